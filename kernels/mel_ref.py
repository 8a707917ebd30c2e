"""Log-mel spectrogram, pure PyTorch reference (same signature as ``kernels.mel.log_mel``).

Math, per clip ``x`` of ``L`` samples (LAION CLAP's front end)::

    pad      center: n_fft // 2 samples on each side, reflect mode, by index arithmetic
             (numpy's ``np.pad(mode="reflect")`` semantics, so any L >= 1 works: the reflection
             repeats when the pad is longer than the clip, and L == 1 pads with that sample)
    frames   t = 0 .. L // hop: samples [t*hop, t*hop + n_fft) of the padded clip
    window   periodic Hann of length n_fft
    power    |rfft(frame * window)|^2                      (n_fft // 2 + 1 bins)
    mel      power @ mel_fb                                (mel_fb: (n_fft // 2 + 1, n_mels))
    dB       10 * log10(max(mel, amin))                    (ref 1.0, no top_db)
    affine   dB * scale + shift                            (optional: eval-mode BatchNorm folded)

The DFT is an FFT (``dft="fft"``, fastest on the CPU), a matmul of the frames against the
windowed cos/sin basis (``dft="matmul"``), or a strided ``conv1d`` of the reflect-padded clip
against the same basis (``dft="conv"``: LAION's STFT-as-convolution, and the form every ONNX
runtime and TensorRT run: no STFT/DFT op, no ``unfold``; about 2 GFLOP per 10 s clip). The conv
form takes the basis as ``stft_weights`` (real, imag), e.g. the model's LAION buffers, so an
exporter sees constants; it needs ``L > n_fft // 2`` (torch's reflect pad).

Inputs: float32 (or any float) waveforms, or int16 waveforms which are read as ``x / 32767``
(LAION's int16 round trip). NaN samples propagate: every frame that touches a NaN sample is NaN
in all its mel bins (documented behaviour; the public API rejects NaN input before this point).
"""

from __future__ import annotations

import math

import torch

__all__ = ["log_mel", "num_frames", "reflect_index", "dft_basis"]

_BASIS_CACHE: dict[tuple, torch.Tensor] = {}


def num_frames(length: int, hop_length: int) -> int:
    """Frames of a centered STFT: ``length // hop_length + 1``."""
    return length // hop_length + 1


def reflect_index(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Map indices of the reflect-padded signal (may be < 0 or >= length) into [0, length).

    Reflection without repeating the edge sample, repeated as often as needed (period
    ``2 * (length - 1)``); ``length == 1`` maps everything to 0.
    """
    if length == 1:
        return torch.zeros_like(idx)
    period = 2 * (length - 1)
    j = torch.remainder(idx, period)
    return torch.where(j >= length, period - j, j)


def dft_basis(n_fft: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Windowed real DFT basis, (n_fft, 2 * (n_fft // 2 + 1)): [cos | -sin] columns times Hann."""
    key = (n_fft, str(device), dtype)
    basis = _BASIS_CACHE.get(key)
    if basis is None:
        with torch.inference_mode(False):  # a cached inference tensor would break autograd later
            basis = _dft_basis(n_fft, device, dtype)
        _BASIS_CACHE[key] = basis
    return basis


def _dft_basis(n_fft: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    # Reduce n*k mod n_fft in integers first: exact angles, no float64 drift at large n*k.
    phase = (n[:, None] * k[None, :]) % n_fft
    ang = 2 * math.pi * phase / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)[:, None]
    basis = torch.cat([torch.cos(ang) * window, -torch.sin(ang) * window], dim=1)
    return basis.to(device=device, dtype=dtype)


def _frames(wave: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """(B, L) -> (B, T, n_fft) centered, reflect-padded frames (materialises B*T*n_fft)."""
    length = wave.shape[-1]
    t = num_frames(length, hop_length)
    if length > n_fft // 2:
        # Fast path: torch's reflect pad is exact here and cheaper than a gather.
        padded = torch.nn.functional.pad(
            wave[:, None, :], (n_fft // 2, n_fft // 2), mode="reflect"
        )[:, 0]
        return padded.unfold(-1, n_fft, hop_length)[:, :t]
    start = torch.arange(t, device=wave.device) * hop_length - n_fft // 2
    idx = start[:, None] + torch.arange(n_fft, device=wave.device)[None, :]
    idx = reflect_index(idx, length)
    return wave[:, idx]


def log_mel(
    waveform: torch.Tensor,
    mel_fb: torch.Tensor,
    *,
    n_fft: int = 1024,
    hop_length: int = 480,
    amin: float = 1e-10,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    dft: str = "fft",
    precision: str = "exact",
    stft_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-mel spectrogram.

    Args:
        waveform: (B, L) float or int16 samples, L >= 1.
        mel_fb: (n_fft // 2 + 1, n_mels) float32 filterbank (Slaney or HTK).
        scale, shift: optional (n_mels,) affine applied to the dB values (eval-mode bn0).
        dft: "fft" (torch.fft.rfft), "matmul" (frames @ windowed DFT basis) or "conv"
            (strided conv1d against the basis; the exportable form).
        precision: accepted for signature parity with the Triton kernel; the reference always
            computes in float32 (float64 inputs stay float64).
        stft_weights: ``dft="conv"`` only: (n_fft // 2 + 1, 1, n_fft) real and imaginary conv
            weights of the windowed basis (default: ``dft_basis``).

    Returns:
        (B, T, n_mels) float32 (float64 for float64 input), T = L // hop_length + 1.
    """
    del precision
    if waveform.dtype == torch.int16:
        wave = waveform.to(torch.float32) / 32767.0
    elif waveform.dtype == torch.float64:
        wave = waveform
    else:
        wave = waveform.to(torch.float32)
    fb = mel_fb.to(wave.dtype)
    n_bins = n_fft // 2 + 1
    if dft == "conv":
        power = _conv_power(wave, n_fft, hop_length, stft_weights)
        return _to_db(power @ fb, amin, scale, shift)
    frames = _frames(wave, n_fft, hop_length)
    if dft == "fft":
        window = torch.hann_window(n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
        spec = torch.fft.rfft(frames * window, n=n_fft, dim=-1)
        power = spec.real.square() + spec.imag.square()
    elif dft == "matmul":
        y = frames @ dft_basis(n_fft, wave.device, wave.dtype)
        power = y[..., :n_bins].square() + y[..., n_bins:].square()
    else:
        raise ValueError(f"dft must be 'fft', 'matmul' or 'conv', got {dft!r}")
    return _to_db(power @ fb, amin, scale, shift)


def _conv_power(
    wave: torch.Tensor,
    n_fft: int,
    hop_length: int,
    stft_weights: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """(B, L) -> (B, T, n_fft // 2 + 1) power spectrum by two strided conv1d (LAION's STFT)."""
    if stft_weights is None:
        basis = dft_basis(n_fft, wave.device, wave.dtype)
        n_bins = n_fft // 2 + 1
        stft_weights = (basis[:, :n_bins].T[:, None, :], basis[:, n_bins:].T[:, None, :])
    real_w, imag_w = (w.to(wave.dtype) for w in stft_weights)
    x = torch.nn.functional.pad(wave[:, None, :], (n_fft // 2, n_fft // 2), mode="reflect")
    real = torch.nn.functional.conv1d(x, real_w, stride=hop_length)  # (B, n_bins, T)
    imag = torch.nn.functional.conv1d(x, imag_w, stride=hop_length)
    return (real.square() + imag.square()).transpose(1, 2)


def _to_db(
    mel: torch.Tensor, amin: float, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """10·log10(max(mel, amin)), then the optional affine."""
    out = 10.0 * torch.log10(torch.clamp(mel, min=amin))
    if scale is not None:
        out = out * scale.to(out.dtype)
    if shift is not None:
        out = out + shift.to(out.dtype)
    return out
