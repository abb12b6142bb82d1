"""Transcripts beside the conversations: what the person said, as text, on the engine's own KV row.

A spoken turn's caption (what Voxtral heard) and the text an old spoken turn becomes once it ages out
of the prompt (chat.py) are transcriptions of audio the conversation already has. They run on a
KV-cache row of their own (`EngineOptions.side_slots`), never on a conversation's slot: a
transcription prompt there would overwrite the conversation's cache. They are submitted as
speculative generations, so a reply someone waits for is prefilled first; on a GPU the
transcription's decode steps batch with the replies'.
"""

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..backends.contract import TRANSCRIBE
from . import prompt as prompts
from .generation import Generation

if TYPE_CHECKING:  # for annotations only: the engine imports this module
    from .engine import Engine

logger = logging.getLogger(__name__)

MAX_WAITING = 64  # transcriptions queued at most; past it the oldest waiting ones are refused


class Transcriber:
    """Runs transcriptions one per side row, in the order asked. Any thread may `transcribe()`;
    `waiting` is guarded by `lock`; each side row is driven by one thread of its own."""

    def __init__(self, engine: "Engine", rows: list[int]):
        self.engine = engine
        self.lock = threading.Lock()
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()  # (audio, language, future), then None per row
        self.count = 0  # waiting, guarded by `lock`
        self.threads = [threading.Thread(target=self.run, args=(row,), name=f"voxtral-transcripts-{row}", daemon=True)
                        for row in rows]
        for thread in self.threads:
            thread.start()

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> Future:
        """A Future of the text said in `audio` (16 kHz float32); it fails (RuntimeError) if the engine cannot."""
        future: Future = Future()
        if not self.threads:
            future.set_exception(RuntimeError("this engine has no row for transcriptions (side_slots=0)"))
            return future
        with self.lock:
            if self.count >= MAX_WAITING:
                future.set_exception(RuntimeError(f"{MAX_WAITING} transcriptions are waiting already"))
                return future
            self.count += 1
        self.waiting.put((audio, language, future))
        return future

    def close(self) -> None:
        for _ in self.threads:
            self.waiting.put(None)

    def run(self, row: int) -> None:
        while (job := self.waiting.get()) is not None:
            audio, language, future = job
            with self.lock:
                self.count -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.run_one(row, audio, language))
            except Exception as error:  # noqa: BLE001 - a failed transcription fails its Future, not the row
                logger.warning("a transcription failed: %s", error)
                future.set_exception(error)

    def run_one(self, row: int, audio: np.ndarray, language: str | None) -> str:
        engine = self.engine
        prompt = prompts.transcription_prompt(engine.processor, audio, language, engine.options.model)
        sampling = replace(TRANSCRIBE, max_new_tokens=engine.options.transcript_tokens)
        generation = Generation(-1 - row, prompt.ids, 0, prompt.audio, sampling)  # a seat no conversation has
        generation.row = row  # its own row: rows.Rows never assigns nor evicts it
        engine.submit(generation)  # speculative: served after the replies someone waits for
        tokens = []
        while (token := generation.tokens.get()) is not None:
            tokens.append(token)
        if generation.error is not None:
            raise RuntimeError(f"transcription failed: {generation.error}")
        return engine.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
