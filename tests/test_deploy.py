"""The deployment files, read as Docker and Hugging Face read them (no registry here, so no image build).

Dockerfile: non-root USER before the entry point, HEALTHCHECK on /health (run here against a real
server), HF_HOME on a VOLUME, the entry point is `python app.py`, only the app's requirements.
.dockerignore: the venv, checkpoints and history stay out; the app's files stay in.
README front matter: a Gradio Space at our pinned gradio, on GPU hardware, preloading only the model files
the app downloads (HUB_FILES).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import httpx
import pytest
import yaml
from conftest import app_options
from servers import BackgroundServer

from voxtral_app.model import checkpoint
from voxtral_app.model.engine import DEFAULT_MODEL
from voxtral_app.serving.app import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_ONLY = {"pytest", "playwright"}
GPU_FLAVORS = {"t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8", "a10g-small", "a10g-large",
               "a10g-largex2", "a10g-largex4", "a100-large", "h100", "h100x8"}  # huggingface_hub's SpaceHardware


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as file:
        return file.read()


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with comments dropped and continuation lines joined."""
    joined, parts = [], []
    for line in dockerfile.splitlines():
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        parts.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            joined.append(" ".join(part for part in parts if part))
            parts = []
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def command(arguments: str) -> list[str]:
    """An exec-form (JSON) or shell-form command as a list of words."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return ["/bin/sh", "-c", arguments]


def env_values(steps) -> dict[str, str]:
    values = {}
    for name, arguments in steps:
        if name == "ENV":
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\[=<>~!; ]", line)[0].lower())
    return names


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path, or a folder above it, decides."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!").strip("/"))
        if any(compiled.match(prefix) for prefix in prefixes):
            result = not negate
    return result


@pytest.fixture(scope="module")
def steps():
    return instructions(read("Dockerfile"))


def test_instructions_parser_reads_continuations_and_exec_form():
    parsed = instructions("# c\nFROM x\nRUN a \\\n    # note\n    && b\nCMD [\"p\", \"app.py\"]\n")
    assert parsed == [("FROM", "x"), ("RUN", "a && b"), ("CMD", '["p", "app.py"]')]
    assert ignored("a/__pycache__/x.pyc", ["**/__pycache__"]) and not ignored("app.py", ["*.pyc", "models"])
    assert ignored(".venv/bin/python", [".venv"]) and not ignored("keep.log", ["*.log", "!keep.log"])


def test_runs_as_a_non_root_user_before_the_entry_point(steps):
    names = [name for name, _ in steps]
    users = [(i, arguments.split(":")[0]) for i, (name, arguments) in enumerate(steps) if name == "USER"]
    assert users, "no USER: the app would run as root"
    last_index, last_user = users[-1]
    assert last_user not in ("root", "0")
    starts = [i for i, name in enumerate(names) if name in ("CMD", "ENTRYPOINT")]
    assert starts and last_index < min(starts)
    assert any(name == "RUN" and re.search(rf"useradd\b.*\b{last_user}\b", arguments) for name, arguments in steps)


def test_entry_point_is_python_app_py_in_exec_form(steps):
    entrypoint = [command(arguments) for name, arguments in steps if name == "ENTRYPOINT"]
    cmd = [command(arguments) for name, arguments in steps if name == "CMD"]
    words = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
    assert words[:2] == ["/venv/bin/python", "app.py"], words  # exec form: signals reach Python as PID 1
    assert os.path.exists(os.path.join(ROOT, "app.py"))
    environment = env_values(steps)
    assert environment.get("HOST") == "0.0.0.0" or "--host" in words, "binds 127.0.0.1 inside the container"


def test_model_cache_is_a_volume_owned_by_the_user(steps):
    hf_home = env_values(steps).get("HF_HOME")
    assert hf_home, "HF_HOME is not set"
    volumes = []
    for name, arguments in steps:
        if name == "VOLUME":
            volumes += json.loads(arguments) if arguments.startswith("[") else arguments.split()
    assert hf_home in volumes
    assert any(name == "RUN" and "chown" in arguments and hf_home in arguments for name, arguments in steps)


def test_installs_only_the_app_requirements(steps):
    runs = " ".join(arguments for name, arguments in steps if name == "RUN")
    assert "-r requirements.txt" in runs and "requirements-dev" not in runs
    assert not requirement_names(read("requirements.txt")) & TEST_ONLY
    dev = read("requirements-dev.txt")
    assert "-r requirements.txt" in dev and TEST_ONLY <= requirement_names(dev)
    for line in (read("requirements.txt") + dev).splitlines():
        line = line.split("#")[0].strip()
        assert not line or line.startswith("-r") or "==" in line, f"not an exact pin: {line}"


def test_system_packages_match_packages_txt(steps):
    packages = read("packages.txt").split()
    assert {"espeak-ng", "libsndfile1"} <= set(packages)
    runs = " ".join(arguments for name, arguments in steps if name == "RUN")
    assert all(re.search(rf"\b{re.escape(package)}\b", runs) for package in packages)


def test_dockerignore_keeps_out_the_heavy_and_private_files():
    patterns = [line.strip() for line in read(".dockerignore").splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "models/voxtral/model.safetensors",
                 ".git/HEAD", "test-output/shot.png", ".whl/torch.whl", ".pytest_cache/v/cache/nodeids",
                 "voxtral_app/__pycache__/engine.cpython-311.pyc"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    needed = [f for f in files if f in ("app.py", "requirements.txt") or f.startswith(("voxtral_app/", "assets/"))]
    assert "voxtral_app/model/engine.py" in needed
    assert [f for f in needed if ignored(f, patterns)] == []


def test_healthcheck_asks_health_and_fails_when_nothing_answers(steps, app_engine):
    checks = [arguments for name, arguments in steps if name == "HEALTHCHECK"]
    assert checks and "CMD" in checks[-1]
    words = command(checks[-1].split("CMD", 1)[1].strip())
    if words[:2] == ["/bin/sh", "-c"]:
        words = shlex.split(words[2])
    assert words[0] == "/venv/bin/python" and words[1] == "-c" and "/health" in words[2]
    probe = [sys.executable, "-c", words[2]]  # the image's command, run here with this interpreter
    server = BackgroundServer(create_app(app_engine, app_options(app_engine)))
    port = server.url.rsplit(":", 1)[1]
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert subprocess.run(probe, env={**os.environ, "PORT": port}, timeout=30).returncode == 0
    finally:
        server.stop()
    assert subprocess.run(probe, env={**os.environ, "PORT": port}, capture_output=True, timeout=30).returncode != 0


def front_matter() -> dict:
    text = read("README.md")
    assert text.startswith("---\n"), "README.md has no front matter: a Space would not know its SDK"
    return yaml.safe_load(text.split("---\n")[1])


def test_readme_front_matter_makes_a_gradio_gpu_space():
    meta = front_matter()
    gradio_pin = re.search(r"^gradio==(\S+)$", read("requirements.txt"), re.M).group(1)
    assert meta["sdk"] == "gradio" and str(meta["sdk_version"]) == gradio_pin
    assert meta["app_file"] == "app.py" and os.path.exists(os.path.join(ROOT, meta["app_file"]))
    assert str(meta["python_version"]) == "3.11"
    assert meta["suggested_hardware"] in GPU_FLAVORS  # not ZeroGPU, not a CPU: see the README


# mistralai/Voxtral-Mini-3B-2507's files on the hub: transformers' shards and configs, and Mistral's own
# params.json and consolidated.safetensors (the same weights again, ~9.4 GB)
VOXTRAL_REPO_FILES = (".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
                      "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                      "model.safetensors.index.json", "params.json", "preprocessor_config.json", "tekken.json")


def test_the_space_preloads_only_the_files_the_app_downloads():
    """preload_from_hub takes `repo file1,file2,...` (the whole repo without a list): the files must be the ones
    HUB_FILES lets snapshot_download fetch, or the Space downloads consolidated.safetensors too (~19 GB)."""
    from huggingface_hub.utils import filter_repo_objects

    (entry,) = front_matter()["preload_from_hub"]
    repo, files = entry.split()
    assert repo == DEFAULT_MODEL and DEFAULT_MODEL in front_matter()["models"]
    wanted = sorted(filter_repo_objects(VOXTRAL_REPO_FILES, allow_patterns=list(checkpoint.HUB_FILES)))
    assert files.split(",") == wanted
    assert "consolidated.safetensors" not in wanted and "tekken.json" in wanted


def test_readme_commands_install_what_they_need():
    readme, ci = read("README.md"), read(".ci/run")
    test_line = next(line for line in readme.splitlines() if "pytest" in line and line.startswith(".venv"))
    assert "pip install -r requirements-dev.txt" in test_line
    assert "-r requirements-dev.txt" in ci and test_line.split("&& ")[-1] in ci
    assert "docker build" in readme and "docker run --gpus all" in readme and "--network host" in readme


def test_the_package_builds_with_its_layers_its_data_and_the_apps_requirements(tmp_path):
    """`pip install .` (and -e .) works: the wheel holds every layer and the model's config file, and
    depends on exactly what requirements.txt pins."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # setuptools builds in the source tree: build a copy
    shutil.copytree(os.path.join(ROOT, "voxtral_app"), source / "voxtral_app",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("voxtral_realtime-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for layer in ("compat", "audio", "backends", "model", "turns", "conversation", "serving"):
        assert f"voxtral_app/{layer}/__init__.py" in names
    assert "voxtral_app/model/voxtral-mini-3b-2507.json" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    required = {line.split(":", 1)[1].strip().split(";")[0].replace(" ", "") for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    pinned = {line.split("#")[0].split(";")[0].strip().replace(" ", "") for line in open(os.path.join(ROOT, "requirements.txt"))
              if line.split("#")[0].strip()}
    assert required == pinned


def test_vllm_runs_a_pinned_image_with_its_audio_extra_and_reports_cached_tokens():
    """The official vLLM image lacks vllm[audio], without which vLLM cannot read input_audio parts."""
    steps = instructions(read("deploy/vllm/Dockerfile"))
    version = next(arguments.split("=", 1)[1] for name, arguments in steps if name == "ARG" and "=" in arguments)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert ("FROM", "vllm/vllm-openai:v${VLLM_VERSION}") in steps
    assert any(name == "RUN" and '"vllm[audio]==${VLLM_VERSION}"' in arguments for name, arguments in steps)
    services = yaml.safe_load(read("deploy/vllm/docker-compose.yml"))["services"]
    assert services["vllm"]["build"] == "." and "image" in services["vllm"]
    assert {"--enable-prefix-caching", "--enable-prompt-tokens-details"} <= set(services["vllm"]["command"])
    assert not any(str(service.get("image", "")).endswith(":latest") for service in services.values())
