"""The one place that touches gradio's private parts.

Written for gradio 5.50 (compat.WRITTEN_FOR, checked at import). Three gaps of a page mounted with
`gr.mount_gradio_app` on a public server are closed here, for every event of the page at once:

- gradio checks that an event's input files were uploaded only once `blocks.has_launched` is set,
  which a mounted app never sets: any path on the server's disk was read as an "upload".
  `guard_input_files` routes every input file through the app's own check instead.
- its queue takes any number of events from one address (`bound_queue`).
- gr.Audio decodes an upload whole (pydub), whatever its length and channels (`check_audio_files`).
- its Starlette app runs with `debug=True`: a crash in a route answers with a traceback
  (`quiet_errors`).

And two `print` calls left in gradio/routes.py write to stdout outside logging: `print("content_type",
...)` each time the component server is called (fastrtc's WebRTC component calls it for every
connection's ICE servers and offer: ~80 lines in one session) and `print("new", path)` once in
mount_gradio_app (`quiet_debug_prints`).
"""

import builtins
import contextvars
import logging
from collections.abc import Callable

import gradio.routes
from gradio import processing_utils
from gradio.exceptions import Error, InvalidPathError

from . import WRITTEN_FOR, check_versions

logger = logging.getLogger(__name__)

check_versions({"gradio": WRITTEN_FOR["gradio"]})

# (session_hash, client address, id(blocks)) of the event being processed: process_api sets it, the file
# check reads it
_event: contextvars.ContextVar[tuple[str, str, int] | None] = contextvars.ContextVar("voxtral_event", default=None)
_checks: dict[int, Callable[[str, str, str], bool]] = {}  # id(blocks) -> its input file check
_original_check = processing_utils._check_allowed


def _check_allowed(path, check_in_upload_folder: bool) -> None:
    """gradio's check, with the app's for input files (check_in_upload_folder: an event's inputs)."""
    event = _event.get()
    if check_in_upload_folder and _checks:  # an event's input, with the app's check installed
        if event is None or event[2] not in _checks or not _checks[event[2]](str(path), event[0], event[1]):
            # one message whether or not the file exists: no oracle for the server's disk
            raise InvalidPathError("This file was not uploaded by this page.")
        return
    _original_check(path, check_in_upload_folder)


processing_utils._check_allowed = _check_allowed


def event_address() -> str | None:
    """The client address of the page event running in this context (gradio copies the context into
    the worker thread of a sync event function); None outside one."""
    event = _event.get()
    return event[1] if event is not None else None


def event_session() -> str | None:
    """The page session (gradio's session_hash) of the page event running in this context; None
    outside one."""
    event = _event.get()
    return event[0] if event is not None and event[0] else None


def guard_input_files(blocks, allowed: Callable[[str, str, str], bool],
                      on_unload: Callable[[str], None] | None = None) -> None:
    """Accept an input file of one of `blocks`' events only if `allowed(path, session_hash, address)`;
    `on_unload(session_hash)` runs after the page's unload events (the page closed)."""
    _checks[id(blocks)] = allowed
    process_api = blocks.process_api

    async def checked_process_api(*args, **kwargs):
        session = kwargs.get("session_hash") or ""
        request = kwargs.get("request")
        if isinstance(request, list):  # a batch
            request = request[0] if request else None
        client = getattr(getattr(request, "request", None), "client", None) or getattr(request, "client", None)
        address = getattr(client, "host", "") or ""
        token = _event.set((session, address, id(blocks)))
        try:
            return await process_api(*args, **kwargs)
        finally:
            _event.reset(token)
            block_fn = kwargs.get("block_fn")
            if on_unload is not None and session and any(t[1] == "unload" for t in getattr(block_fn, "targets", ())):
                on_unload(session)

    blocks.process_api = checked_process_api


def check_audio_files(check: Callable[[str], object]) -> None:
    """Run `check(path)` (raising ValueError to refuse, with a message for the person) on every audio
    file before gr.Audio decodes it."""
    decode = processing_utils.audio_from_file
    if getattr(decode, "checked", False):
        return

    def checked_audio_from_file(filename: str, *args, **kwargs):
        try:
            check(filename)
        except ValueError as error:  # gradio shows an Error's message to the person (others: "Error")
            raise Error(str(error)) from None
        return decode(filename, *args, **kwargs)

    checked_audio_from_file.checked = True
    processing_utils.audio_from_file = checked_audio_from_file


def bound_queue(blocks, per_address: int, exempt: Callable[[str], bool] = lambda address: False) -> None:
    """At most `per_address` pending events per client address (but those `exempt`) in the page's
    queue (gradio answers the rest 503 "queue_full"). Owned by the event loop, as gradio's queue is."""
    queue = blocks._queue
    push = queue.push
    pending: dict[str, list[tuple[str, str]]] = {}  # address -> [(session_hash, event_id)]

    async def bounded_push(body, request, username):
        address = getattr(request.client, "host", "") if request.client else ""
        if exempt(address):
            return await push(body, request, username)
        live = [(s, e) for s, e in pending.get(address, []) if e in queue.pending_event_ids_session.get(s, ())]
        if len(live) >= per_address:
            pending[address] = live
            return False, f"Too many events from your address (over {per_address} at once).", "queue_full"
        accepted, event_id, status = await push(body, request, username)
        if accepted:
            live.append((queue.event_ids_to_events[event_id].session_hash, event_id))
        if live:
            pending[address] = live
        else:
            pending.pop(address, None)
        return accepted, event_id, status

    queue.push = bounded_push


def quiet_errors(app) -> None:
    """Turn off the debug tracebacks of the Starlette app `gr.mount_gradio_app` mounted on `app`, and
    answer 400 where gradio's upload route crashes on a malformed multipart body (a form field where a
    file should be raises TypeError there)."""
    from starlette.responses import JSONResponse

    async def malformed_upload(request, error):
        if not request.url.path.endswith("/upload"):
            raise error  # a real crash: a plain 500, now without the traceback
        return JSONResponse({"status": "failed", "meta": {"error": "bad_upload"},
                             "message": "Malformed upload: send multipart/form-data with files."}, status_code=400)

    for route in app.routes:
        inner = getattr(route, "app", None)
        if inner is not None and type(inner).__module__.startswith("gradio") and hasattr(inner, "debug"):
            inner.debug = False  # Starlette builds its middleware (ServerErrorMiddleware) on the first request
            for kind in (TypeError, ValueError, KeyError):
                inner.add_exception_handler(kind, malformed_upload)


STRAY = ("content_type", "new")  # the first argument of each debug print in gradio/routes.py


def _print(*args, **kwargs) -> None:
    if len(args) == 2 and args[0] in STRAY:
        return
    builtins.print(*args, **kwargs)


def quiet_debug_prints() -> None:
    """Drop those two prints. A module global `print` shadows the builtin in gradio.routes only: its
    other prints (a monitoring URL, a failed file clean-up) and every other module are untouched."""
    gradio.routes.print = _print
