"""The package's layers hold: no import cycle, no import from a layer to one listed after it, the web
stack (fastrtc, aiortc, gradio) only in serving, compat and the client, and a conversation core that
knows nothing of presentation. Read from the source (ast), so a new import that breaks a rule fails
here, naming the file."""

import os
import re

import pytest
from source_imports import imports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "voxtral_app"
# Lowest first: a layer may import itself and the layers before it. The top-level shims keep the
# embedding paths the README documented first (voxtral_app.server, .engine, .loading).
LAYERS = ("compat", "audio", "backends", "model", "turns", "conversation", "serving", "client", "cli", "shims")
SHIMS = ("server", "engine", "loading")
WEB_STACK = ("fastrtc", "aiortc", "gradio")
WEB_LAYERS = ("compat", "serving", "client")
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B50\uFE0F]")


def modules(root: str) -> dict[str, str]:
    """dotted module name -> file, for every .py file of the package under `root`."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return "shims" if parts[1] in SHIMS else parts[1]


def problems(root: str) -> list[str]:
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    found = []
    for module, path in known.items():
        where = os.path.relpath(path, root)
        layer = layer_of(module)
        for name, line in imports(path, module, known.__contains__):
            top = name.split(".")[0]
            if top in WEB_STACK and layer not in WEB_LAYERS:
                found.append(f"{where}:{line} imports {top}: only {', '.join(WEB_LAYERS)} may")
            if top != PACKAGE:
                continue
            target = next((name[:len(m)] for m in sorted(known, key=len, reverse=True)
                           if name == m or name.startswith(m + ".")), name)
            if target == module or target not in known:
                continue
            graph[module].add(target)
            other = layer_of(target)
            if layer == "package" or other == "package":
                found.append(f"{where}:{line} imports {target}: the package's __init__ imports and is imported by nothing")
            elif layer != other and LAYERS.index(other) > LAYERS.index(layer):
                found.append(f"{where}:{line} imports {target}: {layer} may not import {other}, a layer above it")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return groups


def test_the_package_has_no_cycle_and_no_import_upward():
    assert problems(ROOT) == []


def test_every_subpackage_is_a_layer():
    folders = {name for name in os.listdir(os.path.join(ROOT, PACKAGE))
               if os.path.isfile(os.path.join(ROOT, PACKAGE, name, "__init__.py"))}
    assert folders == set(LAYERS) - {"client", "cli", "shims"}


def test_the_conversation_core_knows_nothing_of_presentation():
    for module, path in modules(ROOT).items():
        if layer_of(module) in ("conversation", "turns", "backends", "model", "audio"):
            source = open(path, encoding="utf-8").read()
            assert not EMOJI.search(source), f"{path}: emoji belong to a surface (serving/)"
            if layer_of(module) == "conversation":  # chat-message markup is the page's (serving/chat_view.py)
                assert "metadata" not in source and "gradio" not in source.lower(), path


@pytest.mark.parametrize("module, source, says", [
    ("audio/pcm.py", "from ..serving import metrics\n", "audio may not import serving"),
    ("turns/taker.py", "def later():\n    import gradio\n", "imports gradio"),
    ("model/engine.py", "from .chat import Chat\n", "import cycle"),
])
def test_the_check_catches_what_it_forbids(tmp_path, module, source, says):
    """A small package laid out like ours, with one bad import added."""
    files = {"__init__.py": "", "audio/__init__.py": "", "audio/pcm.py": "", "serving/__init__.py": "",
             "serving/metrics.py": "", "turns/__init__.py": "", "turns/taker.py": "",
             "model/__init__.py": "", "model/engine.py": "", "model/chat.py": "from .engine import x\n"}
    files[module] = files[module] + source
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = problems(str(tmp_path))
    assert len(found) == 1 and says in found[0], found
