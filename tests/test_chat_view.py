"""The page's view of a conversation (serving/chat_view.py), from synthetic events: replies are
plain messages with a footer in words, spoken turns get their caption, the voice loop's state and
a call's ending reach the page."""

import numpy as np

from voxtral_app.audio.pcm import SAMPLE_RATE
from voxtral_app.conversation.conversation import ConversationOptions
from voxtral_app.conversation.events import (
    Closed,
    ReplyDelta,
    ReplyFinished,
    ReplyRetracted,
    ReplyStarted,
    ReplyStats,
    StateChanged,
    UserTranscript,
    UserTurn,
)
from voxtral_app.serving.chat_view import CLOSED, ChatView, Output

TYPED = ReplyStats(mode="chat", source="text", first_token_ms=180, tokens=8, tokens_per_s=41.0)
SPOKEN = ReplyStats(mode="chat", source="speech", pause_ms=600, first_token_ms=240, tokens=4, tokens_per_s=12.5)


def outputs(view: ChatView, *events) -> list:
    return [output for event in events for output in view.render(event)]


def said(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def test_a_finished_reply_is_the_streaming_message_with_a_footer():
    view = ChatView(ConversationOptions(clips=0))
    streaming = outputs(view, UserTurn(1, "text", text="Hi"), ReplyStarted(1, 0.18, TYPED),
                        ReplyDelta(1, "Hello", "Hello"))[-1]
    assert streaming.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    finished = outputs(view, ReplyFinished(1, "Hello there.", TYPED))[-1]
    assert finished.final and finished.status["first_token_ms"] == 180
    assert finished.history[-1] == {"role": "assistant", "content": "Hello there.\n\n"
                                    "<sub>💬 Reply · answered 180 ms after you sent it · 41.0 tok/s</sub>"}
    spoken = outputs(view, UserTurn(2, "speech", audio=said(1.0)), ReplyStarted(2, 0.24, SPOKEN),
                     ReplyFinished(2, "Yes.", SPOKEN, interrupted=True))[-1]
    assert [m["role"] for m in spoken.history] == ["user", "assistant"] * 2  # the next turn: new messages
    assert spoken.history[-1]["content"] == ("Yes.\n\n<sub>💬 Reply · answered 240 ms after you stopped · "
                                             "12.5 tok/s · interrupted</sub>")
    transcript = ReplyStats(mode="transcribe", language="en", source="upload", first_token_ms=90)
    last = outputs(view, UserTurn(3, "upload", audio=said(1.0)), ReplyFinished(3, "hi", transcript))[-1]
    assert last.history[-1]["content"].endswith("<sub>📝 Transcript (en) · answered 90 ms after you sent it · "
                                                "0.0 tok/s</sub>")
    assert not any("metadata" in m for m in last.history)  # gradio folds a message with a title


def test_a_spoken_turn_is_captioned_with_what_was_heard():
    view = ChatView(ConversationOptions(clips=0))
    outputs(view, UserTurn(1, "speech", audio=said(1.5)))
    early = outputs(view, UserTranscript(1, "  what  was\nsaid "))[-1]  # before the reply's first token
    assert early.history == [{"role": "user", "content": "🎙️ 1.5 s of speech"},
                             {"role": "user", "content": "“what was said”"},
                             {"role": "assistant", "content": ""}]
    outputs(view, ReplyStarted(1, 0.2, SPOKEN), ReplyDelta(1, "Ok", "Ok"))
    later = outputs(view, UserTranscript(1, "what was said, then"))[-1]  # a newer caption of the same turn
    assert [m["content"] for m in later.history] == ["🎙️ 1.5 s of speech", "“what was said, then”", "Ok"]
    outputs(view, ReplyFinished(1, "Ok.", SPOKEN), UserTurn(2, "speech", audio=said(1.0)))
    assert outputs(view, UserTranscript(7, "no such turn")) == []
    retracted = outputs(view, UserTranscript(2, "and more"), ReplyRetracted(2))[-1]  # taken back with its turn
    assert len(retracted.history) == 3 and retracted.history[-1]["content"].startswith("Ok.")
    assert outputs(view, UserTranscript(2, "late")) == []


def test_state_changes_and_endings_reach_the_page():
    view = ChatView(ConversationOptions(clips=0))
    outputs(view, UserTurn(1, "text", text="Hi"))
    (thinking,) = outputs(view, StateChanged("thinking"))
    assert thinking.state == "thinking" and thinking.status == {} and len(thinking.history) == 2
    ended, closed = outputs(view, Closed("idle", "This conversation was closed after a long silence."))
    assert isinstance(ended, Output) and ended.state == "ended" and ended.final and closed == CLOSED
    assert ended.history[-1] == {"role": "assistant",
                                 "content": "⚠️ This conversation was closed after a long silence."}
    assert outputs(ChatView(ConversationOptions()), Closed()) == [CLOSED]  # a plain close says nothing
