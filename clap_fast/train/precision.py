"""Training precision, decided once per run from ``--precision`` and the actual device.

``resolve_precision`` turns the requested precision (``fp32`` | ``bf16``; LAION's spellings are
normalised by ``params.parse_args``) into a ``Precision``: whether the forward runs under bf16
autocast (``Precision.autocast()``, built from the device's type) or, for FSDP2 on a GPU,
under FSDP2's bf16 mixed-precision policy. The log-mel front end, ``bn0`` and the loss stay
fp32 in every case.

On a CPU, bf16 pays off only with bf16 arithmetic units (AVX512-BF16 or AMX-BF16 on x86, the
BF16 extension on Arm): there autocast runs the GEMMs in bf16. Without them (e.g. AVX2 only)
bf16 is emulated and about 6x slower than fp32, so the run warns once and trains in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Precision", "resolve_precision", "cpu_has_bf16_units"]

log = logging.getLogger("clap_fast.train")

_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 "flags", Arm "Features"); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX-BF16, or Arm's BF16).

    ``torch.backends.cpu.get_cpu_capability()`` says which vector ISA torch's kernels use
    (e.g. "AVX512", "AVX2"); the bf16 instructions themselves are read from the CPU flags.
    """
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX"):
        return False
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(f in flags for f in _X86_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """How this run computes (see the module docstring)."""

    name: str
    """"fp32" or "bf16": what the run really does (bf16 may have fallen back to fp32)."""
    device_type: str
    """"cuda" or "cpu": the device autocast is built for."""
    fsdp_mixed: bool = False
    """bf16 through FSDP2's MixedPrecisionPolicy (sharded GPU runs) instead of autocast."""

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: bf16 autocast on this device type, or a no-op."""
        return torch.autocast(
            self.device_type, dtype=torch.bfloat16, enabled=self.bf16 and not self.fsdp_mixed
        )

    def fp32(self) -> contextlib.AbstractContextManager:
        """Autocast off (the loss, which must see fp32 features)."""
        return torch.autocast(self.device_type, enabled=False)


def resolve_precision(requested: str, device: torch.device, *, sharded: bool) -> Precision:
    """The run's ``Precision`` from ``--precision`` ("fp32" | "bf16"), the device, and whether
    the model is sharded with FSDP2 over several processes."""
    if requested not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {requested!r}")
    kind = device.type
    if requested == "bf16" and kind == "cpu" and not cpu_has_bf16_units():
        log.warning(
            "--precision bf16: this CPU has no bf16 units (no AVX512-BF16 / AMX; torch uses %s), "
            "where bf16 runs ~6x slower than fp32: training in fp32",
            torch.backends.cpu.get_cpu_capability(),
        )
        return Precision("fp32", kind)
    if requested == "bf16" and kind not in ("cpu", "cuda"):
        log.warning("--precision bf16: not supported on %s: training in fp32", kind)
        return Precision("fp32", kind)
    if requested == "bf16":
        log.info(
            "--precision bf16 on %s: bf16 %s",
            kind,
            "FSDP2 mixed precision" if sharded and kind == "cuda" else "autocast",
        )
    return Precision(requested, kind, fsdp_mixed=requested == "bf16" and sharded and kind == "cuda")
