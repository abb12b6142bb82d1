"""The page's view of a conversation: its events (conversation/events.py) folded into gradio chat
messages and a status dict, as the microphone's AdditionalOutputs, `/outputs` and the page's typed
and uploaded turns show them. A spoken turn becomes a playable clip (a WAV in the view's own
temporary folder, removed when the conversation closes), captioned with what Voxtral heard; a reply
is a plain message, and once finished it gets a footer line (its kind and how fast it came, in
words). The voice loop's state and a call's ending come as Outputs too (`state`, and the ending as
a message).

One `ChatView` per conversation, owned by the one thread that reads that conversation's outbox.
"""

import collections
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import soundfile

from ..audio.pcm import SAMPLE_RATE
from ..conversation.conversation import ConversationOptions
from ..conversation.events import (
    Cleared,
    Closed,
    Event,
    Hushed,
    ReplyDelta,
    ReplyFinished,
    ReplyRetracted,
    ReplyStarted,
    Speech,
    StateChanged,
    TurnFailed,
    UserTranscript,
    UserTurn,
)

HUSH = "hush"  # marker: stop playing what was sent so far (the person spoke over it)
CLOSED = "closed"  # marker: the conversation is over (its slot is free)
# events.STATES and the page's own (the call is stopped but the conversation kept; the call ended), in words
STATE_WORDS = {"listening": "listening", "hearing": "hearing you", "thinking": "thinking", "speaking": "speaking",
               "paused": "paused", "ended": "ended"}


@dataclass
class Output:
    """What the person should see (and hear) now: the whole chat, a status line, maybe speech."""

    history: list[dict]
    status: dict
    audio: tuple[int, np.ndarray] | None = None  # (rate, float32 samples) of one spoken sentence
    final: bool = False  # the turn's last update
    state: str = ""  # the voice loop's state (a STATE_WORDS key) when it changed, "" otherwise


def reply_kind(mode: str, language: str = "") -> str:
    """What a reply is, as the chat labels it."""
    if mode == "transcribe":
        return "📝 Transcript" + (f" ({language})" if language else "")
    return "💬 Reply"


def footer(status: dict) -> str:
    """A finished reply's footer, in words: "💬 Reply · answered 180 ms after you stopped · 41 tok/s"."""
    first = status.get("first_token_ms")
    after = "after you stopped" if status.get("source", "speech") == "speech" else "after you sent it"
    parts = [reply_kind(status["mode"], status.get("language", "")),
             f"answered {first} ms {after}" if first is not None else "no answer",
             f"{status.get('tokens_per_s', 0)} tok/s"]
    if status.get("interrupted"):
        parts.append("interrupted")
    return " · ".join(parts)


class ChatView:
    """One conversation's chat as the page shows it. Owner: the thread reading the conversation's outbox."""

    def __init__(self, options: ConversationOptions, name: str = "conversation"):
        self.options = options
        self.name = name
        self.history: list[dict] = []  # gradio "messages"
        self.status: dict = {}  # the streaming turn's status
        self.turn_at: dict[int, int] = {}  # turn number -> chat length before it (where a retraction cuts)
        self.replying = False  # the chat's last message is a reply still streaming (set_reply replaces it)
        self.clip_dir: str | None = None  # this conversation's clips of spoken turns
        self.clip_files: collections.deque = collections.deque()  # oldest first

    def output(self, status: dict, audio=None, final: bool = False, state: str = "") -> Output:
        return Output([dict(m) for m in self.history], status, audio, final, state)

    def render(self, event: Event) -> list:
        """One event -> what the page gets: Outputs, HUSH or CLOSED (often nothing)."""
        if isinstance(event, UserTurn):
            self.turn_at[event.turn] = len(self.history)
            self.history += [{"role": "user", "content": self.user_message(event)},
                             {"role": "assistant", "content": ""}]
            self.replying = True
            self.status = {}
        elif isinstance(event, UserTranscript):
            return self.caption(event)
        elif isinstance(event, StateChanged):
            return [self.output({}, state=event.state)]
        elif isinstance(event, ReplyStarted):
            self.status = asdict(event.stats)
        elif isinstance(event, ReplyDelta):
            self.set_reply({"role": "assistant", "content": event.text})
            return [self.output(self.status)]
        elif isinstance(event, Speech):
            return [self.output(self.status, audio=(event.rate, event.samples))]
        elif isinstance(event, ReplyFinished):
            return [self.finished(event)]
        elif isinstance(event, ReplyRetracted):
            self.history = self.history[:self.turn_at.pop(event.turn, len(self.history))]
            self.replying = False
            return [self.output({"retracted": True})]
        elif isinstance(event, Cleared):
            self.history, self.turn_at, self.replying = [], {}, False
            return [self.output({"cleared": True})]
        elif isinstance(event, TurnFailed):
            return [self.output({"error": event.message}, final=True)]
        elif isinstance(event, Hushed):
            return [HUSH]
        elif isinstance(event, Closed):
            self.remove_clips()
            return ([self.ended(event.message)] if event.message else []) + [CLOSED]
        return []

    def ended(self, message: str) -> Output:
        """The call (or the conversation) is over: why, as the chat's last message, and the state `ended`."""
        self.replying = False
        self.history.append({"role": "assistant", "content": f"⚠️ {message}"})
        return self.output({"ended": message}, final=True, state="ended")

    def caption(self, event: UserTranscript) -> list:
        """What Voxtral heard, as a message right under the turn's clip (the chat's bubbles group it
        with the clip). A turn already taken back (or shown before this view began) gets none."""
        at = self.turn_at.get(event.turn)
        text = " ".join(event.text.split())
        if at is None or at >= len(self.history) or not text:
            return []
        message = {"role": "user", "content": f"“{text}”"}
        at += 1
        if at < len(self.history) and self.history[at]["role"] == "user":
            self.history[at] = message  # a newer caption of the same turn
        else:
            self.history.insert(at, message)
            for turn, start in self.turn_at.items():
                if start >= at:
                    self.turn_at[turn] = start + 1
        return [self.output(self.status)]

    def finished(self, event: ReplyFinished) -> Output:
        status = event.status()
        text = event.text
        if event.error is not None:
            text += f"\n\n⚠️ {event.error}"
        elif not text and not event.interrupted:
            text = "…"  # nothing generated (an immediate end of sequence)
        # the same message as while it streamed, with a small footer: nothing gradio folds (no metadata title)
        self.set_reply({"role": "assistant", "content": f"{text}\n\n<sub>{footer(status)}</sub>"})
        self.replying = False
        return self.output(status, final=True)

    def set_reply(self, message: dict) -> None:
        """The streaming reply's message: the chat's last, placed by its UserTurn (or added, if this
        view began after that turn was shown)."""
        if self.replying and self.history and self.history[-1]["role"] == "assistant":
            self.history[-1] = message
        else:
            self.history.append(message)
            self.replying = True

    def user_message(self, turn: UserTurn) -> str | dict:
        """A spoken turn is a playable clip (a gradio file message, its label as alt_text), a typed one
        its text. Only the last `clips` spoken turns keep their clip."""
        if turn.audio is None:
            return turn.text
        label = "🎙️ %.1f s of speech" % turn.seconds
        if self.options.clips <= 0:
            return label
        if self.clip_dir is None:
            self.clip_dir = tempfile.mkdtemp(prefix=f"voxtral-{self.name}-")
        fd, path = tempfile.mkstemp(suffix=".wav", dir=self.clip_dir)
        with os.fdopen(fd, "wb") as out:
            soundfile.write(out, turn.audio[-int(self.options.clip_s * SAMPLE_RATE):], SAMPLE_RATE,
                            subtype="PCM_16", format="WAV")
        self.clip_files.append(path)
        while len(self.clip_files) > 2 * self.options.clips:  # outputs still on their way may name recent ones
            os.remove(self.clip_files.popleft())
        spoken = [m for m in self.history if m["role"] == "user" and isinstance(m["content"], dict)]
        for message in spoken[:max(len(spoken) - self.options.clips + 1, 0)]:
            message["content"] = message["content"]["alt_text"]
        return {"path": path, "mime_type": "audio/wav", "alt_text": label}

    def remove_clips(self) -> None:
        if self.clip_dir is not None:
            shutil.rmtree(self.clip_dir, ignore_errors=True)
            self.clip_dir = None
