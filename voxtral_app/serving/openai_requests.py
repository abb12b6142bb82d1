"""What the OpenAI-compatible routes (openai_routes.py) accept: each request checked against OpenAI's
and vLLM's rules and limits, its audio decoded within bounds, and refusals in OpenAI's error shape."""

import base64
import binascii
import io
import json
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from ..audio.pcm import AudioError, decode_file, wav_bytes
from ..backends.contract import CHAT, MAX_AUDIO_TURNS, Sampling
from ..model import prompt as prompts

MAX_BODY_BYTES = 26_214_400  # 25 MB per chat request (guard.py's cap too): 5 min of 16-bit audio is 13 MB in base64
MAX_UPLOAD_BYTES = 26_214_400  # 25 MB per transcription upload, OpenAI's own limit
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 32_000  # per message
MAX_REPLY_TOKENS = 2_048  # max_completion_tokens (or max_tokens) is capped here
MAX_CLIPS = MAX_AUDIO_TURNS  # audio parts per prompt, as vLLM allows for Voxtral


class ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class ChatRequest:
    history: list[dict]  # earlier messages in the transformers chat format (session.Chat.messages)
    audio: np.ndarray | None  # the last user turn's audio, 16 kHz float32
    text: str
    sampling: Sampling
    stream: bool
    include_usage: bool


# -- request parsing (on the pool: audio decoding is CPU work) -----------------------------------------

def decode_audio(data: bytes, max_audio_s: float, param: str) -> np.ndarray:
    """Refused from the file's header when too long or too wide, then decoded in blocks (pcm.decode_file):
    a small compressed file can hold hours of many-channel silence."""
    try:
        return decode_file(io.BytesIO(data), max_audio_s)
    except AudioError as error:
        raise ApiError(400, f"{error}; send WAV, FLAC or OGG", param=param) from None
    except Exception as error:  # noqa: BLE001 - libsndfile's errors are all "cannot read this"
        raise ApiError(400, f"could not read the audio ({error}); send WAV, FLAC or OGG", param=param) from None


def audio_part(part: dict, max_audio_s: float, param: str) -> np.ndarray:
    if part["type"] == "input_audio":
        given = part.get("input_audio")
        data = given.get("data") if isinstance(given, dict) else None
    else:  # audio_url with a data: URL (vLLM's other spelling); fetching URLs is not offered
        given = part.get("audio_url")
        url = given.get("url") if isinstance(given, dict) else None
        data = url.split(",", 1)[1] if isinstance(url, str) and url.startswith("data:") and "," in url else None
    if not isinstance(data, str):
        raise ApiError(400, "an audio part needs base64 data (input_audio.data, or a data: URL)", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the audio is not valid base64", param=param) from None
    return decode_audio(raw, max_audio_s, param)


def parse_message(message, index: int, max_audio_s: float) -> tuple[str, list]:
    """An OpenAI message -> (role, [str | audio array, ...]) in order."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, "each message needs a role: system, user or assistant", param=param)
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ApiError(400, "content must be a string or a non-empty list of parts", param=f"{param}.content")
    parts = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if len(part["text"]) > MAX_TEXT_CHARS:
                raise ApiError(400, f"a text part is over {MAX_TEXT_CHARS} characters", param=where)
            parts.append(part["text"])
        elif kind in ("input_audio", "audio_url") and message["role"] == "user":
            parts.append(audio_part(part, max_audio_s, where))
        else:
            raise ApiError(400, "parts are {'type': 'text', 'text': ...} or, in user messages, {'type': "
                           "'input_audio', 'input_audio': {'data': <base64 WAV>, 'format': 'wav'}}", param=where)
    role = "system" if message["role"] == "developer" else message["role"]
    return role, parts


def to_chat_format(role: str, parts: list) -> dict:
    """(role, parts) -> a message as session.Chat keeps it (transformers' chat format)."""
    if role == "assistant":
        return prompts.assistant_message("".join(parts).strip())  # as the engine keeps its own replies
    if role == "system":
        return {"role": "system", "content": "".join(parts)}
    content = [{"type": "text", "text": p} if isinstance(p, str) else
               {"type": "audio", "base64": base64.b64encode(wav_bytes(p)).decode()} for p in parts]
    return {"role": "user", "content": content}


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low} to {high}", param=name)
    return float(value)


def parse_chat(raw: bytes, model: str, max_audio_s: float) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    check_model(body.get("model"), model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise ApiError(400, f"messages must be a list of 1-{MAX_MESSAGES} messages", param="messages")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = body.get(name)  # max_tokens is OpenAI's deprecated spelling; vLLM prefers the other too
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ApiError(400, f"{name} must be a whole number from 1", param=name)
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "stream must be true or false, stream_options an object", param="stream")
    audio_parts = sum(isinstance(part, dict) and part.get("type") in ("input_audio", "audio_url") for m in messages
                      if isinstance(m, dict) and isinstance(m.get("content"), list) for part in m["content"])
    if audio_parts > MAX_CLIPS:  # vLLM's answer, word for word, so a client built against this server works against vLLM
        raise ApiError(400, f"At most {MAX_CLIPS} audio(s) may be provided in one prompt.", type="BadRequestError",
                       code=400)
    parsed = [parse_message(m, i, max_audio_s) for i, m in enumerate(messages)]
    role, last = parsed[-1]
    if role != "user":
        raise ApiError(400, "the last message must be the user's", param=f"messages[{len(messages) - 1}]")
    clips = [p for p in last if not isinstance(p, str)]
    if len(clips) > 1:
        raise ApiError(400, "the last user message can carry one audio part", param=f"messages[{len(messages) - 1}]")
    text = "\n".join(p for p in last if isinstance(p, str)).strip()
    if not clips and not text:
        raise ApiError(400, "the last user message is empty", param=f"messages[{len(messages) - 1}]")
    sampling = Sampling(temperature=number(body, "temperature", CHAT.temperature, 0.0, 2.0),
                        top_p=number(body, "top_p", CHAT.top_p, 1e-6, 1.0),
                        max_new_tokens=min(limit or CHAT.max_new_tokens, MAX_REPLY_TOKENS))
    return ChatRequest([to_chat_format(r, p) for r, p in parsed[:-1]], clips[0] if clips else None, text,
                       sampling, stream, bool(options.get("include_usage")))


def check_model(given, model: str) -> None:
    if not isinstance(given, str) or not given:
        raise ApiError(400, "model is required", param="model")
    if given != model:
        raise ApiError(404, f"The model `{given}` does not exist. This server serves `{model}`.", param="model",
                       code="model_not_found")


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 past `cap` bytes (whatever Content-Length claims)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"the request body is over the {cap}-byte limit of this route", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, f"the request body is over the {cap}-byte limit of this route", code="body_too_large")
    return bytes(body)
