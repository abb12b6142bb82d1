"""What every route says when it refuses: one failure body (fastrtc's: clients read `status` and
`meta.error`) and one wording for a full server, whichever way the person came in."""

from fastapi.responses import JSONResponse


def failed(status: int, error: str, message: str, **meta) -> JSONResponse:
    """fastrtc's failure body, with a human message."""
    return JSONResponse(status_code=status, content={"status": "failed", "meta": {"error": error, **meta},
                                                     "message": message})


def busy_message(slots: int) -> str:
    return f"All {slots} conversations are in use; please try again in a minute."


def busy(slots: int) -> JSONResponse:
    """429: every conversation slot is taken."""
    return failed(429, "concurrency_limit_reached", busy_message(slots), limit=slots)


def busy_event(slots: int) -> dict:
    """The same refusal as a WebSocket event (fastrtc's error event)."""
    return {"event": "error", "status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": slots},
            "message": busy_message(slots)}
