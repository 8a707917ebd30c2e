"""Benchmark-wide setup for ``pytest bench``: collection, provenance, result paths, GPU timing.

* Collects ``bench/bench_*.py`` when ``pytest bench`` is given the folder (pytest's default
  pattern is ``test_*.py``).
* Every benchmark's ``extra_info`` gets ``env``: device name, torch / triton / CUDA versions,
  the git commit (``GIT_COMMIT`` where there is no ``.git``, as on the device machine), the exact
  command and the load average; the same goes into the JSON's ``machine_info["clap_fast"]``.
* ``--bench-out DIR`` (or ``CLAP_BENCH_OUT=DIR``) writes the pytest-benchmark JSON (all rounds
  included) to ``DIR/pytest-benchmark.json`` unless ``--benchmark-json`` is given; turn it into
  reports with ``python -m bench.report DIR/pytest-benchmark.json --out bench/results/``.
* Every benchmark in the JSON carries ``stats.p20`` / ``stats.p80`` computed from its rounds.
* Cases of compiling providers (compiled, aoti, …) are marked ``slow`` (the CI smoke deselects
  them; they compile for minutes on 2 cores).
* ``gpu`` / ``cuda`` markers skip without CUDA; the ``sync`` and ``cuda_timer`` fixtures time GPU
  work (pytest-benchmark's host clock alone times only the kernel launches).

The CPU suite: ``bench/run_cpu.sh``; the GPU suite in one call: ``bench/gpu_run.sh OUTDIR``.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Nothing at run time may reach the network (models are built from configs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ collection and options
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-out",
        default=os.environ.get("CLAP_BENCH_OUT"),
        metavar="DIR",
        help="write the pytest-benchmark JSON to DIR/pytest-benchmark.json (env CLAP_BENCH_OUT)",
    )


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect bench_*.py from a folder argument (explicit file arguments are collected already)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's configure reads --benchmark-json
def pytest_configure(config: pytest.Config) -> None:
    for name in ("gpu", "cuda"):
        config.addinivalue_line("markers", f"{name}: needs a CUDA GPU (skipped elsewhere)")
    config.addinivalue_line(
        "markers", "largest: a suite's largest size (gpu_run.sh runs these last, one round)"
    )
    # gpu_run.sh stops steps with SIGINT (pytest-benchmark then writes what finished); a shell's
    # background job (`nohup … &`) inherits SIGINT ignored, and Python keeps it ignored
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    out = config.getoption("bench_out", None)
    if out and not config.getoption("benchmark_json", None):
        Path(out).mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = Path(out) / "pytest-benchmark.json"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-benchmark writes its JSON
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):
    """Drop benchmarks without a single finished round (one stopped by SIGINT mid-way), which
    would make pytest-benchmark fail writing the JSON and lose every finished result."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks = [b for b in bs.benchmarks if b]
    yield


# Providers that torch.compile or AOTInductor-package a model first (minutes on 2 cores): marked
# ``slow`` so the CI smoke (``-m "not slow"``) leaves them out; real runs keep them.
_COMPILING = re.compile(
    r"[\[-](compiled|compile|int8_compile|aoti|naive_compiled|ref_compiled|ours_bf16_compiled)[\]-]"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _COMPILING.search(item.name):
            item.add_marker(pytest.mark.slow)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- provenance
def _git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{'+dirty' if dirty else ''}" if sha else "unknown"


def device_name() -> str:
    """The GPU's name, else the CPU model and core count."""
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model} x{os.cpu_count()}"


@functools.cache
def _static_env(command: str) -> dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device_name": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if HAS_CUDA else None,
        "cudnn": torch.backends.cudnn.version() if HAS_CUDA else None,
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "command": command,
        "backend_env": os.environ.get("CLAP_FAST_BACKEND", "auto"),
    }


def bench_env(config: pytest.Config) -> dict[str, object]:
    """Provenance of this run: device, versions, commit, command, load average now."""
    args = shlex.join(config.invocation_params.args)
    env = dict(_static_env(f"pytest {args}".strip()))
    env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return env


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["clap_fast"] = bench_env(config)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """Add p20 / p80 (seconds, from every round) beside pytest-benchmark's own stats."""
    for entry in output_json.get("benchmarks", []):
        data = (entry.get("stats") or {}).get("data")
        if data:
            entry["stats"].update(percentiles(data))


def percentiles(data: list[float]) -> dict[str, float]:
    """p20 / p50 / p80 of per-round times (linear interpolation; one round gives itself)."""
    if len(data) == 1:
        return {"p20": data[0], "p50": data[0], "p80": data[0]}
    q = statistics.quantiles(data, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(data), "p80": q[7]}


@pytest.fixture(autouse=True)
def _record_env(request: pytest.FixtureRequest) -> None:
    """Put the run's provenance into every benchmark's extra_info (under ``env``); with
    ``CLAP_BENCH_MAX_ROUNDS=k`` (gpu_run.sh's pass over the largest sizes) ``pedantic`` runs at
    most k rounds (``benchmark(fn)`` is capped by --benchmark-min-rounds / --benchmark-max-time)."""
    if "benchmark" in request.fixturenames:
        bm = request.getfixturevalue("benchmark")
        bm.extra_info.setdefault("env", bench_env(request.config))
        cap = int(os.environ.get("CLAP_BENCH_MAX_ROUNDS", "0"))
        if cap > 0:
            pedantic = bm.pedantic

            @functools.wraps(pedantic)
            def capped(*args, rounds: int = 1, **kwargs):
                return pedantic(*args, rounds=min(rounds, cap), **kwargs)

            bm.pedantic = capped
            bm.extra_info["max_rounds"] = cap


# ----------------------------------------------------------------------------- GPU timing
def synchronize() -> None:
    """Wait for queued GPU work (a host sync; no-op without CUDA)."""
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def sync() -> Callable[[Callable], Callable]:
    """Wrap a callable so that each call ends with a CUDA sync: ``benchmark(sync(fn))``."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            synchronize()  # host sync: the host clock now covers the GPU work
            return out

        return timed

    return wrap


def cuda_event_times(fn: Callable[[], object], rounds: int = 20, warmup: int = 3) -> list[float]:
    """Per-call GPU times in seconds from CUDA events (one event pair per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(rounds)
    ]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in pairs]


@pytest.fixture
def cuda_timer(request: pytest.FixtureRequest) -> Callable[..., dict[str, float] | None]:
    """``cuda_timer(fn, rounds=20, warmup=3)`` -> {ms_p20, ms_p50, ms_p80} from CUDA events.

    Also stored in the benchmark's ``extra_info["cuda_event"]`` when the test uses ``benchmark``.
    Returns None without CUDA.
    """

    def measure(fn: Callable[[], object], rounds: int = 20, warmup: int = 3):
        if not HAS_CUDA:
            return None
        p = percentiles(cuda_event_times(fn, rounds, warmup))
        res = {f"ms_{k}": v * 1e3 for k, v in p.items()} | {"rounds": rounds}
        if "benchmark" in request.fixturenames:
            request.getfixturevalue("benchmark").extra_info["cuda_event"] = res
        return res

    return measure
