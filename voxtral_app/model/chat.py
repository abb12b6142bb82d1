"""One conversation with the engine: its messages and what its KV-cache slot holds.

A `Chat` keeps the conversation's messages and books which tokens its slot holds, so a new turn
only encodes and prefills what is new (the longest common prefix with the cache is kept). Each
`Reply` carries the prompt it was started from, so the booking after a reply is always that
reply's own prompt plus the tokens it fed: interleaved or abandoned turns cannot pair one turn's
prompt with another's reply. A turn is atomic: it joins `messages` with its reply, or not at all.
A reply joins with the tokens the model generated (`prompt.assistant_message(text, ids)`), so the
next turn's prompt continues exactly what the slot holds instead of the reply's text encoded again.
"""

import logging
import queue
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..backends.contract import CHAT, TRANSCRIBE, Pieces, Sampling, Turns
from . import prompt as prompts
from .generation import Generation

if TYPE_CHECKING:  # for annotations only: the engine imports this module
    from .engine import Engine

logger = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 30.0  # a cancelled reply leaves the decode thread within one step; this is a backstop
ROOM_FOR_A_TURN = 400  # prompt tokens a usual next turn adds: one 30 s audio chunk (375) and its markers
HOUSEKEEPING = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=1)  # a prefill whose one token is dropped
AGE_WAIT_S = 5.0  # at a turn's start, how long an old spoken turn's transcript is waited for (asked for a turn ago)


def common_prefix(a: list, b: list) -> int:
    """How many leading items `a` and `b` share (token ids here; chat messages in serving/app.py)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Reply(Pieces):
    """A reply in progress: iterate for text pieces as tokens arrive; `cancel()` stops it.

    Read by one thread (its reader); `cancel()` may come from any thread (it only sets an event).
    """

    def __init__(self, engine: "Engine", generation: Generation, record: bool, prompt_ids: list[int],
                 prompt_clips: list[tuple[int, str]]):
        self.engine = engine
        self.generation = generation
        self.record = record  # chat replies join the conversation; transcripts do not
        self.prompt_ids = prompt_ids  # the whole prompt this reply continues (what the slot holds before it)
        self.prompt_clips = prompt_clips  # (block start, clip hash) of the prompt's audio
        self.tokens: list[int] = []  # handed to the reader
        self.text = ""
        self.decoded = ""  # text of tokens[:self.clean], a prefix that ends on a whole character
        self.clean = 0

    def next_piece(self, timeout: float | None = None) -> str | None:
        """The text the next token adds ('' while a character is incomplete), or None once the reply
        is over. Raises queue.Empty after `timeout` s without a token, and RuntimeError if it failed."""
        token = self.generation.tokens.get(timeout=timeout) if timeout is not None else self.generation.tokens.get()
        if token is None:
            self.generation.tokens.put(None)  # stays over: later calls see the end too
            if self.generation.error is not None:
                raise RuntimeError(f"generation failed: {self.generation.error}") from self.generation.error
            return None
        self.tokens.append(token)
        # decode only the tokens since the last whole character: linear in the reply's length
        tail = self.engine.processor.tokenizer.decode(self.tokens[self.clean:], skip_special_tokens=True)
        if tail.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece = tail
        self.clean = len(self.tokens)
        self.text += piece
        return piece

    def cancel(self) -> None:
        self.engine.cancel(self.generation)

    def want(self) -> None:
        """Someone is waiting for this reply now: the engine prefills it before speculative ones."""
        self.generation.wanted.set()
        self.engine.wake_up()

    @property
    def cancelled(self) -> bool:
        return self.generation.cancelled.is_set()

    @property
    def queued(self) -> bool:
        return self.generation.waiting.is_set() and self.generation.first_token is None

    @property
    def done(self) -> bool:
        return self.generation.done.is_set()

    def wait(self, timeout: float = SETTLE_TIMEOUT_S) -> bool:
        return self.generation.done.wait(timeout)

    @property
    def stats(self) -> dict:
        g = self.generation
        end = g.finished or time.perf_counter()
        first = (g.first_token - g.submitted) if g.first_token else None
        decode_s = end - g.first_token if g.first_token else 0.0
        rate = (len(g.fed) / decode_s) if decode_s > 0 else 0.0
        return {"prefill_tokens": len(g.ids), "cached_tokens": g.start, "first_token_s": first,
                "tokens": g.count, "tokens_per_s": rate}


class Chat(Turns):
    """One conversation on one KV-cache slot.

    Not thread-safe: it belongs to the thread that drives it (a Conversation's worker thread in the
    app, the test in tests). The decode thread is reached only through `Engine.submit` and events.
    """

    def __init__(self, engine: "Engine", slot: int):
        super().__init__()
        self.engine = engine
        self.slot = slot
        self.encoded: tuple[int, prompts.Prompt] | None = None  # (messages encoded, their prompt)
        self.cached: list[int] = []  # token ids whose keys/values are in the slot, in order
        self.cached_clips: list[tuple[int, str]] = []  # (block start, clip hash) for audio in the slot
        self.audio_turns = engine.options.audio_turns  # clips a prompt keeps (/v1 keeps what it is sent)
        self.away = False  # kept for a resume without a connection (Engine.leave; written under its lock)

    @property
    def prompt_ids(self) -> list[int]:
        return self.current.prompt_ids if self.current is not None else []

    def start(self, audio: np.ndarray | None = None, text: str = "", sampling: Sampling = CHAT,
              speculative: bool = False) -> Reply:
        """Add a user turn and start the reply (prefill begins now; iterate the Reply for text).
        A reply still running is settled first (it stays in the conversation with what it said).
        `speculative`: nobody waits for it yet (the engine prefills it after waited-for turns) until `want()`."""
        started = time.perf_counter()
        self.settle()
        self.messages.append(prompts.user_message(audio, text))
        try:
            prompt = self.fit(sampling)
            return self.launch(prompt, sampling, record=True, started=started, speculative=speculative)
        except BaseException:
            self.drop_last_turn()  # atomic: no reply, no turn
            raise

    def transcribe(self, audio: np.ndarray, language: str | None = None, speculative: bool = False,
                   max_tokens: int | None = None) -> Reply:
        """Start a transcription of `audio` (at most `max_tokens`, or the engine's transcript_tokens); it
        is not added to the conversation."""
        started = time.perf_counter()
        self.settle()
        prompt = prompts.transcription_prompt(self.engine.processor, audio, language, self.engine.options.model)
        limit = self.engine.options.transcript_tokens
        sampling = replace(TRANSCRIBE, max_new_tokens=min(max_tokens or limit, limit))
        return self.launch(prompt, sampling, record=False, started=started, speculative=speculative)

    def tidy(self, sampling: Sampling = CHAT) -> bool:
        """Housekeeping between turns, once the last one is final (it can no longer be taken back): old
        spoken turns become text (`Turns.age`), and if the next turn would have to drop the oldest turns
        (at ~ROOM_FOR_A_TURN more tokens), they go now. What stays is prefilled in the background, so
        the next turn prefills only itself instead of the conversation while the person waits.
        -> whether it did anything."""
        self.settle()
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return False
        aged = self.age(self.audio_turns)
        limit = self.engine.options.max_tokens - sampling.max_new_tokens
        prompt = self.closed_prompt()
        if len(prompt.ids) + ROOM_FOR_A_TURN > limit:
            prompt = self.trim(prompt, limit // 2)
        elif not aged:
            return False
        self.launch(prompt, HOUSEKEEPING, record=False, started=time.perf_counter(), speculative=True)
        return True

    def transcribe_aside(self, audio: np.ndarray, language: str | None):
        return self.engine.transcribe_aside(audio, language)

    # -- internals ------------------------------------------------------------------------------

    def release(self) -> None:
        self.engine.release(self.slot)

    def forget(self) -> None:
        self.encoded = None  # the cache itself is overwritten by the next turn

    def fit(self, sampling: Sampling) -> prompts.Prompt:
        """Prompt for the conversation, with at most `self.audio_turns` clips (older spoken turns become text),
        dropping its oldest turns until prompt + reply fit the cache.
        Once over the limit it drops down to half of it: the whole cache is re-prefilled after a
        drop, so that happens once every few turns, not every turn (and `tidy` does it early)."""
        limit = self.engine.options.max_tokens - sampling.max_new_tokens
        self.age(self.audio_turns, wait_s=AGE_WAIT_S)  # a no-op when tidy aged them already
        prompt = self.encode()
        if len(prompt.ids) > limit:
            prompt = self.trim(prompt, limit // 2)
        if len(prompt.ids) > limit:
            raise ValueError(f"this turn needs {len(prompt.ids)} prompt tokens; the limit is {limit}")
        return prompt

    def trim(self, prompt: prompts.Prompt, target: int) -> prompts.Prompt:
        """Drop the oldest turns until `prompt` (the conversation's, closed or not) has at most `target`
        tokens. The prompt is cut, not encoded again: when it was encoded after each dropped turn, a soak's 4
        conversations trimming at once held up every connection's audio for up to 2.5 s (bench/soak.py)."""
        encoded, count = self.encoded, len(self.messages)
        wanted, turns = prompts.turns_to_drop(prompt.ids, self.engine.inst_id, target), 0
        while turns < wanted and self.drop_oldest_turn():
            turns += 1
        if count - len(self.messages) != 2 * turns:  # not user/assistant pairs: encode what is left
            return self.encode() if self.messages[-1]["role"] == "user" else self.closed_prompt()
        tokens = {"inst_id": self.engine.inst_id, "begin_audio_id": self.engine.begin_audio_id, "turns": turns}
        if encoded is not None:
            self.encoded = (encoded[0] - 2 * turns, prompts.drop_turns(encoded[1], **tokens))
        return prompts.drop_turns(prompt, **tokens)

    def closed_prompt(self) -> prompts.Prompt:
        """The prompt of the conversation up to its last reply, inclusive (it must end with one)."""
        head = self.messages[:-1]
        if self.encoded is None or self.encoded[0] != len(head):
            self.encoded = (len(head), prompts.chat_prompt(self.engine.processor, head))
        return prompts.with_reply(self.engine.processor, self.encoded[1], self.messages[-1])

    def encode(self) -> prompts.Prompt:
        """The conversation's prompt; when it only grew by a reply and a new user turn since the
        last one, extend that (a 20-turn conversation re-encoded costs ~30 ms of CPU per turn)."""
        n = len(self.messages)
        if self.encoded is not None and self.encoded[0] == n - 2 and self.messages[-2]["role"] == "assistant":
            prompt = prompts.extend_prompt(self.engine.processor, self.encoded[1], self.messages[-2], self.messages[-1])
        else:
            prompt = prompts.chat_prompt(self.engine.processor, self.messages)
        self.encoded = (n, prompt)
        return prompt

    def launch(self, prompt: prompts.Prompt, sampling: Sampling, record: bool, started: float,
               speculative: bool = False) -> Reply:
        starts = prompts.audio_block_starts(prompt.ids, self.engine.begin_audio_id)
        clips = list(zip(starts, prompt.keys))
        keep = min(common_prefix(self.cached, prompt.ids), len(prompt.ids) - 1)
        for (start, key), cached in zip(clips, self.cached_clips + [None] * len(clips)):
            if start < keep and cached != (start, key):  # same tokens, different sound: re-encode
                keep = start
        new_clips = [clip for clip, (start, _) in zip(prompt.audio, clips) if start >= keep]
        generation = Generation(self.slot, prompt.ids[keep:], keep, new_clips, sampling, submitted=started,
                                prompt=prompt.ids, prompt_clips=prompt.audio)
        if not speculative:
            generation.wanted.set()
        self.current = Reply(self.engine, self.engine.submit(generation), record, prompt.ids, clips)
        return self.current

    def settle(self, cancel: bool = False) -> None:
        """Wait for the last reply to leave the decode thread and book what the slot now holds:
        that reply's own prompt and the tokens it fed."""
        reply, self.current = self.current, None
        if reply is None:
            return
        if cancel:
            reply.cancel()
        if not reply.wait():
            logger.error("a reply did not leave the decode thread in %.0f s; forgetting the slot's cache",
                         SETTLE_TIMEOUT_S)
            reply.cancel()
            self.cached, self.cached_clips = [], []
            return
        while True:  # whatever the reader has not taken yet: the reply is what was generated
            try:
                if reply.next_piece(timeout=0) is None:
                    break
            except (queue.Empty, RuntimeError):
                break
        g = reply.generation
        if g.error is not None:
            self.cached, self.cached_clips = [], []
        elif g.filled < len(g.ids):  # cancelled before its prompt was all in: the rows hold what they held
            self.cached = reply.prompt_ids[:g.start]
            self.cached_clips = [clip for clip in reply.prompt_clips if clip[0] < g.start]
        else:
            self.cached = reply.prompt_ids + g.fed
            self.cached_clips = reply.prompt_clips
        if reply.record:
            text = reply.text.strip()
            if text and reply.generation.error is None:
                ids = prompts.own_ids(reply.tokens, self.engine.structure)
                self.messages.append(prompts.assistant_message(text, ids))  # the text stripped, as mistral-common keeps it
            else:
                self.drop_last_turn()  # atomic: a turn with no reply is not part of the conversation
