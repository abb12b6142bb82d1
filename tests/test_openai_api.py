"""Our OpenAI-compatible routes on 127.0.0.1, driven by the official `openai` client: the same text
as the local engine under greedy sampling, and OpenAI-shaped errors for hostile input."""

import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import app_options
from servers import BackgroundServer

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.backends.contract import Sampling
from voxtral_app.conversation.speech import VoiceOptions, load_speaker
from voxtral_app.serving.app import create_app

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def api(app_engine):
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=12),
                                         speaker=load_speaker(VoiceOptions(engine="espeak"))))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=60)


def wav_b64(audio: np.ndarray) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="FLOAT")  # lossless: equal input to the engine
    return base64.b64encode(buffer.getvalue()).decode()


def audio_turn(audio, text=None) -> dict:
    content = [{"type": "input_audio", "input_audio": {"data": wav_b64(audio), "format": "wav"}}]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def local(engine, turns) -> list[str]:
    """The engine's own replies to these user turns (audio or text), one conversation, greedy."""
    chat = engine.open_chat()
    try:
        texts = []
        for turn in turns:
            reply = chat.start(turn if not isinstance(turn, str) else None, turn if isinstance(turn, str) else "",
                               GREEDY)
            texts.append("".join(reply))
        return texts
    finally:
        chat.close()


def greedy(**kwargs) -> dict:
    return {"temperature": 0, "top_p": 1, "max_tokens": GREEDY.max_new_tokens, **kwargs}


def test_models(client, app_engine):
    assert [m.id for m in client.models.list().data] == [app_engine.options.model]


def test_audio_chat_equals_the_engine(client, app_engine, speech):
    expected, = local(app_engine, [speech[: 3 * SAMPLE_RATE]])
    model = app_engine.options.model
    answer = client.chat.completions.create(model=model, messages=[audio_turn(speech[: 3 * SAMPLE_RATE])], **greedy())
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.choices[0].message.content == expected and expected
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 375  # an audio block

    stream = client.chat.completions.create(model=model, messages=[audio_turn(speech[: 3 * SAMPLE_RATE])],
                                            stream=True, stream_options={"include_usage": True}, **greedy())
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_text_and_two_turns_equal_the_engine(client, app_engine, speech, other_speech):
    model = app_engine.options.model
    first_audio, second_audio = speech[: 2 * SAMPLE_RATE], other_speech[: 2 * SAMPLE_RATE]
    first, second = local(app_engine, [first_audio, second_audio])
    one = client.chat.completions.create(model=model, messages=[audio_turn(first_audio)], **greedy())
    assert one.choices[0].message.content == first
    history = [audio_turn(first_audio), {"role": "assistant", "content": one.choices[0].message.content},
               audio_turn(second_audio)]
    streamed = client.chat.completions.create(model=model, messages=history, stream=True, **greedy())
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == second

    text, = local(app_engine, ["What is the capital of France?"])
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], **greedy())
    assert answer.choices[0].message.content == text


def test_transcription_equals_the_engine(client, app_engine, speech):
    clip = speech[: 3 * SAMPLE_RATE]
    chat = app_engine.open_chat()
    try:
        expected = "".join(chat.transcribe(clip, "en"))
    finally:
        chat.close()
    upload = ("turn.wav", base64.b64decode(wav_b64(clip)), "audio/wav")
    result = client.audio.transcriptions.create(model=app_engine.options.model, language="en", file=upload)
    assert result.text == expected and expected
    text = client.audio.transcriptions.create(model=app_engine.options.model, language="en", file=upload,
                                              response_format="text")
    assert text == expected  # response_format text: the transcript alone, not JSON


def test_disconnect_stops_generation(api, app_engine, speech):
    body = {"model": app_engine.options.model, "messages": [audio_turn(speech[: 2 * SAMPLE_RATE])], "stream": True,
            "max_tokens": 2000, "temperature": 1.0}  # greedy may end at once
    for _ in range(3):  # the random model samples its end token now and then: a reply that ended proves nothing
        with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # tokens are flowing; leave mid-reply
            generating = app_engine.in_flight == 1
        if generating:
            break
        wait_until_idle(app_engine)
    assert generating
    wait_until_idle(app_engine)
    assert app_engine.in_flight == 0 and app_engine.active_chats == 0


def wait_until_idle(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (engine.in_flight or engine.active_chats) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("body, status", [
    (b"not json", 400),
    (b"[]", 400),
    (b'{"model": "MODEL", "messages": []}', 400),
    (b'{"model": "other", "messages": [{"role": "user", "content": "hi"}]}', 404),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": '
     b'{"data": "%%%", "format": "wav"}}]}]}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": '
     b'{"data": "aGVsbG8=", "format": "wav"}}]}]}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "assistant", "content": "hi"}]}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": 5}]}', 400),
    (b'{"model": "MODEL", "messages": ["hi"]}', 400),
])
def test_malformed_chat_requests_get_openai_errors(api, app_engine, body, status):
    body = body.replace(b"MODEL", app_engine.options.model.encode())
    response = httpx.post(f"{api.url}/v1/chat/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_oversized_and_malformed_uploads(api, app_engine, client):
    too_big = httpx.post(f"{api.url}/v1/chat/completions", content=b"x" * 26_214_401, timeout=30)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    model = app_engine.options.model
    for files, data in [({"file": ("a.wav", b"not audio", "audio/wav")}, {"model": model}),
                        ({}, {"model": model}),
                        ({"file": ("a.wav", b"x", "audio/wav")}, {"model": model, "language": "12345678901"}),
                        ({"file": ("a.wav", b"x", "audio/wav")}, {"model": model, "stream": "maybe"}),
                        ({"file": ("a.wav", b"x", "audio/wav")}, {"model": model, "response_format": "srt"})]:
        response = httpx.post(f"{api.url}/v1/audio/transcriptions", files=files, data=data, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=model, file=("silence.wav", base64.b64decode(
            wav_b64(np.zeros(SAMPLE_RATE, np.float32))), "audio/wav"))


def test_busy_engine_gives_429(api, app_engine):
    chats = []
    try:
        while app_engine.free_slots:
            chats.append(app_engine.open_chat())
        response = httpx.post(f"{api.url}/v1/chat/completions", timeout=30, json={
            "model": app_engine.options.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "concurrency_limit_reached"
    finally:
        for chat in chats:
            chat.close()


def test_six_clips_get_vllms_400_and_five_are_answered(api, client, app_engine, speech, other_speech):
    """vLLM refuses a Voxtral prompt with more than 5 audio clips; so does this server, in vLLM's words."""
    clips = [speech[:SAMPLE_RATE], other_speech[:SAMPLE_RATE]] * 3
    history = []
    for clip in clips[:5]:
        history += [audio_turn(clip), {"role": "assistant", "content": "Yes."}]
    five = client.chat.completions.create(model=app_engine.options.model, messages=history[:-1], **greedy())
    assert five.choices[0].message.content and five.usage.prompt_tokens > 5 * 375
    response = httpx.post(f"{api.url}/v1/chat/completions", timeout=30, json={
        "model": app_engine.options.model, "messages": history + [audio_turn(clips[5])]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "At most 5 audio(s) may be provided in one prompt."


def test_max_completion_tokens_wins_over_max_tokens(client, app_engine):
    answer = client.chat.completions.create(
        model=app_engine.options.model, messages=[{"role": "user", "content": "Count to fifty."}],
        temperature=1.0, max_tokens=40, max_completion_tokens=2)
    assert answer.usage.completion_tokens <= 2 and answer.choices[0].finish_reason == "length"


def test_transcriptions_stream_as_vllm_streams_them_and_take_iso_codes(api, client, app_engine, speech):
    model = app_engine.options.model
    upload = ("turn.wav", base64.b64decode(wav_b64(speech[: 2 * SAMPLE_RATE])), "audio/wav")
    whole = client.audio.transcriptions.create(model=model, language="en", file=upload).text
    chunks = []
    with httpx.stream("POST", f"{api.url}/v1/audio/transcriptions", files={"file": upload}, timeout=60,
                      data={"model": model, "language": "en", "stream": "true"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert {c["object"] for c in chunks} == {"transcription.chunk"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole and whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    short = httpx.post(f"{api.url}/v1/audio/transcriptions", files={"file": upload}, timeout=60,
                       data={"model": model, "max_completion_tokens": "3"}).json()
    assert short["usage"]["output_tokens"] <= 3
    for code in ("en-us", "EN", "xx", "english"):
        refused = httpx.post(f"{api.url}/v1/audio/transcriptions", files={"file": upload}, timeout=30,
                             data={"model": model, "language": code})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "language", code
