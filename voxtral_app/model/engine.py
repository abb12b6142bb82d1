"""The Voxtral engine: one decode thread serves every conversation on one model.

`Engine` owns the model's slot cache and a background thread that prefills new turns and runs
batched decode steps for all replies in flight. A long prompt is prefilled a piece at a time
(`prefill_chunk` tokens), with a decode step for the replies in flight between pieces. Conversations reach it only through messages: a
`Generation` handed to `submit()`, whose tokens come back on its own queue, and a `cancelled`
event. A watchdog view (`failure`, `stuck`) lets /health and the app notice a dead or hung thread.
Loading and warm-up live in loading.py; a conversation's KV-slot bookkeeping in chat.py. The
model itself (generate.Decoder) runs in this process, or in a child process of its own
(`model_process`, model_process.py), called only from the decode thread either way. Telemetry
listens from outside (`listen()`): the engine imports no metrics library, so the GPU bench needs none.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends.contract import EngineBusy, EngineFailed
from . import prompt as prompts
from .chat import Chat
from .decoder import Decoder, sample
from .generation import Generation
from .rows import Rows
from .transcripts import Transcriber

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Voxtral-Mini-3B-2507"
PAYBACK = 1.5  # decode seconds the replies in flight are owed per second of a long prompt's later pieces:
# above 1, so that a client looping long prompts gets less than half of the engine while a reply streams


@dataclass(frozen=True)
class EngineOptions:
    model: str = DEFAULT_MODEL  # hub id or local checkpoint directory
    device: str = "auto"  # "auto": CUDA when available, else CPU
    compile: bool | None = None  # torch.compile the hot path; None: on with CUDA, off on CPU
    slots: int = 8  # connected conversations at once (--max-sessions); kept ones (leave()) wait beyond it
    kv_slots: int | None = None  # KV-cache rows on the device (--kv-slots); None: one per conversation. Fewer
    # rows than conversations make the rows a cache: an idle conversation's rows move to host memory (rows.py)
    kv_host_gb: float = 8.0  # host memory for offloaded rows, GB; past it the oldest is re-prefilled when it returns
    turn_queue: int = 4  # turns that may wait for a row while every row has a reply in flight; then EngineBusy
    max_tokens: int = 8192  # KV cache per conversation (~16 turns of 30 s audio); older turns are dropped
    max_audio_s: float = 300.0  # per-turn audio cap, 5 min; longer speech keeps its last 5 min
    warmup: bool = True  # run (and compile) the hot path once at load so no user waits on it
    stuck_after_s: float = 30.0  # the decode thread has work but has not stepped for this long: stuck
    prefill_chunk: int = 512  # prompt tokens prefilled between two decode steps: a long prompt (a 5 min
    # upload, a trimmed conversation's re-prefill) never holds up the replies in flight for long
    later_chunk: int = 256  # a long prompt's pieces after its first: a turn that arrives meanwhile waits for at
    # most one of them (a piece in flight is never cut short)
    decode_gap_s: float = 0.05  # while a finished turn waits for its prefill, replies in flight get a step
    # only this often: 4 turns ending at once each waited for the others' decode steps too, but a stream of
    # long prompts must not starve the replies in flight either
    model_process: bool = False  # the model in a child process with its own GIL (model_process.py); app.py's default
    transcript_tokens: int = 1024  # longest transcript, tokens (a chat reply's cap: ConversationOptions.reply_tokens)
    side_slots: int = 1  # KV rows beyond the conversations' for transcripts beside them (transcripts.py)
    audio_turns: int = 3  # spoken turns a prompt keeps as audio; older ones become their transcripts (chat.py).
    # Voxtral's authors see quality degrade past 5 clips in a prompt (vLLM refuses a 6th)

    @property
    def conversation_rows(self) -> int:
        """KV-cache rows for conversations (--kv-slots, by default one per --max-sessions)."""
        return self.kv_slots or self.slots

    @property
    def rows(self) -> int:
        """KV-cache rows the decoder holds: the conversations' and the side rows after them."""
        return self.conversation_rows + self.side_slots


def in_line(generation: Generation) -> tuple:
    """Prefill order: prompts someone waits for, then those not yet begun, shortest first (a person's
    turn is a piece or two; a flood of long prompts goes after it), then the rest in turn."""
    begun = generation.filled > 0
    return not generation.wanted.is_set(), begun, 0 if begun else len(generation.ids)


class Engine:
    """The model, its slot cache and the decode thread that serves every conversation.

    Ownership: `pending`, `seats`, `away`, `closed_seats`, `failure`, `in_flight` and `aside` are guarded
    by `self.wake` (a Condition); `active`, `filling`, `stepped`, `rows` and the decoder's cache belong to
    the decode thread.
    """

    def __init__(self, model, processor, options: EngineOptions, on_failure: Callable[[BaseException], None] | None = None,
                 decoder=None):
        """`decoder`: a model_process.ModelProcess (then `model` is None), or by default a Decoder on `model`."""
        self.model = model
        self.processor = processor
        self.options = options
        if decoder is None:
            decoder = Decoder(model, options.rows, options.max_tokens, options.compile,
                              extractor=processor.feature_extractor)
        self.decoder = decoder
        self.model_device = decoder.device  # where the model runs
        self.device = decoder.inputs_device  # where first tokens are sampled
        tokenizer = processor.tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.begin_audio_id = tokenizer.convert_tokens_to_ids("[BEGIN_AUDIO]")
        self.inst_id = tokenizer.convert_tokens_to_ids("[INST]")  # each user turn begins with it
        self.structure = {tokenizer.convert_tokens_to_ids(token) for token in prompts.STRUCTURE}
        self.on_failure = on_failure  # called once, on the dying thread, if the decode thread dies
        self.seats: set[int] = set()  # open conversations' keys (a Chat's `slot`; not a KV row: rows.py)
        self.away: set[int] = set()  # seats of conversations kept for a resume without a connection (leave())
        self.closed_seats: list[int] = []  # released since the decode thread last looked (under `wake`)
        self.rows = Rows(decoder, options.conversation_rows, int(options.kv_host_gb * 1e9), self.timed)
        self.pending: list[Generation] = []
        self.active: list[Generation] = []
        self.filling: list[Generation] = []  # taken from `pending`, being prefilled (decode thread)
        self.stepped = 0.0  # when the last decode step began (decode thread)
        self.in_flight = 0  # generations submitted and not yet finished
        self.aside = 0  # of those, transcripts on the side rows (they queue on their own: transcripts.py)
        self.failure: BaseException | None = None  # why the decode thread died
        self.wake = threading.Condition()
        self.beat = time.monotonic()  # the decode thread's last sign of life (a float: written by it alone)
        self.ready = threading.Event()  # set once warm-up (and compilation) succeeded
        self.closed = False  # set by close(): the decode thread ends
        self.listeners: tuple[Callable[[str, float], None], ...] = ()  # told (phase, seconds) of each prefill
        # piece and decode step, on the decode thread; replaced whole by listen(), never mutated
        self.thread = threading.Thread(target=self.run, name="voxtral-decode", daemon=True)
        self.thread.start()
        decoder.watch(self.fail)  # a model process that exits is the engine's failure
        self.transcriber = Transcriber(self, list(range(options.conversation_rows, options.rows)))

    # -- what the server shows (backends.contract.Backend) ---------------------------------------

    @property
    def device_kind(self) -> str:
        return self.model_device.type

    @property
    def device_name(self) -> str:
        return str(self.model_device)

    @property
    def compiled(self) -> bool:
        return self.decoder.compiled

    def memory_bytes(self) -> int:
        return self.decoder.memory_bytes()

    def describe(self) -> dict:
        return {"kind": "local"}

    def listen(self, listener: Callable[[str, float], None]) -> None:
        """Call `listener(phase, seconds)` after each prefill piece ("prefill") and decode step ("decode"),
        on the decode thread: it must be quick and must not raise. Listening twice is listening once."""
        with self.wake:
            if listener not in self.listeners:
                self.listeners = self.listeners + (listener,)

    def timed(self, phase: str, seconds: float) -> None:
        for listener in self.listeners:
            listener(phase, seconds)

    # -- conversations --------------------------------------------------------------------------

    def open_chat(self):
        """A new conversation on a free seat (a chat.Chat); EngineBusy when --max-sessions are open. It
        takes a KV row only for each turn (rows.py)."""
        with self.wake:
            if self.failure is not None:
                raise EngineFailed(f"the model server has failed ({self.failure}); it needs a restart")
            if len(self.seats) - len(self.away) >= self.options.slots:
                raise EngineBusy(f"all {self.options.slots} conversation slots are in use; try again shortly")
            seat = next(n for n in range(len(self.seats) + 1) if n not in self.seats)  # the lowest free
            self.seats.add(seat)
            return Chat(self, seat)

    def transcribe_aside(self, audio, language: str | None = None):
        """A Future of what was said in `audio`, transcribed on a side row (transcripts.py): a caption,
        or the text an old spoken turn becomes. Served after the replies someone waits for."""
        return self.transcriber.transcribe(audio, language)

    def release(self, slot: int) -> None:
        with self.wake:
            if slot in self.seats:
                self.closed_seats.append(slot)  # before the seat is reopened: serve() forgets its rows first
                self.seats.discard(slot)
                self.away.discard(slot)
                self.wake.notify()

    def leave(self, chat: Chat) -> None:
        """`chat`'s connection ended and its conversation is kept for a resume: it stops counting
        against `slots` (--max-sessions caps connected people; whoever keeps it caps how many wait)."""
        with self.wake:
            if chat.slot in self.seats:
                self.away.add(chat.slot)
                chat.away = True

    def come_back(self, chat: Chat) -> None:
        """`chat`'s conversation has a connection again; EngineBusy when `slots` are connected already."""
        with self.wake:
            if chat.slot not in self.away:
                return
            if len(self.seats) - len(self.away) >= self.options.slots:
                raise EngineBusy(f"all {self.options.slots} conversation slots are in use; try again shortly")
            self.away.discard(chat.slot)
            chat.away = False

    @property
    def free_slots(self) -> list[int]:
        """Room for this many more connected conversations (a list, as the backend contract has it)."""
        with self.wake:
            return list(range(self.options.slots - len(self.seats) + len(self.away)))

    @property
    def kept_conversations(self) -> int:
        """Conversations waiting, without a connection, for their owner to come back."""
        with self.wake:
            return len(self.away)

    @property
    def kv_rows_in_use(self) -> int:
        """KV rows holding a conversation (written by the decode thread; a snapshot)."""
        return self.rows.in_use

    @property
    def kept_on_host(self) -> int:
        """Conversations whose KV cache waits in host memory (a snapshot)."""
        return self.rows.kept_count

    @property
    def active_chats(self) -> int:
        with self.wake:
            return len(self.seats) - len(self.away)

    def submit(self, generation: Generation) -> Generation:
        generation.queued = time.perf_counter()
        with self.wake:
            if self.failure is not None:
                raise EngineFailed(f"the model server has failed ({self.failure}); it needs a restart")
            side = self.aside_row(generation)
            if not side and self.in_flight - self.aside >= self.options.conversation_rows + self.options.turn_queue:
                raise EngineBusy("every KV slot is busy with a reply and the queue is full; try again shortly")
            self.pending.append(generation)
            self.in_flight += 1
            self.aside += side
            self.wake.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        generation.cancelled.set()
        self.wake_up()

    def wake_up(self) -> None:
        """Tell the decode thread a generation's events changed (cancelled, wanted)."""
        with self.wake:
            self.wake.notify()

    @property
    def stuck(self) -> bool:
        """The decode thread has work but has not stepped for `stuck_after_s` (hung kernel, deadlock)."""
        with self.wake:
            busy = self.in_flight > 0
        return busy and self.ready.is_set() and time.monotonic() - self.beat > self.options.stuck_after_s

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.thread.is_alive() and not self.stuck

    # -- decode thread --------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """End every reply and stop the decode thread. Call before exit: a daemon thread still inside
        a torch op when the interpreter finalizes aborts the process (std::terminate, exit status 134)."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.transcriber.close()
        self.thread.join(timeout_s)
        self.decoder.close()

    def run(self) -> None:
        """The decode thread. If anything escapes the per-step error handling, it dies *loudly*:
        every waiting reply fails at once, new turns are refused, and `on_failure` is told."""
        try:
            if self.decoder.compiled:
                self.decoder.allow_variants()
                if self.options.warmup:  # here, not in the caller's thread: CUDA graphs are recorded per thread
                    self.decoder.warm_up()
            self.serve()
        except BaseException as error:  # noqa: BLE001 - the watchdog: anything that kills the thread
            logger.critical("the decode thread died: %s", error, exc_info=True)
            self.fail(error)
        self.strand()

    def fail(self, error: BaseException) -> None:
        """Mark the engine failed (from any thread): new turns are refused, the decode thread stops
        and fails every reply in flight, and `on_failure` is told once."""
        with self.wake:
            if self.failure is not None:
                return
            self.failure = error
            self.wake.notify()
        if self.on_failure is not None:
            self.on_failure(error)

    def strand(self) -> None:
        """On the decode thread, as it ends: finish every reply it still holds."""
        with self.wake:
            stranded, self.pending = self.pending + self.filling + self.active, []
        self.active, self.filling = [], []
        for generation in stranded:
            if self.failure is not None:
                generation.error = EngineFailed(f"the model server failed ({self.failure})")
            self.finish(generation)

    def serve(self) -> None:
        """Each round: one piece (`prefill_chunk` tokens at most) of one prompt, then one decode step
        for every reply in flight. Prompts someone waits for are prefilled first; a speculative one
        (a turn that may go on) joins at most one per round, so it never holds up a finished turn.
        While such a prompt waits, the replies in flight step only every `decode_gap_s`: a person
        waiting for the first word comes before the next word of a reply already streaming. Prompts
        waited for take turns, one piece each and new ones first, shortest first (`in_line`), so a long
        one does not hold up the others; its pieces after the first are smaller (`later_chunk`); and the later pieces of a long prompt are paid for: the replies in flight then get
        PAYBACK times the time those pieces took, so a client looping long prompts cannot starve them."""
        owed = 0.0  # seconds of decoding the replies in flight are owed for long prompts' later pieces
        while True:
            with self.wake:
                while (not self.pending and not self.filling and not self.active and not self.closed
                       and self.failure is None and not self.closed_seats):
                    self.beat = time.monotonic()
                    self.wake.wait(1.0)
                if self.closed or self.failure is not None:
                    return
                closed_seats, self.closed_seats = self.closed_seats, []
                wanted = [g for g in self.pending if g.wanted.is_set()]
                unseen = [g for g in self.pending if not g.wanted.is_set()]
                self.filling += wanted + unseen[:1]
                self.pending = unseen[1:]
            self.beat = time.monotonic()
            for seat in closed_seats:
                self.rows.forget(seat)
            for generation in [g for g in self.filling if g.cancelled.is_set()]:
                self.finish(generation)
            self.filling = sorted((g for g in self.filling if not g.done.is_set()), key=in_line)
            blocked = False  # every KV row is busy with a reply in flight: decoding frees one
            if self.filling and not (self.active and owed > 0):
                owed, blocked = self.prefill_next(owed)
            for generation in self.active:
                if generation.cancelled.is_set():
                    self.finish(generation)
            self.active = [g for g in self.active if not g.done.is_set()]
            if not self.active:
                owed = 0.0
            elif (blocked or owed > 0 or not self.turn_waits()
                  or time.perf_counter() - self.stepped >= self.options.decode_gap_s):
                started = time.perf_counter()
                self.decode(self.active)
                owed = max(0.0, owed - (time.perf_counter() - started))
                self.active = [g for g in self.active if not g.done.is_set()]

    def prefill_next(self, owed: float) -> tuple[float, bool]:
        """One piece of the first prompt in line that has a KV row (or gets one now). Prompts take
        turns, one piece each: a long prompt (one client's) cannot hold up a short one behind it; a
        long prompt's later pieces add what they took to `owed`. -> (owed, whether every row is busy)."""
        head = self.next_seated()
        if head is None:
            return owed, bool(self.filling)
        started, later_piece = time.perf_counter(), head.filled > 0
        if self.prefill(head):
            self.filling.remove(head)
        elif not any(g.slot == head.slot for g in self.filling if g is not head):  # a conversation's stay in order
            self.filling.remove(head)
            self.filling.append(head)
        if later_piece:
            owed += PAYBACK * (time.perf_counter() - started)
        return owed, False

    def next_seated(self) -> Generation | None:
        """The first prompt in line that has a KV row or gets one now (rows.Rows.seat); None while every
        row is busy with a reply in flight (the prompts wait; decoding goes on)."""
        for generation in list(self.filling):
            try:
                if generation.row >= 0 or self.rows.seat(generation):
                    return generation
            except Exception as error:  # a failed copy (host memory, the model process): fail this turn
                logger.exception("moving a KV cache failed")
                generation.error = error
                self.finish(generation)
                self.filling.remove(generation)
        for generation in self.filling:
            generation.waiting.set()  # the person is told (conversation: the `queued` state)
        return None

    def turn_waits(self) -> bool:
        """A prompt someone waits for is next in line or was just submitted (decode thread)."""
        if self.filling and self.filling[0].wanted.is_set():
            return True
        with self.wake:
            return any(g.wanted.is_set() for g in self.pending)

    def prefill(self, generation: Generation) -> bool:
        """Prefill the next piece of a prompt; at its end, sample the first token. -> whether the
        prompt is done with (all prefilled, or failed)."""
        started = time.perf_counter()
        size = self.options.prefill_chunk if generation.filled == 0 else self.options.later_chunk
        piece = generation.ids[generation.filled: generation.filled + size]
        last = generation.filled + len(piece) == len(generation.ids)
        try:
            if generation.clips and generation.audio is None:
                generation.audio = self.decoder.encode_clips(generation.clips)
            audio = None
            if generation.audio is not None:
                count = sum(token == self.decoder.audio_token_id for token in piece)
                audio = generation.audio[generation.audio_used: generation.audio_used + count]
                generation.audio_used += count
            logits = self.decoder.prefill(generation.row, piece, generation.start + generation.filled, None, audio)
            generation.filled += len(piece)
            if not last:
                self.timed("prefill", time.perf_counter() - started)
                return False
            s = generation.sampling
            token = int(logits.argmax()) if s.temperature <= 0 else int(sample(
                logits[None], torch.tensor([s.temperature], device=self.device),
                torch.tensor([s.top_p], device=self.device))[0])
        except Exception as error:  # OOM, bad input: fail this turn, keep serving
            logger.exception("prefill failed")
            generation.error = error
            self.finish(generation)
            return True
        generation.audio = None
        generation.position = generation.start + len(generation.ids)
        generation.first_token = time.perf_counter()
        self.timed("prefill", generation.first_token - started)  # int() synced the device
        if self.emit(generation, token):
            self.active.append(generation)
        return True

    def decode(self, batch: list[Generation]) -> None:
        started = self.stepped = time.perf_counter()
        try:
            tokens = self.decoder.step(
                [g.row for g in batch], [g.next_token for g in batch], [g.position for g in batch],
                [g.sampling.temperature for g in batch], [g.sampling.top_p for g in batch])
        except Exception as error:  # fails only the generations of this step
            logger.exception("decode step failed")
            for generation in batch:
                generation.error = error
                self.finish(generation)
            return
        self.timed("decode", time.perf_counter() - started)  # tolist() synced the device
        for generation, token in zip(batch, tokens):
            generation.fed.append(generation.next_token)
            generation.position += 1
            self.emit(generation, token)

    def emit(self, generation: Generation, token: int) -> bool:
        """Hand out a sampled token; False when the reply is over."""
        if token == self.eos_id:
            self.finish(generation)
            return False
        generation.tokens.put(token)
        generation.count += 1
        generation.next_token = token
        full = generation.position + 1 >= self.options.max_tokens
        if generation.count >= generation.sampling.max_new_tokens or full or generation.cancelled.is_set():
            self.finish(generation)
            return False
        return True

    def aside_row(self, generation: Generation) -> bool:
        """A transcript on a side row (transcripts.py gives it its row before it is submitted)."""
        return generation.row >= self.options.conversation_rows

    def finish(self, generation: Generation) -> None:
        if not generation.done.is_set():
            generation.finished = time.perf_counter()
            self.rows.finished(generation)
            generation.tokens.put(None)
            with self.wake:
                self.in_flight -= 1
                self.aside -= self.aside_row(generation)
            generation.done.set()
