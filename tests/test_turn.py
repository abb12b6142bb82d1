"""Turn-taking on recorded speech: where turns end, when they resume, when someone barges in.

The end-of-turn decisions come from `Scripted`, a stand-in for Smart Turn whose verdicts the test
chooses, so these tests check the decision logic and never what a learned model thinks of a voice
(tests/test_endpoint.py checks Smart Turn itself, on a real recording). Wall time is a `Clock` the test
moves. The audio is committed (tests/data/): espeak-ng phrases and a real recording.
"""

from concurrent.futures import Future
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import espeak

from voxtral_app.audio.denoise import CleanOptions
from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.audio.vad import WINDOW, WINDOW_S, VadOptions
from voxtral_app.turns.end_of_turn import EndOfTurnOptions, shared_model
from voxtral_app.turns.taker import REASONS, TurnOptions, TurnTaker

PAUSE_ONLY = TurnOptions(end_of_turn=EndOfTurnOptions(enabled=False))  # every pause_s of silence ends a turn
MODEL = TurnOptions()  # with an end-of-turn model (the test passes a Scripted one)
TAIL_S = EndOfTurnOptions.hold_s + 0.5  # silence after speech: room for the longest hold
FINISHED, UNFINISHED = 0.99, 0.05  # verdicts far either side of EndOfTurnOptions.threshold


class Scripted:
    """An end-of-turn model whose answers are scripted: `check(audio)` returns an already-decided Future
    of the next of `verdicts` (the last repeats), or of `verdicts(audio)` when it is a function."""

    def __init__(self, *verdicts):
        self.verdicts = verdicts
        self.asked: list[np.ndarray] = []  # the audio of each check, in order

    def check(self, audio: np.ndarray) -> Future:
        self.asked.append(audio)
        script = self.verdicts
        future = Future()
        future.set_result(script[0](audio) if callable(script[0]) else script[min(len(self.asked), len(script)) - 1])
        return future


class Clock:
    """Wall time that passes only when the test says so (`run(..., clock=)` moves it with the audio)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def run(taker, audio, chunk_s=0.02, kinds=("speech", "end", "resume"), clock=None):
    """Feed audio in 20 ms frames, as WebRTC delivers it; -> [(kind, seconds into the audio, event)].
    With a `clock`, each frame arrives its own length after the one before, as in a live call; without,
    the audio arrives all at once (no wall time passes)."""
    step = int(chunk_s * SAMPLE_RATE)
    events = []
    for i in range(0, len(audio), step):
        if clock is not None:
            clock.now += step / SAMPLE_RATE
        events += [(e.kind, (i + step) / SAMPLE_RATE, e) for e in taker.feed(audio[i:i + step]) if e.kind in kinds]
    return events


@pytest.fixture(scope="module")
def phrase():
    return espeak("I was thinking about going to the beach tomorrow")


def test_turn_ends_shortly_after_speech(phrase):
    clock = Clock()
    start = clock.now
    events = run(TurnTaker(PAUSE_ONLY, clock=clock), np.concatenate([silence(0.5), phrase, silence(1.0)]), clock=clock)
    assert [kind for kind, _, _ in events] == ["speech", "end"]
    speech_end = 0.5 + len(phrase) / SAMPLE_RATE
    end_at = events[1][1]
    assert TurnOptions.pause_s <= end_at - speech_end <= TurnOptions.pause_s + 0.25
    turn = events[1][2].audio
    assert len(phrase) <= len(turn) <= len(phrase) + 0.7 * SAMPLE_RATE  # the phrase, a pre-roll and the pause
    assert events[1][2].reason == "pause"
    # speech_end is the clock's time when the last speech window arrived (within a window and a frame)
    assert abs(events[1][2].speech_end - start - speech_end) <= WINDOW_S + 0.02


def test_a_window_without_sound_is_silence_whatever_the_vad_says(phrase):
    """Silero keeps saying "speech" for a window or two of digital silence after a phrase; those count
    as silence, so the turn ends pause_s after the sound stops, a window (or two) sooner."""
    audio = np.concatenate([silence(0.5), phrase, silence(1.0)])
    gated = run(TurnTaker(PAUSE_ONLY), audio)
    ungated = run(TurnTaker(replace(PAUSE_ONLY, silence_dbfs=float("-inf"))), audio)
    assert [kind for kind, _, _ in gated] == [kind for kind, _, _ in ungated] == ["speech", "end"]
    sound_end = 0.5 + np.flatnonzero(np.abs(phrase) > 10 ** (TurnOptions.silence_dbfs / 20))[-1] / SAMPLE_RATE
    assert gated[1][1] - sound_end <= TurnOptions.pause_s + 0.064 + 0.02  # window phase + one 20 ms frame
    assert ungated[1][1] - gated[1][1] >= 0.032


@pytest.mark.parametrize("verdict, reason", [(FINISHED, "complete"), (UNFINISHED, "long_pause")])
def test_the_models_verdict_ends_the_turn_at_the_pause_or_holds_it(phrase, verdict, reason):
    """Finished: the turn ends at pause_s. Unfinished: it is held, asked again every recheck_s, and ends
    after hold_s of silence."""
    model = Scripted(verdict)
    events = run(TurnTaker(MODEL, model), np.concatenate([silence(0.5), phrase, silence(TAIL_S)]))
    assert [kind for kind, _, _ in events] == ["speech", "end"]
    end = events[1][2]
    assert end.reason == reason and end.finished == verdict
    waited = events[1][1] - 0.5 - len(phrase) / SAMPLE_RATE
    asked = [audio for audio in model.asked if len(audio) > len(phrase)]  # after the phrase (not at a word gap)
    if verdict == FINISHED:
        assert TurnOptions.pause_s <= waited <= TurnOptions.pause_s + 0.064 + 0.02 and len(asked) == 1
    else:
        hold = EndOfTurnOptions.hold_s
        assert hold <= waited <= hold + 0.064 + 0.02
        rechecks = (hold - TurnOptions.pause_s) / EndOfTurnOptions.recheck_s  # 2.9: asked at 0.032, 0.416, 0.736 s
        assert len(asked) == 1 + int(rechecks)


def silence_at_end(audio):
    return (len(audio) - 1 - np.flatnonzero(audio)[-1]) / SAMPLE_RATE


def test_a_model_that_changes_its_mind_on_a_recheck_ends_the_turn_then(phrase):
    model = Scripted(lambda audio: FINISHED if silence_at_end(audio) > 0.3 else UNFINISHED)  # at 0.2 s: no
    events = run(TurnTaker(MODEL, model), np.concatenate([silence(0.5), phrase, silence(TAIL_S)]))
    assert [kind for kind, _, _ in events] == ["speech", "end"]
    assert events[1][2].reason == "complete" and events[1][2].finished == FINISHED
    waited = events[1][1] - 0.5 - len(phrase) / SAMPLE_RATE
    recheck_at = TurnOptions.pause_s + EndOfTurnOptions.recheck_s
    assert recheck_at <= waited <= recheck_at + 0.064 + 0.02
    assert len(model.asked[-1]) > len(model.asked[-2])  # asked again about the turn with its longer silence


def test_without_rechecks_an_unfinished_turn_waits_for_the_hold(phrase):
    options = replace(MODEL, end_of_turn=EndOfTurnOptions(recheck_s=0.0))
    model = Scripted(lambda audio: FINISHED if silence_at_end(audio) > 0.3 else UNFINISHED)  # if it were asked
    events = run(TurnTaker(options, model), np.concatenate([silence(0.5), phrase, silence(TAIL_S)]))
    assert [(kind, e.reason, e.finished) for kind, _, e in events][1:] == [("end", "long_pause", UNFINISHED)]
    assert len([audio for audio in model.asked if len(audio) > len(phrase)]) == 1  # once, after the phrase


def test_a_decision_still_running_at_the_pause_holds_the_turn_until_it_arrives(phrase):
    """feed() waits at most wait_s for a decision at pause_s; then the turn is held (no end) and the
    decision is looked at again at every window, ending the turn as soon as it says finished."""
    decisions = []  # each still running
    options = replace(MODEL, end_of_turn=EndOfTurnOptions(wait_s=0.01))
    taker = TurnTaker(options, SimpleNamespace(check=lambda audio: decisions.append(Future()) or decisions[-1]))
    events = run(taker, np.concatenate([silence(0.5), phrase, silence(0.5)]))  # past pause_s, short of hold_s
    assert [kind for kind, _, _ in events] == ["speech"] and taker.state == "speaking"
    decisions[-1].set_result(FINISHED)
    end = run(taker, silence(2 * WINDOW_S))
    assert [(kind, e.reason, e.finished) for kind, _, e in end] == [("end", "complete", FINISHED)]


def test_the_model_starts_deciding_at_the_first_silent_window(phrase):
    """Smart Turn's ~0.1 s of CPU overlaps the rest of the pause: it starts one window into the silence,
    before the reply is prepared (speculate_s), and reads the turn with tail_s of silence at its end."""
    asked = []
    taker = TurnTaker(MODEL, Scripted(lambda audio: asked.append((taker.silence, audio)) or FINISHED))
    events = run(taker, np.concatenate([silence(0.5), phrase, silence(TAIL_S)]), kinds=("pause", "end"))
    assert [kind for kind, _, _ in events] == ["pause", "end"]
    assert len(asked[-1][1]) > len(phrase)  # asked after the phrase (and at any gap between its words)
    tail, first = int(EndOfTurnOptions.tail_s * SAMPLE_RATE), round(EndOfTurnOptions.start_s / WINDOW_S)
    assert first == 1 < round(TurnOptions.speculate_s / WINDOW_S)
    for silent_windows, audio in asked:
        assert silent_windows == first
        # [... the last speech window] [one silent window] [zeros up to tail_s]
        assert audio[-tail - WINDOW:-tail].any() and not audio[-(tail - WINDOW):].any()


@pytest.mark.parametrize("gap_s", [0.3, 0.5, 0.9])
def test_speech_back_within_the_resume_window_continues_the_turn(gap_s):
    """resume_s (1.0 s) counts from where the speech stopped: a 900 ms thinking pause stays one turn."""
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    events = run(TurnTaker(PAUSE_ONLY), np.concatenate([first, silence(gap_s), second, silence(1.0)]))
    assert [kind for kind, _, _ in events] == ["speech", "end", "resume", "end"]
    final = events[-1][2].audio
    assert len(final) >= len(first) + len(second)  # both parts in one turn


def test_speech_back_while_the_model_holds_the_turn_continues_it():
    """An unfinished verdict holds a 500 ms pause open: the speech after it is a "continue" (the unseen
    reply dropped), never an "end" then a "resume" as without the model."""
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    audio = np.concatenate([first, silence(0.5), second, silence(TAIL_S)])
    kinds = ("speech", "pause", "continue", "end", "resume")
    held = run(TurnTaker(MODEL, Scripted(UNFINISHED)), audio, kinds=kinds)
    assert [kind for kind, _, _ in held] == ["speech", "pause", "continue", "pause", "end"]
    assert len(held[-1][2].audio) >= len(first) + len(second)
    assert [kind for kind, _, _ in run(TurnTaker(PAUSE_ONLY), audio)] == ["speech", "end", "resume", "end"]


@pytest.mark.parametrize("sent_s, unsent_s, kinds", [
    (0.9, 0.15, ["speech", "end", "resume", "end"]),  # a 900 ms pause, its next frames 0.15 s late: one turn
    (0.3, 1.5, ["speech", "end", "speech", "end"]),  # 0.3 s of silence, then nothing for 1.5 s: a new turn
])
def test_resume_counts_audio_and_the_wall_time_a_client_sent_nothing(sent_s, unsent_s, kinds):
    """resume_s is audio time since the speech stopped, plus the wall time the client sent nothing (one
    that sends only while someone talks). A hearing thread running behind (frames late by 0.15 s) does
    not split a 900 ms thinking pause; 1.5 s with nothing sent does end the chance to resume."""
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    clock = Clock()
    taker = TurnTaker(PAUSE_ONLY, clock=clock)
    before = run(taker, np.concatenate([first, silence(sent_s)]))  # fed at once: no wall time passes
    clock.now += sent_s + unsent_s  # the silence's own length in real time, then the frames' lateness
    after = run(taker, np.concatenate([second, silence(1.0)]))
    assert [kind for kind, _, _ in before + after] == kinds


@pytest.mark.parametrize("verdict", [FINISHED, UNFINISHED])
def test_later_speech_is_a_new_turn(phrase, verdict):
    audio = np.concatenate([phrase, silence(TAIL_S + 0.5), phrase, silence(TAIL_S)])
    events = run(TurnTaker(MODEL, Scripted(verdict)), audio)
    assert [kind for kind, _, _ in events] == ["speech", "end", "speech", "end"]
    waited = TurnOptions.pause_s if verdict == FINISHED else EndOfTurnOptions.hold_s
    assert len(events[3][2].audio) <= len(phrase) + (TurnOptions.preroll_s + waited + 2 * WINDOW_S) * SAMPLE_RATE


def test_silence_and_noise_are_not_turns():
    noise = np.random.default_rng(0).normal(0, 0.003, 3 * SAMPLE_RATE).astype(np.float32)
    model = Scripted(FINISHED)
    assert run(TurnTaker(MODEL, model), np.concatenate([silence(2.0), noise])) == [] and model.asked == []


def test_endless_speech_is_cut_into_turns(speech):
    model = Scripted(FINISHED)  # even a model sure the speaker is done ends nothing before pause_s
    taker = TurnTaker(TurnOptions(max_turn_s=3.0, pause_s=5.0), model)  # only the cap can end a turn here
    events = run(taker, speech[: 10 * SAMPLE_RATE])
    ends = [e for kind, _, e in events if kind == "end"]
    assert len(ends) >= 2 and all(len(e.audio) <= 3.1 * SAMPLE_RATE for e in ends)
    assert {e.reason for e in ends} == {"max_turn"} and model.asked  # it was asked at the gaps between words


def test_short_pause_prepares_a_reply_and_speech_drops_it():
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    options = PAUSE_ONLY
    gap = silence((options.speculate_s + options.pause_s) / 2)  # long enough to prepare, too short to end
    events = run(TurnTaker(options), np.concatenate([first, gap, second, silence(1.0)]),
                 kinds=("speech", "pause", "continue", "end"))
    kinds = [kind for kind, _, _ in events]
    assert kinds[:3] == ["speech", "pause", "continue"] and kinds[-2:] == ["pause", "end"]
    pause, end = events[-2][2], events[-1][2]
    assert len(pause.audio) < len(end.audio) and np.array_equal(end.audio[: len(pause.audio)], pause.audio)
    assert pause.speech_end == end.speech_end


def test_thinking_pause_in_real_speech_holds_the_turn(speech):
    """A 500 ms pause inserted mid-sentence into a real recording (after 1.67 s, between two words),
    which the model calls unfinished (Smart Turn scores that gap low: tests/test_endpoint.py): the turn is
    held (no "end", nothing shown or taken back), and the sentence's real end (at 4.64 s, a 620 ms pause in
    the recording), which it calls finished, ends it as "complete"."""
    cut, end = int(1.67 * SAMPLE_RATE), int(4.64 * SAMPLE_RATE)
    audio = np.concatenate([speech[:cut], silence(0.5), speech[cut:end], silence(TAIL_S)])
    # asked at the sentence's end, the model reads 5.2 s (the turn from its onset at 0.4 s, the inserted
    # 0.5 s, tail_s); at the thinking pause and the word gaps before and after it, 1.2-3.8 s
    model = Scripted(lambda audio: FINISHED if len(audio) > 4.5 * SAMPLE_RATE else UNFINISHED)
    events = run(TurnTaker(MODEL, model), audio, kinds=("speech", "pause", "continue", "end", "resume"))
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("end") == 1 and "resume" not in kinds and kinds[-1] == "end"
    held = [t for kind, t, _ in events if kind == "continue"]
    assert any(1.67 + 0.5 <= t <= 1.67 + 0.75 for t in held)  # the thinking pause ended in a "continue"
    final = events[-1]
    assert final[2].reason == "complete" and final[2].finished == FINISHED
    assert final[1] - (len(audio) / SAMPLE_RATE - TAIL_S) < EndOfTurnOptions.hold_s  # sooner than the hold
    assert len(final[2].audio) >= end


@pytest.mark.parametrize("foreground_db, reasons", [(0.0, ["no_new_speech"]),
                                                     (TurnOptions.foreground_db, ["no_new_speech", "background"])])
def test_steady_noise_the_vad_calls_speech_still_ends_the_turn(phrase, foreground_db, reasons):
    """Loud steady noise after the speech: the energy VAD calls it speech at first (its floor adapts
    over seconds), but flat "speech" ends the turn ("no_new_speech"), and sooner, speech far below the
    speaker's level ("background")."""
    rng = np.random.default_rng(1)
    options = TurnOptions(vad=VadOptions(kind="energy"), end_of_turn=EndOfTurnOptions(enabled=False),
                          foreground_db=foreground_db)
    noise = rng.normal(0, 0.02, 4 * SAMPLE_RATE).astype(np.float32)  # -34 dBFS, far above the silence before
    events = run(TurnTaker(options), np.concatenate([silence(0.5), phrase, noise]))
    ends = [e for kind, _, e in events if kind == "end"]
    assert [kind for kind, _, _ in events][:2] == ["speech", "end"] and ends[0].reason in reasons
    assert len(ends[0].audio) < len(phrase) + (TurnOptions.energy_floor_s + TurnOptions.stale_s + 0.6) * SAMPLE_RATE


def babble(seconds, seed=0):
    """Four other espeak-ng voices talking at once, RMS 1 (each repeats its sentence, pauses included)."""
    voices = ("en-us+m3", "en+f2", "en-gb+m1", "en+f4")
    texts = ("What is the weather going to be like this weekend", "Explain how a rainbow forms in simple words",
             "Remind me to call my sister after lunch tomorrow", "Which planet in our solar system has the most moons")
    mix = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    for k, voice in enumerate(voices):
        talk = np.roll(np.resize(espeak(texts[k], voice), len(mix)), (seed + 1) * 7919 * (k + 1))
        mix += talk / np.sqrt(np.mean(talk ** 2))
    return mix / np.sqrt(np.mean(mix ** 2))


@pytest.mark.parametrize("verdict", [FINISHED, UNFINISHED])
@pytest.mark.parametrize("cleaning", [CleanOptions(), CleanOptions(noise_reduction=True, auto_gain=True)],
                         ids=["raw", "cleaned"])
def test_turn_in_babble_10_db_below_the_speaker_ends(cleaning, verdict):
    """Other voices never stop, so the VAD never hears silence; the speaker's turn still ends, and the
    voices after it neither resume it nor start a turn of their own. Noise suppression lowers the
    gaps between the voices more than the voices, so the room's level is judged before cleaning."""
    sentence = espeak("Please tell me a short joke about computers")
    room = babble(1.0 + len(sentence) / SAMPLE_RATE + 2.5) * np.sqrt(np.mean(sentence ** 2)) / 10 ** (10 / 20)
    audio = room.astype(np.float32)
    audio[SAMPLE_RATE: SAMPLE_RATE + len(sentence)] += sentence
    events = run(TurnTaker(replace(MODEL, cleaning=cleaning), Scripted(verdict)), audio)
    assert [kind for kind, _, _ in events] == ["speech", "end"] and events[0][1] > 1.0  # the speaker's turn
    waited = events[1][1] - 1.0 - len(sentence) / SAMPLE_RATE
    assert 0 < waited <= 1.5 and events[1][2].reason in REASONS


def test_reasons_are_named():
    assert set(REASONS) == {"complete", "long_pause", "pause", "no_new_speech", "background", "max_turn"}


def speech_in(sentence, noise_rms, before_s=1.0, after_s=TAIL_S, seed=0):
    """The sentence with white noise of `noise_rms` all through: before_s, the sentence, after_s."""
    noise = np.random.default_rng(seed).normal(0, noise_rms, int((before_s + after_s) * SAMPLE_RATE) + len(sentence))
    audio = noise.astype(np.float32)
    audio[int(before_s * SAMPLE_RATE): int(before_s * SAMPLE_RATE) + len(sentence)] += sentence
    return audio


@pytest.mark.parametrize("verdict", [FINISHED, UNFINISHED])
@pytest.mark.parametrize("cleaning", [CleanOptions(), CleanOptions(noise_reduction=True, auto_gain=True)])
def test_turn_in_white_noise_at_10_db_snr_ends(cleaning, verdict):
    sentence = espeak("Please tell me a short joke about computers")
    audio = speech_in(sentence, np.sqrt(np.mean(sentence ** 2)) / 10 ** (10 / 20))
    events = run(TurnTaker(replace(MODEL, cleaning=cleaning), Scripted(verdict)), audio)
    assert [kind for kind, _, _ in events] == ["speech", "end"]
    waited = events[1][1] - 1.0 - len(sentence) / SAMPLE_RATE
    assert 0 < waited <= EndOfTurnOptions.hold_s + 0.3


@pytest.mark.parametrize("verdict", [FINISHED, UNFINISHED])
@pytest.mark.parametrize("options", [MODEL, replace(MODEL, cleaning=CleanOptions(auto_gain=True)),
                                     replace(MODEL, vad=VadOptions(kind="webrtc"))], ids=["silero", "gain", "webrtc"])
def test_quiet_speaker_at_minus_35_dbfs_gets_a_turn_that_ends(options, verdict):
    sentence = espeak("Please tell me a short joke about computers")
    quiet = sentence * (10 ** (-35 / 20) / np.sqrt(np.mean(sentence ** 2)))
    audio = speech_in(quiet, 1e-5)  # a faint hiss, -100 dBFS
    events = run(TurnTaker(options, Scripted(verdict)), audio)
    assert [kind for kind, _, _ in events] == ["speech", "end"]
    waited = events[1][1] - 1.0 - len(sentence) / SAMPLE_RATE
    assert 0 < waited <= EndOfTurnOptions.hold_s + 0.3


def test_the_default_model_is_the_shared_smart_turn_and_off_means_none():
    assert TurnTaker().model is shared_model()
    assert TurnTaker(PAUSE_ONLY, Scripted(FINISHED)).model is None  # enabled=False wins over a given model
