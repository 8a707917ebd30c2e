#!/usr/bin/env bash
# Everything a lent GPU should tell us, in one call of at most 10 minutes:
#   nvidia-smi and versions, the GPU tests (pytest -m gpu tests), every bench/bench_*.py suite
#   with all its baselines, and the reports (JSON, Markdown, PNG) — all written into OUTDIR.
#
# Usage (on the device machine, from the repository root; installs nothing):
#   GIT_COMMIT=<sha> bash bench/gpu_run.sh "$OUT"
# From this machine through the device tool, for example:
#   run(command='GIT_COMMIT=<sha> bash bench/gpu_run.sh "$OUT"', carry=[".cache/bench-vendor"])
# then copy OUTDIR/*.{json,md,png} into bench/results/ and commit.
#
# laion_clap's modules (and torchlibrosa, librosa and their pure-Python deps) are not on the GPU
# image; bench_embed.py skips its laion_clap provider without them. To include it, download the
# wheels here once and carry the folder (1.9 MiB; they are unpacked into a temporary folder on
# PYTHONPATH, nothing is installed):
#   pip download --no-deps -d .cache/bench-vendor laion_clap==1.1.7 torchlibrosa==0.1.0 \
#       librosa==0.11.0 decorator pooch platformdirs
#
# Time budget (BUDGET_S, default 570 s): the GPU tests get at most 120 s, then each suite gets
# at most its cap below and never more than what is left; a suite cut off by its timeout keeps
# its log, and the others still run.
set -u
OUT="${1:?usage: bench/gpu_run.sh OUTDIR}"
BUDGET_S="${BUDGET_S:-570}"
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT/raw" "$OUT/logs"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/clap-fast-inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/clap-fast-triton}"

if compgen -G ".cache/bench-vendor/*.whl" > /dev/null; then
  VENDOR="$(mktemp -d /tmp/clap-bench-vendor.XXXX)"
  for whl in .cache/bench-vendor/*.whl; do "$PY" -m zipfile -e "$whl" "$VENDOR"; done
  export PYTHONPATH="$PYTHONPATH:$VENDOR"  # after the image's own packages
fi

left() { echo $((BUDGET_S - SECONDS)); }
run_step() {  # run_step NAME CAP_S CMD... : runs CMD with min(CAP_S, time left - 15) seconds
  local name="$1" cap="$2"; shift 2
  local t=$(( $(left) - 15 )); (( cap < t )) && t=$cap
  if (( t < 20 )); then echo "SKIPPED (no time left)" > "$OUT/logs/$name.log"; echo "$name: skipped"; return; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$t" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s (limit $t s)" | tee -a "$OUT/steps.txt"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "GIT_COMMIT=${GIT_COMMIT:-unknown}"
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || true
} > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md, importlib.util, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
# Distribution versions without importing (laion_clap's package import needs the network).
for dist, mod in (("triton", "triton"), ("transformers", "transformers"), ("numpy", "numpy"),
                  ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                  ("pytest-benchmark", "pytest_benchmark"), ("matplotlib", "matplotlib"),
                  ("laion_clap", "laion_clap"), ("torchlibrosa", "torchlibrosa"),
                  ("librosa", "librosa"), ("h5py", "h5py"), ("timm", "timm"),
                  ("nnAudio", "nnAudio"), ("open_clip_torch", "open_clip")):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "found (no metadata)" if importlib.util.find_spec(mod) else "MISSING")
EOF
cat "$OUT/versions.txt"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
run_step gpu-tests 120 "${PYTEST[@]}" -m gpu tests --junitxml="$OUT/gpu-tests.xml"

# Suites in order of importance, each with its own time cap (seconds).
for entry in embed:180 window_attention:90 mel:60 contrastive:75 train:90 export:90; do
  suite="${entry%%:*}" cap="${entry##*:}"
  [[ -f "bench/bench_$suite.py" ]] || continue
  run_step "bench_$suite" "$cap" "${PYTEST[@]}" "bench/bench_$suite.py" \
    --benchmark-json="$OUT/raw/$suite.json"
done

shopt -s nullglob
raw=("$OUT"/raw/*.json)
if (( ${#raw[@]} )); then
  "$PY" -m bench.report "${raw[@]}" --out "$OUT" > "$OUT/logs/report.log" 2>&1 \
    || echo "report failed (see logs/report.log)"
fi
echo "total ${SECONDS} s" | tee -a "$OUT/steps.txt"
tail -n 3 "$OUT"/logs/*.log
