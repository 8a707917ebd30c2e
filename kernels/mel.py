"""Fused log-mel spectrogram, Triton kernel (same signature as ``kernels.mel_ref.log_mel``).

Math, per clip ``x`` of ``L`` samples (identical to ``mel_ref``; ``N = n_fft``, ``H = N // 2``)::

    xp[i]     = x[reflect(i - H)]                          center + reflect pad, by index arithmetic
    X[t, k]   = sum_n xp[t*hop + n] w[n] exp(-2 pi i n k / N)     w: periodic Hann, k = 0 .. H
    mel[t, m] = sum_k |X[t, k]|^2 fb[k, m]
    out[t, m] = 10 * log10(max(mel, amin)) * scale[m] + shift[m]          (affine optional)

The DFT is factorised (four-step Cooley-Tukey, N = N1 x N2, ``factor``: 256 = 16 x 16,
512 = 32 x 16, 1024 = 32 x 32, 2048 = 64 x 32). With n = N2 n1 + n2 and k = k1 + N1 k2::

    A[n2, k1] = sum_n1 (w x)[N2 n1 + n2] exp(-2 pi i n1 k1 / N1)     step 1: N1-point DFTs
    B[n2, k1] = A[n2, k1] exp(-2 pi i n2 k1 / N)                     twiddle
    X[k1 + N1 k2] = sum_n2 B[n2, k1] exp(-2 pi i n2 k2 / N2)         step 2: N2-point DFTs

Real input: A[n2, N1 - k1] = conj(A[n2, k1]), so only k1 = 0 .. N1/2 - 1 go through the
complex path: their (k1, k2) outputs hold every bin once, either k or its mirror N - k (same
power); the bins k1 = 0 mirrored above N / 2 get mel weight 0. The missing column k1 = N1 / 2
is real (A = sum_n1 (-1)^n1 x, a row reduction) and its bins N1/2 + N1 j come from one small
dot against exp(-2 pi i n2 (2 j + 1) / (2 N2)) (the "tail"). Step 2's complex product runs as
three real dots (Gauss: b_re c, b_im s, (b_re + b_im)(c - s)). Per frame, n_fft 1024, 64 mels:
step 1 65,536 FLOP, step 2 98,304, mel 65,536, tail 8,192: 237,568 FLOP (the direct folded DFT
of v1: ~1.05 M), 0.238 GFLOP of tensor-core work per 10 s clip in one pass.

What one program computes: ``BLOCK_T`` consecutive frames of one clip, all ``n_mels`` outputs.
It gathers the step-1 operand X (rows (t, n2), columns n1; reflect indices straight from the
waveform, no padded copy, no frame matrix in memory) once, times Hann, then loops over the k1
in chunks of ``BLOCK_K1``: step 1 (two ``tl.dot``s, X against the cos / -sin columns), twiddle
(CUDA cores), a relayout (t, n2, k1) -> (t, k1, n2) (``tl.permute``, through shared memory on a
GPU), step 2 (three ``tl.dot``s), power, and the chunk's mel contribution (a ``tl.dot`` against
the filterbank rows of its bins, gathered by index, each row read only over its nonzero mel
range: ``mel_bands``, cached per filterbank tensor). The tail is added after the loop. Only
n_mels floats per frame are written; the spectrum never leaves the chip. All constants (Hann,
the DFT and twiddle tables) are one cached float32 vector (``four_step_tables``, 32 KB at
n_fft 1024).

Precision (``precision=``; measured against an fp64 reference on the bins within 50 dB of the
clip's peak, tests/test_mel.py, with the GPU's roundings emulated on the CPU since the
interpreter computes every dot in fp32):
  * ``"exact"`` (default; what the model uses, since ``ops.log_mel`` passes no precision):
    every dot ``input_precision="tf32x3"`` (operands split into two TF32 parts, three tensor-core
    products, fp32 accumulation). Emulated: <= 5.2e-5 dB at n_fft 256 - 2048, inside the
    1e-3 dB budget, so LAION parity holds (LAION's conv front end in fp32).
  * ``"fast"``: tf32x3 on the DFT stages, one TF32 pass on the mel stage (positive terms, so
    the rounding stays relative: emulated <= 3.7e-3 dB with round-to-nearest, <= 7.5e-3 dB if
    the hardware truncates; budget 0.05 dB). One TF32 pass everywhere was measured at 0.12 dB
    (n_fft 1024; 0.26 dB at 256) in the same emulation: TF32's 11-bit significand puts a
    rounding floor ~60 dB under the peak, too close to bins 50 dB down, for the data operand
    and for the DFT tables alike (splitting only one of them still gave 0.06 - 0.09 dB). So no
    single-pass mode is offered, and "fast" saves only the mel stage's two extra passes.
  Tensor-core work per 10 s clip (n_fft 1024, 64 mels): exact 3 x 0.238 = 0.713 GFLOP, fast
  0.574 GFLOP.

Static estimate (roofline; NOT measured, no GPU lent, 2026-12-03). ptxas for sm_90a: no spills
in any launched configuration (``report_specs``); the dots compile to ``HMMA`` (mma.sync; the
frame tiles are too small for wgmma except at n_fft 256) at 8 warps, 4 frames per program (2 at
batch 1: 501 programs for a 10 s clip, 3.8 waves on 132 SMs). HBM: 1.92 MB fp32 in (0.96 MB
int16) + 0.26 MB out per clip; each sample is read n_fft / hop ~ 2.1 times, from L2 after the
first. Compute: 0.713 GFLOP at the 495 TFLOP/s dense TF32 peak is 1.4 us per clip (H100 and
H200 alike); mma.sync usually reaches well under the wgmma peak, so expect ~2 - 3 us per clip
exact (~1,000 - 1,400 audio-hours/s) and ~1.5 - 2.5 us fast: compute-bound, the HBM floor is
0.45 us (H200). The filterbank rows are read per program from L1/L2: 128 KB dense, ~25 KB
(32 B sectors of the ~2 nonzeros per row) with the nonzero-range masks of a Slaney or HTK
bank, so that on-chip traffic stays under the compute time. Against the issue's goals
(torchaudio ~8 - 10 us per clip, HTS-AT-tiny bf16 forward ~25 us): ~3 - 5x torchaudio
expected, short of the 8x goal, and ~8 - 12 % of the encoder in exact mode (goal 5 %).
Measure before trusting any of this.

Limits: waveform (B, L), any B >= 1, any L >= 1, float (loaded and computed as fp32; float64 is
computed in fp32, unlike the reference) or int16 (read as x / 32767). n_fft a power of two
>= 256 (tl.dot needs K >= 16 on both DFT stages), hop >= 1, n_mels <= 256. Output
(B, T, n_mels) float32, T = L // hop + 1; HTS-AT's (B, 1, T, n_mels) is ``out[:, None]`` (a
view). 64-bit offsets for the batch, the sample and the frame index. NaN samples propagate like
in the reference: every frame that touches a NaN sample is NaN in all its mel bins (the
zero-weight first sample too: NaN * 0 = NaN; ``max(x, amin)`` is written so NaN survives).
No autograd: the inputs are data (waveforms, a fixed filterbank, eval-mode bn0 constants);
backward through the op raises.
"""

import functools
import math
import os
import weakref

import torch
import triton
import triton.language as tl

from kernels.mel_ref import num_frames

__all__ = ["log_mel", "log_mel_forward", "mel_bands", "report_specs"]

# (DFT stages, mel stage) tl.dot input precisions per mode; see the header.
PRECISIONS = {"exact": ("tf32x3", "tf32x3"), "fast": ("tf32x3", "tf32")}
_TEN_OVER_LOG2_10 = tl.constexpr(
    10.0 / 3.321928094887362
)  # 10 * log10(x) = _TEN_OVER_LOG2_10 * log2(x)
_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_BAND_CACHE: dict[int, tuple] = {}


def factor(n_fft: int) -> tuple[int, int]:
    """(N1, N2) with N1 * N2 = n_fft, N1 >= N2, both powers of two (1024 -> 32 x 32)."""
    n2 = 1 << (n_fft.bit_length() - 1) // 2
    return n_fft // n2, n2


def four_step_tables(n_fft: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's constants as one flat float32 vector (cached per n_fft and device).

    Layout (row-major blocks; N1, N2 = ``factor(n_fft)``, H1 = N1 // 2, angles reduced mod the
    period in integers before the float64 cos / sin)::

        window  (N,)       periodic Hann
        c1, s1  (N1, H1)   cos / -sin(2 pi n1 k1 / N1)            step 1
        twc,tws (N2, H1)   cos / sin(2 pi n2 k1 / N)               twiddle (w = twc - i tws)
        c2, s2  (N2, N2)   cos / sin(2 pi n2 k2 / N2)              step 2 (w = c2 - i s2)
        d2      (N2, N2)   c2 - s2                                 step 2, Gauss's third product
        hc, hs  (N2, N2)   cos / -sin(2 pi n2 (2 j + 1) / (2 N2))  bins k1 = H1 (the tail)
    """
    key = (n_fft, str(device))
    tab = _TABLE_CACHE.get(key)
    if tab is None:
        n1, n2 = factor(n_fft)
        h1 = n1 // 2

        def ang(a: torch.Tensor, b: torch.Tensor, period: int) -> torch.Tensor:
            return 2 * math.pi * ((a[:, None] * b[None, :]) % period).double() / period

        i1, i2, k1 = torch.arange(n1), torch.arange(n2), torch.arange(h1)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        a1, tw, a2 = ang(i1, k1, n1), ang(i2, k1, n_fft), ang(i2, i2, n2)
        ah = ang(i2, 2 * i2 + 1, 2 * n2)
        parts = [window, a1.cos(), -a1.sin(), tw.cos(), tw.sin(), a2.cos(), a2.sin()]
        parts += [a2.cos() - a2.sin()]
        parts += [ah.cos(), -ah.sin()]
        with torch.inference_mode(False):
            tab = torch.cat([p.reshape(-1) for p in parts]).float().to(device)
        _TABLE_CACHE[key] = tab
    return tab


def mel_bands(fb: torch.Tensor) -> torch.Tensor:
    """(n_bins, 2) int32: the first and last nonzero column of each filterbank row (an all-zero
    row gives (n_mels, -1)). Cached per tensor object while its version counter is unchanged
    (in-place edits bump it); inference tensors, which keep no version, are recomputed."""
    try:
        version = fb._version
    except RuntimeError:
        version = None
    hit = _BAND_CACHE.get(id(fb))
    if version is not None and hit is not None and hit[0]() is fb and hit[1] == version:
        return hit[2]
    n_mels = fb.shape[1]
    cols = torch.arange(n_mels, device=fb.device)
    nonzero = fb != 0  # NaN counts as nonzero
    lo = torch.where(nonzero, cols, n_mels).amin(dim=1)
    hi = torch.where(nonzero, cols, -1).amax(dim=1)
    bands = torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()
    if version is not None:
        for key in [k for k, v in _BAND_CACHE.items() if v[0]() is None]:
            del _BAND_CACHE[key]  # filterbanks that no longer exist
        _BAND_CACHE[id(fb)] = (weakref.ref(fb), version, bands)
    return bands


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
    x = tl.load(wave_row + j.to(tl.int64) * stride_wave_l, mask=mask, other=0.0).to(tl.float32)
    if IS_INT16:
        x = x / 32767.0
    return x


@triton.jit
def _load_fb_rows(fb_ptr, band_ptr, row, keep, offs_m, stride_fb_f, stride_fb_m):
    """Filterbank rows ``row`` (masked by ``keep``) as fp32, reading only each row's nonzero
    column range [lo, hi] from ``band_ptr`` (a mel filter row has ~2 nonzeros: ~8x fewer bytes
    of L1/L2 traffic); the skipped entries are zeros either way."""
    lo = tl.load(band_ptr + 2 * row, mask=keep, other=1 << 20)
    hi = tl.load(band_ptr + 2 * row + 1, mask=keep, other=-1)
    inside = (offs_m[None, :] >= lo[:, None]) & (offs_m[None, :] <= hi[:, None])
    ptrs = fb_ptr + row[:, None] * stride_fb_f + offs_m[None, :] * stride_fb_m
    return tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _log_mel_kernel(
    wave_ptr,
    tab_ptr,
    fb_ptr,
    band_ptr,
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
    stride_fb_f,
    stride_fb_m,
    stride_out_b,
    stride_out_t,
    stride_out_m,
    N1: tl.constexpr,
    N2: tl.constexpr,
    N_MELS: tl.constexpr,
    N_MELS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K1: tl.constexpr,
    IS_INT16: tl.constexpr,
    SINGLE_REFLECT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    DFT_PRECISION: tl.constexpr,
    MEL_PRECISION: tl.constexpr,
):
    N: tl.constexpr = N1 * N2
    H1: tl.constexpr = N1 // 2
    OFF_C1: tl.constexpr = N  # offsets into the flat table (four_step_tables)
    OFF_S1: tl.constexpr = OFF_C1 + N1 * H1
    OFF_TWC: tl.constexpr = OFF_S1 + N1 * H1
    OFF_TWS: tl.constexpr = OFF_TWC + N2 * H1
    OFF_C2: tl.constexpr = OFF_TWS + N2 * H1
    OFF_S2: tl.constexpr = OFF_C2 + N2 * N2
    OFF_D2: tl.constexpr = OFF_S2 + N2 * N2
    OFF_HC: tl.constexpr = OFF_D2 + N2 * N2
    OFF_HS: tl.constexpr = OFF_HC + N2 * N2
    # Batch and frame tile flattened into axis 0: no 65535 limit on the batch (grid axis 1).
    pid = tl.program_id(0)
    b = pid // n_tiles
    t0 = (pid % n_tiles) * BLOCK_T
    wave_row = wave_ptr + b.to(tl.int64) * stride_wave_b

    # Step-1 operand X: row r = (frame t, n2), column n1, holding w[n] * xp[t * hop + n] with
    # n = N2 * n1 + n2 (gathered with reflect indices: no padded copy, no frame matrix in HBM).
    rows = tl.arange(0, BLOCK_T * N2)
    row_t = t0 + rows // N2
    row_n2 = rows % N2
    n1 = tl.arange(0, N1)
    n = N2 * n1[None, :] + row_n2[:, None]  # (BLOCK_T * N2, N1)
    x = _load_samples(
        wave_row, (row_t * hop - N // 2)[:, None] + n, (row_t < n_frames)[:, None], length,
        period, stride_wave_l, SINGLE_REFLECT, IS_INT16,
    )  # fmt: skip
    x = x * tl.load(tab_ptr + n)  # Hann; w[0] = 0 still turns a NaN sample into NaN
    # Row k1 = N1 / 2 of step 1 is real: sum_n1 (-1)^n1 X (CUDA cores, N FMAs per frame).
    x_half = tl.sum(x * (1 - 2 * (n1 % 2)).to(tl.float32)[None, :], axis=1)

    i2 = tl.arange(0, N2)
    sq = i2[:, None] * N2 + i2[None, :]
    c2 = tl.load(tab_ptr + OFF_C2 + sq)
    s2 = tl.load(tab_ptr + OFF_S2 + sq)
    d2 = tl.load(tab_ptr + OFF_D2 + sq)
    offs_m = tl.arange(0, N_MELS_PAD)
    mask_m = offs_m < N_MELS
    kk = tl.arange(0, BLOCK_K1)
    j = tl.arange(0, BLOCK_K1 * N2)  # flattened (k1, k2) of one chunk: bin k1 + N1 * k2
    mel = tl.zeros((BLOCK_T, N_MELS_PAD), dtype=tl.float32)
    for k0 in range(0, H1, BLOCK_K1):
        k1 = k0 + kk
        # Step 1: N1-point DFT along n1 for bins k1 of this chunk (tensor cores).
        tile1 = n1[:, None] * H1 + k1[None, :]
        a_re = tl.dot(x, tl.load(tab_ptr + OFF_C1 + tile1), input_precision=DFT_PRECISION)
        a_im = tl.dot(x, tl.load(tab_ptr + OFF_S1 + tile1), input_precision=DFT_PRECISION)
        # Twiddle w_N^(n2 k1) (CUDA cores), then (t, n2, k1) -> (t, k1, n2) through a relayout.
        tw = row_n2[:, None] * H1 + k1[None, :]
        twc = tl.load(tab_ptr + OFF_TWC + tw)
        tws = tl.load(tab_ptr + OFF_TWS + tw)
        b_re = a_re * twc + a_im * tws
        b_im = a_im * twc - a_re * tws
        b_re = tl.reshape(tl.permute(tl.reshape(b_re, (BLOCK_T, N2, BLOCK_K1)), (0, 2, 1)),
                          (BLOCK_T * BLOCK_K1, N2))  # fmt: skip
        b_im = tl.reshape(tl.permute(tl.reshape(b_im, (BLOCK_T, N2, BLOCK_K1)), (0, 2, 1)),
                          (BLOCK_T * BLOCK_K1, N2))  # fmt: skip
        # Step 2: N2-point complex DFT along n2 (tensor cores), y = b (c2 - i s2) as three real
        # products (Gauss): q1 = b_re c2, q2 = b_im s2, q3 = (b_re + b_im)(c2 - s2).
        q1 = tl.dot(b_re, c2, input_precision=DFT_PRECISION)
        q2 = tl.dot(b_im, s2, input_precision=DFT_PRECISION)
        q3 = tl.dot(b_re + b_im, d2, input_precision=DFT_PRECISION)
        y_re = q1 + q2
        y_im = q3 - q1 + q2
        power = tl.reshape(y_re * y_re + y_im * y_im, (BLOCK_T, BLOCK_K1 * N2))
        # Mel rows for bins k = k1 + N1 k2 (k1 < N1 / 2, all k2): bin k if k <= N / 2, else its
        # mirror N - k (same power), except k1 == 0 whose mirror is in the tile already.
        k = k0 + j // N2 + N1 * (j % N2)
        keep = (k <= N // 2) | (j >= N2) | (k0 > 0)
        fb_row = tl.where(k <= N // 2, k, N - k)
        fb = _load_fb_rows(fb_ptr, band_ptr, fb_row, keep, offs_m, stride_fb_f, stride_fb_m)
        mel = tl.dot(power, fb, mel, input_precision=MEL_PRECISION)

    # The tail: bins N1/2 + N1 j = sum_n2 x_half[n2] exp(-2 pi i n2 (2 j + 1) / (2 N2)); the
    # rows j >= N2 / 2 are mirrors (weight 0).
    x_half = tl.reshape(x_half, (BLOCK_T, N2))
    h_re = tl.dot(x_half, tl.load(tab_ptr + OFF_HC + sq), input_precision=DFT_PRECISION)
    h_im = tl.dot(x_half, tl.load(tab_ptr + OFF_HS + sq), input_precision=DFT_PRECISION)
    fb_h = _load_fb_rows(
        fb_ptr, band_ptr, H1 + N1 * i2, i2 < N2 // 2, offs_m, stride_fb_f, stride_fb_m
    )
    mel = tl.dot(h_re * h_re + h_im * h_im, fb_h, mel, input_precision=MEL_PRECISION)

    # 10 log10(max(mel, amin)): the clamp value is exact (floor_db = 10 log10(amin) from the
    # host, so silence is exactly -100 dB), and NaN survives (NaN < amin is False; tl.maximum
    # would drop NaN on the GPU).
    below = mel < amin
    out = tl.where(below, floor_db, _TEN_OVER_LOG2_10 * tl.log2(tl.where(below, amin, mel)))
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + offs_m, mask=mask_m, other=1.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        out = out + tl.load(shift_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    offs_t = t0 + tl.arange(0, BLOCK_T)
    out_ptrs = (
        out_ptr
        + b.to(tl.int64) * stride_out_b
        + offs_t.to(tl.int64)[:, None] * stride_out_t
        + offs_m[None, :] * stride_out_m
    )
    tl.store(out_ptrs, out, mask=(offs_t < n_frames)[:, None] & mask_m[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(
    batch: int, n_frames: int, n_fft: int, precision: str, sms: int, gpu: bool = False
) -> dict[str, int]:
    """Tile sizes: BLOCK_T frames per program, BLOCK_K1 step-1 bins per loop iteration.

    ``gpu=True`` gives the GPU settings even under the interpreter (for the static report).
    """
    n1, _ = factor(n_fft)
    if _interpreting() and not gpu:
        # A program costs milliseconds of Python: big frame tiles, one k1 chunk.
        block_t = max(2, min(64, triton.next_power_of_2(n_frames)))
        return dict(BLOCK_T=block_t, BLOCK_K1=n1 // 2, num_warps=4, num_stages=1)
    # Register budget (ptxas for sm_90, no spills at 8 warps; tf32x3 holds each operand
    # three times): 4096 samples per program (4 frames of 1024). Then halve the tile
    # until there are >= 2 waves of programs (batch 1, 10 s clip: 2 frames, 501 programs).
    block_t = max(2, min(16, 4096 // n_fft))
    while block_t > 2 and batch * triton.cdiv(n_frames, block_t) < 2 * sms:
        block_t //= 2
    # 4 step-1 bins per iteration, 2 where 4 spilled (2-frame tiles, n_fft >= 2048; fast mode
    # with int16 input at 4 frames of 1024: 8 bytes), 1 where 2 spilled (fast, n_fft >= 2048).
    block_k1 = 4 if block_t * n_fft >= 4096 and n_fft < 2048 and precision != "fast" else 2
    if n_fft >= 2048 and precision == "fast":
        block_k1 = 1
    return dict(BLOCK_T=block_t, BLOCK_K1=block_k1, num_warps=8, num_stages=1)


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
    if n_fft < 256 or n_fft & (n_fft - 1):
        raise ValueError(f"the Triton mel kernel needs a power-of-two n_fft >= 256, got {n_fft}")
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
    tables = four_step_tables(n_fft, waveform.device)  # cached per device
    fb = mel_fb.to(device=waveform.device)
    bands = mel_bands(fb)  # cached per filterbank tensor and version
    scale_t = scale.reshape(-1).to(device=waveform.device) if scale is not None else out
    shift_t = shift.reshape(-1).to(device=waveform.device) if shift is not None else out
    sms = _num_sms(waveform.device.index or 0) if waveform.is_cuda else 132
    cfg = _launch_config(batch, n_frames, n_fft, precision, sms)
    n_tiles = triton.cdiv(n_frames, cfg["BLOCK_T"])
    n1, n2 = factor(n_fft)
    _log_mel_kernel[(batch * n_tiles,)](
        waveform,
        tables,
        fb,
        bands,
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
        fb.stride(0),
        fb.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        N1=n1,
        N2=n2,
        N_MELS=n_mels,
        N_MELS_PAD=max(16, triton.next_power_of_2(n_mels)),
        IS_INT16=waveform.dtype == torch.int16,
        SINGLE_REFLECT=length > n_fft // 2,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        DFT_PRECISION=PRECISIONS[precision][0],
        MEL_PRECISION=PRECISIONS[precision][1],
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
        dft: accepted for signature parity; the kernel always runs its factorised DFT.
        precision: "exact" (3-pass TF32, default, what the model uses) or "fast" (one TF32
            pass); see the header.

    Returns:
        (B, T, n_mels) float32, T = L // hop_length + 1. Not differentiable.
    """
    if dft not in ("fft", "matmul"):
        raise ValueError(f"dft must be 'fft' or 'matmul', got {dft!r}")
    return _log_mel_op(waveform, mel_fb, scale, shift, n_fft, hop_length, float(amin), precision)


# --- static report (python -m kernels.report) ---------------------------------------------------

_REPORT_SR, _REPORT_HOP, _REPORT_MELS = 48000, 480, 64


def flop_per_frame(n_fft: int, n_mels_pad: int) -> tuple[int, int]:
    """(DFT, mel) tensor-core FLOP of one frame, one pass, as the dots are written.

    DFT: step 1, 2 N N1 (two real dots over the H1 = N1 / 2 bins); step 2, 3 N N2 (three real
    dots of (H1 x N2) @ (N2 x N2), Gauss); tail, 4 N2^2. Mel: N n_mels_pad (the (k1, k2) bins)
    + 2 N2 n_mels_pad (tail). n_fft 1024, 64 mels: 167,936 + 69,632 = 237,568.
    """
    n1, n2 = factor(n_fft)
    dft = 2 * n_fft * n1 + 3 * n_fft * n2 + 4 * n2 * n2
    return dft, n_fft * n_mels_pad + 2 * n2 * n_mels_pad


def issued_flop(frames: int, n_fft: int, n_mels_pad: int, precision: str) -> int:
    """Tensor-core FLOP issued for ``frames`` frames: tf32x3 dots count 3 passes."""
    dft, mel_ = flop_per_frame(n_fft, n_mels_pad)
    passes = [3 if p == "tf32x3" else 1 for p in PRECISIONS[precision]]
    return frames * (passes[0] * dft + passes[1] * mel_)


def _report_spec(
    batch: int, precision: str, wave_dtype: str, n_fft: int = 1024, seconds: float = 10.0
) -> dict:
    length = int(seconds * _REPORT_SR)
    n_frames = num_frames(length, _REPORT_HOP)
    cfg = _launch_config(batch, n_frames, n_fft, precision, 132, gpu=True)
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    n1, n2 = factor(n_fft)
    n_mels_pad = max(16, triton.next_power_of_2(_REPORT_MELS))
    constexprs = dict(
        N1=n1, N2=n2, N_MELS=_REPORT_MELS, N_MELS_PAD=n_mels_pad, IS_INT16=wave_dtype == "i16",
        SINGLE_REFLECT=True, HAS_SCALE=True, HAS_SHIFT=True,
        DFT_PRECISION=PRECISIONS[precision][0], MEL_PRECISION=PRECISIONS[precision][1], **cfg,
    )  # fmt: skip
    fn = _log_mel_kernel
    floats = ("amin", "floor_db")
    signature = {
        name: "constexpr" if name in constexprs
        else "*i32" if name == "band_ptr"
        else ("*" + wave_dtype if name == "wave_ptr" else "*fp32") if name.endswith("_ptr")
        else "fp32" if name in floats else "i32"
        for name in fn.arg_names
    }  # fmt: skip
    frames_issued = batch * triton.cdiv(n_frames, cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    sample_bytes = 2 if wave_dtype == "i16" else 4
    table_bytes = 4 * (n_fft + n1 * n1 + n1 * n2 + 5 * n2 * n2)  # four_step_tables
    fb_bytes = (4 * _REPORT_MELS + 8) * (n_fft // 2 + 1)  # filterbank + its nonzero ranges
    return dict(
        fn=fn,
        config=f"{precision} n_fft{n_fft} BT{cfg['BLOCK_T']} BK{cfg['BLOCK_K1']} "
        f"w{options['num_warps']} s{options['num_stages']}",
        dtype=wave_dtype,
        signature=signature,
        constexprs=constexprs,
        options=options,
        flop=issued_flop(frames_issued, n_fft, n_mels_pad, precision),
        hbm_bytes=batch * (length * sample_bytes + n_frames * _REPORT_MELS * 4)
        + table_bytes
        + fb_bytes
        + 2 * 4 * _REPORT_MELS,
        tensor_core=True,
        problem=f"B={batch}, {seconds:g} s clips, n_fft {n_fft}, hop 480, 64 mels",
    )


def report_specs() -> list[dict]:
    """Every (kernel, configuration) this module can launch on a GPU, for python -m kernels.report.

    n_fft 1024 (the model's), both precisions, fp32 and int16 input: batch 64 (the largest
    tiles) and every smaller tile the wave heuristic picks down to batch 1 (2 frames); n_fft
    256 / 512 / 2048 at batch 64 and batch 1 in fp32.
    """
    specs = []
    for precision in ("exact", "fast"):
        for dtype in ("fp32", "i16"):
            specs += [_report_spec(b, precision, dtype) for b in (64, 3, 2, 1)]
        specs += [
            _report_spec(b, precision, "fp32", n_fft) for n_fft in (256, 512, 2048) for b in (64, 1)
        ]
    seen, unique = set(), []
    for spec in specs:  # batch 3 and 2 give the same tiles in some cases
        key = (spec["config"], spec["dtype"])
        if key not in seen:
            seen.add(key)
            unique.append(spec)
    return unique
