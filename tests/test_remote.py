"""`--backend openai`: app A generates on app B's OpenAI-compatible routes (both real servers on
127.0.0.1, each with its own backend): the same text as the local engine, whole turns over WebRTC,
barge-in that stops B's generation, and B going away mid-reply."""

import asyncio
import base64
import io
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import app_options, serving
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.backends.contract import EngineBusy, Sampling, is_spoken
from voxtral_app.backends.openai import (
    BackendUnavailable,
    OpenAIBackend,
    RemoteOptions,
)
from voxtral_app.backends.remote_chat import wav_base64
from voxtral_app.client import Client
from voxtral_app.conversation.conversation import (
    Conversation,
    ConversationOptions,
    Settings,
)
from voxtral_app.conversation.events import ReplyFinished, TurnFailed
from voxtral_app.conversation.speech import VoiceOptions, load_speaker
from voxtral_app.serving.app import create_app
from voxtral_app.turns.taker import TurnEvent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12)
SILENCE = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)


def as_sent(audio: np.ndarray) -> np.ndarray:
    """The audio as the remote backend sends it (16-bit WAV), as the server reads it back."""
    samples, _ = sf.read(io.BytesIO(base64.b64decode(wav_base64(audio))), dtype="float32")
    return samples


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def speaker():
    return load_speaker(VoiceOptions(engine="espeak"))


@pytest.fixture(scope="module")
def server_b(app_engine, speaker):
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=12), speaker=speaker))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(server_b):
    backend = OpenAIBackend(RemoteOptions(url=server_b.url, slots=2, check_interval_s=0.5)).connect()
    yield backend
    backend.close()


def test_replies_equal_the_local_engine(backend, app_engine, speech, other_speech):
    first, second = as_sent(speech[: 2 * SAMPLE_RATE]), as_sent(other_speech[: 2 * SAMPLE_RATE])
    local = app_engine.open_chat()
    try:
        expected = ["".join(local.start(first, sampling=GREEDY)), "".join(local.start(second, sampling=GREEDY))]
        local.reset()
        expected.append("".join(local.start(text="Hello there", sampling=GREEDY)))
        transcript = "".join(local.transcribe(first, "en"))
    finally:
        local.close()
    remote = backend.open_chat()
    try:
        got = ["".join(remote.start(first, sampling=GREEDY)), "".join(remote.start(second, sampling=GREEDY))]
        assert [m["role"] for m in remote.messages] == ["user", "assistant", "user"]
        remote.reset()
        got.append("".join(remote.start(text="Hello there", sampling=GREEDY)))
        reply = remote.transcribe(first, "en")
        assert "".join(reply) == transcript and transcript
        stats = reply.stats
    finally:
        remote.close()
    assert got == expected and all(expected)
    assert stats["first_token_s"] > 0 and stats["tokens"] > 0
    assert backend.active_chats == 0
    # the server closes its side as its stream ends, just after [DONE] went out (a race this close would lose)
    assert wait_for(lambda: app_engine.active_chats == 0, 5)


@pytest.mark.slow
def test_seven_spoken_turns_over_the_hop_keep_within_vllms_clip_limit(tiny_checkpoint, speaker, speech, other_speech):
    """A front end's conversation on `--backend openai`, against this app's own /v1 (which refuses a 6th clip,
    as vLLM does): seven spoken turns are all answered; older turns travel as their captions. The server
    has room for the reply and the captions beside it (vLLM has no slot cap)."""
    engine = next(serving_engine := serving(tiny_checkpoint, slots=6, max_tokens=4096))
    server = BackgroundServer(create_app(engine, app_options(engine, reply_tokens=6), speaker=speaker))
    backend = OpenAIBackend(RemoteOptions(url=server.url, slots=1, audio_turns=3, transcript_tokens=16)).connect()
    conversation = Conversation(backend, ConversationOptions(reply_tokens=6, captions=True),
                                settings=Settings(temperature=0.0), name="hop").open()
    sent = []
    stream_chat = backend.stream_chat

    async def recording(reply, messages, sampling, chat_id):
        sent.append(sum(is_spoken(m) for m in messages))
        await stream_chat(reply, messages, sampling, chat_id)

    backend.stream_chat = recording
    try:
        for k in range(7):
            clip = (speech if k % 2 else other_speech)[: int((1.0 + 0.2 * k) * SAMPLE_RATE)]
            conversation.post("speech", TurnEvent("speech"))
            conversation.post("end", TurnEvent("end", clip, time.perf_counter()))
            seen = []
            while not seen or not isinstance(seen[-1], (ReplyFinished, TurnFailed)):
                seen.append(conversation.outbox.get(timeout=60))
            assert isinstance(seen[-1], ReplyFinished) and seen[-1].error is None and seen[-1].text, seen[-1]
        assert len(sent) == 7 and max(sent) <= 3 and sent[-1] >= 2
        texts = [m for m in conversation.chat.messages if m["role"] == "user" and not is_spoken(m)]
        assert len(texts) >= 4
    finally:
        conversation.close()
        assert conversation.closed.wait(30)
        backend.close()
        server.stop()
        next(serving_engine, None)  # closes the engine


def test_slots_cap_conversations(backend):
    chats = [backend.open_chat(), backend.open_chat()]
    with pytest.raises(EngineBusy):
        backend.open_chat()
    assert backend.free_slots == []
    for chat in chats:
        chat.close()
    assert len(backend.free_slots) == 2


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="no OpenAI-compatible server"):
        OpenAIBackend(RemoteOptions(url="http://127.0.0.1:9/v1", connect_timeout_s=1)).connect()


def test_health_reports_the_backend(server_b, backend, speaker):
    app = BackgroundServer(create_app(backend, app_options(backend), speaker=speaker))
    try:
        body = httpx.get(f"{app.url}/health").json()
        assert body["status"] == "healthy" and body["device"] == backend.url
        assert body["backend"]["kind"] == "openai" and body["backend"]["reachable"] is True
        assert httpx.get(f"{server_b.url}/health").json()["backend"] == {"kind": "local"}
        assert httpx.get(f"{app.url}/v1/models").status_code in (404, 405)  # a front end does not proxy the API
    finally:
        app.stop()


def utterance(audio: np.ndarray, seconds: float = 2.0) -> tuple[np.ndarray, float]:
    clip = audio[: int(seconds * SAMPLE_RATE)]
    return np.concatenate([clip, SILENCE]), seconds


async def until(client: Client, done, timeout: float = 60) -> list[dict]:
    """Chat updates until `done(history, final)`; -> that history."""
    deadline = time.monotonic() + timeout
    while True:
        _, event = await client.next_event(max(0.1, deadline - time.monotonic()))
        if done(event["history"], event["final"]):
            return event["history"]


def streaming(turns: int):
    """The reply to turn number `turns` has begun to show."""
    return lambda h, final: len(h) == 2 * turns and h[-1]["role"] == "assistant" and bool(h[-1]["content"])


@pytest.mark.slow  # over 4 s: the fast subset stays under 2.5 min
def test_turn_and_barge_in_over_webrtc(app_engine, speaker, speech, other_speech):
    """A (openai backend) -> B (local engine): a turn streams, then a barge-in stops B's generation."""
    b = BackgroundServer(create_app(app_engine, app_options(app_engine), speaker=speaker))
    # B generates this reply alone: no captions, and no old turn's transcript asked for early (audio_turns 5)
    backend = OpenAIBackend(RemoteOptions(url=b.url, slots=2, audio_turns=5)).connect()
    a = BackgroundServer(create_app(backend, app_options(backend, reply_tokens=2000, captions=False),
                                    speaker=speaker))

    async def run():
        for _ in range(3):  # the random model samples its end token now and then, even at temperature 1
            client = await Client.connect(a.url, temperature=1.0)  # sampled: a long reply, rarely an early end
            try:
                client.say(*utterance(speech))
                await until(client, streaming(1))
                assert app_engine.in_flight == 1 and backend.in_flight == 1
                await asyncio.sleep(1.0)  # past the resume window: what follows is a barge-in
                if app_engine.in_flight == 0:
                    continue  # the reply has ended on its own: nothing to barge in on, ask again
                client.say(*utterance(other_speech, 3.0))
                stopped = await asyncio.to_thread(wait_for, lambda: app_engine.in_flight == 0, 2.5)
                interrupted = await until(client, lambda h, final: len(h) == 2 and final)
                after = await until(client, streaming(2))  # the barge-in's own turn is answered
                return stopped, interrupted, after
            finally:
                await client.close()
                await asyncio.to_thread(wait_for, lambda: backend.active_chats == 0, 10)
        raise AssertionError("three replies in a row ended before their barge-in")

    try:
        stopped, interrupted, after = asyncio.run(run())
        assert stopped, "B kept generating after the barge-in"
        assert interrupted[1]["content"].endswith(" · interrupted</sub>")  # the footer says so
        assert [m["role"] for m in after] == ["user", "assistant", "user", "assistant"]
        assert "⚠️" not in after[3]["content"]
        assert wait_for(lambda: app_engine.active_chats == 0 and backend.active_chats == 0, 10)
    finally:
        a.stop()
        backend.close()
        b.stop()


@pytest.mark.slow  # over 4 s: the fast subset stays under 2.5 min
def test_server_gone_mid_reply_is_a_message_and_a_keeps_serving(app_engine, speaker, speech, other_speech):
    b = BackgroundServer(create_app(app_engine, app_options(app_engine), speaker=speaker))
    port = int(b.url.rsplit(":", 1)[1])
    backend = OpenAIBackend(RemoteOptions(url=b.url, slots=2, read_timeout_s=5, check_interval_s=0.5)).connect()
    a = BackgroundServer(create_app(backend, app_options(backend, reply_tokens=2000, captions=False),
                                      speaker=speaker))  # B generates this reply alone

    async def run():
        nonlocal b
        client = await Client.connect(a.url, temperature=1.0)
        try:
            client.say(*utterance(speech))
            await until(client, streaming(1))
            await asyncio.to_thread(b.stop, True)  # B goes away mid-reply
            failed = await until(client, lambda h, final: final, 30)
            deadline = time.monotonic() + 10
            while True:  # the background check (every 0.5 s) notices
                health = (await client.http.get(f"{a.url}/health")).json()
                if not health["backend"]["reachable"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            b = await asyncio.to_thread(BackgroundServer, b.app, "127.0.0.1", port)  # B is back
            client.say(*utterance(other_speech))
            again = await until(client, streaming(2))
            return failed, health, again
        finally:
            await client.close()

    try:
        failed, health, again = asyncio.run(run())
        assert "⚠️ the generation server at" in failed[-1]["content"], failed[-1]
        assert backend.describe()["errors_total"].get("backend_unavailable", 0) >= 1
        assert health["status"] == "degraded" and health["backend"]["reachable"] is False
        assert "⚠️" not in again[-1]["content"]
        assert wait_for(lambda: backend.reachable, 5)
        assert httpx.get(f"{a.url}/health").json()["status"] == "healthy"
    finally:
        a.stop()
        backend.close()
        b.stop()
    assert wait_for(lambda: app_engine.in_flight == 0 and app_engine.active_chats == 0, 10)


def run_app(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_backend_flags_and_environment():
    import app

    args = app.parse_args([], environ={"VOXTRAL_BACKEND": "openai", "VOXTRAL_BACKEND_URL": "http://vllm:8000",
                                       "VOXTRAL_BACKEND_API_KEY": "k", "VOXTRAL_BACKEND_MODEL": "m"})
    assert (args.backend, args.backend_url, args.backend_api_key, args.backend_model) == (
        "openai", "http://vllm:8000/v1", "k", "m")
    assert app.parse_args([], environ={}).backend == "local"


@pytest.mark.parametrize("args, env, says", [
    (["--backend", "openai", "--backend-url", "notaurl"], {}, "argument --backend-url: expected an http(s) URL"),
    (["--backend", "openai"], {"VOXTRAL_BACKEND_URL": "ftp://x"}, "VOXTRAL_BACKEND_URL='ftp://x'"),
    (["--backend", "openai"], {}, "--backend openai needs --backend-url"),
    pytest.param(["--backend", "openai", "--backend-url", "http://127.0.0.1:9/v1"], {}, "--backend-url "
                 "http://127.0.0.1:9/v1: no OpenAI-compatible server answers",
                 marks=pytest.mark.slow),  # past parsing: app.py imports torch, transformers and gradio first (~6 s)
])
def test_bad_backend_url_is_a_one_line_error(args, env, says):
    result = run_app(*args, env={"VOXTRAL_BACKEND_URL": "", **env})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
