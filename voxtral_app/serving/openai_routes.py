"""OpenAI-compatible routes on the local engine: one GPU box becomes a backend for other front ends.

    GET  /v1/models
    POST /v1/chat/completions      stream or not; text, `input_audio` (base64 WAV) and `audio_url` (data:) parts
    POST /v1/audio/transcriptions  multipart: file, model, language (ISO 639-1), response_format (json | text),
                                   stream (vLLM's transcription.chunk events), max_completion_tokens

Shapes follow OpenAI's API (ids, `choices[].delta.content`, `finish_reason`, `usage`, error bodies
{"error": {"message", "type", "param", "code"}}), so the official `openai` client works unmodified,
and so does this app's own `--backend openai`. Each request opens a Chat on a free slot (the same cap
as every conversation: 429 when full) and closes it when the reply ends or the client goes away.
The server keeps nothing between requests, so a multi-turn request prefills its whole history.

Threads: the routes run on the event loop; everything that blocks (audio decoding, prompt building
and prefill submission, waiting for tokens, closing a chat) runs on this module's own thread pool.
"""

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..audio.pcm import AudioError, decode_file, wav_bytes
from ..backends.contract import (
    CHAT,
    MAX_AUDIO_TURNS,
    EngineBusy,
    EngineFailed,
    Sampling,
)
from ..backends.openai import ISO_639_1
from ..model import prompt as prompts

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 26_214_400  # 25 MB per chat request (guard.py's cap too): 5 min of 16-bit audio is 13 MB in base64
MAX_UPLOAD_BYTES = 26_214_400  # 25 MB per transcription upload, OpenAI's own limit
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 32_000  # per message
MAX_REPLY_TOKENS = 2_048  # max_completion_tokens (or max_tokens) is capped here
MAX_CLIPS = MAX_AUDIO_TURNS  # audio parts per prompt, as vLLM allows for Voxtral
PIECE_TIMEOUT_S = 60.0  # no token for this long: the reply is failed (the engine's watchdog says why)
POLL_S = 0.5  # a waiting pool thread looks up this often (a cancelled reply ends within one decode step)


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


# -- answers --------------------------------------------------------------------------------------------

def usage(reply) -> dict:
    stats = reply.stats
    prompt = len(reply.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": stats["tokens"], "total_tokens": prompt + stats["tokens"],
            "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]}}


def finish_reason(reply, sampling: Sampling, max_tokens: int) -> str:
    tokens = reply.stats["tokens"]
    full = len(reply.prompt_ids) + tokens >= max_tokens - 1  # the conversation's KV cache is full
    return "length" if tokens >= sampling.max_new_tokens or full else "stop"


def next_piece(reply) -> str | None:
    """On a pool thread: the next piece, or raise RuntimeError once PIECE_TIMEOUT_S pass without one."""
    deadline = time.monotonic() + PIECE_TIMEOUT_S
    while True:
        try:
            return reply.next_piece(timeout=POLL_S)
        except queue.Empty:
            if reply.cancelled or time.monotonic() > deadline:
                reply.cancel()
                raise RuntimeError(f"no token for {PIECE_TIMEOUT_S:.0f} s; the generation was stopped") from None


def next_pieces(reply) -> str | None:
    """next_piece, plus whatever else has already arrived: one thread hop and one chunk per batch."""
    piece = next_piece(reply)
    while piece is not None:
        try:
            more = reply.next_piece(timeout=0)
        except queue.Empty:
            break
        if more is None:
            break  # the end stays queued for the next call
        piece += more
    return piece


def failure_event(message: str) -> str:
    """A streamed answer's last event when generation fails part-way: OpenAI's error body."""
    return f"data: {json.dumps(ApiError(500, message, type='server_error').body())}\n\n"


def whole_reply(reply) -> str:
    while next_piece(reply) is not None:
        pass
    return reply.text


def add_openai_routes(app: FastAPI, engine, pool_threads: int | None = None) -> None:
    """Mount /v1/models, /v1/chat/completions and /v1/audio/transcriptions on `app`, served by `engine`."""
    pool = ThreadPoolExecutor(pool_threads or 2 * engine.options.slots + 4, thread_name_prefix="voxtral-openai-api")
    model = engine.options.model
    created = int(time.time())

    async def run(function, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    def open_chat():
        try:
            return engine.open_chat()
        except EngineBusy as error:
            raise ApiError(429, str(error), type="rate_limit_error", code="concurrency_limit_reached") from None
        except EngineFailed as error:
            raise ApiError(503, str(error), type="server_error", code="engine_failed") from None

    def start(chat, request: ChatRequest):
        chat.messages = request.history
        chat.audio_turns = MAX_CLIPS  # every clip sent is heard (parse_chat refused more)
        try:
            return chat.start(request.audio, request.text, request.sampling)
        except EngineFailed as error:
            raise ApiError(503, str(error), type="server_error", code="engine_failed") from None
        except Exception as error:  # noqa: BLE001 - mistral-common refusing a conversation is the client's input
            logger.info("chat request refused: %s", error)
            raise ApiError(400, f"could not build the prompt: {error}", param="messages") from None

    def close(chat) -> None:
        pool.submit(chat.close)  # never awaited: it may run while this task is being cancelled

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "voxtral-realtime"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, MAX_BODY_BYTES)
        parsed = await run(parse_chat, raw, model, engine.options.max_audio_s)
        chat = open_chat()
        try:
            reply = await run(start, chat, parsed)
        except BaseException:
            close(chat)
            raise
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not parsed.stream:
            try:
                text = await run(whole_reply, reply)
            except RuntimeError as error:
                raise ApiError(500, f"generation failed: {error}", type="server_error") from None
            finally:
                close(chat)
            return {"id": ident, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                 "logprobs": None,
                                 "finish_reason": finish_reason(reply, parsed.sampling, engine.options.max_tokens)}],
                    "usage": usage(reply)}

        def chunk(choices: list, **extra) -> str:
            fields = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model,
                      "choices": choices, **({"usage": None} if parsed.include_usage else {}), **extra}
            return f"data: {json.dumps(fields)}\n\n"

        def delta(content: dict, reason: str | None = None) -> list:
            return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}]

        async def events():
            try:
                yield chunk(delta({"role": "assistant", "content": ""}))
                try:
                    async for piece in streamed(reply):
                        yield chunk(delta({"content": piece}))
                except RuntimeError as error:
                    yield failure_event(f"generation failed: {error}")
                    return
                yield chunk(delta({}, finish_reason(reply, parsed.sampling, engine.options.max_tokens)))
                if parsed.include_usage:
                    yield chunk([], usage=usage(reply))
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away (this task is cancelled): stop generating
                reply.cancel()
                close(chat)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        raw = await read_body(request, MAX_UPLOAD_BYTES)

        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except Exception as error:  # noqa: BLE001 - a malformed multipart body
            raise ApiError(400, f"send multipart/form-data with a file ({error})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file is required (multipart/form-data)", param="file")
        check_model(form.get("model"), model)
        language = form.get("language") or None
        if language is not None and (not isinstance(language, str) or language not in ISO_639_1):
            raise ApiError(400, f"Unsupported language: {str(language)[:16]!r}. Send an ISO 639-1 code such as "
                           "'en' or 'fr' (as vLLM does), or none to detect it", param="language")
        response_format = form.get("response_format") or "json"
        if response_format not in ("json", "text"):
            raise ApiError(400, "response_format must be json or text", param="response_format")
        stream = str(form.get("stream", "false")).lower()
        if stream not in ("true", "false"):
            raise ApiError(400, "stream must be true or false", param="stream")
        limit = form.get("max_completion_tokens")
        if limit is not None and (not isinstance(limit, str) or not limit.isdigit() or int(limit) < 1):
            raise ApiError(400, "max_completion_tokens must be a whole number from 1", param="max_completion_tokens")
        tokens = min(int(limit), engine.options.transcript_tokens) if limit else None
        data = await upload.read()
        audio = await run(decode_audio, data, engine.options.max_audio_s, "file")
        chat = open_chat()
        try:
            reply = await run(transcribe, chat, audio, language, tokens)
        except BaseException:
            close(chat)
            raise
        if stream == "true":
            limit = tokens or engine.options.transcript_tokens
            return StreamingResponse(transcription_chunks(reply, chat, limit), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text = await run(whole_reply, reply)
        except RuntimeError as error:
            raise ApiError(500, f"transcription failed: {error}", type="server_error") from None
        finally:
            close(chat)
        if response_format == "text":
            return PlainTextResponse(text)
        stats = reply.stats
        return {"text": text, "usage": {"type": "tokens", "input_tokens": len(reply.prompt_ids),
                                        "output_tokens": stats["tokens"],
                                        "total_tokens": len(reply.prompt_ids) + stats["tokens"]}}

    async def transcription_chunks(reply, chat, limit: int):
        """A streamed transcription as vLLM streams one: `transcription.chunk` deltas, then [DONE].
        `limit`: the transcript's token cap (its finish_reason is "length" when it is reached)."""
        ident, now = f"trsc-{uuid.uuid4().hex}", int(time.time())

        def chunk(content: str, reason: str | None = None) -> str:
            return "data: " + json.dumps({"id": ident, "object": "transcription.chunk", "created": now, "model": model,
                                          "choices": [{"delta": {"content": content}, "finish_reason": reason,
                                                       "stop_reason": None}]}) + "\n\n"

        try:
            try:
                async for piece in streamed(reply):
                    yield chunk(piece)
            except RuntimeError as error:
                yield failure_event(f"transcription failed: {error}")
                return
            yield chunk("", "length" if reply.stats["tokens"] >= limit else "stop")
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: stop transcribing
            reply.cancel()
            close(chat)

    async def streamed(reply):
        """The reply's text pieces as they arrive, empty ones skipped, read on the pool; RuntimeError
        if generation failed or stalled."""
        while (piece := await run(next_pieces, reply)) is not None:
            if piece:
                yield piece

    def transcribe(chat, audio: np.ndarray, language: str | None, tokens: int | None):
        try:
            return chat.transcribe(audio, language, max_tokens=tokens)
        except EngineFailed as error:
            raise ApiError(503, str(error), type="server_error", code="engine_failed") from None
        except Exception as error:  # noqa: BLE001 - e.g. a language mistral-common does not know
            raise ApiError(400, f"could not build the request: {error}", param="language") from None

    app.state.openai_pool = pool
