"""Generation on an OpenAI-compatible server: vLLM serving Voxtral, or another copy of this app.

`OpenAIBackend` stands where the local `Engine` stands (contract.py): `open_chat()`
gives a `RemoteChat` (remote_chat.py) that keeps the conversation's messages itself and streams each reply from
`POST /v1/chat/completions` (the user's audio as an `input_audio` part, a base64 WAV; earlier turns
as messages, at most `audio_turns` of them as audio and older ones as their transcripts: vLLM takes
at most 5 clips a prompt) or, in transcribe mode, a streamed `POST /v1/audio/transcriptions`. The
server keeps no state between requests; its prefix cache (vLLM's --enable-prefix-caching) spares
the history's prefill only while the history's start is unchanged.

Threads: the backend owns ONE asyncio loop on its own thread ("voxtral-openai"); every request
runs there through one AsyncOpenAI client on one httpx connection pool. A RemoteChat belongs to the
thread that drives it (a Conversation's worker); a RemoteReply's pieces cross from the loop thread
on a queue.SimpleQueue, and its end is a threading.Event. `slots`, `in_flight` and the error counts
are guarded by `lock`. A server that is down or slow fails the reply with a message for the user
(connect and read timeouts: never a hang); /health reads a reachability check made in the background.
"""

import asyncio
import base64
import collections
import json
import logging
import threading
import urllib.parse
from concurrent.futures import Future
from dataclasses import dataclass, replace

import httpx
import numpy as np
import openai

from .contract import (
    MAX_AUDIO_TURNS,
    EngineBusy,
    EngineFailed,
    Sampling,
)
from .remote_chat import RemoteChat, RemoteReply, wav_base64

logger = logging.getLogger(__name__)

ASIDE_TRIES = 6  # a background transcript refused as busy (429) is asked for this often (0.5 s, 1 s, ... apart)
CONVERSATION_HEADER = "X-Voxtral-Conversation"  # deploy/vllm/nginx.conf pins a conversation to a replica by it
# ISO 639-1: the language codes vLLM's transcription endpoint takes (it refuses "en-us")
ISO_639_1 = frozenset("""aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy
da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io
is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na
nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss
st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split())


@dataclass(frozen=True)
class RemoteOptions:
    url: str  # the server's OpenAI base URL: http://vllm:8000/v1 (a bare http://host:port gets /v1)
    api_key: str = ""  # sent as a bearer token; vLLM checks it when started with --api-key
    model: str = ""  # the served model id; "": the first one GET /v1/models lists
    slots: int = 8  # conversations at once (the server batches; this caps what one front end sends)
    max_audio_s: float = 300.0  # per-turn audio cap, 5 min
    history_audio_s: float = 480.0  # audio a conversation's request carries; older turns are dropped (480 s of
    # 16-bit WAV is 20 MB in base64: under the 25 MB request cap of this app's /v1 and of most proxies)
    connect_timeout_s: float = 5.0  # TCP/TLS connect, and the start-up and health checks
    read_timeout_s: float = 30.0  # longest wait for the first token (prefill) or between two tokens
    check_interval_s: float = 10.0  # /health's reachability answer is at most this old
    max_connections: int = 64  # the httpx pool
    audio_turns: int = 3  # spoken turns a request keeps as audio; older ones go as their transcripts (vLLM
    # refuses more than MAX_AUDIO_TURNS clips in one prompt)
    transcript_tokens: int = 1024  # longest transcript asked of the server (max_completion_tokens)
    age_wait_s: float = 5.0  # at a turn's start, how long an old spoken turn's transcript is waited for


class BackendUnavailable(RuntimeError):
    """The server at --backend-url does not answer like an OpenAI-compatible server."""


def iso_639_1(language: str | None) -> str | None:
    """A language setting ("en", "en-US", "fr_FR") -> the ISO 639-1 code vLLM takes, or None (detect it)."""
    code = (language or "").strip().lower().replace("_", "-").split("-")[0]
    return code if code in ISO_639_1 else None


def base_url(text: str) -> str:
    """An OpenAI-compatible server's base URL: http(s)://host[:port][/path]; a bare host gets /v1.
    ValueError saying what is expected."""
    parts = urllib.parse.urlsplit(text.strip())
    expected = f"expected an http(s) URL such as http://vllm:8000/v1, got {text!r}"
    try:
        parts.port  # noqa: B018 - raises for a port that is not one
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") or "/v1", "", ""))


def explain(error: BaseException, url: str, read_timeout_s: float) -> tuple[str, str]:
    """An openai/httpx error -> (metric kind, a message for the person in the chat)."""
    if isinstance(error, (openai.APITimeoutError, httpx.TimeoutException)):
        return "backend_unavailable", f"the generation server at {url} did not answer within {read_timeout_s:.0f} s"
    if isinstance(error, openai.APIConnectionError):
        return "backend_unavailable", (f"the generation server at {url} cannot be reached "
                                       f"({error.__cause__ or error}); try again in a moment")
    if isinstance(error, httpx.TransportError):  # mid-stream: the connection broke
        return "backend_unavailable", f"the generation server at {url} went away mid-reply ({error})"
    if isinstance(error, openai.APIStatusError):
        if "may be provided in one prompt" in str(error.message):
            return "backend_error", (f"the generation server refused the turn: it takes at most {MAX_AUDIO_TURNS} "
                                     f"audio clips in one prompt (vLLM's limit for Voxtral); lower --audio-turns "
                                     f"({error.status_code}: {error.message})")
        if error.status_code == 429 or error.status_code >= 500:
            return "backend_unavailable", (f"the generation server at {url} is busy or failing "
                                           f"({error.status_code}: {error.message})")
        return "backend_error", f"the generation server refused the turn ({error.status_code}: {error.message})"
    return "backend_error", f"the generation server's answer could not be read ({type(error).__name__}: {error})"


class OpenAIBackend:
    """A generation backend on an OpenAI-compatible server (contract.py); thread-safe."""

    def __init__(self, options: RemoteOptions):
        self.url = base_url(options.url)
        self.options = options
        self.device_kind = "remote"  # the contract's view of where generation runs (contract.Backend)
        self.device_name = self.url
        self.compiled = False
        self.failure: BaseException | None = None  # never set: a remote failure fails turns, not the process
        self.ready = threading.Event()  # set once the server has answered
        self.lock = threading.Lock()
        self.open_chats = 0
        self.away = 0  # open chats kept for a resume (leave): they do not count against `slots`
        self.streams = 0  # requests in flight
        self.errors: collections.Counter = collections.Counter()  # kind -> count (errors_total{kind})
        self.reachable: bool | None = None  # the last background check's answer
        self.problem = ""  # why the last check failed
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="voxtral-openai", daemon=True)
        self.thread.start()
        self.client: openai.AsyncOpenAI = self.call(self.make_client(), timeout=10)
        self.streams_transcripts = True  # until the server refuses a streamed transcription (loop-owned)
        self.checker: asyncio.Task | None = None

    async def make_client(self) -> openai.AsyncOpenAI:
        o = self.options
        timeout = httpx.Timeout(o.read_timeout_s, connect=o.connect_timeout_s, pool=o.connect_timeout_s)
        http = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=o.max_connections,
                                                                      max_keepalive_connections=o.max_connections))
        return openai.AsyncOpenAI(base_url=self.url, api_key=o.api_key or "none", http_client=http, timeout=timeout,
                                  max_retries=0)  # a retry would only make the person wait longer

    # -- start-up and health --------------------------------------------------------------------

    def connect(self) -> "OpenAIBackend":
        """Ask GET /v1/models (within the connect timeout), pick the model, start the background
        health check. BackendUnavailable says what went wrong."""
        try:
            models = self.call(self.list_models(), timeout=self.options.connect_timeout_s * 2 + 1)
        except Exception as error:  # noqa: BLE001 - any failure means: not a server we can use
            reason = error.__cause__ or error if isinstance(error, openai.APIConnectionError) else error
            raise BackendUnavailable(f"no OpenAI-compatible server answers GET {self.url}/models "
                                     f"({type(reason).__name__}: {reason})") from error
        if not models:
            raise BackendUnavailable(f"the server at {self.url} serves no models")
        if self.options.model and self.options.model not in models:
            raise BackendUnavailable(f"the server at {self.url} does not serve {self.options.model!r} "
                                     f"(it serves {', '.join(models)})")
        self.options = replace(self.options, model=self.options.model or models[0])
        self.reachable = True
        self.ready.set()
        self.checker = self.call(self.start_checks(), timeout=10)
        logger.info("generating on %s (model %s)", self.url, self.options.model)
        return self

    async def list_models(self) -> list[str]:
        page = await self.client.with_options(timeout=self.options.connect_timeout_s).models.list()
        return [model.id for model in page.data]

    async def start_checks(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self.check_forever())

    async def check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.check_interval_s)
            try:
                await self.list_models()
                self.reachable, self.problem = True, ""
            except Exception as error:  # noqa: BLE001 - reported on /health
                self.reachable = False
                self.problem = explain(error, self.url, self.options.connect_timeout_s)[1]

    def describe(self) -> dict:
        """For /health: which backend, and whether it answered its last check."""
        with self.lock:
            errors = dict(self.errors)
        body = {"kind": "openai", "url": self.url, "model": self.options.model, "reachable": bool(self.reachable),
                "streams": self.in_flight, "errors_total": errors}
        if self.problem:
            body["error"] = self.problem
        return body

    @property
    def healthy(self) -> bool:
        return self.thread.is_alive() and self.reachable is not False

    @property
    def stuck(self) -> bool:
        return False  # a slow server fails its turns by the read timeout

    # -- conversations --------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Accelerator memory held here: none, the model runs elsewhere."""
        return 0

    def listen(self, listener) -> None:
        """The engine's step timings (Engine.listen): no model steps run here, so nothing is ever told."""

    def open_chat(self) -> RemoteChat:
        with self.lock:
            if not self.thread.is_alive():
                raise EngineFailed("the backend's network thread has stopped; the app needs a restart")
            if self.open_chats - self.away >= self.options.slots:
                raise EngineBusy(f"all {self.options.slots} conversation slots are in use; try again shortly")
            self.open_chats += 1
        return RemoteChat(self)

    def release(self, chat: RemoteChat) -> None:
        with self.lock:
            self.open_chats -= 1
            if chat.away:
                chat.away = False
                self.away -= 1

    def leave(self, chat) -> None:
        """A conversation kept for a resume stops counting against `slots` (contract.Backend.leave)."""
        with self.lock:
            if not chat.away:
                chat.away = True
                self.away += 1

    def come_back(self, chat) -> None:
        with self.lock:
            if not chat.away:
                return
            if self.open_chats - self.away >= self.options.slots:
                raise EngineBusy(f"all {self.options.slots} conversation slots are in use; try again shortly")
            chat.away = False
            self.away -= 1

    @property
    def free_slots(self) -> list[int]:
        with self.lock:
            return list(range(self.options.slots - self.open_chats + self.away))

    @property
    def active_chats(self) -> int:
        with self.lock:
            return self.open_chats - self.away

    @property
    def kept_conversations(self) -> int:
        with self.lock:
            return self.away

    @property
    def in_flight(self) -> int:
        with self.lock:
            return self.streams

    def close(self) -> None:
        if self.loop.is_closed() or not self.thread.is_alive():
            return
        try:
            self.call(self.shutdown(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    async def shutdown(self) -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()
        await self.loop.shutdown_asyncgens()

    # -- the loop thread ------------------------------------------------------------------------

    def call(self, coroutine, timeout: float):
        """Run a coroutine on the backend's loop and wait for its result (not from the loop itself)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def on_loop(self, callback) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(callback)

    def submit(self, reply: RemoteReply, coroutine) -> RemoteReply:
        """Start streaming `reply` on the loop; it ends (pieces end with None) whatever happens."""
        with self.lock:
            self.streams += 1

        def begin() -> None:
            reply.task = self.loop.create_task(coroutine)
            reply.task.add_done_callback(reply.end)  # also when cancelled before it ran
            if reply.cancelled:
                reply.task.cancel()

        if self.loop.is_closed():
            coroutine.close()
            reply.error = "the backend is closed"
            reply.end()
        else:
            self.loop.call_soon_threadsafe(begin)
        return reply

    def stream_ended(self) -> None:
        with self.lock:
            self.streams -= 1

    def failed(self, reply: RemoteReply, error: BaseException) -> None:
        kind, message = explain(error, self.url, self.options.read_timeout_s)
        if reply.cancelled:
            return
        with self.lock:
            self.errors[kind] += 1
        logger.warning("turn failed on %s: %s", self.url, message)
        reply.error = message

    async def stream_chat(self, reply: RemoteReply, messages: list[dict], sampling: Sampling, chat_id: str) -> None:
        try:
            stream = await self.client.chat.completions.create(
                model=self.options.model, messages=messages, stream=True, stream_options={"include_usage": True},
                temperature=sampling.temperature, top_p=sampling.top_p, max_completion_tokens=sampling.max_new_tokens,
                extra_headers={CONVERSATION_HEADER: chat_id})
            async with stream:  # leaving it closes the response: a cancel reaches the server
                async for chunk in stream:
                    if chunk.usage is not None:
                        reply.usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            reply.put(choice.delta.content)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure ends the turn with a message
            self.failed(reply, error)

    async def transcribe(self, reply: RemoteReply, audio: np.ndarray, language: str | None, chat_id: str,
                         max_tokens: int) -> None:
        """A transcription, streamed as vLLM streams one (`transcription.chunk` deltas; OpenAI's
        `transcript.text.delta` events read too). A server that refuses to stream gets asked once more
        without streaming, and is not asked to stream again."""
        try:
            if self.streams_transcripts:
                try:
                    return await self.stream_transcript(reply, audio, language, chat_id, max_tokens)
                except openai.BadRequestError as error:
                    if "stream" not in str(error.message).lower() or reply.chunks:
                        raise
                    self.streams_transcripts = False
            text = await self.whole_transcript(audio, language, chat_id, max_tokens)
            if text:
                reply.put(text)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001
            self.failed(reply, error)

    def transcription_request(self, audio: np.ndarray, language: str | None, chat_id: str, max_tokens: int) -> dict:
        language = iso_639_1(language)
        return {"model": self.options.model, "file": ("turn.wav", base64.b64decode(wav_base64(audio)), "audio/wav"),
                "temperature": 0.0, "extra_headers": {CONVERSATION_HEADER: chat_id},
                "extra_body": {"max_completion_tokens": max_tokens}, **({"language": language} if language else {})}

    async def stream_transcript(self, reply: RemoteReply, audio: np.ndarray, language: str | None, chat_id: str,
                                max_tokens: int) -> None:
        request = self.transcription_request(audio, language, chat_id, max_tokens)
        async with self.client.audio.transcriptions.with_streaming_response.create(
                stream=True, response_format="json", **request) as response:
            async for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError((chunk["error"] or {}).get("message") or "the transcription failed")
                if chunk.get("type") == "transcript.text.delta":  # OpenAI's own streaming format
                    piece = chunk.get("delta") or ""
                else:
                    piece = "".join((choice.get("delta") or {}).get("content") or "" for choice in chunk.get("choices") or [])
                if piece:
                    reply.put(piece)

    async def whole_transcript(self, audio: np.ndarray, language: str | None, chat_id: str, max_tokens: int) -> str:
        result = await self.client.audio.transcriptions.create(
            response_format="json", **self.transcription_request(audio, language, chat_id, max_tokens))
        return result.text.strip()

    async def transcript_aside(self, audio: np.ndarray, language: str | None, chat_id: str) -> str:
        """Nobody waits on it: a busy server (429) is asked again, a little later each time."""
        for attempt in range(ASIDE_TRIES - 1):
            try:
                return await self.whole_transcript(audio, language, chat_id, self.options.transcript_tokens)
            except openai.RateLimitError:
                await asyncio.sleep(0.5 * (attempt + 1))
        return await self.whole_transcript(audio, language, chat_id, self.options.transcript_tokens)  # the last try

    def transcribe_aside(self, audio: np.ndarray, language: str | None, chat_id: str) -> Future:
        """A Future of what was said in `audio` (a caption, or an old spoken turn's text), from the server."""
        coroutine = self.transcript_aside(audio, language, chat_id)
        if self.loop.is_closed():
            coroutine.close()
            future: Future = Future()
            future.set_exception(RuntimeError("the backend is closed"))
            return future
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)
