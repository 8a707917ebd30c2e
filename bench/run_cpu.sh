#!/usr/bin/env bash
# The CPU benchmark suite with real timing, then the reports.
#
#   bash bench/run_cpu.sh [OUTDIR]          # default OUTDIR: bench/results
#   bash bench/run_cpu.sh --smoke           # CI: every benchmark once, untimed (pytest bench
#                                           # --benchmark-disable -m "not slow": compiling
#                                           # providers left out), no report
#
# Each bench/bench_*.py runs in its own pytest process (compile caches and memory do not leak
# between suites); a failing suite is reported and the others still run. The raw
# pytest-benchmark JSON (every round) goes to .cache/bench-raw/, the reports
# (<suite>_<device>_<date>.{json,md,png}) to OUTDIR. Extra arguments after OUTDIR go to pytest,
# e.g. `bash bench/run_cpu.sh bench/results -k "not compiled"`.
# laion_clap for bench_embed.py: pip install --no-deps laion_clap torchlibrosa
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"

if [[ "${1:-}" == "--smoke" ]]; then
  shift
  exec "$PY" -m pytest bench --benchmark-disable -q -p no:cacheprovider -m "not slow" "$@"
fi

OUTDIR="${1:-bench/results}"
shift || true
RAW="$ROOT/.cache/bench-raw/$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$RAW"
failed=()
for file in bench/bench_*.py; do
  suite="$(basename "$file" .py)"
  suite="${suite#bench_}"
  echo "== $suite"
  t0=$SECONDS
  if ! "$PY" -m pytest "$file" -q -p no:cacheprovider -rs --benchmark-json="$RAW/$suite.json" \
      --benchmark-columns=median,iqr,rounds "$@" 2>&1 | tee "$RAW/$suite.log" | tail -n 25; then
    failed+=("$suite")
  fi
  echo "== $suite: $((SECONDS - t0)) s"
done
shopt -s nullglob
raw=("$RAW"/*.json)
(( ${#raw[@]} )) && "$PY" -m bench.report "${raw[@]}" --out "$OUTDIR"
if (( ${#failed[@]} )); then
  echo "failed suites: ${failed[*]} (logs in $RAW)" >&2
  exit 1
fi
