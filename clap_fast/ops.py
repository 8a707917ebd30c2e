"""The dispatch layer: the only place in clap_fast that looks at devices.

Each op runs the Triton kernel from ``kernels/`` when the tensor is on a CUDA device and Triton
imports, and the pure-PyTorch reference from ``kernels/*_ref.py`` otherwise (the reference is
what ``torch.compile`` on the CPU and the ONNX exporter see).

Overrides, strongest first:
  * ``with ops.use_backend("triton" | "reference" | "auto"):`` (process-wide while the block
    runs, innermost wins; a plain module global, not a ContextVar, so that ``torch.compile``
    traces the dispatch: dynamo cannot trace ``ContextVar.get`` and broke the graph at every op),
  * the environment variable ``CLAP_FAST_BACKEND`` (read at each call),
  * ``auto``.

``triton`` forced on CPU tensors runs the kernels through Triton's interpreter; that needs
``TRITON_INTERPRET=1`` in the environment before ``kernels`` is imported, and raises a clear
error otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch

from kernels import contrastive_ref, mel_ref, window_attention_ref

__all__ = [
    "BACKENDS",
    "backend",
    "use_backend",
    "device_of",
    "log_mel",
    "window_attention",
    "contrastive_loss",
    "contrastive_loss_symmetric",
]

BACKENDS = ("auto", "triton", "reference")
_override: str | None = None
"""``use_backend``'s name while its block runs. Compiled code guards on it (a change recompiles)."""
_override_lock = threading.Lock()


def backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``CLAP_FAST_BACKEND``, else auto."""
    name = _override or os.environ.get("CLAP_FAST_BACKEND", "auto") or "auto"
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"CLAP_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: "triton", "reference" or "auto"."""
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    global _override
    with _override_lock:
        previous, _override = _override, name
    try:
        yield
    finally:
        with _override_lock:
            _override = previous


_TRITON = importlib.util.find_spec("triton") is not None
"""Triton importable, decided at import: dynamo will not trace ``find_spec`` (a call inside a
compiled model broke its graph at every op on a GPU); it reads this global instead."""


def _triton_available() -> bool:
    return _TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(t: torch.Tensor) -> bool:
    """Decide the backend for one call from the tensor's device and the override."""
    name = backend()
    if name == "reference":
        return False
    if _exporting():
        # Exporters trace the reference: it is plain aten, which ONNX and AOTInductor handle.
        return False
    if name == "auto":
        return t.is_cuda and _triton_available()
    if not _triton_available():
        raise RuntimeError("backend 'triton' was forced but Triton is not installed")
    if not t.is_cuda and not _interpreting():
        raise RuntimeError(
            "backend 'triton' was forced on a CPU tensor: set TRITON_INTERPRET=1 before importing "
            "clap_fast to run the kernels through Triton's interpreter, or use 'auto'/'reference'"
        )
    return True


def _exporting() -> bool:
    """Under an exporter (the ONNX exporters, ``torch.export`` for AOTInductor), not under
    ``torch.compile``. ``torch.compiler.is_exporting()`` cannot tell them apart: dynamo folds it
    to True in every trace (torch 2.11, ``torch/_dynamo/variables/torch.py``), which sent every
    compiled op down the export branch (no Triton kernels; the STFT as a 16-GFLOP conv). The
    flag ``torch.export`` sets around its trace is read instead (dynamo guards on it)."""
    onnx_export = getattr(torch.onnx, "is_in_onnx_export", None)
    in_onnx = onnx_export is not None and onnx_export()
    return bool(in_onnx or getattr(torch.compiler, "_is_exporting_flag", False))


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def default_device() -> torch.device:
    """cuda when a GPU is visible, else cpu (used for ``device="auto"`` in the API and CLI)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> default_device(); anything else -> torch.device, with a clear error."""
    if device is None or device == "auto":
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but no CUDA GPU is visible")
    return dev


_KERNELS: dict[str, object] = {}
"""Imported kernel modules. A compiled model reads them from here: dynamo does not trace
``import_module``, so only the first trace that meets a kernel breaks its graph there."""


def _kernel(name: str):
    """Import ``kernels.<name>`` lazily (Triton kernels must not load at package import)."""
    module = _KERNELS.get(name)
    if module is not None:
        return module
    try:
        module = _KERNELS[name] = importlib.import_module(f"kernels.{name}")
    except ImportError as exc:  # pragma: no cover - depends on the installed stack
        raise RuntimeError(
            f"the Triton kernel kernels.{name} could not be imported: {exc}"
        ) from exc
    return module


def log_mel(
    waveform: torch.Tensor,
    mel_fb: torch.Tensor,
    *,
    n_fft: int = 1024,
    hop_length: int = 480,
    amin: float = 1e-10,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    stft_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, L) float/int16 waveform -> (B, T, n_mels) float32 log-mel; see ``kernels/mel_ref.py``.

    The export branch: under an exporter (ONNX, ``torch.export`` for AOTInductor) the reference
    runs its STFT as a strided conv1d against ``stft_weights`` ((n_fft // 2 + 1, 1, n_fft) real
    and imaginary windowed DFT bases, e.g. the model's LAION buffers, constants to the
    exporter), since ONNX and TensorRT have no usable STFT and the legacy exporter rejects
    ``unfold`` with a dynamic batch. Same math as the FFT to float32 rounding.
    """
    kwargs = dict(n_fft=n_fft, hop_length=hop_length, amin=amin, scale=scale, shift=shift)
    # The kernel factors n_fft into two tensor-core stages: power of two >= 256, n_mels <= 256.
    # Other front ends take the reference under "auto"; a forced "triton" gets the kernel's error.
    fits = n_fft >= 256 and n_fft & (n_fft - 1) == 0 and mel_fb.shape[-1] <= 256
    if _use_triton(waveform) and (fits or backend() == "triton"):
        return _kernel("mel").log_mel(waveform, mel_fb, **kwargs)
    if _exporting():
        return mel_ref.log_mel(waveform, mel_fb, dft="conv", stft_weights=stft_weights, **kwargs)
    return mel_ref.log_mel(waveform, mel_fb, dft="fft", **kwargs)


def window_attention(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size: int,
    shift_size: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """(B, H, W, 3C) -> (B, H, W, C) shifted-window attention; see ``kernels/window_attention_ref.py``."""
    kwargs = dict(num_heads=num_heads, window_size=window_size, shift_size=shift_size, scale=scale)
    if _use_triton(qkv):
        return _kernel("window_attention").window_attention(qkv, bias_table, **kwargs)
    return window_attention_ref.window_attention(qkv, bias_table, **kwargs)


def contrastive_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of rows of ``scale * A @ B^T`` against targets ``offset + i``.

    A: (n, d) this rank's features, B: (N, d) all features of the other modality, logit_scale:
    the (already exponentiated) scale, 0-d or shape (1,). See ``kernels/contrastive_ref.py``.
    """
    if _use_triton(features_a):
        return _kernel("contrastive").contrastive_loss(features_a, features_b, logit_scale, offset)
    return contrastive_ref.contrastive_loss(features_a, features_b, logit_scale, offset)


def contrastive_loss_symmetric(
    features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of both directions of the square (n == N, one process) contrastive loss.

    A, B: (n, d), logit_scale: 0-d or (1,). Equals ``(contrastive_loss(A, B, s) +
    contrastive_loss(B, A, s)) / 2`` from one fused pass; see ``kernels/contrastive_ref.py``.
    """
    if _use_triton(features_a):
        kernel = _kernel("contrastive")
        return kernel.contrastive_loss_symmetric(features_a, features_b, logit_scale)
    return contrastive_ref.contrastive_loss_symmetric(features_a, features_b, logit_scale)
