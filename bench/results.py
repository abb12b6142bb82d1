"""Benchmark results as files: every bench ends by saving what it printed, so a number in the docs
always names the machine, the commit and the command that produced it.

    with results.recording() as printed:     # stdout as it was, also kept
        ...print the tables...
    results.write("soak", printed.text, {"turns": ...}, argv)

`write` saves docs/benchmarks/<name>-<YYYY-MM-DD>.md (the printed text under a header: machine, commit,
command) and a .json beside it (the same plus the bench's raw numbers), then rebuilds
docs/benchmarks/README.md from every .json there: the latest file per bench and the history by commit.
A second run of a bench on the same day gets -2, -3, ... rather than replacing the first.

    python bench/results.py        # rebuild docs/benchmarks/README.md (after copying results in)

BENCH_RESULTS=<folder> writes elsewhere (the GPU machine writes under $OUT), BENCH_RESULTS=none not at
all; BENCH_COMMIT names the commit where there is no git checkout.
"""

import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "docs", "benchmarks")
INDEX = "README.md"


class Tee(io.TextIOBase):
    """Writes go to `stream` unchanged and are kept in `text`."""

    def __init__(self, stream):
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def text(self) -> str:
        return "".join(self.parts)


@contextlib.contextmanager
def recording():
    """Keep what is printed to stdout inside the block (it still reaches stdout as before)."""
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield tee


def machine() -> dict:
    """CPU model (as /proc/cpuinfo names it), cores, GPU (torch.cuda's name, or "none"), versions."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu, torch_version = "none", None
    try:
        import torch

        torch_version = torch.__version__
        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch_version}


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit() -> tuple[str, bool]:
    """(short commit, whether tracked files differ from it); results files themselves do not count."""
    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return os.environ.get("BENCH_COMMIT", "unknown"), False
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/benchmarks")
    return head, bool(changed)


def command(script: str, argv: list[str]) -> str:
    return shlex.join(["python", f"bench/{os.path.basename(script)}", *argv])


def folder() -> str | None:
    where = os.environ.get("BENCH_RESULTS", FOLDER)
    return None if where.lower() == "none" else where


def write(name: str, markdown: str, data: dict, argv: list[str] | None = None, script: str | None = None,
          today: datetime.date | None = None) -> str | None:
    """Save one result (see the module's docstring); -> the .md file's path (None when turned off).
    `argv`: the bench's arguments (default: this process's); `script`: its file (default: sys.argv[0])."""
    where = folder()
    if where is None:
        return None
    os.makedirs(where, exist_ok=True)
    today = today or datetime.date.today()
    head, dirty = commit()
    ran = command(script or sys.argv[0], sys.argv[1:] if argv is None else list(argv))
    base = f"{name}-{today.isoformat()}"
    stem, n = base, 1
    while os.path.exists(os.path.join(where, stem + ".md")) or os.path.exists(os.path.join(where, stem + ".json")):
        n += 1
        stem = f"{base}-{n}"
    host = machine()
    record = {"bench": name, "date": today.isoformat(), "written": now(), "commit": head, "uncommitted": dirty,
              "command": ran, "machine": host, "markdown": markdown, "data": data}
    with open(os.path.join(where, stem + ".md"), "w") as f:
        f.write(page(record))
    with open(os.path.join(where, stem + ".json"), "w") as f:
        json.dump(record, f, indent=1, default=plain)
        f.write("\n")
    index(where)
    path = os.path.join(where, stem + ".md")
    print(f"results: {os.path.relpath(path)}", file=sys.stderr)
    return path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def plain(value):
    """json's fallback: numpy scalars and arrays as numbers and lists, anything else as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def commit_text(record: dict) -> str:
    return record["commit"] + (" + uncommitted changes" if record.get("uncommitted") else "")


def machine_text(host: dict) -> str:
    return f"{host['cpu']} · {host['cores']} cores · GPU: {host['gpu']}"


def page(record: dict) -> str:
    host = record["machine"]
    software = f"Python {host['python']}" + (f" · torch {host['torch']}" if host.get("torch") else "")
    return (f"# {record['bench']} · {record['date']}\n\n"
            f"- machine: {machine_text(host)}\n"
            f"- software: {software}\n"
            f"- commit: {commit_text(record)}\n"
            f"- command: `{record['command']}`\n\n"
            f"{record['markdown'].strip()}\n")


def records(where: str) -> list[tuple[str, dict]]:
    """(file stem, record) for every result in `where`, oldest first."""
    found = []
    for file in os.listdir(where):
        if file.endswith(".json"):
            with open(os.path.join(where, file)) as f:
                record = json.load(f)
            if isinstance(record, dict) and {"bench", "date", "commit", "command", "machine"} <= set(record):
                found.append((file[:-5], record))
    return sorted(found, key=lambda item: (item[1].get("written") or item[1]["date"], item[0]))


def index(where: str = FOLDER) -> str:
    """Rebuild `where`/README.md from the results there; -> its path."""
    os.makedirs(where, exist_ok=True)
    found = records(where)
    latest = {}
    for stem, record in found:
        latest[record["bench"]] = (stem, record)
    lines = ["# Benchmark results", "",
             "Written by the scripts in `bench/` (`bench/results.py`); each file names its machine, commit and "
             "command. `python bench/results.py` rebuilds this page.", "",
             "## Latest per bench", "",
             "| bench | date | commit | machine | command | file |", "|---|---|---|---|---|---|"]
    for bench, (stem, record) in sorted(latest.items()):
        lines.append(f"| {bench} | {record['date']} | {commit_text(record)} | {machine_text(record['machine'])} | "
                     f"`{record['command']}` | [{stem}.md]({stem}.md) |")
    lines += ["", "## History", "", "| date | commit | bench | file |", "|---|---|---|---|"]
    for stem, record in reversed(found):
        lines.append(f"| {record['date']} | {commit_text(record)} | {record['bench']} | [{stem}.md]({stem}.md) |")
    path = os.path.join(where, INDEX)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(index(folder() or FOLDER))
