"""gradio's stray debug prints, silenced in one place.

Written for gradio 5.50.0 (compat.WRITTEN_FOR, checked at import). Two `print` calls left in
gradio/routes.py write to stdout outside logging: `print("content_type", ...)` each time the
component server is called (fastrtc's WebRTC component calls it for every connection's ICE servers
and offer: ~80 lines in one session) and `print("new", path)` once in mount_gradio_app.
"""

import builtins

import gradio.routes

from . import WRITTEN_FOR, check_versions

check_versions({"gradio": WRITTEN_FOR["gradio"]})

STRAY = ("content_type", "new")  # the first argument of each debug print in gradio/routes.py


def _print(*args, **kwargs) -> None:
    if len(args) == 2 and args[0] in STRAY:
        return
    builtins.print(*args, **kwargs)


def quiet_debug_prints() -> None:
    """Drop those two prints. A module global `print` shadows the builtin in gradio.routes only: its
    other prints (a monitoring URL, a failed file clean-up) and every other module are untouched."""
    gradio.routes.print = _print
