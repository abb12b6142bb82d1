"""Turn-taking in harder rooms, over real WebRTC: noise, babble, a quiet voice, a telephone, thinking pauses.

    python bench/turn_sets.py --turns 2                # a short run (~10 min on 2 cores)
    python bench/turn_sets.py --turns 10               # the full run
    python bench/turn_sets.py --sets clean thinking --configs ours-smart-turn
    python bench/turn_sets.py --sets clean thinking-um --configs ours-smart-turn@0.128 ours-smart-turn@0.192 \
        --pause-s 0.128 0.192                           # ours at two pauses
    python bench/turn_sets.py --offline 0 10 20 --sets babble white10   # ours' turn-taking alone, no server

Same app, client and timing as bench/turn_latency.py (its speak()/drive() are reused): an aiortc
client in its own process says each utterance in real time, then its tail (silence, or the same
noise going on), and waits for the reply. Sets, all made here from espeak-ng voices and sox:
- clean: espeak-ng sentences and cuts of fastrtc's test recording (turn_latency's latency turns);
- thinking: one sentence with a 300, 600 or 900 ms pause inside, spoken as one sentence (SSML break),
  so the words before the pause carry the sentence's own prosody;
- thinking-um: the same sentences hesitating as people do, "..., um, <pause> ...": the filler is the cue an
  audio-only end-of-turn model can hear (espeak-ng's plain break sounds like a finished sentence);
- thinking-real: the first sentence of fastrtc's test recording (a real speaker) with one of its two
  short mid-sentence silences made 300, 600 or 900 ms long: espeak-ng's prosody misleads Smart Turn,
  a person's does not;
- white20, white10: steady white noise at 20 / 10 dB SNR from 0.5 s before the speech to its tail's end;
- babble: four other espeak-ng voices saying other sentences, mixed, at 10 dB below the speaker;
- quiet: the speaker at -35 dBFS (RMS while speaking);
- phone: sox band-pass 300-3400 Hz and 8 kHz sampling, as a telephone line.
Configurations: fastrtc's ReplyOnPause at its defaults, fastrtc tuned for speed with its documented
options (AlgoOptions(audio_chunk_duration=0.2, started_talking_threshold=0.1, speech_threshold=0.05),
SileroVadOptions(min_silence_duration_ms=100); the VAD model is the silero-vad package's, as in
turn_latency, so only its threshold applies), and ours: pause only (the app's default when the model runs on
this machine's CPU), with Smart Turn (its default with a GPU or a remote backend), and with Smart Turn +
WebRTC noise suppression and gain.

Per set and configuration: end of speech -> first VISIBLE reply token at the client (p50/p90/p99,
over the utterances that stayed one turn),
missed turns (speech never detected), flicker (utterances whose reply was shown and then taken
back), false cuts (one utterance left two user turns), never ended (speech detected, no reply within
turn_latency.TIMEOUT_S), and for ours how the turns ended.
"""

import argparse
import contextlib
import io
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import soundfile as sf
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results  # noqa: E402  (bench/results.py)
import turn_latency as tl  # noqa: E402 (sets the offline environment first)
from fastrtc import AlgoOptions, SileroVadOptions  # noqa: E402
from servers import BackgroundServer  # noqa: E402  (tests/servers.py, on the path via turn_latency)

from voxtral_app.audio.denoise import CleanOptions  # noqa: E402
from voxtral_app.audio.pcm import SAMPLE_RATE, prepare  # noqa: E402
from voxtral_app.conversation.conversation import ConversationOptions  # noqa: E402
from voxtral_app.serving.app import create_app  # noqa: E402
from voxtral_app.turns.end_of_turn import EndOfTurnOptions  # noqa: E402
from voxtral_app.turns.taker import TurnOptions, TurnTaker  # noqa: E402

SETS = ("clean", "thinking", "thinking-um", "thinking-real", "white20", "white10", "babble", "quiet", "phone")
THINKING_MS = (300, 600, 900)
LEAD_S = 0.5  # noise before the speech in the noisy sets
QUIET_DBFS = -35.0
BABBLE_VOICES = ("en-us+m3", "en+f2", "en-gb+m1", "en+f4")
THINKING = [  # (before the pause, after it), one sentence
    ("I was thinking about", "going to the beach tomorrow"),
    ("Could you tell me", "what time the museum opens"),
    ("I need to buy", "some milk and a loaf of bread"),
    ("My plan for the weekend", "is to clean out the garage"),
    ("I am looking for", "a recipe with chicken and rice"),
]


# fastrtc's test recording: its first sentence ends at 4.64 s; at 1.70 s and 3.29 s it has short silences
# between words, inside that sentence (tests/test_endpoint.py: Smart Turn scores them 0.01-0.05)
RECORDING_SENTENCE_END_S = 4.64
RECORDING_GAPS_S = (1.70, 3.29)


def espeak(text: str, voice: str = "en-us", ssml: bool = False) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, *(["-m"] if ssml else []), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return tl.trim(prepare(rate, samples, max_seconds=60))


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio))))


def telephone(audio: np.ndarray) -> np.ndarray:
    """sox: band-pass 300-3400 Hz, down to 8 kHz (and back to 16 kHz, what the client sends)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    out = subprocess.run(["sox", "-t", "wav", "-", "-t", "wav", "-e", "floating-point", "-", "sinc", "300-3400",
                          "rate", "8k"], input=buffer.getvalue(), capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(out), dtype="float32")
    return tl.trim(prepare(rate, samples, max_seconds=60))


def babble(seconds: float, seed: int) -> np.ndarray:
    """Four espeak-ng voices saying other sentences at once, looped to `seconds`, RMS 1."""
    rng = np.random.default_rng(seed)
    mix = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    for voice in BABBLE_VOICES:
        talk = np.concatenate([espeak(tl.SENTENCES[k], voice) for k in rng.permutation(len(tl.SENTENCES))[:4]])
        talk = np.roll(np.resize(talk, len(mix)), int(rng.integers(len(talk))))
        mix += talk / rms(talk)
    return mix / rms(mix)


def in_noise(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> tuple[np.ndarray, np.ndarray]:
    """(lead noise + speech with noise, tail noise): noise scaled to `snr_db` below the speech, RMS 1 in."""
    noise = noise * rms(speech) / 10 ** (snr_db / 20)
    lead = int(LEAD_S * SAMPLE_RATE)
    audio = noise[: lead + len(speech)].copy()
    audio[lead:] += speech
    return audio.astype(np.float32), noise[lead + len(speech): lead + len(speech) + int(tl.TAIL_S * SAMPLE_RATE)]


def make_set(name: str, turns: int) -> list[tl.Utterance]:
    if name == "clean":
        return [replace(u, set=name) for u in tl.plan(turns, 0)]
    if name in ("thinking", "thinking-um"):
        out, um = [], ", um," if name == "thinking-um" else ""
        for i in range(turns):
            for j, gap_ms in enumerate(THINKING_MS):
                before, after = THINKING[(i * len(THINKING_MS) + j) % len(THINKING)]
                audio = espeak(f"{before}{um} <break time='{gap_ms}ms'/> {after}.", ssml=True)
                out.append(tl.Utterance("gap", f"{before}{um} … {after}", audio, gap_ms, set=name))
        return out
    if name == "thinking-real":  # a real speaker's mid-sentence prosody, the pause made longer
        sentence = tl.recording()[: int(RECORDING_SENTENCE_END_S * SAMPLE_RATE)]
        out = []
        for i in range(turns):
            for j, gap_ms in enumerate(THINKING_MS):
                cut = int(RECORDING_GAPS_S[(i * len(THINKING_MS) + j) % len(RECORDING_GAPS_S)] * SAMPLE_RATE)
                audio = np.concatenate([sentence[:cut], np.zeros(gap_ms * SAMPLE_RATE // 1000, np.float32),
                                        sentence[cut:]])
                out.append(tl.Utterance("gap", f"test_file.wav 0-4.64 s, {gap_ms} ms at {cut / SAMPLE_RATE:.2f} s",
                                        tl.trim(audio), gap_ms, set=name))
        return out
    out = []
    for i in range(turns):
        text = tl.SENTENCES[i % len(tl.SENTENCES)]
        speech = espeak(text)
        total = LEAD_S + len(speech) / SAMPLE_RATE + tl.TAIL_S + 0.1
        rng = np.random.default_rng(i)
        if name in ("white20", "white10"):
            audio, tail = in_noise(speech, rng.normal(0, 1, int(total * SAMPLE_RATE)), float(name[5:]))
        elif name == "babble":
            audio, tail = in_noise(speech, babble(total, i), 10.0)
        elif name == "quiet":
            audio, tail = speech * (10 ** (QUIET_DBFS / 20) / rms(speech)), None
        elif name == "phone":
            audio, tail = telephone(speech), None
        else:
            raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")
        out.append(tl.Utterance("espeak", text, audio.astype(np.float32), tail=tail, set=name))
    return out


FASTRTC = {  # fastrtc's ReplyOnPause: tl.DefaultTurns(engine, options, *these)
    "fastrtc-default": (),
    "fastrtc-tuned": (AlgoOptions(audio_chunk_duration=0.2, started_talking_threshold=0.1, speech_threshold=0.05),
                      None, SileroVadOptions(min_silence_duration_ms=100)),
}


def configurations(engine, reply_tokens: int, pauses_s: list[float]) -> dict:
    options = ConversationOptions(max_audio_s=engine.options.max_audio_s, reply_tokens=reply_tokens)
    configs = {name: lambda extra=extra: create_app(engine, options, handler=tl.DefaultTurns(engine, options, *extra))
               for name, extra in FASTRTC.items()}
    for name, turns in ours_turns(pauses_s).items():
        configs[name] = lambda turns=turns: create_app(engine, replace(options, turns=turns))
    return configs


def ours_turns(pauses_s: list[float]) -> dict[str, TurnOptions]:
    """Ours' three configurations at each pause (named name@pause when it is not just the default's)."""
    out, t = {}, TurnOptions()
    for pause_s in pauses_s:  # the reply prepared as long before the pause as by default
        turns = replace(t, pause_s=pause_s, speculate_s=max(0.032, pause_s - (t.pause_s - t.speculate_s)))
        suffix = "" if pauses_s == [t.pause_s] else f"@{pause_s:g}"
        out.update({"ours-pause-only" + suffix: replace(turns, end_of_turn=EndOfTurnOptions(enabled=False)),
                    "ours-smart-turn" + suffix: turns,
                    "ours-smart-turn-clean" + suffix: replace(turns, cleaning=CleanOptions(noise_reduction=True,
                                                                                         auto_gain=True))})
    return out


def offline(turns: TurnOptions, utterances: list[tl.Utterance], offset_ms: float) -> list[dict]:
    """Each utterance fed straight into a TurnTaker in 20 ms frames (no server, no codec, no clock):
    its turn events, so that a turn-taking question can be answered in a minute and without timing
    noise. `offset_ms` of silence first shifts the VAD's 32 ms window grid against the speech."""
    frame = SAMPLE_RATE // 50
    turns = replace(turns, end_of_turn=replace(turns.end_of_turn, wait_s=30.0))  # fed faster than real time:
    out = []  # wait for each decision as a live stream would have had it
    for u in utterances:
        taker = TurnTaker(turns)
        tail = u.tail if u.tail is not None else np.zeros(int(tl.TAIL_S * SAMPLE_RATE), np.float32)
        lead = np.zeros(SAMPLE_RATE // 2 + int(offset_ms * SAMPLE_RATE / 1000), np.float32)
        audio = np.concatenate([lead, u.audio, tail, np.zeros(SAMPLE_RATE, np.float32)])
        kinds = [e.kind for i in range(0, len(audio), frame) for e in taker.feed(audio[i:i + frame])
                 if e.kind in ("speech", "end", "resume")]
        out.append({"set": u.set, "heard": "speech" in kinds, "flicker": "resume" in kinds,  # only an end resumes
                    "cut": kinds.count("speech") > 1, "never": "speech" in kinds and "end" not in kinds})
    return out


def offline_table(config: str, offset_ms: float, events: list[dict], sets: list[str]) -> str:
    lines = []
    for name in sets:
        rows = [e for e in events if e["set"] == name]
        lines.append(f"| {name} | {config} | {offset_ms:g} | {len(rows)} | {sum(not e['heard'] for e in rows)} | "
                     f"{sum(e['flicker'] for e in rows)} | {sum(e['cut'] for e in rows)} | "
                     f"{sum(e['never'] for e in rows)} |")
    return "\n".join(lines)


def during(times, outcome: tl.Outcome) -> list:
    return [t for t in times if outcome.started <= t[0] <= outcome.ended + 0.5]


def summarize(config: str, name: str, outcomes: list[tl.Outcome]) -> dict:
    ours = config.startswith("ours")
    firsts, missed, never, reasons = [], 0, 0, Counter()
    for o in outcomes:
        if o.first_token_ms is not None and o.user_turns == 1:  # a split turn's reply may come before its end
            firsts.append(o.first_token_ms)
        if ours:
            events = during(tl.TURN_EVENTS, o)
            heard = any(kind in ("speech", "resume") for _, kind, _ in events)
            reasons.update(reason for _, kind, reason in events if kind == "end")
        else:
            heard = bool(during([(t,) for t in tl.DefaultTurns.starts], o))
        if not o.replied:
            missed += not heard
            never += heard
    pct = {q: tl.percentile(firsts, q) for q in (50, 90, 99)}
    return {"set": name, "config": config, "turns": len(outcomes), **pct, "missed": missed,
            "flicker": sum(o.retracted > 0 for o in outcomes), "cuts": sum(o.user_turns > 1 for o in outcomes),
            "never": never, "reasons": ", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "-"}


def table(rows: list[dict]) -> str:
    lines = ["| set | configuration | turns | first visible token p50 / p90 / p99 (ms) | missed | flicker | "
             "false cuts | never ended | how ours ended |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['config']} | {r['turns']} | {tl.rounded(r[50])} / {tl.rounded(r[90])} / "
                     f"{tl.rounded(r[99])} | {r['missed']} | {r['flicker']} | {r['cuts']} | {r['never']} | "
                     f"{r['reasons']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10, help="utterances per set (x3 for the thinking sets: one per pause)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--configs", nargs="+", default=None, help="configurations (default: fastrtc's two, and ours' three at each --pause-s)")
    parser.add_argument("--reply-tokens", type=int, default=tl.REPLY_TOKENS, help="longest reply, tokens")
    parser.add_argument("--pause-s", type=float, nargs="+", default=[TurnOptions.pause_s],
                        help="ours' pause that ends a turn, seconds (several: each of ours at each, named name@pause)")
    parser.add_argument("--offline", type=float, nargs="*", metavar="OFFSET_MS", default=None,
                        help="ours' turn-taking only, each utterance fed straight into a TurnTaker (no server), "
                        "with the VAD's window grid shifted by each OFFSET_MS (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per utterance")
    parser.add_argument("--in-process", action="store_true",
                        help="the model in the server's process (the library's default), not in app.py's model process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("voxtral_app.conversation.speech").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()

    unknown = set(args.configs or []) - {*FASTRTC, *ours_turns(args.pause_s)}
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join([*FASTRTC, *ours_turns(args.pause_s)])}")
    started = time.perf_counter()
    utterances = [u for name in args.sets for u in make_set(name, args.turns)]
    with results.recording() as printed:
        data = (offline_run if args.offline is not None else run)(args, utterances, started)
    results.write("turn-sets-offline" if args.offline is not None else "turn-sets", printed.text, data, argv)


def offline_run(args: argparse.Namespace, utterances: list[tl.Utterance], started: float) -> dict:
    """--offline: ours' turn-taking fed straight from the utterances; prints its table, -> the raw events."""
    turns = {name: turns for name, turns in ours_turns(args.pause_s).items()
             if args.configs is None or name in args.configs}
    print("| set | configuration | grid offset (ms) | turns | missed | flicker | false cuts | never ended |\n"
          + "|---" * 8 + "|")
    events = {}
    for offset_ms in args.offline or [0.0]:
        for name, options in turns.items():
            found = offline(options, utterances, offset_ms)
            events[f"{name}@{offset_ms:g}ms"] = found
            print(offline_table(name, offset_ms, found, args.sets), flush=True)
    print(f"\n{len(utterances)} utterances per configuration and offset · wall time "
          f"{time.perf_counter() - started:.0f} s")
    return {"events": events, "utterances": len(utterances)}


def run(args: argparse.Namespace, utterances: list[tl.Utterance], started: float) -> dict:
    """Every configuration over real WebRTC; prints the table, -> its rows."""
    print(f"**{tl.machine()}** · tiny random Voxtral on CPU · {args.reply_tokens}-token replies · "
          f"client in its own process\n", flush=True)
    rows = []
    tl.count_turn_events()
    with tempfile.TemporaryDirectory() as workdir, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
        engine = tl.app_engine(workdir, in_process=args.in_process)
        print(tl.setup_line(args.in_process), flush=True)
        try:
            configs = configurations(engine, args.reply_tokens, args.pause_s)
            for config in args.configs or list(configs):
                with contextlib.redirect_stdout(io.StringIO()):  # gradio prints "new /" when mounted
                    app = configs[config]()
                server = BackgroundServer(app)
                try:
                    outcomes = client.submit(tl.run_client, server.url, utterances, config, args.verbose).result()
                finally:
                    server.stop()
                for name in args.sets:
                    rows.append(summarize(config, name, [o for o in outcomes if o.utterance.set == name]))
                print(f"{config} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        finally:
            engine.close()
    rows.sort(key=lambda r: args.sets.index(r["set"]))
    print(table(rows))
    print(f"\n{len(utterances)} utterances per configuration · wall time {time.perf_counter() - started:.0f} s")
    return {"rows": rows, "utterances": len(utterances)}


if __name__ == "__main__":
    main()
