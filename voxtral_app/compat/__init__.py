"""Third-party internals, in one place: what fastrtc, aiortc, gradio, transformers, torch's dynamo and
mistral-common do not offer as public API, but the app needs. Each module says which versions it
was written for; `check_versions()` compares them with what is installed once, at start-up, so an
upgrade that moves an internal fails there with a message, not mid-conversation.

This package's `__init__` imports nothing third-party: the model layer uses `compat.transformers`
on a GPU machine that has no fastrtc or gradio.
"""

from importlib.metadata import PackageNotFoundError, version

# package -> the versions this layer was written and tested for (the first is requirements.txt's pin;
# transformers 5.17 is what the GPU machine of bench/gpu/ has)
WRITTEN_FOR = {
    "fastrtc": ("0.0.34",),  # compat/fastrtc.py, the page's script in serving/ui.py
    "aiortc": ("1.16.0",),  # compat/fastrtc.py (its jitter buffer)
    "gradio": ("5.50.0",),  # compat/gradio.py, serving/ui.py (fastrtc breaks on gradio 6)
    "transformers": ("5.24.0", "5.17.0"),  # compat/transformers.py
    "mistral-common": ("1.13.1",),  # compat/transformers.py (the Tekken tokenizer inside the processor)
}


def mismatches(packages: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """One line per installed package whose version this layer was not written for."""
    problems = []
    for package, expected in (packages or WRITTEN_FOR).items():
        try:
            found = version(package)
        except PackageNotFoundError:
            found = "none"
        if found not in expected:
            problems.append(f"{package} {found} is installed, but voxtral_app/compat was written for "
                            f"{' or '.join(expected)}: pin {package}=={expected[0]} (requirements.txt) "
                            f"or port voxtral_app/compat to it")
    return problems


def check_versions(packages: dict[str, tuple[str, ...]] | None = None) -> None:
    """RuntimeError naming every mismatch (see `mismatches`)."""
    problems = mismatches(packages)
    if problems:
        raise RuntimeError("; ".join(problems))
