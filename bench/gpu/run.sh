#!/usr/bin/env bash
# There (the GPU machine; no registry): install .whl/ beside the image's own packages, then run
# bench/engine.py with the given arguments. Writes to $OUT: engine.md (the table), engine.json (raw
# timings), progress.log (timestamped progress: a run cut off still says how far it got) and
# benchmarks/ (the result as bench/results.py files; copy them into docs/benchmarks/).
#   BENCH_COMMIT=<commit> bench/gpu/run.sh --config full    # bench/gpu/README.md
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-out}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
stamp() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/progress.log" >&2; }
stamp "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export BENCH_RESULTS=${BENCH_RESULTS:-$OUT/benchmarks}
"$PYTHON" -c 'import sys, torch, transformers, numpy, mistral_common
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, available: "
      f"{torch.cuda.is_available()}), transformers {transformers.__version__}, numpy {numpy.__version__}, "
      f"mistral-common {mistral_common.__version__}")' | tee -a "$OUT/progress.log" >&2
stamp "bench/engine.py $*"
"$PYTHON" bench/engine.py "$@" --json "$OUT/engine.json" 2> >(tee -a "$OUT/progress.log" >&2) | tee "$OUT/engine.md"
stamp "done"
