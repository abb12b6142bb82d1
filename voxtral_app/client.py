"""A headless client for the app (aiortc WebRTC): speak audio into it and read the replies.

Used by the tests and bench/turn_latency.py, and handy for scripting the app:

    client = await Client.connect("http://127.0.0.1:7860")
    sent = await client.say(audio_16k)        # real-time paced; -> when the last sample went out
    history = await client.reply()            # the chat history once the reply is complete
"""

import asyncio
import fractions
import json
import time
import uuid

import httpx
import numpy as np
import soxr
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from av import AudioFrame

from .audio.pcm import SAMPLE_RATE

RTC_RATE = 48_000  # Hz, what WebRTC (Opus) carries
FRAME = 960  # samples per 20 ms frame at 48 kHz


class SpeechTrack(AudioStreamTrack):
    """A microphone that plays queued audio in real time and silence in between."""

    def __init__(self):
        super().__init__()
        self.buffer = np.zeros(0, dtype=np.int16)
        self.marks: list[tuple[int, asyncio.Future]] = []  # (samples still to send, future set when sent)
        self.sent = 0

    def play(self, audio: np.ndarray, mark_at: float | None = None) -> asyncio.Future:
        """Queue float32 16 kHz audio; the future gets the perf_counter time sample `mark_at` s went out."""
        pcm = soxr.resample(audio.astype(np.float32), SAMPLE_RATE, RTC_RATE)
        offset = len(self.buffer) + int((len(audio) / SAMPLE_RATE if mark_at is None else mark_at) * RTC_RATE)
        self.buffer = np.concatenate([self.buffer, (np.clip(pcm, -1, 1) * 32767).astype(np.int16)])
        future = asyncio.get_running_loop().create_future()
        self.marks.append((self.sent + offset, future))
        return future

    @property
    def queued_s(self) -> float:
        return len(self.buffer) / RTC_RATE

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if hasattr(self, "_timestamp"):
            self._timestamp += FRAME
            await asyncio.sleep(self._start + self._timestamp / RTC_RATE - time.time())
        else:
            self._start, self._timestamp = time.time(), 0
        chunk, self.buffer = self.buffer[:FRAME], self.buffer[FRAME:]
        chunk = np.pad(chunk, (0, FRAME - len(chunk)))
        self.sent += FRAME
        now = time.perf_counter()
        for mark in [m for m in self.marks if m[0] <= self.sent]:
            if not mark[1].done():
                mark[1].set_result(now)
            self.marks.remove(mark)
        frame = AudioFrame.from_ndarray(chunk[None], format="s16", layout="mono")
        frame.pts, frame.sample_rate, frame.time_base = self._timestamp, RTC_RATE, fractions.Fraction(1, RTC_RATE)
        return frame


class Client:
    """One WebRTC connection to /webrtc/offer plus the /outputs event stream."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.webrtc_id = uuid.uuid4().hex[:12]
        self.token = ""  # the server's secret for this connection, from the offer's answer
        self.pc = RTCPeerConnection()
        self.track = SpeechTrack()
        self.events: asyncio.Queue = asyncio.Queue()  # (perf_counter time, {"history", "status"})
        self.messages: list[str] = []  # data-channel messages from the server
        self.http = httpx.AsyncClient(timeout=30)
        self.reader: asyncio.Task | None = None
        self.heard: list[np.ndarray] = []  # the server's audio (spoken replies), float32 mono at 48 kHz
        self.listener: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: str, **settings) -> "Client":
        client = cls(url)
        await client.start(settings)
        return client

    async def start(self, settings: dict) -> None:
        self.pc.addTrack(self.track)
        self.pc.on("track", lambda track: setattr(self, "listener", asyncio.ensure_future(self.listen(track))))
        channel = self.pc.createDataChannel("text")
        channel.on("message", self.messages.append)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await self.http.post(f"{self.url}/webrtc/offer", json={
            "sdp": self.pc.localDescription.sdp, "type": "offer", "webrtc_id": self.webrtc_id})
        answer = response.json()
        if response.status_code != 200 or "sdp" not in answer:
            raise ConnectionError(f"offer refused ({response.status_code}): {answer}")
        self.token = answer["token"]  # this connection's secret: /outputs and /input want it
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        for _ in range(100):  # the outputs route exists once the audio track is connected
            if (await self.http.get(f"{self.url}/health")).status_code == 200 and await self.open_outputs():
                break
            await asyncio.sleep(0.05)
        if settings:
            await self.http.post(f"{self.url}/input", json={"webrtc_id": self.webrtc_id, "token": self.token, **settings})

    async def listen(self, track) -> None:
        """Keep what the server says (its audio track), as a browser would play it."""
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().astype(np.float32) / 32768  # [1, samples * channels] s16
                self.heard.append(pcm.reshape(-1, len(frame.layout.channels)).mean(axis=1))
        except MediaStreamError:
            pass

    async def open_outputs(self) -> bool:
        request = self.http.build_request("GET", f"{self.url}/outputs", params={"webrtc_id": self.webrtc_id},
                                          headers={"X-Voxtral-Token": self.token})
        response = await self.http.send(request, stream=True)
        if response.status_code != 200:
            await response.aclose()
            return False
        self.reader = asyncio.create_task(self.read(response))
        return True

    async def read(self, response) -> None:
        """/outputs events -> (arrival time, {"history": the whole chat, "status", "final"}) on `events`."""
        history: list[dict] = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                history = history[:event["start"]] + event["messages"]  # the server sends what changed
                self.events.put_nowait((time.perf_counter(), {"history": history, "status": event["status"],
                                                              "final": event.get("final", False)}))

    def say(self, audio: np.ndarray, speech_end_s: float | None = None) -> asyncio.Future:
        """Speak float32 16 kHz audio; -> future: perf_counter time the end of speech was sent."""
        return self.track.play(audio, speech_end_s)

    async def next_event(self, timeout: float = 30.0) -> tuple[float, dict]:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def reply(self, timeout: float = 60.0, quiet_s: float = 1.2) -> list[dict]:
        """Wait for a finished reply that stays (no retraction within `quiet_s`); -> the chat history."""
        deadline = time.perf_counter() + timeout
        history, final = None, False
        while True:
            finished = final and bool(history) and history[-1]["role"] == "assistant"
            try:
                _, event = await self.next_event(quiet_s if finished else max(0.1, deadline - time.perf_counter()))
            except TimeoutError:
                if finished:
                    return history
                raise
            history, final = event["history"], event["final"]

    async def close(self) -> None:
        for task in (self.reader, self.listener):
            if task is not None:
                task.cancel()
        await self.pc.close()
        await self.http.aclose()
