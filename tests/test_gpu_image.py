"""The GPU machine's image, simulated (tests/gpu_image_sim): what a GPU run collects there.

The lent GPU image lacks soundfile, librosa, webdataset, nnAudio, open_clip, ... (the list is
tests/gpu_image_sim/gpu_image.json). A module-level import of one of them turns into a
collection error there, which stops ``pytest -m gpu tests`` before any GPU test runs. These
tests collect in subprocesses with the simulation first on PYTHONPATH and compare with a plain
collection: the GPU tests and the benchmarks must all be collected, with no errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "tests" / "gpu_image_sim"


def sim_env(simulate: bool = True) -> dict[str, str]:
    """The environment of a subprocess that looks like the GPU image (``simulate``) or not."""
    env = dict(os.environ)
    paths = [str(SIM)] if simulate else []
    paths += [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def collect(args: list[str], simulate: bool) -> tuple[set[str], str]:
    """Node ids collected by ``pytest --collect-only -q ARGS`` and the whole output.

    Fails when pytest reports a collection error (exit status 2) or any ``ERROR`` line."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=sim_env(simulate), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    where = "under the GPU-image simulation" if simulate else "without the simulation"
    assert proc.returncode == 0, f"{' '.join(args)} {where}: rc {proc.returncode}\n{out[-4000:]}"
    assert "ERROR" not in out and "error" not in out.splitlines()[-1], out[-4000:]
    return {ln for ln in proc.stdout.splitlines() if "::" in ln}, out


def test_simulation_blocks_imports_and_probes():
    code = (
        "import importlib.metadata as md, importlib.util as u\n"
        "assert u.find_spec('soundfile') is None and u.find_spec('torch') is not None\n"
        "try:\n    md.version('open_clip_torch')\nexcept md.PackageNotFoundError:\n    pass\n"
        "else:\n    raise SystemExit('open_clip_torch metadata visible')\n"
        "try:\n    import librosa.filters\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    raise SystemExit('librosa imported')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=sim_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gpu_tests_collect_on_the_gpu_image():
    """Every ``gpu``-marked test collected without the simulation is collected with it."""
    plain, _ = collect(["-m", "gpu", "tests"], simulate=False)
    sim, out = collect(["-m", "gpu", "tests"], simulate=True)
    assert plain, "no gpu-marked tests collected at all"
    assert plain <= sim, f"lost on the GPU image: {sorted(plain - sim)}\n{out[-3000:]}"


def test_benchmarks_collect_on_the_gpu_image():
    """``pytest bench`` collects the same benchmarks (no module skipped for a missing package:
    their optional baselines skip per test, at run time)."""
    plain, _ = collect(["bench"], simulate=False)
    sim, out = collect(["bench"], simulate=True)
    assert plain, "no benchmarks collected at all"
    assert plain <= sim, f"lost on the GPU image: {sorted(plain - sim)}\n{out[-3000:]}"


def test_library_imports_on_the_gpu_image():
    """Every clap_fast / kernels module imports without the packages the image lacks."""
    mods = [
        f"{d}.{p.stem}" for d in ("clap_fast", "kernels") for p in sorted((ROOT / d).glob("*.py"))
    ]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code, *mods], cwd=ROOT, env=sim_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
