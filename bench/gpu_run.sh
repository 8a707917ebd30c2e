#!/usr/bin/env bash
# Everything a lent GPU should tell us, in one call that cannot lose evidence (bench/README.md):
#   1. preflight (<= 20 s): nvidia-smi, versions, imports, one launch of every Triton kernel on a
#      small shape against its reference (bench/preflight.py -> OUTDIR/preflight.json);
#   2. the GPU tests (pytest -m gpu tests -> OUTDIR/gpu-tests.xml);
#   3. every bench/bench_*.py suite without its largest sizes (baselines included);
#   4. the largest sizes (tests marked `largest`) last, one round each;
#   5. the reports: OUTDIR/<suite>_<device>_<date>.{json,md,png} from OUTDIR/raw/*.json.
# Every step runs under `timeout -s INT` (pytest-benchmark still writes the JSON of what
# finished) with its cap below and never more than the budget left; a step that fails or runs
# over leaves its log in OUTDIR/logs and the next step runs. The reports are written on exit,
# whatever happened before. Total budget BUDGET_S (default 420 s) leaves time for a rerun
# within 15 device-minutes.
#
# Usage (on the device machine, from the repository root; installs nothing):
#   GIT_COMMIT=<sha> bash bench/gpu_run.sh "$OUT"
#   run(command='GIT_COMMIT=<sha> bash bench/gpu_run.sh "$OUT"', carry=[".cache/bench-vendor"])
# then copy OUTDIR/*.{json,md,png} into bench/results/ and commit.
#   bash bench/gpu_run.sh --dry-run OUTDIR   # every step on the CPU, tiny sizes (CI)
# The dry run sets CLAP_BENCH_TINY=1 (bench/sizes.py), TRITON_INTERPRET=1, one round per
# benchmark, HTS-AT-mini for the export suite, and leaves out torch.compile / AOTInductor
# providers (minutes on 2 CPU cores); CI runs it under tests/gpu_image_sim.
#
# laion_clap (and torchlibrosa, librosa and their pure-Python deps) are not on the GPU image;
# bench_embed.py skips its laion_clap provider without them. To include it, download the wheels
# here once and carry the folder (1.9 MiB; unpacked into a temporary folder on PYTHONPATH):
#   pip download --no-deps -d .cache/bench-vendor laion_clap==1.1.7 torchlibrosa==0.1.0 \
#       librosa==0.11.0 decorator pooch platformdirs
set -u
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:?usage: bench/gpu_run.sh [--dry-run] OUTDIR}"
BUDGET_S="${BUDGET_S:-420}"
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT/raw" "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/steps.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/clap-fast-inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/clap-fast-triton}"

# Caps in seconds. Pass 1 in order of importance; pass 2 only for suites with `largest` tests.
PREFLIGHT_CAP=20
GPU_TESTS_CAP=75
PASS1="embed:60 window_attention:45 mel:30 contrastive:35 train:40 export:30"
PASS2="embed:25 mel:10 contrastive:20"
REPORT_RESERVE=25  # kept back: the last step's --kill-after (10 s) and the reports
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
ONE_ROUND=(--benchmark-min-rounds=1 --benchmark-max-time=0.000001)
SELECT=()
if (( DRY )); then  # every step runs, each with a short cap (a cut-off step still writes JSON)
  export CLAP_BENCH_TINY=1 TRITON_INTERPRET=1 CLAP_BENCH_MAX_ROUNDS=1
  export CLAP_FAST_BENCH_MODEL=HTSAT-mini
  BUDGET_S="${BUDGET_S_DRY:-600}" PREFLIGHT_CAP=60 GPU_TESTS_CAP=90
  PASS1="$(for e in $PASS1; do printf '%s:40 ' "${e%%:*}"; done)"
  PASS2="$(for e in $PASS2; do printf '%s:20 ' "${e%%:*}"; done)"
  SELECT=(-k "not compiled and not aoti")
  PYTEST+=("${ONE_ROUND[@]}" --benchmark-warmup=off)
fi

if compgen -G ".cache/bench-vendor/*.whl" > /dev/null; then
  VENDOR="$(mktemp -d /tmp/clap-bench-vendor.XXXX)"
  for whl in .cache/bench-vendor/*.whl; do "$PY" -m zipfile -e "$whl" "$VENDOR"; done
  export PYTHONPATH="$PYTHONPATH:$VENDOR"  # after the image's own packages
fi

left() { echo $((BUDGET_S - SECONDS - REPORT_RESERVE)); }
run_step() {  # run_step NAME CAP_S CMD... : CMD under SIGINT after min(CAP_S, budget left) s
  local name="$1" cap="$2"; shift 2
  local t; t=$(left); (( cap < t )) && t=$cap
  if (( t < 5 )); then
    echo "$name: skipped (no time left)" | tee -a "$OUT/steps.txt" > "$OUT/logs/$name.log"
    return
  fi
  local t0=$SECONDS
  timeout -s INT --kill-after=10 "$t" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local note=""; (( rc == 124 || rc == 137 )) && note=" (stopped at its limit)"
  echo "$name: rc=$rc, $((SECONDS - t0)) s (limit $t s)$note" | tee -a "$OUT/steps.txt"
}

REPORTED=0
report() {  # the reports from whatever JSON exists; runs once, on exit
  (( REPORTED )) && return
  REPORTED=1
  shopt -s nullglob
  local raw=("$OUT"/raw/*.json)
  if (( ${#raw[@]} )); then
    timeout -s INT --kill-after=5 60 "$PY" -m bench.report "${raw[@]}" --out "$OUT" \
      > "$OUT/logs/report.log" 2>&1 || echo "report failed (see logs/report.log)" | tee -a "$OUT/steps.txt"
  else
    echo "report: no benchmark JSON" | tee -a "$OUT/steps.txt"
  fi
  echo "total ${SECONDS} s (budget ${BUDGET_S} s, dry run ${DRY})" | tee -a "$OUT/steps.txt"
}
trap report EXIT

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "GIT_COMMIT=${GIT_COMMIT:-unknown} DRY_RUN=${DRY}"
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || true
} > "$OUT/nvidia-smi.txt" 2>&1

# 1. preflight
run_step preflight "$PREFLIGHT_CAP" "$PY" -m bench.preflight "$OUT"
# 2. GPU tests (all skip without CUDA: the dry run checks that they collect and start)
run_step gpu-tests "$GPU_TESTS_CAP" "${PYTEST[@]}" -m gpu tests --junitxml="$OUT/gpu-tests.xml"
# 3. every suite, largest sizes left out
for entry in $PASS1; do
  suite="${entry%%:*}" cap="${entry##*:}"
  [[ -f "bench/bench_$suite.py" ]] || continue
  run_step "bench_$suite" "$cap" "${PYTEST[@]}" "bench/bench_$suite.py" -m "not largest" \
    "${SELECT[@]}" --benchmark-json="$OUT/raw/$suite.json"
done
# 4. the largest sizes, one round each
for entry in $PASS2; do
  suite="${entry%%:*}" cap="${entry##*:}"
  [[ -f "bench/bench_$suite.py" ]] || continue
  CLAP_BENCH_MAX_ROUNDS=1 run_step "bench_${suite}_largest" "$cap" "${PYTEST[@]}" \
    "bench/bench_$suite.py" -m largest "${SELECT[@]}" "${ONE_ROUND[@]}" \
    --benchmark-json="$OUT/raw/${suite}_largest.json"
done
# 5. reports (also on any earlier exit, through the trap)
report
tail -n 2 "$OUT"/logs/*.log
