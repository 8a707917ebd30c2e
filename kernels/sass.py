"""Compile a Triton kernel for Hopper (sm_90a) without a GPU and read its machine code.

``compile_spec(spec)`` takes one dict of a kernel module's ``report_specs()`` (see
``kernels/report.py`` for the convention), compiles it with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (Triton's PTX back end and its bundled ``ptxas``; no driver and
no CUDA call) and disassembles the cubin with the bundled ``cuobjdump``. It returns a
:class:`SassStats`: registers per thread, local memory per thread (spills: Triton kernels have
no local arrays), shared memory per program, and static counts of the SASS instructions that
matter for speed (tensor-core ``HGMMA`` / ``HMMA``, ``FFMA``, atomics, local-memory traffic,
global loads and stores by width).

Launch assumptions: pointer arguments are 16-byte aligned (Triton's launcher specialises them
so for fresh torch tensors); integer arguments are not specialised (a launch whose strides are
multiples of 16 may vectorise wider than reported here). Counts are static (instructions in the
code), not executed instructions.

Must run with ``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` functions are
not compilable (``python -m kernels.report`` checks this).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

TARGET_ARCH = 90
SPEC_KEYS = frozenset(
    {
        "fn",
        "config",
        "dtype",
        "signature",
        "constexprs",
        "options",
        "flop",
        "hbm_bytes",
        "problem",
        "tensor_core",
    }
)
DTYPES = frozenset({"fp32", "bf16", "fp16", "i16"})

# One SASS instruction line of ``cuobjdump -sass``: /*0a40*/  @!P0 LDG.E.128 R4, desc[...] ;
_INSN = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class SassStats:
    """What the sm_90a machine code of one kernel configuration says (static counts)."""

    registers: int
    """Registers per thread (ptxas' allocation; 255 is the ceiling)."""
    spill_bytes: int
    """Local memory per thread in bytes (register spills; 0 when nothing spills)."""
    smem_bytes: int
    """Shared memory per program (Triton's dynamic allocation; the 1 KB the hardware reserves
    per program is not included)."""
    num_warps: int
    hgmma: int = 0
    """Warpgroup tensor-core MMAs (Hopper's wgmma)."""
    hmma: int = 0
    """Warp-level tensor-core MMAs (mma.sync)."""
    ffma: int = 0
    """fp32 fused multiply-adds (the CUDA-core dot products of an IEEE fp32 ``tl.dot``)."""
    atomics: int = 0
    """Global / shared atomics and reductions (ATOM*, RED*)."""
    ldl: int = 0
    stl: int = 0
    instructions: int = 0
    global_loads: dict[str, int] = field(default_factory=dict)
    """Global loads by width in bits ("128": n, ...), cp.async (LDGSTS) and TMA included."""
    global_stores: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _tool(name: str) -> str:
    """Path of a CUDA binary bundled with Triton (cuobjdump, nvdisasm, ptxas)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"Triton's bundled {name} is missing ({path})")
    return str(path)


def _width(opcode: str) -> str:
    """Access width in bits of a load/store opcode such as LDG.E.128 or STG.E.U16."""
    mods = opcode.split(".")[1:]
    for m in mods:
        if m in ("128", "64", "32"):
            return m
        if m in ("U16", "S16"):
            return "16"
        if m in ("U8", "S8"):
            return "8"
    return "32"


def parse_sass(sass: str) -> dict:
    """Instruction counts from ``cuobjdump -sass`` text (one kernel)."""
    counts = dict(hgmma=0, hmma=0, ffma=0, atomics=0, ldl=0, stl=0, instructions=0)
    loads: dict[str, int] = {}
    stores: dict[str, int] = {}
    for line in sass.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        counts["instructions"] += 1
        if base == "HGMMA":
            counts["hgmma"] += 1
        elif base == "HMMA":
            counts["hmma"] += 1
        elif base == "FFMA":
            counts["ffma"] += 1
        elif base.startswith(("ATOM", "RED")):
            counts["atomics"] += 1
        elif base == "LDL":
            counts["ldl"] += 1
        elif base == "STL":
            counts["stl"] += 1
        elif base in ("LDG", "LDGSTS"):
            key = _width(op) if base == "LDG" else f"{_width(op)} async"
            loads[key] = loads.get(key, 0) + 1
        elif base.startswith("UTMALDG"):
            loads["tma"] = loads.get("tma", 0) + 1
        elif base == "STG":
            stores[_width(op)] = stores.get(_width(op), 0) + 1
        elif base.startswith("UTMASTG"):
            stores["tma"] = stores.get("tma", 0) + 1
    return counts | {"global_loads": loads, "global_stores": stores}


def check_spec(spec: dict) -> None:
    """Raise ValueError naming what is wrong with one ``report_specs()`` entry."""
    keys = set(spec)
    if keys != SPEC_KEYS:
        raise ValueError(
            f"report spec {spec.get('config')!r}: keys must be {sorted(SPEC_KEYS)}, "
            f"missing {sorted(SPEC_KEYS - keys)}, unexpected {sorted(keys - SPEC_KEYS)}"
        )
    fn = spec["fn"]
    names = list(getattr(fn, "arg_names", []))
    if not names:
        raise ValueError(f"report spec {spec['config']!r}: 'fn' is not a @triton.jit function")
    where = f"{fn.__name__} [{spec['config']}]"
    if set(spec["signature"]) != set(names):
        raise ValueError(
            f"{where}: signature must name every argument; missing "
            f"{sorted(set(names) - set(spec['signature']))}, unknown "
            f"{sorted(set(spec['signature']) - set(names))}"
        )
    const_args = {n for n, t in spec["signature"].items() if t == "constexpr"}
    if const_args != set(spec["constexprs"]):
        raise ValueError(f"{where}: constexprs must give exactly the 'constexpr' arguments")
    if spec["dtype"] not in DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {spec['dtype']!r}")
    if set(spec["options"]) != {"num_warps", "num_stages"}:
        raise ValueError(f"{where}: options must be {{'num_warps', 'num_stages'}}")


def compile_spec(spec: dict) -> SassStats:
    """Compile one spec for sm_90a and read registers, spills, shared memory and SASS counts."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_spec needs TRITON_INTERPRET unset (kernels are interpreted)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check_spec(spec)
    fn = spec["fn"]
    aligned = [["tt.divisibility", 16]]
    attrs = {
        (i,): aligned
        for i, n in enumerate(fn.arg_names)
        if str(spec["signature"][n]).startswith("*")
    }
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=spec["options"]
    )
    with tempfile.TemporaryDirectory(prefix="clap-fast-sass-") as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        # One call: -sass disassembles through nvdisasm (~0.6 s of CPU per kernel).
        sass = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", "-sass", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
    m = _RES.search(sass)
    if not m:
        raise RuntimeError(f"no resource usage for {fn.__name__} in cuobjdump output")
    regs, stack, _reserved_smem, local = map(int, m.groups())
    counts = parse_sass(sass)
    return SassStats(
        registers=regs,
        spill_bytes=max(local, stack),
        smem_bytes=int(compiled.metadata.shared),
        num_warps=int(spec["options"]["num_warps"]),
        **counts,
    )
