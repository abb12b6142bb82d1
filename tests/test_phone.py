"""Phone calls: a client speaking Twilio's Media Streams protocol over /telephone/handler."""

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import soxr
import websockets
from conftest import app_options
from g711 import lin2ulaw, ulaw2lin
from servers import BackgroundServer
from twilio.request_validator import RequestValidator

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.serving.app import ServerOptions, create_app
from voxtral_app.serving.handler import PHONE_PIECE_S

PHONE_RATE = 8_000  # Hz, Twilio's mu-law
FRAME_S = 0.02
SID = "MZ0123456789abcdef"


def mulaw_payloads(audio16k: np.ndarray):
    pcm = (soxr.resample(audio16k, SAMPLE_RATE, PHONE_RATE) * 32767).clip(-32768, 32767).astype(np.int16)
    step = int(PHONE_RATE * FRAME_S)
    for i in range(0, len(pcm), step):
        yield base64.b64encode(lin2ulaw(pcm[i:i + step])).decode()


class Call:
    """The Twilio side of a call: sends caller audio in real time, collects what comes back."""

    def __init__(self, ws):
        self.ws = ws
        self.received: list[dict] = []
        self.reader = asyncio.create_task(self.read())

    async def read(self):
        async for text in self.ws:
            self.received.append(json.loads(text))

    async def start(self):
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": SID, "start": {
            "streamSid": SID, "callSid": "CA1", "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))

    async def speak(self, audio16k: np.ndarray):
        for payload in mulaw_payloads(audio16k):
            await self.ws.send(json.dumps({"event": "media", "streamSid": SID, "media": {"payload": payload}}))
            await asyncio.sleep(FRAME_S)

    async def wait_for(self, predicate, timeout=60.0):
        """Wait for a message, sending the line's silence meanwhile (Twilio streams media all call long)."""
        silence = next(mulaw_payloads(np.zeros(int(FRAME_S * SAMPLE_RATE), np.float32)))
        for _ in range(int(timeout / FRAME_S)):
            if any(predicate(m) for m in self.received):
                return
            await self.ws.send(json.dumps({"event": "media", "streamSid": SID, "media": {"payload": silence}}))
            await asyncio.sleep(FRAME_S)
        raise TimeoutError(f"no such message; got events {sorted({m.get('event') for m in self.received})}")

    def payloads(self) -> list[bytes]:
        """The mu-law audio of each media message received (a byte a sample)."""
        return [base64.b64decode(m["media"]["payload"]) for m in self.received if m.get("event") == "media"]

    def pieces(self) -> list[int]:
        """The length of each media message received, in samples."""
        return [len(payload) for payload in self.payloads()]

    def reply_audio(self) -> np.ndarray:
        pcm = ulaw2lin(b"".join(self.payloads()))
        return pcm.astype(np.float32) / 32768


def test_the_callers_mulaw_is_g711():
    """The tests' coder (g711.py) against G.711's table: silence, full scale, and a round trip within a step."""
    assert lin2ulaw(np.array([0, 32767, -32768], np.int16)) == bytes([0xFF, 0x80, 0x00])
    assert ulaw2lin(bytes([0xFF, 0x80, 0x00])).tolist() == [0, 32124, -32124]
    pcm = np.arange(-32000, 32000, 7, dtype=np.int16)
    error = np.abs(ulaw2lin(lin2ulaw(pcm)).astype(np.int32) - pcm)
    assert (error <= np.abs(pcm) / 16 + 16).all()  # 4 bits of mantissa: within 1/16 of the level


@pytest.mark.slow  # a call in real time: three spoken turns, two spoken replies
def test_phone_call_two_spoken_turns_and_barge_in(app_engine, speech, other_speech):
    """Replies come back as speech in short pieces: fastrtc waits out 0.75x a piece's length before the
    next whatever happens meanwhile, so a long piece held back the reply after a barge-in."""
    server = BackgroundServer(create_app(app_engine, app_options(app_engine, reply_tokens=400)))
    silence = np.zeros(SAMPLE_RATE, np.float32)

    async def run():
        async with websockets.connect(server.url.replace("http", "ws") + "/telephone/handler") as ws:
            call = Call(ws)
            await call.start()
            await call.speak(np.concatenate([speech[: 3 * SAMPLE_RATE], silence]))
            await call.wait_for(lambda m: m.get("event") == "media")
            await asyncio.sleep(2.0)
            first, pieces = call.reply_audio(), call.pieces()
            call.received.clear()

            await ws.send(json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "reply-1"}}))
            await call.speak(np.concatenate([other_speech[: 3 * SAMPLE_RATE], silence]))
            await call.wait_for(lambda m: m.get("event") == "media")  # second spoken reply starts
            await asyncio.sleep(1.0)  # past the window in which speech would continue the turn
            await call.speak(speech[5 * SAMPLE_RATE: 7 * SAMPLE_RATE])  # the caller talks over it
            await call.wait_for(lambda m: m.get("event") == "clear")
            clear = next(m for m in call.received if m.get("event") == "clear")

            await ws.send(json.dumps({"event": "stop", "streamSid": SID}))
            call.reader.cancel()
            return first, pieces + call.pieces(), clear

    try:
        first, pieces, clear = asyncio.run(run())
    finally:
        server.stop()
    assert len(first) > 0.5 * PHONE_RATE and np.abs(first).max() > 0.05  # real speech came back
    assert clear["streamSid"] == SID
    assert max(pieces) <= PHONE_PIECE_S * PHONE_RATE, max(pieces) / PHONE_RATE  # mu-law: a byte a sample


def test_phone_bad_messages_do_not_end_the_call(live_server):
    async def run():
        async with websockets.connect(live_server.url.replace("http", "ws") + "/telephone/handler") as ws:
            answers = []
            for bad in ["]]", json.dumps({"event": "media", "media": {"payload": "not base64!"}}),
                        json.dumps({"event": "dance"}), json.dumps({"no": "event"})]:
                await ws.send(bad)
                answers.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"event": "ping"}))
            pong = json.loads(await ws.recv())
            return answers, pong

    answers, pong = asyncio.run(run())
    assert [a["event"] for a in answers] == ["error"] * 4
    assert pong == {"event": "pong"}
    assert httpx.get(f"{live_server.url}/health").status_code == 200


def test_incoming_call_twiml_and_signature(app_engine):
    token = "secret-auth-token"
    server = BackgroundServer(create_app(app_engine, app_options(app_engine), ServerOptions(twilio_auth_token=token)))
    try:
        url = f"{server.url}/telephone/incoming"
        form = {"CallSid": "CA1", "From": "+15550001", "To": "+15550002"}
        forged = httpx.post(url, data=form, headers={"X-Twilio-Signature": "forged"})
        signature = RequestValidator(token).compute_signature(url, form)
        signed = httpx.post(url, data=form, headers={"X-Twilio-Signature": signature})
    finally:
        server.stop()
    assert forged.status_code == 403
    assert signed.status_code == 200
    assert "<Stream" in signed.text and "/telephone/handler" in signed.text
