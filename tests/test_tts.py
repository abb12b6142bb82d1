"""Streamed reply text becomes sentences as soon as they are complete, and real espeak-ng speech."""

import logging

import numpy as np
import pytest

from voxtral_app.conversation.speech import (
    MAX_SENTENCE_CHARS,
    EspeakSpeaker,
    SentenceSplitter,
    VoiceOptions,
    load_speaker,
    strip_markdown,
)


def split(text: str, piece_chars: int = 1) -> tuple[list[str], list[str]]:
    """Feed `text` in pieces of `piece_chars`: (sentences from push, sentences from flush)."""
    splitter = SentenceSplitter()
    pushed = []
    for i in range(0, len(text), piece_chars):
        pushed += splitter.push(text[i:i + piece_chars])
    return pushed, splitter.flush()


@pytest.fixture(scope="module")
def espeak() -> EspeakSpeaker:
    return EspeakSpeaker("en-us", 175)


def test_streamed_char_by_char():
    text = "Hello there! How are you? I'm fine… Thanks for calling.\nBye"
    pushed, rest = split(text)
    assert pushed == ["Hello there!", "How are you?", "I'm fine…", "Thanks for calling."]
    assert rest == ["Bye"]
    assert split(text, piece_chars=7) == (pushed, rest)  # same sentences whatever the piece sizes


def test_a_sentence_waits_for_the_whitespace_after_its_period():
    splitter = SentenceSplitter()
    assert splitter.push("It costs 3.") == []  # may still become 3.5
    assert splitter.push("5 dollars. ") == ["It costs 3.5 dollars."]
    assert splitter.push('She said "yes." Then') == ['She said "yes."']
    assert splitter.flush() == ["Then"]
    assert splitter.flush() == []


@pytest.mark.parametrize("text", [
    "Dr. Smith will see you at 3.5 p.m. tomorrow, e.g. after lunch.",
    "Ask Mr. J. R. Tolkien, i.e. the author, about version 2.0.1 of the map.",
    "Prices rose 4.25 percent vs. last year.",
])
def test_abbreviations_and_numbers_do_not_split(text):
    pushed, rest = split(text + " Next one.")
    assert pushed == [text]
    assert rest == ["Next one."]


def test_numbered_list_items_are_sentences():
    pushed, rest = split("Steps:\n1. Open the app.\n2. Press call.\n")
    assert pushed == ["Steps:", "1. Open the app.", "2. Press call."]
    assert rest == []


def test_run_on_sentence_is_capped_at_a_comma_or_space():
    clause = "and then we walked a little further down the road"
    run_on = ", ".join([clause] * 10) + "."
    pushed, rest = split(run_on)
    assert len(pushed) >= 2
    for sentence in pushed:
        assert len(sentence) <= MAX_SENTENCE_CHARS
        assert sentence.endswith(",")  # cut at a clause boundary, comma kept
    assert " ".join(pushed + rest) == run_on  # nothing lost or doubled

    no_commas = " ".join(["word"] * 120)
    pushed, rest = split(no_commas)
    assert pushed and all(len(s) <= MAX_SENTENCE_CHARS for s in pushed)
    assert " ".join(pushed + rest) == no_commas

    pushed, rest = split("x" * 450)  # no space at all: hard cut
    assert pushed == ["x" * 200, "x" * 200] and rest == ["x" * 50]


def test_markdown_is_not_spoken():
    text = "# Plan\n**Bold** move with `code`.\n- first item\n* second item\n---\nSee [the docs](http://x.y/z). "
    pushed, rest = split(text)
    assert pushed == ["Plan", "Bold move with code.", "first item", "second item", "See the docs."]
    assert rest == []
    assert strip_markdown("  ## **Hi**   there ") == "Hi there"


def test_flush_returns_the_remainder_and_resets():
    splitter = SentenceSplitter()
    assert splitter.push("Almost done, just one more") == []
    assert splitter.flush() == ["Almost done, just one more"]
    assert splitter.push("Fresh turn. ") == ["Fresh turn."]
    assert SentenceSplitter().flush() == []
    assert split("   \n \n")[1] == []


def test_espeak_speaks(espeak):
    rate, samples = espeak.synthesize("Hello there, how are you today?")
    assert rate == espeak.sample_rate == 22_050
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert 1.0 < len(samples) / rate < 4.0
    assert 0.05 < np.abs(samples).max() <= 1.0


def test_empty_text_is_silence(espeak):
    for text in ["", "   \n\t"]:
        rate, samples = espeak.synthesize(text)
        assert rate == 22_050 and samples.shape == (0,) and samples.dtype == np.float32


def test_hostile_text_is_spoken_safely(espeak, tmp_path):
    marker = tmp_path / "pwned"
    text = f"""--help '; rm -rf / "$(touch {marker})" `touch {marker}` | && > café 日本語 “quotes” ünïcode"""
    rate, samples = espeak.synthesize(text)
    assert not marker.exists()  # no shell ever saw the text
    assert len(samples) / rate > 1.0 and np.abs(samples).max() > 0.05  # spoken, not parsed as options


def test_unknown_espeak_voice_fails_clearly():
    with pytest.raises(RuntimeError, match="voice does not exist"):
        load_speaker(VoiceOptions(engine="espeak", voice="nosuchvoice"))


def test_sentences_are_ready_before_the_rest_of_the_reply_arrives(espeak):
    pieces = ["Hello", " there.", " This", " is", " the", " rest", " of", " it.", " Bye"]
    splitter = SentenceSplitter()
    ready = [(i, sentence) for i, piece in enumerate(pieces) for sentence in splitter.push(piece)]
    ready += [(len(pieces), sentence) for sentence in splitter.flush()]
    assert ready == [(2, "Hello there."), (8, "This is the rest of it."), (9, "Bye")]  # " This" completes one
    rate, samples = espeak.synthesize(ready[0][1])
    assert rate == 22_050 and np.abs(samples).max() > 0.05


def test_auto_falls_back_to_espeak_here(caplog):
    """The default start (kokoro is not in requirements.txt): espeak-ng, with kokoro's absence at DEBUG only;
    asking for kokoro by name (--voice kokoro) makes its absence a warning."""
    caplog.set_level(logging.DEBUG, logger="voxtral_app.conversation.speech")
    speaker = load_speaker(VoiceOptions(engine="auto"))
    assert speaker.engine == "espeak" and speaker.sample_rate == 22_050
    assert [r.levelname for r in caplog.records if "kokoro" in r.getMessage()] == ["DEBUG"]
    rate, samples = speaker.synthesize("Fallback works.")
    assert rate == 22_050 and len(samples) > 0
    caplog.clear()
    assert load_speaker(VoiceOptions(engine="kokoro")).engine == "espeak"
    assert [r.levelname for r in caplog.records if "kokoro" in r.getMessage()] == ["WARNING"]
