"""Fused log-mel spectrogram, Triton kernel (same signature as ``kernels.mel_ref.log_mel``).

Math, per clip ``x`` of ``L`` samples (identical to ``mel_ref``; ``H = n_fft // 2``)::

    xp[i]     = x[reflect(i - H)]                          center + reflect pad, by index arithmetic
    re[t, f]  =  sum_n xp[t*hop + n] * w[n] * cos(2 pi n f / n_fft)       w: periodic Hann
    im[t, f]  = -sum_n xp[t*hop + n] * w[n] * sin(2 pi n f / n_fft)       f = 0 .. H
    mel[t, m] = sum_f (re^2 + im^2)[t, f] * fb[f, m]
    out[t, m] = 10 * log10(max(mel, amin)) * scale[m] + shift[m]          (affine optional)

Folding (half the FLOP): the periodic Hann window is symmetric (w[N - n] = w[n]) and w[0] = 0,
so with e[n] = x[n] + x[N - n] and o[n] = x[n] - x[N - n] (x[N] := 0, n = 1 .. H)::

    re[t, f] =  sum_{n=1..H} e[t, n] * w[n] * cos(2 pi n f / N)
    im[t, f] = -sum_{n=1..H} o[t, n] * w[n] * sin(2 pi n f / N)

The contraction runs over H samples instead of N. Bins 0 .. H - 1 go through the matmuls; the
Nyquist bin H (im = 0) is its own row reduction, sum_n e[t, n] * w[n] * (-1)^n.

What one program computes: ``BLOCK_T`` consecutive frames of one clip, all ``n_mels`` outputs.
It loops over the bins 0 .. H - 1 in chunks of ``BLOCK_F``; for each chunk it loops over
n = 1 .. H in chunks of ``BLOCK_K``, gathers the two (BLOCK_T, BLOCK_K) sample tiles x[n] and
x[N - n] with reflect indices straight from the waveform (no padded copy, no frame matrix in
memory; after the first chunk the tiles come from L1/L2), and accumulates two ``tl.dot``s
against rows 1 .. H of the windowed basis (``mel_ref.dft_basis``: [cos | -sin] times Hann).
The chunk's power goes into the mel accumulator (BLOCK_T, N_MELS_PAD) with one more ``tl.dot``;
the Nyquist power times filterbank row H is added at the end. Only n_mels floats per frame are
written; each sample is read from HBM about n_fft / hop ~ 2 times; the spectrum never leaves
registers.

Precision (``precision=``):
  * ``"exact"`` (default): fp32 loads, fp32 ``tl.dot`` with ``input_precision="ieee"`` (plain
    FMA, no TF32). Within 1e-3 dB of an fp64 reference over the bins within 50 dB of a clip's
    peak (tests/test_mel.py). Default because clap_fast promises LAION's features: the mel feeds
    bn0 and the whole audio tower, and ``ops.log_mel`` passes no precision, so the model gets
    exact unless a caller asks otherwise.
  * ``"fast"``: ``input_precision="tf32x3"``: each fp32 operand is split into two TF32 parts and
    three TF32 tensor-core products are summed (fp32 accumulation), so the DFT runs on tensor
    cores (H100: 495 dense TF32 TFLOP/s / 3 vs 67 fp32 FMA TFLOP/s) at close to fp32 accuracy.
    Emulated on the CPU for the unfolded DFT (operands rounded as TF32,
    test_tf32x3_emulation_within_fast_budget):
    ~2e-5 dB, far inside the 0.05 dB budget. Plain one-pass TF32 measured 0.053 dB in the same
    emulation on a two-tone clip (bins near -50 dB from the peak), and bf16 ~0.4 dB: both over
    the 0.05 dB budget, so neither is offered. If GPU runs confirm the emulation, "fast" could
    become the default.
  The interpreter ignores ``input_precision`` (numpy fp32 matmul), so "fast" is only really
  tested on a GPU.

Cost and roofline (estimates, not measured: no GPU lent yet): 2 * 2 * H^2 FLOP per frame for
the folded DFT plus 4 * H * n_mels for the mel, ~1.1 GFLOP per 10 s clip against 1.9 MB of
fp32 input, so the kernel is compute-bound. H100 upper bounds: exact mode at the 67 TFLOP/s
fp32 FMA peak ~170 audio-hours/s; fast mode at 495 / 3 TFLOP/s ~410 audio-hours/s. Issue 3's
target (60 % of HBM, ~2,300 audio-hours/s) needs ~0.9 PFLOP/s with any direct DFT, so it is out
of reach by construction; a two-stage 32 x 32 factorisation of the 1024-point transform
(~5x fewer FLOP) is the next step. Measure torchaudio (cuFFT, memory-bound) before assuming a
win in exact mode.

Limits: waveform (B, L), any B >= 1, any L >= 1, float (loaded and computed as fp32; float64 is
computed in fp32, unlike the reference) or int16 (read as x / 32767). n_fft a power of two
>= 32 (the frequency and sample tiles divide it; no masks on those axes), hop
>= 1, n_mels <= 256. Output (B, T, n_mels) float32, T = L // hop + 1; HTS-AT's (B, 1, T, n_mels)
is ``out[:, None]`` (a view). NaN samples propagate like in the reference: every frame that
touches a NaN sample is NaN in all its mel bins (``max(x, amin)`` is written so NaN survives).
No autograd: the inputs are data (waveforms, a fixed filterbank, eval-mode bn0 constants);
backward through the op raises.
"""

import math
import os

import torch
import triton
import triton.language as tl

from kernels.mel_ref import dft_basis, num_frames

__all__ = ["log_mel", "log_mel_forward"]

PRECISIONS = {"exact": "ieee", "fast": "tf32x3"}
_TEN_OVER_LOG2_10 = tl.constexpr(
    10.0 / 3.321928094887362
)  # 10 * log10(x) = _TEN_OVER_LOG2_10 * log2(x)


@triton.jit
def _load_samples(
    wave_row, idx, mask, length, period, stride_wave_l, SINGLE_REFLECT: tl.constexpr,
    IS_INT16: tl.constexpr,
):  # fmt: skip
    """Samples at padded-signal indices ``idx`` (any shape), reflect-mapped, as fp32."""
    if SINGLE_REFLECT:
        # L > n_fft // 2: one reflection at each end is enough (and cheaper than a mod).
        j = tl.where(idx < 0, -idx, idx)
        j = tl.where(j >= length, period - j, j)
    else:
        # Short clip: the reflection repeats (period 2 (L - 1); period 1 when L == 1).
        j = idx % period
        j = tl.where(j < 0, j + period, j)
        j = tl.where(j >= length, period - j, j)
    x = tl.load(wave_row + j * stride_wave_l, mask=mask, other=0.0).to(tl.float32)
    if IS_INT16:
        x = x / 32767.0
    return x


@triton.jit
def _log_mel_kernel(
    wave_ptr,
    basis_ptr,
    fb_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    length,
    n_frames,
    n_tiles,
    hop,
    period,
    amin,
    floor_db,
    stride_wave_b,
    stride_wave_l,
    stride_basis_n,
    stride_basis_f,
    stride_fb_f,
    stride_fb_m,
    stride_out_b,
    stride_out_t,
    stride_out_m,
    N_FFT: tl.constexpr,
    N_MELS: tl.constexpr,
    N_MELS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_INT16: tl.constexpr,
    SINGLE_REFLECT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = N_FFT // 2
    # Batch and frame tile flattened into axis 0: no 65535 limit on the batch (grid axis 1).
    pid = tl.program_id(0)
    b = pid // n_tiles
    t0 = (pid % n_tiles) * BLOCK_T

    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_f = tl.arange(0, BLOCK_F)
    offs_m = tl.arange(0, N_MELS_PAD)
    mask_t = offs_t < n_frames
    mask_m = offs_m < N_MELS
    wave_row = wave_ptr + b.to(tl.int64) * stride_wave_b
    start = offs_t * hop - HALF  # first padded-signal index of each frame, (BLOCK_T,)

    mel = tl.zeros((BLOCK_T, N_MELS_PAD), dtype=tl.float32)
    nyq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for f0 in range(0, HALF, BLOCK_F):
        f = f0 + offs_f
        re = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        im = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        nyq = tl.zeros((BLOCK_T,), dtype=tl.float32)  # the same in every f chunk; keep the last
        for k0 in range(0, HALF, BLOCK_K):
            # Folded frame: n = 1 .. HALF pairs with N - n (w[0] = 0, so n = 0 drops out).
            n = 1 + k0 + offs_k
            x_a = _load_samples(
                wave_row, start[:, None] + n[None, :], mask_t[:, None], length, period,
                stride_wave_l, SINGLE_REFLECT, IS_INT16,
            )  # fmt: skip
            x_b = _load_samples(
                wave_row, start[:, None] + (N_FFT - n)[None, :],
                mask_t[:, None] & (n < HALF)[None, :], length, period, stride_wave_l,
                SINGLE_REFLECT, IS_INT16,
            )  # fmt: skip
            even = x_a + x_b  # (BLOCK_T, BLOCK_K)
            odd = x_a - x_b
            rows = basis_ptr + n[:, None] * stride_basis_n
            cos = tl.load(rows + f[None, :] * stride_basis_f).to(tl.float32)
            sin = tl.load(rows + (HALF + 1 + f)[None, :] * stride_basis_f).to(tl.float32)
            re = tl.dot(even, cos, re, input_precision=INPUT_PRECISION)
            im = tl.dot(odd, sin, im, input_precision=INPUT_PRECISION)
            c_nyq = tl.load(basis_ptr + n * stride_basis_n + HALF * stride_basis_f)
            nyq += tl.sum(even * c_nyq.to(tl.float32)[None, :], axis=1)
        fb = tl.load(
            fb_ptr + f[:, None] * stride_fb_f + offs_m[None, :] * stride_fb_m,
            mask=mask_m[None, :],
            other=0.0,
        ).to(tl.float32)
        mel = tl.dot(re * re + im * im, fb, mel, input_precision=INPUT_PRECISION)
    fb_nyq = tl.load(fb_ptr + HALF * stride_fb_f + offs_m * stride_fb_m, mask=mask_m, other=0.0)
    mel += (nyq * nyq)[:, None] * fb_nyq.to(tl.float32)[None, :]
    # Sample n = 0 has weight w[0] = 0 and is dropped by the folding, but in the reference a NaN
    # or inf there still poisons its frame (x * 0 = NaN): keep that behaviour.
    x_0 = _load_samples(
        wave_row, start, mask_t, length, period, stride_wave_l, SINGLE_REFLECT, IS_INT16
    )
    mel += (x_0 * 0.0)[:, None]

    # 10 log10(max(mel, amin)): the clamp value is exact (floor_db = 10 log10(amin) from the
    # host, so silence is exactly -100 dB), and NaN survives (NaN < amin is False; tl.maximum
    # would drop NaN on the GPU).
    below = mel < amin
    out = tl.where(below, floor_db, _TEN_OVER_LOG2_10 * tl.log2(tl.where(below, amin, mel)))
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + offs_m, mask=mask_m, other=1.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        out = out + tl.load(shift_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    out_ptrs = (
        out_ptr
        + b.to(tl.int64) * stride_out_b
        + offs_t[:, None] * stride_out_t
        + offs_m[None, :] * stride_out_m
    )
    tl.store(out_ptrs, out, mask=mask_t[:, None] & mask_m[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_config(n_frames: int, n_fft: int, precision: str) -> dict[str, int]:
    """Tile sizes. GPU values compile without spills for sm_90 but are untimed (no GPU lent)."""
    if _interpreting():
        # A program costs milliseconds of Python: one DFT chunk, one K chunk, big frame tiles.
        block_t = max(16, min(128, triton.next_power_of_2(n_frames)))
        return dict(
            BLOCK_T=block_t, BLOCK_F=n_fft // 2, BLOCK_K=n_fft // 2, num_warps=4, num_stages=1
        )
    # Chosen offline (PTX + ptxas for sm_90, no GPU): of the ~12 tilings tried, the largest
    # without register spills (tests/test_mel.py compiles both modes).
    # The fp32 FMA dot holds operand slices per thread, hence the narrower BLOCK_F in exact mode.
    block_t = max(16, min(64, triton.next_power_of_2(n_frames)))
    return dict(
        BLOCK_T=block_t,
        BLOCK_F=min(64 if precision == "fast" else 32, n_fft // 2),
        BLOCK_K=16,
        num_warps=8,
        num_stages=2,
    )


def log_mel_forward(
    waveform: torch.Tensor,
    mel_fb: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    n_fft: int,
    hop_length: int,
    amin: float,
    precision: str,
) -> torch.Tensor:
    """Launcher: checks, tile sizes, one kernel launch.

    Args:
        waveform: (B, L) float32/float16/bfloat16/float64 or int16 samples, L >= 1, any strides.
        mel_fb: (n_fft // 2 + 1, n_mels) float filterbank.
        scale, shift: optional (n_mels,) float affine on the dB values.

    Returns:
        (B, T, n_mels) float32, T = L // hop_length + 1.
    """
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be (B, L), got shape {tuple(waveform.shape)}")
    if not (waveform.is_floating_point() or waveform.dtype == torch.int16):
        raise TypeError(f"waveform must be float or int16, got {waveform.dtype}")
    if n_fft < 32 or n_fft & (n_fft - 1):
        raise ValueError(f"the Triton mel kernel needs a power-of-two n_fft >= 32, got {n_fft}")
    if not amin > 0:
        raise ValueError(f"amin must be > 0, got {amin}")
    if hop_length < 1:
        raise ValueError(f"hop_length must be >= 1, got {hop_length}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    batch, length = waveform.shape
    n_bins, n_mels = mel_fb.shape
    if length < 1:
        raise ValueError("waveform must have at least one sample")
    if n_bins != n_fft // 2 + 1:
        raise ValueError(f"mel_fb must have n_fft // 2 + 1 = {n_fft // 2 + 1} rows, got {n_bins}")
    if n_mels > 256:
        raise ValueError(f"the Triton mel kernel supports n_mels <= 256, got {n_mels}")
    if not waveform.is_cuda and not _interpreting():
        raise RuntimeError("kernels.mel on a CPU tensor needs TRITON_INTERPRET=1 (set at import)")
    for name, vec in (("scale", scale), ("shift", shift)):
        if vec is not None and vec.numel() != n_mels:
            raise ValueError(f"{name} must have n_mels = {n_mels} elements, got {vec.numel()}")

    n_frames = num_frames(length, hop_length)
    out = torch.empty((batch, n_frames, n_mels), device=waveform.device, dtype=torch.float32)
    if batch == 0:
        return out
    basis = dft_basis(n_fft, waveform.device, torch.float32)  # cached per device
    fb = mel_fb.to(device=waveform.device)
    scale_t = scale.reshape(-1).to(device=waveform.device) if scale is not None else out
    shift_t = shift.reshape(-1).to(device=waveform.device) if shift is not None else out
    cfg = _launch_config(n_frames, n_fft, precision)
    n_tiles = triton.cdiv(n_frames, cfg["BLOCK_T"])
    _log_mel_kernel[(batch * n_tiles,)](
        waveform,
        basis,
        fb,
        scale_t,
        shift_t,
        out,
        length,
        n_frames,
        n_tiles,
        hop_length,
        max(2 * (length - 1), 1),
        amin,
        10.0 * math.log10(amin),
        waveform.stride(0),
        waveform.stride(1),
        basis.stride(0),
        basis.stride(1),
        fb.stride(0),
        fb.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        N_FFT=n_fft,
        N_MELS=n_mels,
        N_MELS_PAD=max(16, triton.next_power_of_2(n_mels)),
        IS_INT16=waveform.dtype == torch.int16,
        SINGLE_REFLECT=length > n_fft // 2,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        INPUT_PRECISION=PRECISIONS[precision],
        **cfg,
    )
    return out


@torch.library.custom_op("clap_fast::log_mel", mutates_args=())
def _log_mel_op(
    waveform: torch.Tensor,
    mel_fb: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    n_fft: int,
    hop_length: int,
    amin: float,
    precision: str,
) -> torch.Tensor:
    """The torch op (opaque to torch.compile); no ``device_types`` so the interpreter runs it."""
    return log_mel_forward(waveform, mel_fb, scale, shift, n_fft, hop_length, amin, precision)


@_log_mel_op.register_fake
def _(
    waveform: torch.Tensor,
    mel_fb: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    n_fft: int,
    hop_length: int,
    amin: float,
    precision: str,
) -> torch.Tensor:
    n_frames = waveform.shape[-1] // hop_length + 1
    return waveform.new_empty((waveform.shape[0], n_frames, mel_fb.shape[1]), dtype=torch.float32)


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
) -> torch.Tensor:
    """Log-mel spectrogram on the Triton kernel (signature of ``kernels.mel_ref.log_mel``).

    Args:
        waveform: (B, L) float or int16 samples (int16 read as x / 32767), L >= 1.
        mel_fb: (n_fft // 2 + 1, n_mels) float filterbank (Slaney or HTK).
        scale, shift: optional (n_mels,) affine applied to the dB values (eval-mode bn0).
        dft: accepted for signature parity; the kernel always computes the DFT as a matmul
            against the windowed basis.
        precision: "exact" (fp32 FMA, default) or "fast" (3-pass TF32 tensor cores); see the
            header.

    Returns:
        (B, T, n_mels) float32, T = L // hop_length + 1. Not differentiable.
    """
    if dft not in ("fft", "matmul"):
        raise ValueError(f"dft must be 'fft' or 'matmul', got {dft!r}")
    return _log_mel_op(waveform, mel_fb, scale, shift, n_fft, hop_length, float(amin), precision)


def report_specs() -> list[dict]:
    """Every (kernel, configuration) this module can launch on a GPU, for python -m kernels.report.

    LAION's front end (n_fft 1024, hop 480, 64 mel bins, bn0 affine fused) at each input dtype
    and precision, with the GPU tiles of ``_launch_config`` for a 10 s clip (1001 frames).
    FLOP and bytes per call for B = 64 10 s clips, from the header's cost model: 4 H^2 + 4 H
    n_mels FLOP per frame; the waveform read once, the output written once, basis and bank once.
    """
    batch, length, n_fft, hop, n_mels = 64, 480000, 1024, 480, 64
    n_frames = num_frames(length, hop)
    half = n_fft // 2
    flop = batch * n_frames * (4 * half * half + 4 * half * n_mels)
    fixed_bytes = (
        batch * n_frames * n_mels * 4 + n_fft * 2 * (half + 1) * 4 + (half + 1) * n_mels * 4
    )
    fn = _log_mel_kernel
    specs = []
    for precision in PRECISIONS:
        for dtype, itemsize in (("fp32", 4), ("bf16", 2), ("fp16", 2), ("i16", 2)):
            cfg = dict(BLOCK_T=64, BLOCK_F=64 if precision == "fast" else 32, BLOCK_K=16)
            consts = dict(
                N_FFT=n_fft,
                N_MELS=n_mels,
                N_MELS_PAD=n_mels,
                IS_INT16=dtype == "i16",
                SINGLE_REFLECT=True,
                HAS_SCALE=True,
                HAS_SHIFT=True,
                INPUT_PRECISION=PRECISIONS[precision],
                **cfg,
            )
            sig = {
                n: "constexpr"
                if n in consts
                else (f"*{dtype}" if n == "wave_ptr" else "*fp32")
                if n.endswith("_ptr")
                else "fp32"
                if n in ("amin", "floor_db")
                else "i32"
                for n in fn.arg_names
            }
            specs.append(
                dict(
                    fn=fn,
                    config=f"{precision} T{cfg['BLOCK_T']} F{cfg['BLOCK_F']} K{cfg['BLOCK_K']} w8 s2",
                    dtype=dtype,
                    signature=sig,
                    constexprs=consts,
                    options={"num_warps": 8, "num_stages": 2},
                    flop=flop,
                    hbm_bytes=batch * length * itemsize + fixed_bytes,
                    problem="B=64, 10 s clips, n_fft 1024, 64 mels",
                    tensor_core=precision == "fast",
                )
            )
    return specs
