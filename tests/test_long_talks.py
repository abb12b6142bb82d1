"""Long spoken conversations: old spoken turns become their transcripts (at most `audio_turns` clips in
a prompt), captions beside the replies, and prompts that stay exactly mistral-common's encoding."""

import time

import numpy as np
import pytest
from test_conversation import GREEDY, events_until_finished

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.backends.contract import UNHEARD, ageing, as_text, is_spoken
from voxtral_app.conversation.conversation import Conversation, ConversationOptions
from voxtral_app.conversation.events import ReplyFinished, UserTranscript, UserTurn
from voxtral_app.model import prompt as prompts
from voxtral_app.turns.taker import TurnEvent


def clips_in(ids: list[int], engine) -> int:
    return ids.count(engine.begin_audio_id)


def test_ageing_goes_in_batches_and_never_past_the_cap():
    for keep in range(1, 6):
        spoken = 0
        rebuilds = 0
        for _ in range(20):  # each turn: age, then the new spoken turn joins
            due = ageing(spoken, keep)
            assert spoken - due + 1 <= keep
            rebuilds += due > 0
            spoken = spoken - due + 1
        assert rebuilds <= 20 // max(keep - keep // 2, 1) + 1  # every few turns, not every turn


def test_a_spoken_turn_as_text_keeps_its_typed_words():
    message = prompts.user_message(np.full(SAMPLE_RATE, 0.1, dtype=np.float32), "and this")
    assert is_spoken(message)
    text = as_text(message, "hello there")
    assert not is_spoken(text) and text["content"] == [{"type": "text", "text": "hello there\nand this"}]
    assert as_text(message, "")["content"][0]["text"].startswith(UNHEARD)


@pytest.mark.slow
def test_the_seventh_spoken_turn_keeps_three_clips_and_captions_come_beside(engine, shadowed, speech, other_speech):
    """Seven spoken turns with captions on: each turn's caption arrives as UserTranscript; the older turns
    become exactly their captions; every prompt holds at most 3 clips and equals mistral-common's encoding
    of the messages (the `shadowed` check), and every launch continues what its slot holds."""
    assert engine.options.audio_turns == 3
    conversation = Conversation(engine, ConversationOptions(reply_tokens=6, captions=True), settings=GREEDY,
                                name="long").open()
    clips = [speech[: int((1.0 + 0.25 * k) * SAMPLE_RATE)] if k % 2 else other_speech[:SAMPLE_RATE]
             for k in range(7)]
    captions, prompts_seen = {}, []
    try:
        for clip in clips:
            conversation.post("speech", TurnEvent("speech"))  # the person starts: old turns age now
            conversation.post("end", TurnEvent("end", clip, time.perf_counter()))
            seen = events_until_finished(conversation)
            assert isinstance(seen[-1], ReplyFinished) and seen[-1].error is None, seen[-1]
            turn = next(e.turn for e in seen if isinstance(e, UserTurn))
            prompts_seen.append(conversation.chat.prompt_ids if conversation.chat.current else None)
            deadline = time.monotonic() + 60
            while turn not in captions and time.monotonic() < deadline:  # the caption comes beside the reply
                event = conversation.outbox.get(timeout=60)
                if isinstance(event, UserTranscript):
                    captions[event.turn] = event.text
            for event in seen:
                if isinstance(event, UserTranscript):
                    captions[event.turn] = event.text
            assert turn in captions
        messages = conversation.chat.messages
        audio_kept = [m for m in messages if is_spoken(m)]
        assert len(audio_kept) <= 3
        texts = [m["content"][0]["text"] for m in messages if m["role"] == "user" and not is_spoken(m)]
        assert texts == [captions[t] or UNHEARD for t in range(1, len(texts) + 1)]
        assert len(texts) >= 4
    finally:
        conversation.close()
    assert conversation.closed.wait(30)
    assert not shadowed.errors, shadowed.errors
    assert all(ids is not None and clips_in(ids, engine) <= 3 for ids in prompts_seen)
    assert clips_in(prompts_seen[-1], engine) >= 2  # the newest turns are still heard as audio
