"""One reply being generated: the message a chat hands the engine's decode thread (engine.py)."""

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends.contract import Sampling


@dataclass(eq=False)
class Generation:
    """One reply being produced. Built by a session, then owned by the decode thread until `done`;
    the session reads its results (`fed`, `error`, times) only after `done` is set."""

    slot: int  # the conversation's seat (Engine.open_chat); its KV row is `row`, given by the decode thread
    ids: list[int]  # prompt tokens to prefill, from position `start`
    start: int
    clips: list[np.ndarray]  # the prompt's new audio: padded 16 kHz clips, one per [BEGIN_AUDIO] block in `ids`
    sampling: Sampling
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # sampled ids, then None
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by anyone: stop soon
    wanted: threading.Event = field(default_factory=threading.Event)  # someone waits for it (not speculative)
    done: threading.Event = field(default_factory=threading.Event)  # set by the decode thread, last
    waiting: threading.Event = field(default_factory=threading.Event)  # set by the decode thread: it waits for a KV row
    fed: list[int] = field(default_factory=list)  # generated tokens whose keys/values are in the cache
    error: Exception | None = None
    prompt: list[int] = field(default_factory=list)  # the whole prompt (`ids` is its tail from `start`)
    prompt_clips: list[np.ndarray] = field(default_factory=list)  # all of its audio: a re-prefill needs them
    submitted: float = field(default_factory=time.perf_counter)  # the turn began (prompt building included)
    queued: float = 0.0  # handed to the decode thread, inputs ready
    first_token: float | None = None
    finished: float | None = None
    # decode-thread state
    row: int = -1  # the KV-cache row it runs in (rows.Rows.seat); -1 until it has one
    filled: int = 0  # prompt tokens (of `ids`) prefilled so far
    audio: torch.Tensor | None = None  # `clips` encoded, while the prompt is prefilled a piece at a time
    audio_used: int = 0  # audio embeddings written so far
    next_token: int = -1
    position: int = 0
    count: int = 0
