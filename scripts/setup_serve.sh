#!/usr/bin/env bash
# Create (or reuse) the serving environment of `clap-fast serve`: a venv of the same interpreter
# holding nvidia-pytriton 0.7.0 (which ships tritonserver 2.51) and numpy 1.26, layered over the
# main environment (a .pth file appends its site-packages, so torch etc. are reused, not copied).
# PyTriton 0.7 needs numpy < 2; the main environment keeps numpy 2. It must be a venv rather than
# a PYTHONPATH folder: Triton's Python-backend stub finds its packages through the venv on PATH
# and ignores PYTHONPATH. Idempotent: a second run only checks the stamp.
# Usage: bash scripts/setup_serve.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-${PYTHON:-}}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
env_dir="${CLAP_FAST_SERVE_ENV:-$root/.cache/serve-env}"
want="nvidia-pytriton==0.7.0 numpy==1.26.4 main=$("$py" -c 'import sys; print(sys.prefix)')"
stamp="$env_dir/.clap_fast-serve-installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m venv --without-pip --clear "$env_dir"
  site="$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$py" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
    | sort -u > "$site/clap_fast_main_env.pth"
  "$py" -m pip install -q --target "$site" nvidia-pytriton==0.7.0 numpy==1.26.4
  echo "$want" > "$stamp"
fi
echo "serving environment ready: $env_dir"
