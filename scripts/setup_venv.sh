#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install clap_fast with its dev extras,
# pinned by constraints.txt. Idempotent: a second run only checks that the install is current.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.clap_fast-installed"
want="$(cat pyproject.toml constraints.txt scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  # laion_clap 1.1.7 itself: tests/test_compat_laion.py runs the same calls through it and through
  # clap_fast.compat.laion, and the benchmarks use it as the baseline. --no-deps: it pins
  # numpy < 2; everything it imports comes with the dev extras.
  .venv/bin/python -m pip install -q --no-deps laion_clap==1.1.7 torchlibrosa==0.1.0
  echo "$want" > "$stamp"
fi

# transformers 5.x in a folder of its own (scripts/transformers5.txt; the GPU image has 5.17):
# scripts/test.sh runs the model, checkpoint and API tests again with it first on PYTHONPATH.
tf5=".cache/transformers5"
want5="$(sha256sum scripts/transformers5.txt | cut -d' ' -f1)"
if [ ! -f "$tf5/.installed" ] || [ "$(cat "$tf5/.installed")" != "$want5" ]; then
  rm -rf "$tf5"
  .venv/bin/python -m pip install -q --no-deps --target "$tf5" -r scripts/transformers5.txt
  echo "$want5" > "$tf5/.installed"
fi
