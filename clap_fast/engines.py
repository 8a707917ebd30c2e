"""Inference engines of the ``embed_*`` calls, and what ``engine="auto"`` picks on this machine.

Measured (``bench/results/cpu_engines_cpu-2core_2026-12-04.md``, HTSAT-tiny audio, 10 s clips,
batch 8, 2-core AVX512-BF16 EPYC, × laion_clap 1.1.7 fp32 in the same run) and fidelity on a
trained model (``int8_fidelity_cpu-2core_2026-12-03.md``, HTSAT-mini, 512 held-out clips):

=============  ===========================================================  ======  ===========
engine         what runs                                                    × LAION  fidelity
=============  ===========================================================  ======  ===========
eager          the model in PyTorch (fp32, or under the caller's            1.15×   reference
               ``autocast``)
bf16           eager under bf16 autocast; the log-mel front end stays fp32  2.23×   cos ≥ 0.99999
               (on the CPU the audio tower runs 2 clips per call: 1.46× at
               embed_audio's default batch_size 32, 3–12 % at 8)
compile        ``torch.compile`` of ``encode_audio`` / ``encode_text``,     —       exact (fp32)
               static shapes (batches padded to a power of two); compiles
               for minutes on 2 cores
int8_compile   audio: static int8 (torchao PT2E, ``X86InductorQuantizer``;  3.62×   cos ≥ 0.9996,
               int8 weights per channel, activation scales calibrated on            metrics within
               16 built-in synthetic clips) compiled by inductor with                 0.004 (bound
               freezing to oneDNN int8 kernels (VNNI); front end and                  0.01); 0.9997
               patch-embedding convolution fp32. Text: fp32 eager.                    on HTSAT-tiny
               Builds in ~80 s (quantise ~37 s, compile ~43 s; once more
               for single-row calls); runs in chunks of 2 rows
onnx           the ``export/`` graph in onnxruntime's CPU provider          1.30×   exact (≤ 1e-6)
openvino       the same graph in OpenVINO, f32 inference precision          1.38×   exact (≤ 1e-6)
openvino_bf16  the same graph in OpenVINO at bf16 inference precision       2.92×   **unsafe**:
               (falls back to f32, with a warning, where OpenVINO cannot            cos 0.38 on a
               compile at bf16)                                                     trained model
int8           the same graph with every linear layer's MatMul / Gemm       2.50×   cos ≥ 0.99998,
               quantised by onnxruntime (``quantize_dynamic``: int8                 metrics within
               weights per output channel, activations per call); front             0.004 (bound
               end, resize and attention-score matmuls stay fp32                    0.01); 0.99987
                                                                                    on HTSAT-tiny
=============  ===========================================================  ======  ===========

The default (``engine=None``, no ``--engine``) is ``CLAP_FAST_ENGINE`` when set, else ``eager``
in fp32: embeddings equal LAION's to float tolerance on every machine, which is this project's
first promise. ``auto`` (``engine="auto"``, ``--engine auto`` or ``CLAP_FAST_ENGINE=auto``) is the
fast choice for CPU inference when reduced precision is acceptable: cos ≥ ``AUTO_MIN_COSINE``
= 0.9999 to fp32 for bf16, ≥ ``INT8_MIN_COSINE`` = 0.999 for int8_compile (measured on a
trained model).

``auto`` decides from the CPU's capabilities and the job's size, never by timing at run time:

1. ``CLAP_FAST_ENGINE`` set in the environment -> that engine;
2. the model is not on the CPU -> ``eager`` (Triton kernels on a GPU);
3. the caller passed ``autocast`` -> ``eager`` under it;
4. audio, an x86 CPU (AVX2), torchao installed (``clap_fast[int8]``), and either
   ``int8_compile`` already built for this model or a job of at least ``AUTO_INT8_CLIPS`` clips
   (3,000 where the alternative is bf16, 1,000 where it is fp32 eager: where its ~80 s build
   pays back) -> ``int8_compile``. A job is one ``embed_audio`` call, or all the files of one
   ``embed_audio_files`` call (``clap-fast embed``);
5. bf16 units usable (``CpuInfo.bf16_units``: ``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo,
   and neither ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 nor ``ATEN_CPU_CAPABILITY`` below
   avx512) -> ``bf16``, both towers (1.7–1.9× fp32 eager for RoBERTa text). ``openvino_bf16``
   lost the fp32 embeddings on a trained model; int8 (onnxruntime) is no clear win over bf16
   and needs an export;
6. otherwise -> ``eager``. Under the AVX2-only simulation (``ONEDNN_MAX_CPU_ISA=AVX2
   ATEN_CPU_CAPABILITY=avx2`` on the same CPU, ``cpu_engines_avx2sim_*``) bf16 autocast was
   0.19× fp32 eager (emulated); on the real AVX2-only machine of issue 21 it was 6× slower,
   onnxruntime 0.98× and OpenVINO 1.06× eager. onnxruntime's int8 ignores the ISA limit (it ran
   its AVX512-VNNI kernels in the simulation), so it has no AVX2 number. ``int8_compile`` obeys
   the limit (oneDNN): 2.34× laion_clap at batch 8 in the simulation, where activations are
   quantised to 7 bits (no VNNI).

The int8, onnx, openvino(_bf16) and compile engines are for callers who ask for them (they
export or compile on first use, seconds to minutes); ``int8_compile`` is the fastest measured,
and auto's choice for large jobs. Exported engines return L2-normalised
embeddings, so they need ``normalize=True``. Built graphs are cached per model and rebuilt when
its weights change (in-place updates bump the parameters' version counters).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ENGINES",
    "EXPORTED",
    "INT8_MIN_COSINE",
    "AUTO_MIN_COSINE",
    "CpuInfo",
    "Choice",
    "cpu_info",
    "openvino_available",
    "auto_engine",
    "select",
    "clear_cache",
]

log = logging.getLogger(__name__)

ENGINES = (
    "auto", "eager", "bf16", "compile", "int8_compile", "onnx", "openvino", "openvino_bf16", "int8",
)  # fmt: skip
"""Values of ``engine=`` in the ``embed_*`` calls and of ``clap-fast … --engine``."""
EXPORTED = ("onnx", "openvino", "openvino_bf16", "int8")
"""Engines that run an exported graph (CPU only; L2-normalised outputs)."""
INT8_MIN_COSINE = 0.999
"""Bound on the row-wise cosine of int8 audio embeddings to fp32 eager (issue 21)."""
AUTO_MIN_COSINE = 0.9999
"""What ``auto`` may cost: row-wise cosine to fp32 eager measured ≥ this for what it picks
(bf16); ``int8_compile``, which it picks for large audio jobs, is held to ``INT8_MIN_COSINE``."""
INT8_COMPILE_BUILD_S = 80.0
"""int8_compile's build before its first batch: quantisation ~37 s, fidelity check and compile
~43 s (HTSAT-tiny, 2 cores; a second process is no faster: freezing bypasses inductor's cache)."""
AUTO_INT8_CLIPS = {"bf16": 3000, "eager": 1000}
"""Audio clips in one job from which ``auto`` picks int8_compile over the engine it would pick
otherwise: where its ~80 s build pays back (rounded). Against bf16: 72.3 -> 44.6 ms per clip
(batch 8, ``cpu_engines_cpu-2core_2026-12-04``), 80 s / 27.7 ms = 2,900 clips. Against fp32
eager (no bf16 units): 149 -> 70 ms per clip (AVX2 simulation,
``cpu_engines_avx2sim_cpu-2core_2026-12-04``), 80 s / 79 ms = 1,000 clips."""
ENV = "CLAP_FAST_ENGINE"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
"""oneDNN's run-time ISA limit (the first one set wins), which PyTorch's matmuls obey."""
_ONEDNN_NATIVE_BF16 = (
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
)
"""oneDNN ISA limits at or above AVX512_CORE_BF16: bf16 dot products stay native under them."""
_ATEN_BELOW_AVX512 = ("DEFAULT", "AVX2")
_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_ONEDNN_NO_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")
"""oneDNN ISA limits below VNNI (AVX2_VNNI and AVX512_CORE_VNNI and later keep it)."""


@dataclass(frozen=True)
class CpuInfo:
    """What this CPU offers, as the OS and PyTorch see it."""

    model: str
    """``model name`` of /proc/cpuinfo (platform's processor elsewhere)."""
    flags: frozenset[str] = field(default_factory=frozenset)
    """ISA flags of /proc/cpuinfo (empty where there is no such file, e.g. macOS)."""
    capability: str = ""
    """``torch.backends.cpu.get_cpu_capability()``: the ATen kernels' ISA (AVX2, AVX512, …),
    lowered by ``ATEN_CPU_CAPABILITY``."""
    onednn_max_isa: str = ""
    """``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) upper-cased; empty when unset."""

    @property
    def bf16_units(self) -> bool:
        """Native bf16 dot products (AVX512-BF16 or AMX-BF16) that PyTorch may use: the CPU has
        them, oneDNN is not limited below AVX512_CORE_BF16 and ATen not below AVX512 (with
        either limit, as on an AVX2-only CPU, bf16 is emulated and slower than fp32)."""
        if not any(f in self.flags for f in _BF16_FLAGS):
            return False
        isa = self.onednn_max_isa
        if isa and isa not in ("ALL", "DEFAULT") and isa not in _ONEDNN_NATIVE_BF16:
            return False
        return self.capability.upper() not in _ATEN_BELOW_AVX512

    @property
    def int8_dot(self) -> bool:
        """VNNI / AMX int8 dot products that oneDNN may use: the CPU has them and
        ``ONEDNN_MAX_CPU_ISA`` is not below them (AVX2, AVX512_CORE). Without them u8·s8
        multiply-adds saturate, so int8 engines quantise with reduced range."""
        if not any(f in self.flags for f in _INT8_DOT_FLAGS):
            return False
        isa = self.onednn_max_isa
        return not isa or isa not in _ONEDNN_NO_VNNI

    def isa(self) -> str:
        """Short summary for logs and reports, e.g. 'AVX512 avx2 avx512f avx512_bf16 …'."""
        keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", *_BF16_FLAGS, "amx_int8")
        limit = [f"oneDNN≤{self.onednn_max_isa}"] if self.onednn_max_isa else []
        return " ".join([self.capability, *[f for f in keep if f in self.flags], *limit]).strip()


def _read_proc_cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, ISA flags) of the first CPU in /proc/cpuinfo; the platform's processor name
    and no flags where there is no such file."""
    import platform

    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU and the ISA limits set in the environment (read once per process;
    ``cpu_info.cache_clear()`` re-reads)."""
    model, flags = _read_proc_cpuinfo()
    limit = next((os.environ[k] for k in ONEDNN_ISA_ENV if os.environ.get(k)), "")
    return CpuInfo(model, flags, torch.backends.cpu.get_cpu_capability(), limit.strip().upper())


def torchao_available() -> bool:
    """torchao importable (engine ``int8_compile``'s quantiser; the ``clap_fast[int8]`` extra)."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def openvino_available() -> bool:
    """OpenVINO importable (the optional ``clap_fast[openvino]`` extra)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def auto_engine(
    device: torch.device,
    *,
    autocast: torch.dtype | None = None,
    info: CpuInfo | None = None,
    tower: str = "audio",
    clips: int | None = None,
    built: bool = False,
) -> tuple[str, str]:
    """``auto``'s rules (module docstring): (engine, reason). ``clips``: audio clips in the job
    (None: unknown, taken as small); ``built``: int8_compile is already built for this model's
    ``tower`` (its cost is paid)."""
    env = os.environ.get(ENV)
    if env and env != "auto":
        if env not in ENGINES[1:]:
            raise ValueError(f"{ENV}={env!r} is not an engine; use one of {ENGINES[1:]}")
        return env, f"{ENV}={env}"
    if device.type != "cpu":
        return "eager", f"model on {device.type}: PyTorch with the device's kernels"
    if autocast is not None:
        return "eager", f"autocast={autocast} given by the caller"
    info = info or cpu_info()
    if info.bf16_units:
        other = "bf16"
        why = f"CPU has bf16 units ({info.isa()}): bf16 autocast, front end fp32"
    else:
        other = "eager"
        why = (
            f"CPU without bf16 units ({info.isa() or 'unknown ISA'}): fp32 eager "
            "(bf16 would be emulated and slower)"
        )
    if tower == "audio" and "avx2" in info.flags and torchao_available():
        need = AUTO_INT8_CLIPS[other]
        if built:
            return "int8_compile", "int8_compile is already built for this model"
        if clips is not None and clips >= need:
            return "int8_compile", (
                f"{clips} clips >= {need}: int8_compile's ~{INT8_COMPILE_BUILD_S:.0f} s build "
                f"pays back against {other} ({info.isa()})"
            )
        why += f"; int8_compile from {need} clips in one job"
    return other, why


@dataclass
class Choice:
    """An engine picked for one tower of one model, ready to run."""

    engine: str
    reason: str
    dtype: torch.dtype | None = None
    """Autocast dtype around the call (eager / bf16 / compile), None for fp32."""
    encode: Callable[..., torch.Tensor] | None = None
    """Replaces ``model.encode_audio`` / ``encode_text`` (same signature); None: the model's."""

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast context of this choice; for fp32 a no-op that leaves a caller's own
        enclosing autocast in force (``torch.autocast(enabled=False)`` would switch it off)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


# model -> {(engine, tower): (weights fingerprint, encode)}; weak: dies with the model
_BUILT: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_LOGGED: set[tuple] = set()


def _fingerprint(model: nn.Module) -> int:
    """Changes when a parameter or buffer is replaced or updated in place."""
    return hash(
        tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())
    )


def clear_cache(model: nn.Module | None = None) -> None:
    """Drop built engines (of one model, or of all)."""
    if model is None:
        _BUILT.clear()
    else:
        _BUILT.pop(model, None)


def select(
    model: nn.Module,
    engine: str | None,
    tower: str,
    *,
    normalize: bool = True,
    autocast: torch.dtype | None = None,
    clips: int | None = None,
) -> Choice:
    """Resolve ``engine`` for ``tower`` ("audio" | "text") of ``model``; build it if needed.
    ``clips``: audio clips in the whole job, for ``auto`` (None: unknown, taken as small).

    Raises ValueError for an unknown engine, an exported engine with ``normalize=False`` or on
    a GPU model, and ``autocast`` combined with an engine other than eager.
    """
    from clap_fast import ops

    if engine is None:  # the default: LAION's fp32 numbers unless the environment says otherwise
        engine = os.environ.get(ENV) or "eager"
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if tower not in ("audio", "text"):
        raise ValueError(f"tower must be 'audio' or 'text', got {tower!r}")
    device = ops.device_of(model)
    if engine == "auto":
        built = tower == "audio" and _is_built(model, "int8_compile", tower)
        engine, reason = auto_engine(
            device, autocast=autocast, tower=tower, clips=clips, built=built
        )
        if engine in EXPORTED and not normalize:
            engine = "bf16" if engine == "openvino_bf16" else "eager"
            reason = f"{reason}; normalize=False needs a PyTorch engine: {engine}"
    else:
        reason = "requested"
    if autocast is not None and engine != "eager":
        raise ValueError(f"autocast={autocast} only applies to engine='eager', not {engine!r}")
    if engine in EXPORTED:
        if not normalize:
            raise ValueError(
                f"engine {engine!r} returns L2-normalised embeddings; use normalize=True or "
                "engine='eager' / 'bf16' / 'compile'"
            )
    if (engine in EXPORTED or engine == "int8_compile") and device.type != "cpu":
        raise ValueError(f"engine {engine!r} runs on the CPU; the model is on {device}")
    if engine in ("bf16", "openvino_bf16") and device.type == "cpu" and not cpu_info().bf16_units:
        _log_once(
            (engine, "emulated"),
            logging.WARNING,
            "engine %r on a CPU without bf16 units (%s): emulated, usually slower than fp32",
            engine,
            cpu_info().isa(),
        )
    if engine == "openvino_bf16":
        _log_once(
            (engine, "unsafe"),
            logging.WARNING,
            "engine 'openvino_bf16' is experimental: on a trained HTSAT-mini its audio embeddings "
            "fell to cosine 0.51 of fp32 (bench/results/int8_fidelity_*); check them against "
            "engine='eager' on your own data before use",
        )
    _log_once(
        (id(model), tower, engine, reason),
        logging.INFO,
        "%s engine: %s (%s)",
        tower,
        engine,
        reason,
    )
    dtype = torch.bfloat16 if engine == "bf16" else autocast
    if engine == "bf16" and tower == "audio" and device.type == "cpu":
        from clap_fast.engine_runtimes import in_chunks

        encode = in_chunks(model.encode_audio)  # MICRO_BATCH clips per call
    elif engine in ("eager", "bf16"):
        encode = None
    else:
        encode = _built(model, engine, tower)
    return Choice(engine, reason, dtype, encode)


def _is_built(model: nn.Module, engine: str, tower: str) -> bool:
    entry = _BUILT.get(model, {}).get((engine, tower))
    return entry is not None and entry[0] == _fingerprint(model)


def _built(model: nn.Module, engine: str, tower: str) -> Callable[..., torch.Tensor]:
    from clap_fast import engine_runtimes

    key, fp = (engine, tower), _fingerprint(model)
    entry = _BUILT.setdefault(model, {}).get(key)
    if entry is None or entry[0] != fp:
        if entry is not None:
            log.info("weights changed: rebuilding the %s %s engine", tower, engine)
        entry = (fp, engine_runtimes.build(model, engine, tower))
        _BUILT[model][key] = entry
    return entry[1]


def _log_once(key: tuple, level: int, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, msg, *args)
