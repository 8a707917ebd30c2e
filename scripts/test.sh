#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv, then lint, the test suite and a smoke run of
# the benchmarks. Without a GPU the Triton kernels run through Triton's interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
bash scripts/setup_serve.sh .venv/bin/python  # numpy<2 venv for the Triton server tests
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$root/.cache/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$root/.cache/triton}"  # kernels.report's compiles
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check clap_fast kernels export bench tests
.venv/bin/python -m pytest -q tests "$@"
# The model, checkpoint and API tests again under transformers 5.x (the GPU image has 5.17).
tf5=(env PYTHONPATH="$root/.cache/transformers5")
"${tf5[@]}" .venv/bin/python -c 'import sys, transformers; sys.exit(transformers.__version__[0] != "5")'
"${tf5[@]}" .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_checkpoint.py tests/test_audio_api.py
# The checkpoint and drop-in tests again with numpy 1.26 (laion_clap pins numpy < 2; we declare
# numpy >= 1.26): the serving venv of scripts/setup_serve.sh holds numpy 1.26 over this venv.
np1="${CLAP_FAST_SERVE_ENV:-$root/.cache/serve-env}/bin/python"
"$np1" -c 'import sys, numpy; sys.exit(numpy.__version__[0] != "1")'
"$np1" -m pytest -q -p no:cacheprovider \
  tests/test_checkpoint.py tests/test_compat_laion.py tests/test_hf_format.py
# Benchmark smoke: every case once; the compiling providers (marked slow) are left to real runs,
# the model-level compile paths are covered by tests/test_export.py and tests/test_engines.py.
bash bench/run_cpu.sh --smoke
