"""The GPU kit (bench/gpu/) must work the first time on a machine lent only now and then: every
third-party module that `bench/engine.py` imports at module level, directly or through the package,
is on the GPU machine (bench/gpu/device-packages.txt) or carried as a wheel (bench/gpu/wheels.txt),
and the carried wheels stay within the carry budget. bench/gpu/check-kit.sh proves the same by
running the bench in such a venv; this is the cheap guard that runs on every change."""

import importlib.metadata
import os
import re
import sys
import zlib

from source_imports import imports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "voxtral_app"
KIT = os.path.join(ROOT, "bench", "gpu")
BUDGET_BYTES = 48 * 1024 * 1024  # wheels.sh's budget for .whl/, inside the 64 MiB a device call carries


def names_in(path: str) -> set[str]:
    """Distribution names listed in a kit file (`name==version` or `name`), normalised as pip does."""
    with open(path) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {normalise(re.split(r"[=<>~!\[ ]", line)[0]) for line in lines if line}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def module_file(module: str) -> str | None:
    """The package's own source file for a dotted module name (a subpackage's __init__.py), else None."""
    base = os.path.join(ROOT, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def third_party_reached(entry: str) -> dict[str, str]:
    """{top-level third-party module: the package file that imports it}, following the package's own
    modules (and the __init__ of every package on the way) from the entry script."""
    third: dict[str, str] = {}
    seen: set[str] = set()
    queue = [(entry, "__main__")]
    while queue:
        path, module = queue.pop()
        for name, _ in imports(path, module, lambda name: module_file(name) is not None, at_import=True):
            top = name.split(".")[0]
            if top == PACKAGE:
                parts = name.split(".")
                for k in range(1, len(parts) + 1):
                    dotted = ".".join(parts[:k])
                    source = module_file(dotted)
                    if source and dotted not in seen:
                        seen.add(dotted)
                        queue.append((source, dotted))
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.setdefault(top, os.path.relpath(path, ROOT))
    return third


def missing_on_device(entry: str) -> list[str]:
    """'module (imported by file)' for each third-party module the kit would not have there."""
    have = names_in(os.path.join(KIT, "device-packages.txt")) | names_in(os.path.join(KIT, "wheels.txt"))
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, importer in sorted(third_party_reached(entry).items()):
        provided_by = {normalise(d) for d in distributions.get(module, [module])}
        if not provided_by & have:
            missing.append(f"{module} (imported by {importer}; distribution {'/'.join(sorted(provided_by))})")
    return missing


def test_every_module_the_engine_bench_imports_is_on_the_gpu_machine_or_carried():
    reached = third_party_reached(os.path.join(ROOT, "bench", "engine.py"))
    assert {"torch", "numpy", "mistral_common"} <= set(reached)  # the walk does reach through the package
    assert missing_on_device(os.path.join(ROOT, "bench", "engine.py")) == []


def test_a_module_level_import_of_something_absent_there_is_caught(tmp_path):
    script = tmp_path / "bench_script.py"
    script.write_text("import numpy\nfrom voxtral_app.model import checkpoint\nimport prometheus_client\n\n"
                      "def later():\n    import gradio  # only when called: not needed at import\n")
    missing = missing_on_device(str(script))
    assert len(missing) == 1 and missing[0].startswith("prometheus_client (imported by ")


def test_the_carried_wheels_fit_the_budget():
    """A wheel is a zip of the files it installs: each wheels.txt distribution's installed files,
    deflated as a wheel's are, estimate what .whl/ will carry (the one check short of downloading)."""
    total = 0
    for name in names_in(os.path.join(KIT, "wheels.txt")):
        for file in importlib.metadata.distribution(name).files or []:
            path = file.locate()
            if os.path.isfile(path) and "__pycache__" not in str(file):  # .pyc files are made on install
                total += len(zlib.compress(open(path, "rb").read(), 6))
    assert 1 << 20 < total < BUDGET_BYTES, f"{total / 2**20:.1f} MiB deflated for wheels.txt"
