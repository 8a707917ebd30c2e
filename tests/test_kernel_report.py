"""The static Hopper report (python -m kernels.report, kernels/sass.py): specs, parsing, and the
check that no shipped kernel configuration spills or loses its tensor cores."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import report, sass

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "kernel", "config", "dtype", "registers", "spill_bytes", "smem_bytes", "hgmma", "hmma",
    "ffma", "atomics", "local", "ldl", "stl", "global_loads", "global_stores",
    "programs_per_sm", "flop", "hbm_bytes", "roofline_us_h100", "roofline_us_h200",
}  # fmt: skip

SASS_SNIPPET = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;            /* 0x000000040204798e */
        /*0020*/              @!P0 LDG.E.U16 R8, desc[UR4][R6.64] ;            /* 0x0000000406088981 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R2.64] ;/* 0x0000000002097fae */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;/* 0x0000000818187df0 */
        /*0050*/                   FFMA R3, R4, R5, R3 ;                       /* 0x0000000504037223 */
        /*0060*/                   FFMA.FTZ R3, R4, R5, R3 ;                   /* 0x0000000504037223 */
        /*0070*/               @P1 RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*0080*/                   STL [R1+0x4], R3 ;                          /* 0x0000040301007387 */
        /*0090*/                   LDL R3, [R1+0x4] ;                          /* 0x0000040001037983 */
        /*00a0*/                   STG.E.64 desc[UR4][R2.64], R4 ;             /* 0x0000000402007986 */
        /*00b0*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;        /* 0x000000060408723c */
        /*00c0*/                   EXIT ;                                      /* 0x000000000000794d */
"""


def test_parse_sass_counts_each_kind():
    c = sass.parse_sass(SASS_SNIPPET)
    assert (c["hgmma"], c["hmma"], c["ffma"], c["atomics"], c["ldl"], c["stl"]) == (
        1,
        1,
        2,
        1,
        1,
        1,
    )
    assert c["global_loads"] == {"128": 1, "16": 1, "128 async": 1}
    assert c["global_stores"] == {"64": 1}
    assert c["instructions"] == 13


def test_occupancy_and_roofline():
    assert report.programs_per_sm(128, 20 * 1024, 8) == (2, "registers")
    assert report.programs_per_sm(32, 200 * 1024, 4) == (1, "smem")
    assert report.programs_per_sm(32, 1024, 1) == (32, "blocks")
    assert (
        report.programs_per_sm(100, 0, 4)[0] == 4
    )  # 104 registers: 4 x 16384 // (104*32) = 16 warps
    assert report.programs_per_sm(32, 228 * 1024, 4)[0] == 0  # over 227 KB: cannot launch
    us, bound = report.roofline_us(989_000_000, 10, tensor_core=True, gpu="h100")
    assert bound == "compute" and us == pytest.approx(1.0)
    us, bound = report.roofline_us(1, 4_800_000, tensor_core=False, gpu="h200")
    assert bound == "memory" and us == pytest.approx(1.0)


@pytest.mark.parametrize("module", report.MODULES)
def test_every_kernel_module_provides_valid_report_specs(module):
    mod = importlib.import_module(f"kernels.{module}")
    assert callable(getattr(mod, "report_specs", None)), f"kernels.{module} has no report_specs()"
    specs = mod.report_specs()
    assert specs, f"kernels.{module}.report_specs() is empty"
    for spec in specs:
        sass.check_spec(spec)
        assert spec["flop"] > 0 and spec["hbm_bytes"] > 0 and spec["problem"]
    keys = [(s["fn"].__name__, s["config"], s["dtype"]) for s in specs]
    assert len(keys) == len(set(keys)), "two specs share kernel, config and dtype"


def test_check_spec_names_the_problem():
    spec = importlib.import_module("kernels.contrastive").report_specs()[0]
    bad = dict(spec, signature={k: v for k, v in spec["signature"].items() if k != "n"})
    with pytest.raises(ValueError, match="missing \\['n'\\]"):
        sass.check_spec(bad)
    with pytest.raises(ValueError, match="dtype"):
        sass.check_spec(dict(spec, dtype="fp8"))
    with pytest.raises(ValueError, match="missing \\['tensor_core'\\]"):
        sass.check_spec({k: v for k, v in spec.items() if k != "tensor_core"})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


_ONE = """
import json, kernels.contrastive as C
from kernels.sass import compile_spec
spec = next(s for s in C.report_specs() if s["dtype"] == "bf16" and "fwd" in s["fn"].__name__)
print(json.dumps(compile_spec(spec).as_dict()))
"""


def test_one_spec_compiles_and_reads_sass():
    """End to end on one small configuration (a few seconds): ptxas, cuobjdump, parsing."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, "-c", _ONE], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.splitlines()[-1])
    assert 0 < stats["registers"] <= 255 and stats["smem_bytes"] > 0
    assert stats["hgmma"] + stats["hmma"] > 0  # bf16 dots on tensor cores
    assert stats["instructions"] > 100 and stats["global_loads"]


@pytest.mark.slow
def test_report_no_spills_and_tensor_cores_where_documented(tmp_path):
    """python -m kernels.report over every shipped configuration (minutes on 2 busy cores):
    fails if a configuration does not compile, spills, or is documented as tensor-core
    without HGMMA/HMMA in its SASS."""
    pytest.importorskip("triton")
    out = tmp_path / "SASS.md"
    cmd = [sys.executable, "-m", "kernels.report", "--json", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert rows, proc.stderr[-3000:]
    assert {r["module"] for r in rows} == set(report.MODULES)
    for r in rows:
        assert "error" in r or FIELDS <= set(r), sorted(FIELDS - set(r))
    text = out.read_text()
    assert all(f"## {m} " in text for m in report.MODULES)
    found = report.problems(rows)
    assert not found, "\n".join(found)
    assert proc.returncode == 0, proc.stderr[-3000:]
