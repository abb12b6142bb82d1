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
import json
import logging
import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from ..backends.contract import (
    EngineBusy,
    EngineFailed,
    Sampling,
)
from ..backends.openai import ISO_639_1
from .openai_requests import (
    MAX_BODY_BYTES,
    MAX_CLIPS,
    MAX_UPLOAD_BYTES,
    ApiError,
    ChatRequest,
    check_model,
    decode_audio,
    parse_chat,
    read_body,
)

logger = logging.getLogger(__name__)

PIECE_TIMEOUT_S = 60.0  # no token for this long: the reply is failed (the engine's watchdog says why)
POLL_S = 0.5  # a waiting pool thread looks up this often (a cancelled reply ends within one decode step)


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
