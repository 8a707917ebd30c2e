"""Log-mel front end: Triton kernel (through the interpreter on the CPU) vs the PyTorch reference
vs an fp64 reference vs torchaudio (HTK bank) and librosa (Slaney bank).

Tolerance (issue 3): on real signals (tones, noise, speech-like; never zeros), |delta| <= 1e-3 dB
over the mel bins within 50 dB of the clip's peak. Deeper valleys are rounding noise in dB, so
there the mel power error is bounded relative to the clip's loudest DFT bin.
"""

import math

import numpy as np
import pytest
import torch

from clap_fast.frontend import htk_mel_fb, slaney_mel_fb
from kernels import mel, mel_ref

N_FFT, HOP, SR, N_MELS = 1024, 480, 48000, 64
LENGTHS = [1, 479, 480, 481, SR, int(10.37 * SR)]  # 1 sample ... 1 s, 10.37 s


@pytest.fixture(scope="module")
def banks() -> dict[str, torch.Tensor]:
    """(513, 64) float32 filterbanks: the Slaney bank (LAION's melW, librosa's default) and the
    HTK bank (torchaudio's), built by clap_fast.frontend (no librosa: the GPU image lacks it;
    tests/test_audio_api.py checks both against librosa / torchaudio where they exist)."""
    return {
        "slaney": slaney_mel_fb(SR, N_FFT, N_MELS, 50, 14000),
        "htk": htk_mel_fb(SR, N_FFT, N_MELS, 50, 14000),
    }


def signal(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) float32 in [-1, 1]: row 0 tones, row 1 noise, row 2 speech-like, ..."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / SR
    rows = []
    for i in range(batch):
        kind = i % 3
        if kind == 0:  # two tones plus a little noise
            f1, f2 = 220.0 * (1 + i), 3100.0 + 500 * i
            x = 0.5 * torch.sin(2 * math.pi * f1 * t) + 0.2 * torch.sin(2 * math.pi * f2 * t + 1)
            x = x + 1e-3 * torch.randn(length, generator=g, dtype=torch.float64)
        elif kind == 1:  # white noise
            x = 0.2 * torch.randn(length, generator=g, dtype=torch.float64)
        else:  # vibrato harmonics with a syllable-rate envelope (speech-like)
            f0 = 140 + 30 * torch.sin(2 * math.pi * 2.5 * t)
            phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
            x = sum(torch.sin(h * phase) / h for h in range(1, 12))
            x = 0.3 * x * (0.6 + 0.4 * torch.sin(2 * math.pi * 4 * t)) + 1e-3 * torch.randn(
                length, generator=g, dtype=torch.float64
            )
        rows.append(x)
    return torch.stack(rows).clamp(-1, 1).float()


def to_int16(x: torch.Tensor) -> torch.Tensor:
    """LAION's round trip: clamp, * 32767, truncate toward zero."""
    return (x.clamp(-1, 1) * 32767.0).to(torch.int16)


def power_scale(wave: torch.Tensor) -> torch.Tensor:
    """(B,) the loudest DFT bin power of each clip, from the fp64 reference (identity bank)."""
    eye = torch.eye(N_FFT // 2 + 1, dtype=torch.float64)
    w = wave.double() / 32767.0 if wave.dtype == torch.int16 else wave.double()
    return 10 ** (mel_ref.log_mel(w, eye, amin=1e-300).amax(dim=(1, 2)) / 10)


def assert_close_db(
    out: torch.Tensor,
    ref: torch.Tensor,
    wave: torch.Tensor,
    fb: torch.Tensor,
    db_tol: float = 1e-3,
    power_rtol: float = 4e-6,
    amin: float = 1e-10,
) -> None:
    """|out - ref| <= db_tol dB over the real bins within 50 dB of each clip's peak mel bin.

    "Real" bins also hold at least 1e-6 x (the clip's loudest DFT bin) x (the filter's sum):
    the rest is leakage and rounding (e.g. a 1-sample clip is a constant whose energy sits in
    DFT bins 0 and 1, below the banks' 50 Hz edge). Elsewhere, the valleys:
    |P_out - P_ref| <= power_rtol * (loudest DFT bin) * (filter's sum) + amin, i.e. how a DFT
    error of power_rtol x the peak reaches a mel bin. The default power_rtol is 2-3x what the
    float32 PyTorch reference itself shows against fp64 (test_reference_fp32_within_budget).
    """
    assert out.shape == ref.shape
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    p_out, p_ref = 10 ** (out / 10), 10 ** (ref / 10)
    scale = power_scale(wave)[:, None, None] * fb.double().sum(0)
    near = (ref >= ref.amax(dim=(1, 2), keepdim=True) - 50) & (p_ref >= 1e-6 * scale)
    err = (out - ref).abs()
    worst = err[near].max().item() if near.any() else 0.0
    assert worst <= db_tol, f"max |delta| = {worst:.3g} dB within 50 dB of the peak"
    excess = ((p_out - p_ref).abs() / (power_rtol * scale + amin)).max().item()
    assert excess <= 1.0, f"valley power error {excess:.3g} x the bound"


# --- the reference against the outside world ---------------------------------------------------


@pytest.mark.parametrize("length", [1000, SR, 10 * SR, int(10.37 * SR)])
def test_reference_matches_torchaudio_htk(banks, length):
    """torchaudio MelSpectrogram (HTK, no norm) + AmplitudeToDB: LAION's fusion front end.

    torch.stft refuses a reflect pad longer than the clip, so lengths <= 512 are librosa's.
    """
    torchaudio = pytest.importorskip("torchaudio")
    wave = signal(3 if length <= SR else 1, length)
    spec = torchaudio.transforms.MelSpectrogram(
        sample_rate=SR, n_fft=N_FFT, hop_length=HOP, f_min=50, f_max=14000, n_mels=N_MELS,
        center=True, pad_mode="reflect", power=2.0, norm=None, mel_scale="htk",
    )  # fmt: skip
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)
    theirs = to_db(spec(wave)).transpose(1, 2)
    ours = mel_ref.log_mel(wave, banks["htk"])
    assert_close_db(ours, theirs, wave, banks["htk"], power_rtol=1e-5)


@pytest.mark.parametrize("length", LENGTHS)
def test_reference_matches_librosa_slaney(banks, length):
    """librosa.stft / melspectrogram with its default (Slaney) bank: LAION's in-model front end.

    librosa pads with np.pad(mode="reflect"), so the short lengths (1, 479, 480, 481) are
    checked too (torch.stft refuses a reflect pad longer than the clip).
    """
    librosa = pytest.importorskip("librosa")
    wave = signal(3 if length <= SR else 1, length)
    theirs = librosa.feature.melspectrogram(
        y=wave.numpy(), sr=SR, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window="hann",
        center=True, pad_mode="reflect", power=2.0, n_mels=N_MELS, fmin=50, fmax=14000,
    )  # fmt: skip
    theirs = torch.from_numpy(10 * np.log10(np.maximum(theirs, 1e-10))).transpose(1, 2)
    ours = mel_ref.log_mel(wave, banks["slaney"])
    assert_close_db(ours, theirs, wave, banks["slaney"], power_rtol=1e-5)
    stft = librosa.stft(wave.numpy(), n_fft=N_FFT, hop_length=HOP, center=True, pad_mode="reflect")
    power = torch.from_numpy(np.abs(stft) ** 2).transpose(1, 2).double()
    eye = torch.eye(N_FFT // 2 + 1, dtype=torch.float64)
    ours_power = 10 ** (mel_ref.log_mel(wave.double(), eye, amin=1e-300) / 10)
    assert torch.allclose(ours_power, power, rtol=0, atol=1e-5 * power.max().item())


def test_reference_fp32_within_budget(banks):
    """The float32 reference itself meets the 1e-3 dB budget (so the budget is PyTorch-sized)."""
    wave = signal(3, SR)
    for fb in banks.values():
        ref64 = mel_ref.log_mel(wave.double(), fb.double())
        for dft in ("fft", "matmul"):
            assert_close_db(mel_ref.log_mel(wave, fb, dft=dft), ref64, wave, fb)


# --- the kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
@pytest.mark.parametrize("bank", ["slaney", "htk"])
@pytest.mark.parametrize("length", LENGTHS)
def test_kernel_matches_fp64_reference(banks, length, bank, dtype):
    """Exact mode vs the fp64 reference, and vs the fp32 reference, batch 3 (batch 1 at 10.37 s)."""
    fb = banks[bank]
    wave = signal(3 if length <= SR else 1, length, seed=length)
    if dtype == torch.int16:
        wave = to_int16(wave)
    out = mel.log_mel(wave, fb)
    assert out.dtype == torch.float32
    assert out.shape == (wave.shape[0], length // HOP + 1, N_MELS)
    wave64 = wave.double() / 32767.0 if dtype == torch.int16 else wave.double()
    assert_close_db(out, mel_ref.log_mel(wave64, fb.double()), wave, fb)
    assert_close_db(out, mel_ref.log_mel(wave, fb), wave, fb)


@pytest.mark.parametrize("length", [1, 481, 3 * HOP + 17])
def test_kernel_batch1(banks, length):
    wave = signal(1, length, seed=1)
    ref = mel_ref.log_mel(wave.double(), banks["slaney"].double())
    assert_close_db(mel.log_mel(wave, banks["slaney"]), ref, wave, banks["slaney"])


def test_kernel_silence_is_exactly_minus_100_db(banks):
    """Zeros clamp at amin = 1e-10: exactly -100 dB, in both dtypes and with the affine."""
    for wave in (torch.zeros(2, 2000), torch.zeros(2, 2000, dtype=torch.int16)):
        out = mel.log_mel(wave, banks["slaney"])
        assert torch.equal(out, torch.full_like(out, -100.0))
        assert torch.equal(out, mel_ref.log_mel(wave, banks["slaney"]))
    scale, shift = torch.full((N_MELS,), 0.5), torch.full((N_MELS,), 3.0)
    out = mel.log_mel(torch.zeros(1, 700), banks["htk"], scale=scale, shift=shift)
    assert torch.equal(out, torch.full_like(out, -47.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_kernel_full_scale_square_wave(banks, dtype):
    """+-full scale 1 kHz square wave: no inf / overflow, matches the fp64 reference."""
    t = torch.arange(SR // 4)
    wave = torch.where((t // 24) % 2 == 0, 1.0, -1.0)[None].repeat(2, 1)
    wave[1] = -wave[1]
    if dtype == torch.int16:
        wave = to_int16(wave)
    for fb in banks.values():
        out = mel.log_mel(wave, fb)
        assert torch.isfinite(out).all()
        wave64 = wave.double() / 32767.0 if dtype == torch.int16 else wave.double()
        assert_close_db(out, mel_ref.log_mel(wave64, fb.double()), wave, fb)


def frames_touching(sample: int, length: int) -> torch.Tensor:
    """(T,) bool: the frames whose reflect-padded window reads ``sample``."""
    t = mel_ref.num_frames(length, HOP)
    idx = (torch.arange(t) * HOP - N_FFT // 2)[:, None] + torch.arange(N_FFT)[None, :]
    return (mel_ref.reflect_index(idx, length) == sample).any(dim=1)


@pytest.mark.parametrize(
    ("length", "sample"), [(5000, 0), (5000, 448), (5000, 2400), (5000, 4999), (300, 7)]
)
def test_kernel_nan_propagates_like_reference(banks, length, sample):
    """Documented behaviour: frames that touch a NaN sample are NaN in every bin, others exact.

    Sample 448 is frame 2's first sample (Hann weight 0), which the kernel's folding skips.
    """
    wave = signal(2, length)
    wave[1, sample] = float("nan")
    fb = banks["slaney"]
    out, ref = mel.log_mel(wave, fb), mel_ref.log_mel(wave, fb)
    expected = frames_touching(sample, length)
    assert expected.any()
    assert torch.equal(torch.isnan(ref[1]).all(dim=1), expected)
    assert torch.equal(torch.isnan(ref[1]).any(dim=1), expected)
    assert torch.equal(torch.isnan(out[1]).all(dim=1), expected)
    assert torch.equal(torch.isnan(out[1]).any(dim=1), expected)
    assert not torch.isnan(out[0]).any()
    clean = ~expected
    if clean.any():
        wave[1, sample] = 0.0  # clean frames never read it: compare them with a finite input
        ref64 = mel_ref.log_mel(wave.double(), fb.double())
        assert_close_db(out[1:, clean], ref64[1:, clean], wave[1:], fb)


def test_kernel_affine_and_htsat_view(banks):
    """Eval-mode bn0 folded as scale/shift; (B, 1, T, 64) is a view of the output."""
    wave = signal(3, 3000)
    scale, shift = torch.rand(N_MELS) + 0.5, torch.randn(N_MELS)
    out = mel.log_mel(wave, banks["htk"], scale=scale, shift=shift)
    ref = mel_ref.log_mel(wave.double(), banks["htk"].double(), scale=scale, shift=shift)
    plain = mel_ref.log_mel(wave.double(), banks["htk"].double())
    near = plain >= plain.amax(dim=(1, 2), keepdim=True) - 50
    assert (out.double() - ref).abs()[near].max() <= 1e-3 * scale.max()
    image = out[:, None]
    assert image.shape == (3, 1, 3000 // HOP + 1, N_MELS) and image.data_ptr() == out.data_ptr()


def test_kernel_strided_input_and_small_bank(banks):
    """Non-contiguous waveform, n_fft 512 / hop 160 / 40 mel bins (padded to 64 inside)."""
    base = signal(3, 2 * 4000)
    wave = base[:, ::2]  # stride 2 along time
    assert not wave.is_contiguous()
    fb = banks["slaney"][::2][:257, :40].contiguous()
    out = mel.log_mel(wave, fb, n_fft=512, hop_length=160)
    ref = mel_ref.log_mel(wave.double(), fb.double(), n_fft=512, hop_length=160)
    assert out.shape == ref.shape == (3, 4000 // 160 + 1, 40)
    assert_close_db(out, ref, wave, fb, power_rtol=1e-5)


def test_kernel_dc_and_nyquist_bins():
    """The Nyquist bin is packed into column 0 of the -sin half: check DC, Nyquist, bin 1 and the
    total separately (the 50 Hz - 14 kHz banks put zero weight on both ends)."""
    n_bins = N_FFT // 2 + 1
    fb = torch.zeros(n_bins, 4)
    fb[0, 0] = fb[n_bins - 1, 1] = fb[1, 2] = 1.0
    fb[:, 3] = 1.0
    t = torch.arange(5000)
    nyquist = torch.where(t % 2 == 0, 1.0, -1.0)
    wave = torch.stack([0.3 + 0.1 * nyquist, 0.5 * nyquist - 0.2, signal(1, 5000)[0]])
    out = mel.log_mel(wave, fb)
    ref = mel_ref.log_mel(wave.double(), fb.double())
    assert_close_db(out, ref, wave, fb)


def test_kernel_fast_mode_within_budget(banks):
    """precision="fast" <= 0.05 dB (the interpreter runs it in fp32; real TF32 only on a GPU)."""
    wave = signal(3, SR // 2)
    ref = mel_ref.log_mel(wave.double(), banks["slaney"].double())
    out = mel.log_mel(wave, banks["slaney"], precision="fast")
    assert_close_db(out, ref, wave, banks["slaney"], db_tol=0.05, power_rtol=1e-4)


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 mantissa bits, nearest), returned as float64."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32).double()


def _dot_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton's input_precision="tf32x3": hi*hi + hi*lo + lo*hi with TF32 parts."""
    a_hi, b_hi = _round_tf32(a), _round_tf32(b)
    a_lo, b_lo = _round_tf32(a.double() - a_hi), _round_tf32(b.double() - b_hi)
    return a_hi @ b_hi + a_hi @ b_lo + a_lo @ b_hi


def test_tf32x3_emulation_within_fast_budget(banks):
    """The fast mode's arithmetic, emulated on the CPU, stays within the 0.05 dB budget.

    This checks the design choice (tf32x3 rather than one-pass TF32 or bf16), not the GPU.
    """
    wave = signal(3, SR)
    fb = banks["slaney"]
    frames = mel_ref._frames(wave.double(), N_FFT, HOP)
    y = _dot_tf32x3(frames.float(), mel_ref.dft_basis(N_FFT, "cpu", torch.float32))
    half = N_FFT // 2 + 1
    power = y[..., :half] ** 2 + y[..., half:] ** 2
    emulated = 10 * torch.log10(_dot_tf32x3(power.float(), fb).clamp(min=1e-10))
    ref = mel_ref.log_mel(wave.double(), fb.double())
    assert_close_db(emulated, ref, wave, fb, db_tol=0.05, power_rtol=1e-4)


def test_kernel_rejects_bad_arguments(banks):
    fb = banks["slaney"]
    for n_fft in (1023, 1000, 16):
        with pytest.raises(ValueError, match="power-of-two n_fft"):
            mel.log_mel(torch.zeros(1, 100), fb[: n_fft // 2 + 1], n_fft=n_fft)
    with pytest.raises(ValueError, match="rows"):
        mel.log_mel(torch.zeros(1, 100), fb[:-1])
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        mel.log_mel(torch.zeros(100), fb)
    with pytest.raises(ValueError, match="precision"):
        mel.log_mel(torch.zeros(1, 100), fb, precision="bf16")
    with pytest.raises(TypeError, match="int16"):
        mel.log_mel(torch.zeros(1, 100, dtype=torch.int32), fb)


def test_kernel_is_a_torch_op(banks):
    """Registered as clap_fast::log_mel with a fake kernel (shape inference without running)."""
    op = torch.ops.clap_fast.log_mel.default
    wave = signal(2, 2000)
    out = op(wave, banks["htk"], None, None, N_FFT, HOP, 1e-10, "exact")
    assert torch.equal(out, mel.log_mel(wave, banks["htk"]))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = op(
            torch.empty(5, 10_000), torch.empty(513, 64), None, None, N_FFT, HOP, 1e-10, "fast"
        )
    assert fake.shape == (5, 10_000 // HOP + 1, 64) and fake.dtype == torch.float32


def test_ops_dispatch_reaches_the_kernel(banks, monkeypatch):
    """clap_fast.ops.log_mel with backend "triton" calls kernels.mel.log_mel with its kwargs."""
    from clap_fast import ops

    calls = []
    real = mel.log_mel

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mel, "log_mel", spy)
    wave = signal(2, 3000)
    scale, shift = torch.rand(N_MELS) + 0.5, torch.randn(N_MELS)
    with ops.use_backend("triton"):
        out = ops.log_mel(wave, banks["slaney"], scale=scale, shift=shift)
    assert len(calls) == 1
    ref = mel_ref.log_mel(wave.double(), banks["slaney"].double())
    assert_close_db((out - shift) / scale, ref, wave, banks["slaney"], db_tol=2e-3)


def test_opcheck_interpreter(banks):
    """torch.library.opcheck (schema, fake tensor, autograd registration) on the CPU op."""
    wave = signal(2, 3000)
    scale, shift = torch.rand(N_MELS) + 0.5, torch.randn(N_MELS)
    for args in (
        (wave, banks["htk"], None, None, N_FFT, HOP, 1e-10, "exact"),
        (to_int16(wave), banks["slaney"], scale, shift, N_FFT, HOP, 1e-10, "fast"),
    ):
        torch.library.opcheck(torch.ops.clap_fast.log_mel.default, args)


def test_traced_by_torch_compile(banks):
    """The op traces under torch.compile (aot_eager: no C++ compile) as one opaque node."""
    fb = banks["slaney"]

    def front_end(x: torch.Tensor) -> torch.Tensor:
        return mel.log_mel(x, fb)[:, None] * 2.0

    wave = signal(2, 3000)
    compiled = torch.compile(front_end, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(wave), front_end(wave))


_AOT_SCRIPT = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.mel as K

wave_dt, precision, single = sys.argv[1:]
cfg = dict(K._launch_config(1001, 1024, precision))
options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
consts = dict(N_FFT=1024, N_MELS=64, N_MELS_PAD=64, IS_INT16=wave_dt == "i16",
              SINGLE_REFLECT=single == "1", HAS_SCALE=True, HAS_SHIFT=True,
              INPUT_PRECISION=K.PRECISIONS[precision], **cfg)
fn = K._log_mel_kernel
sig = {n: "constexpr" if n in consts else ("*" + wave_dt if n == "wave_ptr" else "*fp32")
       if n.endswith("_ptr") else "fp32" if n in ("amin", "floor_db") else "i32"
       for n in fn.arg_names}
src = ASTSource(fn=fn, signature=sig,
                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
assert compiled.asm["cubin"]
"""


@pytest.mark.parametrize("config", [("fp32", "exact", 1), ("i16", "fast", 0)], ids=str)
def test_compiles_for_sm90_without_a_gpu(config):
    """PTX + ptxas for an H100 with the GPU launch config: GPU-only compile errors on the CPU."""
    from tests.helpers import run_sm90_aot

    run_sm90_aot(_AOT_SCRIPT, config)


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_gpu_batch64_10s_matches_reference(banks, precision):
    wave = signal(64, 10 * SR).cuda()
    fb = banks["slaney"].cuda()
    out = mel.log_mel(wave, fb, precision=precision)
    ref = mel_ref.log_mel(wave.double(), fb.double())
    tol = dict(db_tol=1e-3) if precision == "exact" else dict(db_tol=0.05)
    assert_close_db(out.cpu(), ref.cpu(), wave.cpu(), fb.cpu(), **tol)
    wave16 = to_int16(wave)
    out16 = mel.log_mel(wave16, fb, precision=precision)
    ref16 = mel_ref.log_mel(wave16.double() / 32767.0, fb.double())
    assert_close_db(out16.cpu(), ref16.cpu(), wave16.cpu(), fb.cpu(), **tol)


@pytest.mark.gpu
def test_gpu_torch_compile_over_the_op(banks):
    fb = banks["slaney"].cuda()
    scale, shift = torch.rand(N_MELS, device="cuda") + 0.5, torch.randn(N_MELS, device="cuda")

    def front_end(x: torch.Tensor) -> torch.Tensor:
        return mel.log_mel(x, fb, scale=scale, shift=shift)[:, None] * 2.0

    wave = signal(4, 3 * SR).cuda()
    compiled = torch.compile(front_end, fullgraph=True)
    torch.testing.assert_close(compiled(wave), front_end(wave), rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_gpu_opcheck(banks):
    wave = signal(2, SR).cuda()
    fb = banks["htk"].cuda()
    for args in (
        (wave, fb, None, None, N_FFT, HOP, 1e-10, "exact"),
        (to_int16(wave), fb, torch.ones(N_MELS, device="cuda"), None, N_FFT, HOP, 1e-10, "fast"),
    ):
        torch.library.opcheck(torch.ops.clap_fast.log_mel.default, args)
