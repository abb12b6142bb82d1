"""Turn latency over real WebRTC: end of speech -> pause detected -> first reply token at the client.

    python bench/turn_latency.py                        # tiny random Voxtral on CPU, both turn-takers, ~5 min
    python bench/turn_latency.py --profile              # ... and where the time goes, step by step
    python bench/turn_latency.py --turns 30 --gap-turns 20 --pause-s 0.128 0.096

Starts the real app (create_app + uvicorn on 127.0.0.1) once per configuration, one after the other,
on one engine: fastrtc's ReplyOnPause at its default settings (VAD over 0.6 s chunks), then ours
(VoxtralHandler as app.py runs it: streaming 32 ms VAD, no end-of-turn model; the reply is prepared
unseen at a 0.064 s pause and shown when the turn ends at 0.128 s; a turn that resumes is taken back). An aiortc client in its own process (as
a browser would be) speaks into each in real time: espeak-ng sentences and cuts of fastrtc's test
recording, each trimmed to its last sample above -40 dBFS so the end of speech is known to a
sample, then 2 s of silence. Latencies run from the moment the frame with that last sample left the
client to the arrival of the "pause_detected" data-channel message and of the first /outputs event
with reply text. Utterances of two phrases with 200/300/500 ms of silence between them count false
turn-ends (two user turns left in the chat). Replies begun in such a pause and dropped when speech
came back are counted apart: "shown" ones reached the client and were retracted, "unseen" ones
never left the server. Every CALL_UTTERANCES utterances the client reconnects, so each conversation
stays inside the engine's KV cache (8192 tokens; each clip is padded to 30 s = 375 audio tokens).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # random weights: nothing to download
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no DNS lookups from gradio
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import logging
import multiprocessing
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import soundfile as sf
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # servers.py

import results  # noqa: E402  (bench/results.py)
from fastrtc import AdditionalOutputs, ReplyOnPause  # noqa: E402
from servers import BackgroundServer  # noqa: E402  (tests/servers.py)

from voxtral_app.audio.pcm import SAMPLE_RATE, prepare, read_wav  # noqa: E402
from voxtral_app.audio.vad import SileroPauseModel  # noqa: E402
from voxtral_app.client import Client  # noqa: E402
from voxtral_app.conversation.conversation import Conversation, ConversationOptions  # noqa: E402
from voxtral_app.model import checkpoint  # noqa: E402
from voxtral_app.model.engine import EngineOptions  # noqa: E402
from voxtral_app.model.loading import load_engine  # noqa: E402
from voxtral_app.serving.app import create_app  # noqa: E402
from voxtral_app.serving.chat_view import CLOSED, ChatView, Output  # noqa: E402
from voxtral_app.turns.end_of_turn import EndOfTurnOptions  # noqa: E402
from voxtral_app.turns.taker import TurnOptions  # noqa: E402

logger = logging.getLogger("bench")

END_DBFS = -40.0  # speech starts/ends at the first/last sample above this level
TAIL_S = 2.0  # silence after each utterance: room for fastrtc's 0.6-1.2 s pause and the reply
GAPS_MS = (200, 300, 500)  # mid-sentence pauses for the false turn-end rate
REPLY_TOKENS = 16  # short replies: the next utterance waits for the reply to finish
TIMEOUT_S = 10.0  # an utterance with no finished reply this long after its speech ended is dropped
CALL_UTTERANCES = 10  # utterances per connection: ~400 KV tokens each (a clip is padded to 30 s), 8192 fit
CUT_SILENCE_S = 0.3  # the test recording is cut into utterances at silences at least this long
CUT_S = (1.0, 6.0)  # shortest, longest cut kept, seconds

SENTENCES = [  # no commas: espeak-ng pauses at punctuation, and these must be one stretch of speech
    "What is the weather going to be like this weekend",
    "Can you recommend a good book about the history of science",
    "I would like to book a table for two people tonight",
    "Please tell me a short joke about computers",
    "How long does it take to fly from Paris to Tokyo",
    "Explain how a rainbow forms in simple words",
    "My favourite colour has always been a deep shade of blue",
    "Remind me to call my sister after lunch tomorrow",
    "Which planet in our solar system has the most moons",
    "Translate good morning into French and Spanish",
]
PHRASES = [  # (before the pause, after it): a thinking pause in the middle of a sentence
    ("I was thinking about", "going to the beach tomorrow"),
    ("Could you tell me", "what time the museum opens"),
    ("The best way to learn a language", "is to speak it every day"),
    ("I need to buy", "some milk and a loaf of bread"),
    ("Yesterday my friend and I", "watched a very long movie"),
    ("Do you know", "how tall the Eiffel tower is"),
    ("My plan for the weekend", "is to clean out the garage"),
    ("What would happen if", "the moon disappeared tonight"),
    ("I am looking for", "a recipe with chicken and rice"),
    ("Tell me something", "interesting about octopuses"),
]


# -- speech with a known end -----------------------------------------------------------------------


def trim(audio: np.ndarray) -> np.ndarray:
    """Cut to the first..last sample above END_DBFS: the clip ends exactly where its speech ends."""
    loud = np.flatnonzero(np.abs(audio) > 10 ** (END_DBFS / 20))
    if not len(loud):
        raise ValueError(f"no speech above {END_DBFS:.0f} dBFS")
    return audio[loud[0]: loud[-1] + 1]


def espeak(text: str) -> np.ndarray:
    """A sentence spoken by espeak-ng -> float32 16 kHz, trimmed."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return trim(prepare(rate, samples, max_seconds=60))


def recording() -> np.ndarray:
    """fastrtc's test recording (~21 s, one speaker), float32 16 kHz."""
    path = os.path.join(os.path.dirname(importlib.util.find_spec("fastrtc").origin), "speech_to_text", "test_file.wav")
    return prepare(*read_wav(path), max_seconds=300)


def recording_cuts() -> list[np.ndarray]:
    """fastrtc's test recording (~21 s, one speaker) cut at its silences into 1-6 s utterances."""
    audio = recording()
    hop = SAMPLE_RATE // 100  # 10 ms frames
    loud = np.abs(audio[: len(audio) // hop * hop].reshape(-1, hop)).max(axis=1) > 10 ** (END_DBFS / 20)
    cuts, start, quiet = [], None, 0
    for i, is_loud in enumerate(np.append(loud, [False] * 100)):
        if is_loud:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet * hop >= CUT_SILENCE_S * SAMPLE_RATE:
                cuts.append(trim(audio[start * hop: (i - quiet + 1) * hop]))
                start, quiet = None, 0
    return [cut for cut in cuts if CUT_S[0] * SAMPLE_RATE <= len(cut) <= CUT_S[1] * SAMPLE_RATE]


@dataclass
class Utterance:
    kind: str  # "espeak", "recording" (latency turns) or "gap" (two phrases with a pause between)
    text: str
    audio: np.ndarray  # float32 16 kHz; speech ends at the last sample
    gap_ms: int = 0
    tail: np.ndarray | None = None  # what the client sends after the speech (default: TAIL_S of silence)
    set: str = ""  # bench/turn_sets.py: which set it belongs to


def plan(turns: int, gap_turns: int) -> list[Utterance]:
    """Latency turns and gap utterances, interleaved so both see the conversation grow alike."""
    cuts = recording_cuts()
    latency = []
    for i in range(turns):  # two espeak sentences to one recording cut
        if i % 3 == 2 and cuts:
            n = i // 3 % len(cuts)
            latency.append(Utterance("recording", f"test_file.wav cut {n}", cuts[n]))
        else:
            text = SENTENCES[(i - i // 3) % len(SENTENCES)]
            latency.append(Utterance("espeak", text, espeak(text)))
    gaps = []
    for i in range(gap_turns):
        for j, gap_ms in enumerate(GAPS_MS):
            before, after = PHRASES[(i * len(GAPS_MS) + j) % len(PHRASES)]
            audio = np.concatenate([espeak(before), np.zeros(gap_ms * SAMPLE_RATE // 1000, np.float32), espeak(after)])
            gaps.append(Utterance("gap", f"{before} … {after}", audio, gap_ms))
    mixed, every = [], max(1, round(len(gaps) / max(1, len(latency))))
    while latency or gaps:
        mixed += latency[:1] + gaps[:every]
        latency, gaps = latency[1:], gaps[every:]
    return mixed


# -- the apps --------------------------------------------------------------------------------------


class DefaultTurns(ReplyOnPause):
    """fastrtc's ReplyOnPause with its default AlgoOptions (or `algo_options`), answering with the same
    Conversation.

    Only the VAD model is ours by default: the same Silero model from the silero-vad package, because
    fastrtc's own default downloads it. `starts` collects when a person was heard to start talking.
    """

    starts: list[float] = []  # perf_counter times ReplyOnPause decided someone started talking

    def __init__(self, engine, options: ConversationOptions, algo_options=None, model=None, model_options=None):
        super().__init__(self.reply, algo_options=algo_options, model=model or SileroPauseModel(),
                         model_options=model_options)
        self.engine, self.options, self.speaker = engine, options, None  # what the UI's upload path reads
        self.conversation = None
        self.tuning = (algo_options, model, model_options)

    def copy(self) -> "DefaultTurns":
        return DefaultTurns(self.engine, self.options, *self.tuning)

    def determine_pause(self, audio, sampling_rate, state) -> bool:
        talking = state.started_talking
        paused = super().determine_pause(audio, sampling_rate, state)
        if state.started_talking and not talking:
            DefaultTurns.starts.append(time.perf_counter())
        return paused

    def start_up(self) -> None:
        self.conversation = Conversation(self.engine, self.options, name="bench").open()
        self.view = ChatView(self.options, "bench")  # the connection's chat, across its turns

    def reply(self, audio: tuple):
        self.conversation.post("audio", audio)
        while True:
            for output in self.view.render(self.conversation.outbox.get()):
                if output == CLOSED:
                    return
                if not isinstance(output, Output):  # hush
                    continue
                yield AdditionalOutputs(output.history, output.status, output.final)
                if output.final:
                    return

    def shutdown(self) -> None:
        if self.conversation is not None:
            self.conversation.close()


def app_engine(workdir: str, in_process: bool = False):
    """The tiny random engine (2 slots), set up as `python app.py` sets up its own: the model in a
    process of its own (unless `in_process`), the GIL handed over every 0.5 ms, glibc's mmap threshold
    fixed, torch on one thread here when the model has its own process."""
    import app

    app.steady_memory()
    app.fair_gil()
    app.light_torch(not in_process)
    return load_engine(EngineOptions(model=checkpoint.build_tiny(os.path.join(workdir, "tiny")), device="cpu",
                                     slots=2, model_process=not in_process))


def setup_line(in_process: bool) -> str:
    import torch

    where = "in the server's process (--in-process)" if in_process else "in its own process, as app.py runs it"
    return f"model {where}; torch threads in the server's process: {torch.get_num_threads()}\n"


def configurations(engine, reply_tokens: int, pauses_s: list[float],
                   end_of_turn: bool = False) -> list[tuple[str, Callable]]:
    """(name, app factory): fastrtc's default first, then ours at each pause length, as `python app.py`
    runs it by default: without the end-of-turn model; `end_of_turn`: a second row per pause with it."""
    options = ConversationOptions(max_audio_s=engine.options.max_audio_s, reply_tokens=reply_tokens)
    options = replace(options, turns=replace(options.turns, end_of_turn=EndOfTurnOptions(enabled=False)))
    configs = [("fastrtc default (ReplyOnPause, 0.6 s chunks)",
                lambda: create_app(engine, options, handler=DefaultTurns(engine, options)))]
    for pause_s in pauses_s:
        speculate_s = max(0.032, pause_s - (options.turns.pause_s - options.turns.speculate_s))  # same head start
        ours = replace(options, turns=replace(options.turns, pause_s=pause_s, speculate_s=speculate_s))
        configs.append((f"ours (VoxtralHandler, pause {pause_s:g} s)", lambda ours=ours: create_app(engine, ours)))
        if end_of_turn:
            smart = replace(ours, turns=replace(ours.turns, end_of_turn=EndOfTurnOptions()))
            configs.append((f"ours+smart-turn (pause {pause_s:g} s, Smart Turn)", lambda smart=smart: create_app(engine, smart)))
    return configs


TURN_EVENTS: list[tuple[float, str, str]] = []  # (perf_counter, kind, reason) of every turn event of ours


def count_turn_events() -> Counter:
    """Count our handler's turn events ("pause", "continue", "end", "resume", ...) in this process."""
    counts, post = Counter(), Conversation.post

    def counted(conversation, kind, value=None):
        counts[kind] += 1
        TURN_EVENTS.append((time.perf_counter(), kind, getattr(value, "reason", "") or ""))
        post(conversation, kind, value)

    Conversation.post = counted
    return counts


# -- the client (its own process) ------------------------------------------------------------------


class Stamped(list):
    """Data-channel messages as (perf_counter arrival time, message)."""

    def append(self, message) -> None:
        super().append((time.perf_counter(), message))


class TimedClient(Client):
    def __init__(self, url: str):
        super().__init__(url)
        self.messages = Stamped()  # bound as the channel's message callback in start()
        self.history: list[dict] = []  # chat history from the latest /outputs event


def log_text(message: str) -> str | None:
    try:
        body = json.loads(message)
    except ValueError:
        return None
    return body.get("data") if isinstance(body, dict) and body.get("type") == "log" else None


def users(history: list[dict]) -> int:
    return sum(message["role"] == "user" for message in history)


def has_text(event: dict) -> bool:
    history = event["history"]
    return bool(history) and history[-1]["role"] == "assistant" and bool(history[-1]["content"]) \
        and not event["status"].get("retracted")


def finished(event: dict) -> bool:
    """A reply that is over: the turn's last update."""
    return has_text(event) and event["final"]


@dataclass
class Outcome:
    utterance: Utterance
    started: float  # perf_counter (CLOCK_MONOTONIC: the same clock in every process) when it was queued
    sent: float | None  # when the frame with the last sample of speech left the client
    ended: float  # when its reply had finished (or it was given up)
    pause_ms: float | None  # end of speech sent -> "pause_detected" at the client
    first_token_ms: float | None  # end of speech sent -> first /outputs event with reply text
    user_turns: int  # user turns the utterance left in the chat (1 unless it was split)
    retracted: int  # replies shown at a pause and taken back when speech resumed
    replied: bool


async def speak(client: TimedClient, utterance: Utterance) -> Outcome:
    """Say one utterance (+ TAIL_S silence), wait for its reply to finish (or TIMEOUT_S), measure."""
    users_before, messages_from, started = users(client.history), len(client.messages), time.perf_counter()
    tail = utterance.tail if utterance.tail is not None else np.zeros(int(TAIL_S * SAMPLE_RATE), np.float32)
    audio = np.concatenate([utterance.audio, tail])
    speech_sent = client.say(audio, len(utterance.audio) / SAMPLE_RATE)
    events: list[tuple[float, dict]] = []
    sent = deadline = None
    while True:
        try:
            arrived, event = await asyncio.wait_for(client.events.get(), 0.05)
            events.append((arrived, event))
            client.history = event["history"]
        except TimeoutError:
            pass
        if sent is None and speech_sent.done():
            sent = speech_sent.result()
            deadline = sent + TIMEOUT_S
        done = sent is not None and bool(events) and events[-1][0] >= sent and finished(events[-1][1]) \
            and users(client.history) > users_before
        if done and client.track.queued_s == 0 or deadline is not None and time.perf_counter() > deadline:
            break
    ended = time.perf_counter()
    while client.track.queued_s > 0:  # a dropped turn: still let its silence play out
        await asyncio.sleep(0.05)

    retracts = [i for i, (_, e) in enumerate(events) if e["status"].get("retracted")]
    final = events[retracts[-1] + 1:] if retracts else events  # events of the turn that was not taken back
    first = next((t for t, e in final if has_text(e)), None)
    pauses = [t for t, m in client.messages[messages_from:] if log_text(m) == "pause_detected"]
    if first is not None:  # the pause that ended the turn replied to (the data channel may lag /outputs a little)
        pause = max((t for t in pauses if t <= first + 0.05), default=None)
    else:
        pause = min((t for t in pauses if sent is not None and t >= sent), default=None)

    def ms(t):
        return None if t is None or sent is None else 1000 * (t - sent)

    return Outcome(utterance, started, sent, ended, ms(pause), ms(first), users(client.history) - users_before,
                   len(retracts), done)


async def drive(url: str, utterances: list[Utterance], name: str) -> list[Outcome]:
    """Speak every utterance, reconnecting (a new conversation) every CALL_UTTERANCES."""
    outcomes = []
    for call in range(0, len(utterances), CALL_UTTERANCES):
        client = await TimedClient.connect(url)
        try:
            await client.say(np.zeros(SAMPLE_RATE // 2, np.float32))  # the connection settles in silence first
            for utterance in utterances[call: call + CALL_UTTERANCES]:
                outcome = await speak(client, utterance)
                outcomes.append(outcome)
                logger.info("%s %d/%d %s%s: pause %s ms, first token %s ms, user turns %d, retracted %d%s", name,
                            len(outcomes), len(utterances), utterance.kind,
                            f" {utterance.gap_ms} ms" if utterance.gap_ms else "", rounded(outcome.pause_ms),
                            rounded(outcome.first_token_ms), outcome.user_turns, outcome.retracted,
                            "" if outcome.replied else " DROPPED")
        finally:
            await client.close()
        await asyncio.sleep(0.5)  # the server frees the conversation's slot
    return outcomes


def run_client(url: str, utterances: list[Utterance], name: str, verbose: bool) -> list[Outcome]:
    """The client process: a browser stand-in, so its encoding and pacing do not share the server's GIL."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    return asyncio.run(drive(url, utterances, name))


def rounded(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# -- where the time goes (--profile) ---------------------------------------------------------------


class Profiler:
    """Server-side perf_counter stamps per turn, patched onto the app's functions (the server's process)."""

    def __init__(self):
        self.turns: list[dict] = []  # one per turn: step name -> time; "at": when it began (pause or end)
        self.lock = threading.Lock()
        self.last_loud = 0.0  # when fastrtc last handed a handler a frame with speech in it

    def begin(self, name: str, speculative: bool = False) -> None:
        now = time.perf_counter()
        with self.lock:
            self.turns.append({"at": now, "server: last frame with speech reached the handler": self.last_loud,
                               name: now, "speculative": speculative})

    def mark(self, name: str, at: float | None = None) -> None:
        with self.lock:
            if self.turns and name not in self.turns[-1]:
                self.turns[-1][name] = at if at is not None else time.perf_counter()

    def wrap(self, owner, attr: str, done: str, start: str | None = None) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            if start:
                self.mark(start)
            result = original(*args, **kwargs)
            self.mark(done)
            return result

        setattr(owner, attr, timed)

    def install(self) -> None:
        """Stamp each step from the last speech frame to the first /outputs event leaving the server."""
        from fastrtc import Stream

        from voxtral_app.conversation import conversation
        from voxtral_app.model import decoder as generate
        from voxtral_app.model import engine, model_process, prompt
        from voxtral_app.serving.handler import VoxtralHandler
        from voxtral_app.turns import end_of_turn as endpoint

        profiler = self
        for handler in (VoxtralHandler, DefaultTurns):
            def receive(handler_, frame, original=handler.receive):
                if np.abs(frame[1]).max(initial=0) > 32768 * 10 ** (END_DBFS / 20):  # int16 frames
                    profiler.last_loud = time.perf_counter()
                original(handler_, frame)

            handler.receive = receive
        post = Conversation.post

        def turn_event(conversation_, kind, event=None):
            if kind == "pause":  # the reply begins here, unseen; a "continue" drops it
                profiler.begin("ours: short pause, reply begun unseen (speculate_s)", speculative=True)
                profiler.mark("ours: last speech window in (VAD)", event.speech_end)
            elif kind == "end":
                if not (profiler.turns and profiler.turns[-1].pop("speculative", False)):
                    profiler.begin("ours: turn end (pause_s of silence)")
                profiler.mark("ours: turn end (pause_s of silence)")
                profiler.mark("ours: last speech window in (VAD)", event.speech_end)
            post(conversation_, kind, event)

        Conversation.post = turn_event
        default_reply = DefaultTurns.reply

        def reply(handler, audio):
            profiler.begin("default: pause detected, reply fn called")
            yield from default_reply(handler, audio)

        DefaultTurns.reply = reply
        show = Conversation.show

        def shown(*args, **kwargs):
            self.mark("show() started: the turn is shown")
            return show(*args, **kwargs)

        Conversation.show = shown
        self.wrap(conversation, "prepare", "audio prepared")
        self.wrap(prompt, "user_message", "user message built (wav + base64)")
        self.wrap(prompt, "chat_prompt", "prompt built (apply_chat_template)")
        self.wrap(engine.Engine, "submit", "submitted to the decode thread")
        for decoder in (generate.Decoder, model_process.ModelProcess):  # in the server's process, or a call to the model's
            self.wrap(decoder, "encode_clips", "audio encoded", start="log-mel + audio encoder started")
            self.wrap(decoder, "prefill", "prompt prefilled", start="prefill started")
        self.wrap(engine.Engine, "emit", "first token sampled")
        self.wrap(endpoint.EndOfTurnModel, "probability", "end-of-turn model decided", start="end-of-turn model started")
        self.wrap(Conversation, "output", "first output made by show()")
        set_outputs = Stream.set_additional_outputs

        def set_additional_outputs(stream, webrtc_id):
            put = set_outputs(stream, webrtc_id)

            def stamped(outputs):
                history = outputs.args[0]
                if history and history[-1].get("role") == "assistant" and history[-1].get("content"):
                    profiler.mark("on the /outputs queue")
                put(outputs)

            return stamped

        Stream.set_additional_outputs = set_additional_outputs

    def breakdown(self, outcomes: list[Outcome]) -> list[tuple[str, float, float]]:
        """(step, median ms after the end of speech left the client, median ms since the step before)."""
        stamps = defaultdict(list)
        for outcome in outcomes:
            turns = [t for t in self.turns if outcome.started <= t["at"] <= outcome.ended]
            if not turns or outcome.sent is None or outcome.first_token_ms is None:
                continue
            steps = {name: 1000 * (t - outcome.sent) for name, t in turns[-1].items()
                     if name not in ("at", "speculative")}
            steps["client: first token event arrived"] = outcome.first_token_ms
            ordered = sorted(steps.items(), key=lambda step: step[1])
            for i, (name, ms) in enumerate(ordered):
                stamps[name].append((ms, ms - ordered[i - 1][1] if i else ms))
        rows = [(name, float(np.median([a for a, _ in v])), float(np.median([d for _, d in v])))
                for name, v in stamps.items()]
        return sorted(rows, key=lambda row: row[1])


# -- results ---------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return f"{model} · {os.cpu_count()} cores · torch {torch.__version__} ({torch.get_num_threads()} threads)"


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(name: str, outcomes: list[Outcome], events: Counter) -> dict:
    latency = [o for o in outcomes if o.utterance.kind != "gap"]
    pauses = [o.pause_ms for o in latency if o.pause_ms is not None]
    firsts = [o.first_token_ms for o in latency if o.first_token_ms is not None]
    row = {"name": name, "turns": f"{len(latency)} + {len(outcomes) - len(latency)} with a pause",
           "pause p50": percentile(pauses, 50), "pause p90": percentile(pauses, 90),
           "first p50": percentile(firsts, 50), "first p90": percentile(firsts, 90),
           "retracted": sum(o.retracted for o in outcomes), "dropped": sum(not o.replied for o in outcomes),
           "unseen": events["continue"] + max(0, events["resume"] - sum(o.retracted for o in outcomes)),
           "total": len(outcomes)}
    for gap_ms in GAPS_MS:
        split = [o.user_turns > 1 for o in outcomes if o.utterance.gap_ms == gap_ms]
        row[gap_ms] = (sum(split), len(split))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| configuration | turns | pause detected p50 (ms) | p90 | first token at client p50 (ms) | p90 | "
             + " | ".join(f"false turn-ends, {g} ms pause" for g in GAPS_MS)
             + " | speculative replies retracted: shown + unseen | dropped turns |", "|---" * (8 + len(GAPS_MS)) + "|"]
    for r in rows:
        splits = [f"{100 * k / n:.0f}% ({k}/{n})" if n else "-" for k, n in (r[g] for g in GAPS_MS)]
        lines.append(f"| {r['name']} | {r['turns']} | {rounded(r['pause p50'])} | {rounded(r['pause p90'])} | "
                     f"{rounded(r['first p50'])} | {rounded(r['first p90'])} | " + " | ".join(splits)
                     + f" | {r['retracted']} + {r['unseen']} | {r['dropped']}/{r['total']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=12, help="latency turns per configuration (single sentences)")
    parser.add_argument("--gap-turns", type=int, default=6,
                        help=f"utterances per mid-sentence pause length ({', '.join(map(str, GAPS_MS))} ms)")
    parser.add_argument("--pause-s", type=float, nargs="+", default=[TurnOptions.pause_s],
                        help="our turn-end pause(s), seconds: one 'ours' row each (default: the app's)")
    parser.add_argument("--end-of-turn", action="store_true",
                        help="a second 'ours' row per pause with the end-of-turn model (Smart Turn) on")
    parser.add_argument("--reply-tokens", type=int, default=REPLY_TOKENS, help="longest reply, tokens")
    parser.add_argument("--profile", action="store_true", help="stamp the server's steps and print where the time goes")
    parser.add_argument("--in-process", action="store_true",
                        help="the model in the server's process (the library's default), not in app.py's model process")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per utterance, and the app's turn lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("voxtral_app.conversation.speech").setLevel(logging.ERROR)  # replies are not spoken here
    transformers.utils.logging.disable_progress_bar()  # checkpoint writing and loading
    if args.verbose:
        logging.getLogger("voxtral_app.model.chat").setLevel(logging.INFO)
    with results.recording() as printed:
        data = run(args)
    results.write("turn-latency", printed.text, data, argv)


def run(args: argparse.Namespace) -> dict:
    """Measure every configuration and print the tables; -> the raw rows (and the profile)."""
    started = time.perf_counter()
    print(f"**{machine()}** · tiny random Voxtral on CPU · {args.reply_tokens}-token replies · "
          f"client in its own process\n", flush=True)
    profiler = Profiler() if args.profile else None
    if profiler:
        profiler.install()
    utterances = plan(args.turns, args.gap_turns)
    rows, heard, events = [], {}, count_turn_events()
    with tempfile.TemporaryDirectory() as workdir, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
        engine = app_engine(workdir, in_process=args.in_process)
        print(setup_line(args.in_process), flush=True)
        try:
            for name, build in configurations(engine, args.reply_tokens, args.pause_s, args.end_of_turn):
                with contextlib.redirect_stdout(io.StringIO()):  # gradio prints "new /" when mounted
                    app = build()
                events.clear()
                server = BackgroundServer(app)  # one app at a time: fastrtc's default emit loop polls without sleeping
                try:
                    heard[name] = client.submit(run_client, server.url, utterances, name.split()[0],
                                                args.verbose).result()
                finally:
                    server.stop()
                rows.append(summarize(name, heard[name], events))
        finally:
            engine.close()

    print(table(rows))
    default = rows[0]["first p50"]
    for ours in rows[1:]:
        if default and ours["first p50"]:
            print(f"\np50 first token at client, default / {ours['name']}: {default / ours['first p50']:.1f}x "
                  f"({default:.0f} ms / {ours['first p50']:.0f} ms)")
    profile = {}
    if profiler:
        for name, outcomes in heard.items():
            print(f"\nWhere the time goes, {name}: median over the latency turns\n")
            print("| step | ms after the end of speech left the client | ms since the step before |\n|---|---|---|")
            profile[name] = profiler.breakdown([o for o in outcomes if o.utterance.kind != "gap"])
            for step, at, delta in profile[name]:
                print(f"| {step} | {at:.0f} | {delta:.0f} |")
    print(f"\n{len(utterances)} utterances per configuration · wall time {time.perf_counter() - started:.0f} s")
    return {"rows": rows, "profile": profile, "utterances": len(utterances)}


if __name__ == "__main__":
    main()
