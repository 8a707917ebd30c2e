"""``clap-fast serve``: launch a Triton Inference Server (through PyTriton) for a checkpoint.

This module only finds the serving environment and starts the server process; the models
themselves live in ``clap_fast.serve_models`` and run in that process.

Why a separate environment: ``nvidia-pytriton`` 0.7.0 (which ships ``tritonserver`` 2.51 and its
Python backend) needs ``numpy < 2`` -- with numpy 2 a served request came back as an empty
array -- while the main environment needs numpy 2. ``scripts/setup_serve.sh`` creates a venv of
the same interpreter (default ``<repo>/.cache/serve-env``, or ``$CLAP_FAST_SERVE_ENV``) holding
PyTriton and numpy 1.26, with a ``.pth`` file that appends the main environment's
site-packages (torch is reused, not copied). A plain ``PYTHONPATH`` folder is not enough: the
Python backend's stub process finds its packages through the venv on ``PATH`` and ignores
``PYTHONPATH``.

Second trap: the stub loads ``libpython3.X.so`` from the system library path. When this
interpreter is another build of the same version, the stub dies
(``'_thread.RLock' object has no attribute '_recursion_count'``), so the launcher puts this
interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ENGINES",
    "build_parser",
    "find_serve_env",
    "server_env",
    "serve_main",
]

log = logging.getLogger(__name__)

ENGINES = ("eager", "bf16", "auto", "compiled", "onnx", "aoti", "trt")
SETUP_HINT = "bash scripts/setup_serve.sh"
_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds clap_fast/ (and export/)


def build_parser(prog: str = "clap-fast serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve clap_audio / clap_text / clap_text_tokens on Triton Inference Server.",
    )
    p.add_argument("checkpoint", help="checkpoint path (LAION .pt, HF dir, ours) or released name")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="eager",
        help="eager (default, fp32), bf16 / auto / compiled (clap_fast.engines), onnx; "
        "aoti and trt are refused with the reason",
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=16, help="largest batch a model accepts")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="dynamic batching: longest wait for a fuller batch (0 sends at once)",
    )
    p.add_argument(
        "--no-dynamic-batching", action="store_true", help="serve each request on its own"
    )
    p.add_argument(
        "--front-instances",
        type=int,
        default=8,
        help="dynamic batching: instances of the checking front model of clap_audio (at most "
        "--max-batch; bounds the batch the batched model can form); text models get a quarter",
    )
    p.add_argument(
        "--max-seconds", type=float, default=120.0, help="longest audio clip accepted (seconds)"
    )
    p.add_argument("--onnx-dir", default=None, help="onnx engine: where the graphs are written")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbosity")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first bad option."""
    for name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(args, name)
        if not 0 < port < 65536:
            raise ValueError(f"--{name.replace('_', '-')} must be in 1..65535, got {port}")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise ValueError("--http-port, --grpc-port and --metrics-port must differ")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.front_instances < 1:
        raise ValueError(f"--front-instances must be >= 1, got {args.front_instances}")
    if args.max_queue_delay_us < 0:
        raise ValueError(f"--max-queue-delay-us must be >= 0, got {args.max_queue_delay_us}")
    if not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")


def find_serve_env() -> Path | None:
    """The serving venv if it holds PyTriton and numpy 1.x for this Python version, else None."""
    env = Path(os.environ.get("CLAP_FAST_SERVE_ENV", _ROOT / ".cache" / "serve-env"))
    site = env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    ok = (
        (env / "bin" / "python").exists()
        and (site / "pytriton" / "__init__.py").is_file()
        and any(site.glob("numpy-1.*.dist-info"))
    )
    return env if ok else None


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the server process: this source tree first on PYTHONPATH, this
    interpreter's LIBDIR first on LD_LIBRARY_PATH (the Python backend stub's libpython)."""
    env = dict(os.environ if base is None else base)

    def prepend(key: str, *paths: str) -> None:
        old = [p for p in env.get(key, "").split(os.pathsep) if p]
        env[key] = os.pathsep.join([*paths, *[p for p in old if p not in paths]])

    prepend("PYTHONPATH", str(_ROOT))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        prepend("LD_LIBRARY_PATH", libdir)
    return env


def serve_main(argv: Sequence[str]) -> int:
    """Entry of ``clap-fast serve``: check options, then replace this process by the server
    (same pid, so SIGINT / SIGTERM reach the server directly)."""
    args = build_parser().parse_args(list(argv))
    try:
        validate_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    env_dir = find_serve_env()
    if env_dir is None:
        log.error(
            "serving environment (PyTriton, numpy<2) not found; create it with: %s", SETUP_HINT
        )
        return 2
    python = str(env_dir / "bin" / "python")
    log.info("starting Triton server (%s engine) with %s", args.engine, python)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, "-m", "clap_fast.serve_models", *argv], server_env())
    return 0  # not reached
