"""Server memory per turn: one Conversation on the tiny engine, N spoken turns, RSS every 10 turns.

    python bench/memory.py                    # glibc's default (its mmap threshold adjusts itself)
    python bench/memory.py --fixed-mmap       # what app.py does at start (steady_memory)

Also counts numpy arrays and torch tensors over 500 kB still alive, to tell a Python leak (they
grow) from heap fragmentation (they do not, RSS does).
"""

import argparse
import gc
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import results  # noqa: E402  (bench/results.py)
import torch  # noqa: E402

from app import steady_memory  # noqa: E402
from voxtral_app.audio.pcm import prepare, read_wav  # noqa: E402
from voxtral_app.conversation.conversation import (  # noqa: E402
    Conversation,
    ConversationOptions,
    Settings,
)
from voxtral_app.conversation.events import ReplyFinished  # noqa: E402
from voxtral_app.model import checkpoint  # noqa: E402
from voxtral_app.model.engine import EngineOptions  # noqa: E402
from voxtral_app.model.loading import load_engine  # noqa: E402
from voxtral_app.turns.taker import TurnEvent  # noqa: E402


def rss_mb() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


def alive() -> int:
    return sum(1 for o in gc.get_objects() if (isinstance(o, np.ndarray) and o.nbytes > 500_000)
               or (isinstance(o, torch.Tensor) and o.nelement() * o.element_size() > 500_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--fixed-mmap", action="store_true")
    args = parser.parse_args()
    with results.recording() as printed:
        data = run(args)
    results.write("memory", printed.text, data)


def run(args: argparse.Namespace) -> dict:
    """Turn after turn, printing RSS every 10; -> those samples."""
    if args.fixed_mmap:
        steady_memory()
    engine = load_engine(EngineOptions(model=checkpoint.build_tiny(os.path.join(ROOT, "test-output", "tiny")),
                                       device="cpu", slots=1, max_tokens=8192))
    wav = os.path.join(ROOT, "assets", "speech-16k.wav")
    speech = prepare(*read_wav(wav), max_seconds=300)[: 3 * 16_000]
    conversation = Conversation(engine, ConversationOptions(reply_tokens=16), Settings(temperature=0.0)).open()
    print(f"| turns | RSS (MB) | arrays/tensors > 500 kB alive |  ({'fixed' if args.fixed_mmap else 'default'} mmap)")
    print("|---|---|---|")
    samples = []
    for turn in range(1, args.turns + 1):
        conversation.post("pause", TurnEvent("pause", speech, time.perf_counter()))
        conversation.post("end", TurnEvent("end", speech, time.perf_counter()))
        while not isinstance(conversation.outbox.get(), ReplyFinished):
            pass
        if turn % 10 == 0:
            gc.collect()
            samples.append({"turn": turn, "rss_mb": rss_mb(), "alive": alive()})
            print(f"| {turn} | {samples[-1]['rss_mb']} | {samples[-1]['alive']} |", flush=True)
    conversation.close()
    conversation.closed.wait(30)
    engine.close()
    return {"fixed_mmap": args.fixed_mmap, "samples": samples}


if __name__ == "__main__":
    main()
