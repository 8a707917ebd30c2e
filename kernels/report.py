"""Static Hopper report: every kernel configuration compiled for sm_90a, without a GPU.

    python -m kernels.report                 # writes kernels/SASS.md
    python -m kernels.report --json          # also one JSON object per configuration per line
    python -m kernels.report --out x.md -j 2 # another path, 2 compile processes

Each kernel module (``MODULES``) provides ``report_specs() -> list[dict]``: one dict per
(kernel, configuration) it can launch on a GPU, with exactly the keys ``fn`` (the
``@triton.jit`` function), ``config`` (short text), ``dtype`` (``fp32 | bf16 | fp16 | i16``),
``signature`` ({arg: Triton type or ``"constexpr"``} for every argument), ``constexprs``
({arg: value} for the constexpr arguments), ``options`` ({num_warps, num_stages}), ``flop``
and ``hbm_bytes`` (per call, for the reference problem named in ``problem``) and
``tensor_core`` (True when the docs call this path tensor-core). ``kernels.sass`` compiles each
one (Triton's PTX back end, the bundled ptxas and cuobjdump) and counts its SASS.

The report gives per configuration: registers per thread, spilled bytes, shared memory per
program, programs per SM (the tightest of registers, shared memory, threads and 32 blocks on
an sm_90 SM), static counts of HGMMA / HMMA / FFMA / atomics / LDL + STL and global loads and
stores by width, and the roofline time max(FLOP / peak, bytes / bandwidth) on an H100 SXM and
an H200 (989 TFLOP/s for tensor-core paths (dense bf16; TF32 paths reach at most half), 67
TFLOP/s fp32 FMA otherwise; 3.35 / 4.8 TB/s HBM). Exit status 1 when a configuration fails to
compile, spills, or is documented as tensor-core but shows no HGMMA / HMMA.

Needs ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` functions cannot be
compiled, so the report refuses to start (``tests/test_kernel_report.py`` runs it in a
subprocess without it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

log = logging.getLogger("kernels.report")

MODULES = ("mel", "window_attention", "contrastive")
DEFAULT_OUT = Path(__file__).resolve().parent / "SASS.md"
GPUS = {  # dense peaks (FLOP/s) and HBM bandwidth (B/s)
    "h100": {"tensor_core": 989e12, "fma": 67e12, "hbm": 3.35e12},
    "h200": {"tensor_core": 989e12, "fma": 67e12, "hbm": 4.8e12},
}
# One sm_90 SM: 64 K registers (4 partitions of 16 K), 228 KB shared memory (1 KB reserved per
# program, at most 227 KB per program), 2048 threads, 32 resident programs.
SM_REGS_PER_PARTITION, SM_SMEM, SM_RESERVED, SM_MAX_SMEM, SM_WARPS, SM_BLOCKS = (
    16384,
    228 * 1024,
    1024,
    227 * 1024,
    64,
    32,
)


def programs_per_sm(registers: int, smem_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident programs per sm_90 SM and what limits them ("registers", "smem", ...)."""
    regs = max(8, -(-registers // 8) * 8)  # allocated per thread in units of 8
    warps_by_regs = 4 * (SM_REGS_PER_PARTITION // (regs * 32))
    limits = {
        "registers": warps_by_regs // num_warps,
        "smem": 0 if smem_bytes > SM_MAX_SMEM else SM_SMEM // (smem_bytes + SM_RESERVED),
        "threads": SM_WARPS // num_warps,
        "blocks": SM_BLOCKS,
    }
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name


def roofline_us(flop: int, hbm_bytes: int, tensor_core: bool, gpu: str) -> tuple[float, str]:
    """Lower bound on the time of one call in microseconds, and whether compute or memory binds."""
    peak = GPUS[gpu]["tensor_core" if tensor_core else "fma"]
    t_compute, t_memory = flop / peak, hbm_bytes / GPUS[gpu]["hbm"]
    return max(t_compute, t_memory) * 1e6, "compute" if t_compute >= t_memory else "memory"


def _specs(module: str) -> list[dict]:
    mod = importlib.import_module(f"kernels.{module}")
    if not callable(getattr(mod, "report_specs", None)):
        raise AttributeError(f"kernels.{module} has no report_specs()")
    return mod.report_specs()


def _compile_one(module: str, index: int) -> dict:
    """Compile spec ``index`` of ``module`` (runs in a worker process); one report row."""
    from kernels.sass import compile_spec

    spec = _specs(module)[index]
    row = {
        "kernel": spec["fn"].__name__,
        "module": module,
        "config": spec["config"],
        "dtype": spec["dtype"],
        "problem": spec["problem"],
        "tensor_core": bool(spec["tensor_core"]),
        "num_stages": spec["options"]["num_stages"],
        "flop": int(spec["flop"]),
        "hbm_bytes": int(spec["hbm_bytes"]),
    }
    t0 = time.perf_counter()
    try:
        stats = compile_spec(spec).as_dict()
    except Exception as exc:  # a failed compile is a finding of the report, not a crash
        return row | {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    row |= stats
    row["local"] = row["ldl"] + row["stl"]
    row["programs_per_sm"], row["occupancy_limit"] = programs_per_sm(
        row["registers"], row["smem_bytes"], row["num_warps"]
    )
    for gpu in GPUS:
        us, bound = roofline_us(row["flop"], row["hbm_bytes"], row["tensor_core"], gpu)
        row[f"roofline_us_{gpu}"], row[f"bound_{gpu}"] = round(us, 3), bound
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def problems(rows: list[dict]) -> list[str]:
    """What the report's check fails on: compile errors, spills, tensor-core paths without MMA."""
    out = []
    for r in rows:
        name = f"{r['module']}.{r['kernel']} [{r['config']}, {r['dtype']}]"
        if "error" in r:
            out.append(f"{name}: does not compile: {r['error'].splitlines()[0]}")
            continue
        if r["spill_bytes"] or r["local"]:
            out.append(f"{name}: spills ({r['spill_bytes']} B local, {r['local']} LDL/STL)")
        if r["tensor_core"] and not (r["hgmma"] or r["hmma"]):
            out.append(f"{name}: documented as tensor-core but the SASS has no HGMMA/HMMA")
    return out


def build(jobs: int | None = None) -> list[dict]:
    """Compile every configuration of every module in ``MODULES``; rows in module/spec order."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("python -m kernels.report needs TRITON_INTERPRET unset")
    tasks = [(m, i) for m in MODULES for i in range(len(_specs(m)))]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    log.info("compiling %d configurations for sm_90a with %d processes", len(tasks), jobs)
    if jobs == 1:
        return [_compile_one(m, i) for m, i in tasks]
    ctx = multiprocessing.get_context("fork")  # the specs' jit functions are already imported
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, *zip(*tasks)))


def _widths(d: dict) -> str:
    return " ".join(f"{k}×{v}" for k, v in sorted(d.items())) or "–"


def markdown(rows: list[dict], triton_version: str) -> str:
    """kernels/SASS.md: the problems found, then one table per module."""
    lines = [
        "# Static Hopper report (sm_90a)",
        "",
        "Generated by `python -m kernels.report` (no GPU needed; do not edit by hand): every "
        "configuration of `report_specs()` in "
        + ", ".join(f"`kernels/{m}.py`" for m in MODULES)
        + f" compiled with Triton {triton_version} for `GPUTarget('cuda', 90, 32)` (PTX, the "
        "bundled ptxas, `cuobjdump -sass`). What the machine code says before any GPU runs it; "
        "not a measurement.",
        "",
        "- **regs**: registers per thread (255 max); **spill**: local memory per thread in bytes "
        "(spilled registers); **smem**: shared memory per program (KiB); **prog/SM**: resident "
        "programs per SM and what limits them (registers, smem, threads, blocks).",
        "- **HGMMA / HMMA / FFMA / atom / LDL+STL**: static instruction counts (in the code, not "
        "executed); tensor-core work shows as HGMMA (wgmma) or HMMA (mma.sync), CUDA-core fp32 "
        "dots as FFMA. **LDG / STG**: global loads / stores by width in bits (`async` = cp.async, "
        "`tma` = TMA); pointers assumed 16-byte aligned, integer arguments not specialised.",
        "- **roofline**: max(FLOP / peak, bytes / bandwidth) per call for the problem named under "
        "each table: 989 TFLOP/s on tensor-core paths (dense bf16; TF32 reaches half, tf32x3 a "
        "sixth), 67 TFLOP/s fp32 FMA otherwise; HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200). "
        "FLOP and bytes come from each kernel module's own formulas.",
        "",
    ]
    found = problems(rows)
    lines += ["## Problems", ""]
    lines += (
        [f"- {p}" for p in found]
        if found
        else ["None: no spills, every tensor-core path has HGMMA/HMMA, everything compiles.", ""]
    )
    if found:
        lines.append("")
    head = (
        "| kernel | config | dtype | regs | spill | smem KiB | prog/SM | HGMMA | HMMA | FFMA "
        "| atom | LDL+STL | LDG | STG | GFLOP | MB | H100 µs | H200 µs | bound |"
    )
    for module in MODULES:
        mine = [r for r in rows if r["module"] == module]
        lines += [f"## {module} (`kernels/{module}.py`)", "", head, "|" + "---|" * 19]
        for r in mine:
            if "error" in r:
                lines.append(
                    f"| `{r['kernel']}` | {r['config']} | {r['dtype']} | compile error: "
                    f"{r['error'].splitlines()[0][:120]} |" + " |" * 15
                )
                continue
            lines.append(
                f"| `{r['kernel']}` | {r['config']} | {r['dtype']} | {r['registers']} "
                f"| {r['spill_bytes']} | {r['smem_bytes'] / 1024:.1f} "
                f"| {r['programs_per_sm']} ({r['occupancy_limit']}) | {r['hgmma']} | {r['hmma']} "
                f"| {r['ffma']} | {r['atomics']} | {r['local']} | {_widths(r['global_loads'])} "
                f"| {_widths(r['global_stores'])} | {r['flop'] / 1e9:.2f} "
                f"| {r['hbm_bytes'] / 1e6:.1f} | {r['roofline_us_h100']:.1f} "
                f"| {r['roofline_us_h200']:.1f} | {r['bound_h100']} |"
            )
        probs = sorted({r["problem"] for r in mine})
        lines += ["", "Problem (FLOP, bytes, roofline): " + "; ".join(probs) + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per configuration"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
    parser.add_argument(
        "-j", "--jobs", type=int, default=None, help="compile processes (default: cores)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    import triton

    t0 = time.perf_counter()
    rows = build(args.jobs)
    args.out.write_text(markdown(rows, triton.__version__))
    if args.json:
        for r in rows:
            sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")
    found = problems(rows)
    for p in found:
        log.warning("%s", p)
    log.info("%d configurations in %.0f s -> %s", len(rows), time.perf_counter() - t0, args.out)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
