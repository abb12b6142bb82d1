"""The model in a process of its own, so the decode loop does not share a GIL with the audio.

The decode thread lets go of the GIL in every torch op and must win it back for the next one. Next
to 8 WebRTC connections (aiortc, Opus, turn-taking: ~25 Python threads) it won it back late each
time: in `bench/soak.py` a decode step took 100-280 ms and a prefill 0.4-1.4 s, against 16 ms and
~40 ms alone, with CPU to spare. Here the engine's scheduling (engine.py: slots, turns, sampling of
the first token) stays in the app's process and only the model crosses over: `ModelProcess` has
`generate.Decoder`'s methods and runs each one in a child process that holds the model and its slot
cache, a few calls per decode step instead of hundreds of GIL hand-overs.

Ownership: the pipe belongs to the engine's decode thread (every call comes from its serve loop or
warm-up, so the child's CUDA graphs are recorded on one thread too). A watcher thread only waits for
the child to exit and reports it (`watch`). Tensors cross as numpy arrays (plain pickles, no shared
file descriptors). A turn's audio crosses as its sound (the clip without its padding to 30 s); its
log-mel features and embeddings are made in the child, and the embeddings stay there (`AudioRef`).
"""

import itertools
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np
import torch

from . import prompt as prompts

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # loading the weights onto the device, 30 min (any download happened before, here)
AUDIO_KEPT_PER_SLOT = 2  # encoded clips the child keeps for prompts prefilled a piece at a time


class ModelProcessError(RuntimeError):
    """The model process failed to start, or has exited."""


class AudioRef:
    """Audio embeddings that stay in the model process (what `encode_clips` returns). Sliced like the
    [N, hidden] tensor it stands for: the engine takes each prefill piece's share of it."""

    def __init__(self, key: int, start: int, stop: int):
        self.key, self.start, self.stop = key, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, part: slice) -> "AudioRef":
        start, stop, _ = part.indices(len(self))
        return AudioRef(self.key, self.start + start, self.start + max(start, stop))


class KeptRef:
    """A conversation's KV rows offloaded to host memory in the model process (decoder.HostRows there)."""

    def __init__(self, key: int, length: int, nbytes: int):
        self.key, self.length, self.nbytes = key, length, nbytes


class ModelProcess:
    """`generate.Decoder`, run in a child process. Owned by the engine's decode thread."""

    def __init__(self, path: str, device: str, slots: int, max_tokens: int, compile: bool | None):
        # A fresh interpreter (`python -m voxtral_app.model_process`), not multiprocessing's fork (it would
        # copy the app's threads and CUDA state) or spawn (it re-runs the caller's __main__).
        self.pipe, child = multiprocessing.Pipe()
        settings = json.dumps({"path": path, "device": device, "slots": slots, "max_tokens": max_tokens,
                               "compile": compile, "log_level": logging.getLogger().getEffectiveLevel()})
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "voxtral_app.model.model_process", str(child.fileno()),
                                         settings], pass_fds=[child.fileno()], env=env)
        child.close()
        self.closing = threading.Event()
        self.memory = 0  # the child's torch.cuda.memory_allocated after its last call (an int: read by scrapes)
        if not self.pipe.poll(START_TIMEOUT_S):
            self.close()
            raise ModelProcessError(f"the model process did not load the model in {START_TIMEOUT_S:.0f} s")
        try:
            info = self.receive()
        except RuntimeError as error:
            self.close()
            raise ModelProcessError(f"the model process could not load the model: {error}") from error
        self.device = torch.device(info["device"])  # where the model runs
        self.inputs_device = torch.device("cpu")  # where the engine samples first tokens
        self.compiled = info["compiled"]
        self.audio_token_id = info["audio_token_id"]

    # -- Decoder's methods ----------------------------------------------------------------------

    def allow_variants(self) -> None:
        self.call("allow_variants")

    def warm_up(self) -> tuple[int, int]:
        return self.call("warm_up")

    def encode_clips(self, clips: list[np.ndarray]) -> AudioRef:
        """Log-mel and encoder both run in the child; each padded clip crosses as its sound only."""
        key, length = self.call("encode_clips", [(prompts.sound(clip), len(clip)) for clip in clips])
        return AudioRef(key, 0, length)

    def prefill(self, slot: int, ids: list[int], start: int, features: torch.Tensor | None,
                audio: AudioRef | None = None) -> torch.Tensor:
        logits = self.call("prefill", slot, ids, start, None if features is None else features.cpu().numpy(), audio)
        return torch.from_numpy(logits)

    def step(self, rows: list[int], tokens: list[int], positions: list[int], temperature: list[float],
             top_p: list[float]) -> list[int]:
        return self.call("step", rows, tokens, positions, temperature, top_p)

    def offload(self, row: int, length: int) -> "KeptRef":
        """The host copy stays in the child; the engine holds a reference to it."""
        key, nbytes = self.call("offload", row, length)
        return KeptRef(key, length, nbytes)

    def restore(self, row: int, kept: "KeptRef") -> None:
        self.call("restore", row, kept.key)

    def discard(self, kept: "KeptRef") -> None:
        self.call("discard", kept.key)

    def memory_bytes(self) -> int:
        return self.memory

    # -- the child's lifetime -------------------------------------------------------------------

    def call(self, name: str, *args):
        try:
            self.pipe.send((name, args))
        except OSError as error:
            raise ModelProcessError(f"the model process has exited (code {self.process.poll()})") from error
        return self.receive()

    def receive(self):
        try:
            status, value, memory = self.pipe.recv()
        except (EOFError, OSError) as error:
            raise ModelProcessError(f"the model process has exited (code {self.process.poll()})") from error
        self.memory = memory
        if status == "error":  # the child's exception (out of memory, a bad input), as a message
            raise RuntimeError(value)
        return value

    def watch(self, on_exit: Callable[[BaseException], None]) -> None:
        """Call `on_exit` (on a watcher thread) if the child exits before `close()`."""

        def watcher():
            code = self.process.wait()
            if not self.closing.is_set():
                on_exit(ModelProcessError(f"the model process exited (code {code})"))

        threading.Thread(target=watcher, name="voxtral-model-watcher", daemon=True).start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (after the decode thread has stopped calling it)."""
        self.closing.set()
        try:
            self.pipe.send(("close", ()))
        except OSError:
            pass
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)
        self.pipe.close()


# -- the child ---------------------------------------------------------------------------------------

def main() -> None:
    """`python -m voxtral_app.model_process FD SETTINGS`: what ModelProcess starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the app closes us
    settings = json.loads(sys.argv[2])
    logging.basicConfig(level=settings["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Connection(int(sys.argv[1])), settings["path"], settings["device"], settings["slots"],
          settings["max_tokens"], settings["compile"])


def serve(pipe: Connection, path: str, device: str, slots: int, max_tokens: int, compile: bool | None) -> None:
    """The model process: load, say what it is, then run the parent's calls one at a time until told
    to close or the parent is gone."""
    from transformers import AutoFeatureExtractor

    from .checkpoint import load_model, resolve_device
    from .decoder import Decoder

    try:
        model_device = resolve_device(device)
        if model_device.type == "cpu":
            torch.set_num_threads(cpu_threads())
        model = load_model(path, model_device)
        decoder = Decoder(model, slots, max_tokens, compile, extractor=AutoFeatureExtractor.from_pretrained(path))
    except BaseException as error:  # noqa: BLE001 - told to the parent, which reports it
        pipe.send(("error", f"{type(error).__name__}: {error}", 0))
        return
    calls = Calls(decoder, slots * AUDIO_KEPT_PER_SLOT)
    pipe.send(("ok", {"device": str(decoder.device), "compiled": decoder.compiled,
                      "audio_token_id": decoder.audio_token_id}, 0))
    while True:
        try:
            name, args = pipe.recv()
        except (EOFError, OSError):
            return
        if name == "close":
            return
        try:
            pipe.send(("ok", getattr(calls, name)(*args), calls.memory_bytes()))
        except Exception as error:  # noqa: BLE001 - one failed call fails one turn, in the parent
            logger.exception("model call %s failed", name)
            pipe.send(("error", f"{type(error).__name__}: {error}", calls.memory_bytes()))


def cpu_threads() -> int:
    """torch's threads for a model on the CPU: half the cores. The app's audio threads need the rest;
    with every core asked for, OpenMP's threads waited at each op's barrier for a core the audio held
    (bench/soak.py, 8 clients on 2 cores: a decode step took 100-135 ms with 2 threads, 30-70 ms with 1)."""
    return max(1, (os.cpu_count() or 2) // 2)


class Calls:
    """The child's side of each call: numpy in and out, encoded audio kept here by key."""

    def __init__(self, decoder, audio_kept: int):
        self.decoder = decoder
        self.audio: OrderedDict[int, torch.Tensor] = OrderedDict()  # oldest first
        self.audio_kept = audio_kept
        self.keys = itertools.count()
        self.host: dict[int, object] = {}  # offloaded KV rows (decoder.HostRows) by key, until restored or discarded

    def memory_bytes(self) -> int:
        return self.decoder.memory_bytes()

    def allow_variants(self) -> None:
        self.decoder.allow_variants()

    def warm_up(self) -> tuple[int, int]:
        return self.decoder.warm_up()

    def encode_clips(self, sounds: list[tuple[np.ndarray, int]]) -> tuple[int, int]:
        clips = []
        for samples, length in sounds:
            clip = np.zeros(length, np.float32)
            clip[: len(samples)] = samples
            clips.append(clip)
        return self.keep(self.decoder.encode_clips(clips))

    def keep(self, audio: torch.Tensor) -> tuple[int, int]:
        """Hold a prompt's encoded audio for its prefill pieces -> (key, embeddings)."""
        key = next(self.keys)
        self.audio[key] = audio
        while len(self.audio) > self.audio_kept:  # a prompt cancelled halfway never takes its last piece
            self.audio.popitem(last=False)
        return key, len(self.audio[key])

    def prefill(self, slot: int, ids: list[int], start: int, features: np.ndarray | None,
                audio: AudioRef | None) -> np.ndarray:
        embeddings = None
        if audio is not None and len(audio):
            if audio.key not in self.audio:
                raise RuntimeError("this prompt's encoded audio was dropped (too many prompts prefilled at once)")
            embeddings = self.audio[audio.key][audio.start: audio.stop]
            if audio.stop == len(self.audio[audio.key]):  # the prompt's last audio: done with it
                del self.audio[audio.key]
        logits = self.decoder.prefill(slot, ids, start, None if features is None else torch.from_numpy(features),
                                      embeddings)
        return logits.float().cpu().numpy()

    def step(self, rows, tokens, positions, temperature, top_p) -> list[int]:
        return self.decoder.step(rows, tokens, positions, temperature, top_p)

    def offload(self, row: int, length: int) -> tuple[int, int]:
        key = next(self.keys)
        self.host[key] = self.decoder.offload(row, length)
        return key, self.host[key].nbytes

    def restore(self, row: int, key: int) -> None:
        self.decoder.restore(row, self.host.pop(key))

    def discard(self, key: int) -> None:
        self.host.pop(key, None)


if __name__ == "__main__":
    main()
