"""Turn-taking on real speech: where turns end, when they resume, when someone barges in."""

import numpy as np
import pytest
from conftest import espeak

from voxtral_app.audio import SAMPLE_RATE
from voxtral_app.turn import TurnOptions, TurnTaker


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def run(taker, audio, chunk_s=0.02, kinds=("speech", "end", "resume")):
    """Feed audio in 20 ms frames, as WebRTC delivers it; -> [(kind, seconds into the audio, event)]."""
    step = int(chunk_s * SAMPLE_RATE)
    events = []
    for i in range(0, len(audio), step):
        events += [(e.kind, (i + step) / SAMPLE_RATE, e) for e in taker.feed(audio[i:i + step]) if e.kind in kinds]
    return events


@pytest.fixture(scope="module")
def phrase():
    return espeak("I was thinking about going to the beach tomorrow")


def test_turn_ends_shortly_after_speech(phrase):
    events = run(TurnTaker(), np.concatenate([silence(0.5), phrase, silence(1.0)]))
    assert [kind for kind, _, _ in events] == ["speech", "end"]
    speech_end = 0.5 + len(phrase) / SAMPLE_RATE
    end_at = events[1][1]
    assert TurnOptions.pause_s <= end_at - speech_end <= TurnOptions.pause_s + 0.25
    turn = events[1][2].audio
    assert len(phrase) <= len(turn) <= len(phrase) + 0.7 * SAMPLE_RATE  # the phrase, a pre-roll and the pause


@pytest.mark.parametrize("gap_s", [0.3, 0.5])
def test_speech_back_within_the_resume_window_continues_the_turn(phrase, gap_s):
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    events = run(TurnTaker(), np.concatenate([first, silence(gap_s), second, silence(1.0)]))
    kinds = [kind for kind, _, _ in events]
    assert kinds in (["speech", "end", "resume", "end"], ["speech", "end"])  # a 300 ms gap may not even end it
    final = events[-1][2].audio
    assert len(final) >= len(first) + len(second)  # both parts in one turn


def test_later_speech_is_a_new_turn(phrase):
    events = run(TurnTaker(), np.concatenate([phrase, silence(1.5), phrase, silence(1.0)]))
    assert [kind for kind, _, _ in events] == ["speech", "end", "speech", "end"]
    assert len(events[3][2].audio) < 1.5 * len(phrase)


def test_silence_and_noise_are_not_turns():
    noise = np.random.default_rng(0).normal(0, 0.003, 3 * SAMPLE_RATE).astype(np.float32)
    assert run(TurnTaker(), np.concatenate([silence(2.0), noise])) == []


def test_endless_speech_is_cut_into_turns(speech):
    taker = TurnTaker(TurnOptions(max_turn_s=3.0, pause_s=5.0))  # only the cap can end a turn here
    events = run(taker, speech[: 10 * SAMPLE_RATE])
    ends = [e for kind, _, e in events if kind == "end"]
    assert len(ends) >= 2 and all(len(e.audio) <= 3.1 * SAMPLE_RATE for e in ends)


def test_short_pause_prepares_a_reply_and_speech_drops_it():
    first, second = espeak("I was thinking about"), espeak("going to the beach tomorrow")
    options = TurnOptions()
    gap = silence((options.speculate_s + options.pause_s) / 2 + 0.03)  # long enough to prepare, too short to end
    events = run(TurnTaker(options), np.concatenate([first, gap, second, silence(1.0)]),
                 kinds=("speech", "pause", "continue", "end"))
    kinds = [kind for kind, _, _ in events]
    assert kinds[:3] == ["speech", "pause", "continue"] and kinds[-2:] == ["pause", "end"]
    pause, end = events[-2][2], events[-1][2]
    assert len(pause.audio) < len(end.audio) and np.array_equal(end.audio[: len(pause.audio)], pause.audio)
    assert pause.speech_end == end.speech_end
