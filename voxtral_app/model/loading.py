"""Loading: a hub id or checkpoint directory -> a running Engine, warmed up before the first user."""

import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from ..backends.contract import Sampling
from . import checkpoint
from . import prompt as prompts
from .checkpoint import load_model, resolve_device
from .engine import DEFAULT_MODEL, Engine, EngineOptions

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "VOXTRAL_CACHE_DIR"  # where `--model tiny-random` is built (tests point it at their tmp dir)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to point at a local checkpoint."""


def download_hint(model: str) -> str:
    return (f"Download the checkpoint once, e.g. `hf download {DEFAULT_MODEL} --local-dir models/voxtral`, "
            "then start with `--model models/voxtral` (or VOXTRAL_MODEL=models/voxtral).")


def cache_dir() -> str:
    """$VOXTRAL_CACHE_DIR, else voxtral_app/ in the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(user_cache, "voxtral_app")


def checkpoint_path(model: str) -> str:
    """Hub id or directory -> local directory, downloading (with progress bars) if needed."""
    if model == checkpoint.TINY:
        return checkpoint.build_tiny(os.path.join(cache_dir(), checkpoint.TINY))
    if os.path.isdir(model):
        return model
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"No model directory at '{model}'. {download_hint(model)}")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, allow_patterns=list(checkpoint.HUB_FILES))
    except Exception as error:  # offline, unknown repo, gated, network: all end the same way
        raise ModelLoadError(f"Could not get '{model}' from the Hugging Face Hub ({type(error).__name__}: "
                             f"{error}). {download_hint(model)}") from error


def load_engine(options: EngineOptions, background_warmup: bool = False,
                on_failure: Callable[[BaseException], None] | None = None) -> Engine:
    """Load processor and model from a hub id or local directory and start the decode thread.

    With `background_warmup` the warm-up (and compilation) runs while the caller goes on to
    serve; `engine.ready` is set when it succeeded. `on_failure` is called if the decode thread dies.
    """
    from transformers import AutoProcessor

    path = checkpoint_path(options.model)
    started = time.perf_counter()
    try:
        processor = AutoProcessor.from_pretrained(path)
        if options.model_process:
            from .model_process import ModelProcess, ModelProcessError

            try:
                decoder = ModelProcess(path, options.device, options.kv_slots or options.slots, options.max_tokens, options.compile)
            except ModelProcessError as error:
                raise ModelLoadError(f"{error}. {download_hint(options.model)}") from error
            engine = Engine(None, processor, options, on_failure=on_failure, decoder=decoder)
        else:
            engine = Engine(load_model(path, resolve_device(options.device)), processor, options, on_failure=on_failure)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"'{path}' is not a loadable Voxtral checkpoint ({error}). "
                             f"{download_hint(options.model)}") from error
    logger.info("loaded %s on %s%s in %.1f s", options.model, engine.model_device,
                " (in its own process)" if options.model_process else "", time.perf_counter() - started)
    if not options.warmup:
        engine.ready.set()
    elif background_warmup:
        threading.Thread(target=warm_up, args=(engine,), name="voxtral-warmup", daemon=True).start()
    else:
        warm_up(engine)
    return engine


def warm_up(engine: Engine) -> None:
    """Encode, prefill and decode once (and at the batch sizes used) before the first user.
    `engine.ready` is set only if it worked; a failure is the engine's failure (health: degraded)."""
    started = time.perf_counter()
    chats = []
    try:
        chats = [engine.open_chat() for _ in range(min(2, engine.options.slots))]
        audio = np.sin(np.linspace(0, 2000, prompts.CHUNK_SAMPLES // 30)).astype(np.float32) * 0.1
        replies = [chat.start(audio, sampling=Sampling(max_new_tokens=4)) for chat in chats]
        for reply in replies:
            "".join(reply)
    except Exception as error:  # noqa: BLE001 - reported through the engine's health
        logger.critical("warm-up failed: %s", error, exc_info=True)
        if engine.failure is None:
            engine.fail(error)
        return
    finally:
        for chat in chats:
            chat.close()
    engine.ready.set()
    logger.info("warm-up done in %.1f s (compiled: %s)", time.perf_counter() - started, engine.decoder.compiled)
