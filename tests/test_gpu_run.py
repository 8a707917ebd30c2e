"""bench/gpu_run.sh --dry-run under the GPU-image simulation: every step of the one-call GPU run
walks on the CPU with tiny sizes, so an import, path or collection error shows up here and not
in the 15 minutes of a lent GPU. The dry run is 11 steps of at most 20-90 s each (embed, train
and export usually stop at their 40 s cap on 2 cores): 6 min measured under a load average of
14 (2026-12-03), the whole file 8.5 min."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CPU-only suites (CPU engines, data loader, Ray/FAISS library, Triton serving): their packages
# are not on the GPU image and they measure nothing GPU-bound; bench/run_cpu.sh runs them.
CPU_ONLY = {"cpu_engines", "data", "library", "serve"}
SUITES = sorted(
    p.stem.removeprefix("bench_")
    for p in (ROOT / "bench").glob("bench_*.py")
    if p.stem.removeprefix("bench_") not in CPU_ONLY
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {
        "PYTHONPATH": str(ROOT / "tests" / "gpu_image_sim"),
        "PYTHON": sys.executable,
        "BUDGET_S_DRY": "900",  # caps still apply per step; a loaded CI machine needs the slack
    }
    proc = subprocess.run(
        ["bash", "bench/gpu_run.sh", "--dry-run", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    return out, proc


def test_every_step_runs(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = (out / "steps.txt").read_text()
    names = ["preflight", "gpu-tests"] + [f"bench_{s}" for s in SUITES]
    for name in names:
        assert re.search(rf"^{name}: rc=", steps, re.M), f"step {name} missing:\n{steps}"
    assert "skipped" not in steps, steps
    assert re.search(r"^total \d+ s", steps, re.M)


def test_preflight_launches_every_kernel(dry_run):
    out, _ = dry_run
    result = json.loads((out / "preflight.json").read_text())
    assert all(v["ok"] for v in result["imports"].values()), result["imports"]
    assert set(result["launches"]) == {"mel", "window_attention", "contrastive"}
    for name, launch in result["launches"].items():
        assert launch["ok"], (name, launch.get("error"))
    assert result["versions"]["soundfile"] is None  # the simulation was on


def test_gpu_tests_collect_and_skip_cleanly(dry_run):
    out, _ = dry_run
    steps = (out / "steps.txt").read_text()
    assert re.search(r"^gpu-tests: rc=0,", steps, re.M), steps
    assert (out / "gpu-tests.xml").exists()


def test_no_import_errors_and_evidence_kept(dry_run):
    """No suite fails to import or collect, none has a failing test, every JSON left behind
    is valid, the fast kernel suites leave theirs, and the reports are written."""
    out, _ = dry_run
    steps = (out / "steps.txt").read_text()
    for suite in SUITES:
        log = (out / "logs" / f"bench_{suite}.log").read_text()
        # a skip for a missing package reads "could not import ..."; these are errors
        assert "ModuleNotFoundError" not in log and "ImportError" not in log, (suite, log[-3000:])
        assert "ERROR collecting" not in log and "FAILED" not in log, (suite, log[-3000:])
        # rc 0: done; 124 / 137: stopped at its cap (a busy CPU), JSON of what finished kept
        assert re.search(rf"^bench_{suite}: rc=(0|124|137),", steps, re.M), steps
        raw = out / "raw" / f"{suite}.json"
        if raw.exists():
            assert json.loads(raw.read_text())["benchmarks"], suite
    for suite in ("mel", "contrastive"):
        assert (out / "raw" / f"{suite}.json").exists(), out / "logs" / f"bench_{suite}.log"
    assert list(out.glob("*_cpu-*.md")), (out / "logs" / "report.log").read_text()[-2000:]


SLEEPY = """
import time
from pathlib import Path


def test_quick(benchmark):
    benchmark.pedantic(lambda: sum(range(1000)), rounds=3, iterations=1)


def test_slow(benchmark, tmp_path_factory):
    def body():
        Path(READY).touch()
        time.sleep(120)

    benchmark.pedantic(body, rounds=1, iterations=1)
"""


def test_sigint_keeps_the_json_of_finished_benchmarks(tmp_path):
    """What gpu_run.sh relies on: pytest stopped by SIGINT in the middle of a benchmark still
    writes the JSON of the finished ones (bench/conftest.py drops the unfinished one, on which
    pytest-benchmark would fail and write nothing)."""
    ready = tmp_path / "ready"
    suite = tmp_path / "bench_sleepy.py"
    suite.write_text(f"READY = {str(ready)!r}\n" + SLEEPY)
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.conftest",
           "--rootdir", str(tmp_path), str(suite), f"--benchmark-json={out}"]  # fmt: skip
    # started with SIGINT ignored, as a shell's background job (`nohup … &`) is:
    # bench/conftest.py restores it, else the sleep below would run out the timeout
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    names = [b["name"] for b in json.loads(out.read_text())["benchmarks"]]
    assert names == ["test_quick"], log[-3000:]
