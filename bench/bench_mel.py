"""Log-mel front end benchmark: 10 s clips at 48 kHz -> (B, 1001, 64) float32 dB.

Providers (same inputs, same run):
  triton, triton-fast    kernels.mel.log_mel, precision "exact" / "fast" (CUDA only)
  reference              kernels.mel_ref.log_mel, eager (rfft)
  reference-compiled     torch.compile(kernels.mel_ref.log_mel), static shapes
  stft, stft-compiled    torch.stft (cuFFT on a GPU) + power + mel matmul + 10 log10(clamp),
                         eager and torch.compile (static shapes)
  torchaudio             MelSpectrogram(HTK, no norm) + AmplitudeToDB(top_db=None)
  nnaudio                nnAudio.features.MelSpectrogram (Slaney) + 10 log10(clamp)
  laion-conv             LAION's torchlibrosa front end: two Conv1d(1, 513, 1024, stride 480)
                         holding the windowed DFT matrix, power, @ melW, 10 log10(clamp)

Batches 1, 64, 256 on a GPU; 1 and 8 on the CPU (the suite then takes a minute or two). The
Triton providers skip cleanly without CUDA (the interpreter is not a benchmark).

    pytest bench/bench_mel.py --benchmark-json bench/results/mel-<gpu>-<date>.json
    pytest bench/bench_mel.py --benchmark-disable        # smoke test: every provider runs once

extra_info per case: device, torch / triton versions, commit, command, batch, audio-hours per
second, effective GB/s on the minimal bytes (fp32 input + fp32 output), % of the HBM roofline
(H100 3.35 TB/s, H200 4.8 TB/s; None elsewhere) and the provider's max |dB| gap to the fp64
reference over the bins within 50 dB of each clip's peak (recorded, not asserted).
"""

import functools
import math
import platform
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from bench.sizes import TINY, largest_last
from clap_fast.frontend import slaney_mel_fb
from kernels import mel_ref

SR, N_FFT, HOP, N_MELS, SECONDS = 48000, 1024, 480, 64, 10
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BATCHES = (1, 64, 256) if HAS_CUDA else (1, 2) if TINY else (1, 8)
PROVIDERS = (
    "triton",
    "triton-fast",
    "reference",
    "reference-compiled",
    "stft",
    "stft-compiled",
    "torchaudio",
    "nnaudio",
    "laion-conv",
)
HBM_TBPS = {"H100": 3.35, "H200": 4.8}  # memory-bandwidth roofline by device-name substring


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def hbm_tbps(name: str) -> float | None:
    return next((tb for key, tb in HBM_TBPS.items() if key in name), None)


@functools.cache
def commit() -> str:
    """The checkout's HEAD, read once per session (others may commit while the suite runs)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def slaney_bank() -> torch.Tensor:
    """(513, 64) LAION's melW: the Slaney bank (librosa's default), fmin 50, fmax 14000.

    Built by clap_fast.frontend, not librosa (absent on the GPU image)."""
    return slaney_mel_fb(SR, N_FFT, N_MELS, 50, 14000)


def clips(batch: int) -> torch.Tensor:
    """(batch, 480000) float32: tones plus noise, different per row."""
    g = torch.Generator().manual_seed(batch)
    t = torch.arange(SR * SECONDS, dtype=torch.float32) / SR
    f = 200 + 3000 * torch.rand(batch, 1, generator=g)
    x = 0.5 * torch.sin(2 * math.pi * f * t) + 0.05 * torch.randn(batch, t.numel(), generator=g)
    return x.clamp(-1, 1)


class LaionConvFrontEnd(torch.nn.Module):
    """torchlibrosa's Spectrogram + LogmelFilterBank as LAION's HTS-AT uses them (eval mode).

    STFT as two Conv1d(1, 513, 1024, stride hop, no bias) whose weights are the real and
    imaginary parts of the DFT matrix times the periodic Hann window, on the reflect-padded
    input; power = real^2 + imag^2; (B, 1, T, 513) @ melW (513, 64); 10 log10(clamp(amin)).
    """

    def __init__(self, mel_fb: torch.Tensor, amin: float = 1e-10) -> None:
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)
        ang = 2 * math.pi * torch.outer(k, n) / N_FFT  # (513, 1024), like np.exp(-2j pi k n / N)
        window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
        self.conv_real = torch.nn.Conv1d(1, N_FFT // 2 + 1, N_FFT, stride=HOP, bias=False)
        self.conv_imag = torch.nn.Conv1d(1, N_FFT // 2 + 1, N_FFT, stride=HOP, bias=False)
        with torch.no_grad():
            self.conv_real.weight.copy_((torch.cos(ang) * window)[:, None, :].float())
            self.conv_imag.weight.copy_((-torch.sin(ang) * window)[:, None, :].float())
        self.register_buffer("melW", mel_fb.float())
        self.amin = amin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) float32 -> (B, T, 64) float32 dB."""
        x = torch.nn.functional.pad(x[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")
        real = self.conv_real(x).transpose(1, 2)  # (B, T, 513)
        imag = self.conv_imag(x).transpose(1, 2)
        power = (real**2 + imag**2)[:, None]  # (B, 1, T, 513), as torchlibrosa keeps it
        mel = torch.matmul(power, self.melW)
        return (10.0 * torch.log10(torch.clamp(mel, min=self.amin)))[:, 0]


def stft_log_mel(x: torch.Tensor, fb: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, T, 64) dB: torch.stft (center, reflect) -> |.|^2 -> @ fb -> 10 log10."""
    spec = torch.stft(
        x, N_FFT, HOP, window=window, center=True, pad_mode="reflect", return_complex=True
    )  # (B, 513, T) complex64
    power = spec.real.square() + spec.imag.square()
    mel = power.transpose(1, 2) @ fb
    return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))


def make_provider(name: str, fb: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function (B, L) float32 on DEVICE -> (B, T, 64) float32 dB, or pytest.skip."""
    if name.startswith("triton"):
        if not HAS_CUDA:
            pytest.skip("the Triton kernel is benchmarked on a CUDA GPU only")
        from kernels import mel

        precision = "fast" if name == "triton-fast" else "exact"
        return lambda x: mel.log_mel(x, fb, precision=precision)
    if name == "reference":
        return lambda x: mel_ref.log_mel(x, fb)
    if name == "reference-compiled":
        compiled = torch.compile(mel_ref.log_mel, dynamic=False)
        return lambda x: compiled(x, fb)
    if name.startswith("stft"):
        window = torch.hann_window(N_FFT, periodic=True, device=fb.device)
        fn = stft_log_mel
        if name == "stft-compiled":
            fn = torch.compile(stft_log_mel, dynamic=False)
        return lambda x: fn(x, fb, window)
    if name == "torchaudio":
        torchaudio = pytest.importorskip("torchaudio")
        spec = torchaudio.transforms.MelSpectrogram(
            sample_rate=SR, n_fft=N_FFT, hop_length=HOP, f_min=50, f_max=14000, n_mels=N_MELS,
            center=True, pad_mode="reflect", power=2.0, norm=None, mel_scale="htk",
        ).to(DEVICE)  # fmt: skip
        to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None).to(DEVICE)
        return lambda x: to_db(spec(x)).transpose(1, 2)
    if name == "nnaudio":
        features = pytest.importorskip("nnAudio.features")
        spec = features.MelSpectrogram(
            sr=SR, n_fft=N_FFT, win_length=N_FFT, n_mels=N_MELS, hop_length=HOP, window="hann",
            center=True, pad_mode="reflect", power=2.0, htk=False, fmin=50, fmax=14000, norm=1,
            verbose=False,
        ).to(DEVICE)  # fmt: skip
        return lambda x: (10.0 * torch.log10(torch.clamp(spec(x), min=1e-10))).transpose(1, 2)
    if name == "laion-conv":
        return LaionConvFrontEnd(fb.cpu()).to(DEVICE)
    raise ValueError(name)


def gap_to_fp64(name: str, out: torch.Tensor, x: torch.Tensor, fb: torch.Tensor) -> float:
    """Max |dB| vs the fp64 reference over bins within 50 dB of each clip's peak (first clip).

    torchaudio uses its own HTK bank, so it is compared with the fp64 reference on that bank.
    """
    x0 = x[:1].double().cpu()
    if name.startswith("stft"):
        window = torch.hann_window(N_FFT, periodic=True, device=fb.device)
        fn = stft_log_mel
        if name == "stft-compiled":
            fn = torch.compile(stft_log_mel, dynamic=False)
        return lambda x: fn(x, fb, window)
    if name == "torchaudio":
        import torchaudio

        fb = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, 50, 14000, N_MELS, SR, None, "htk"
        )
    ref = mel_ref.log_mel(x0, fb.double().cpu())
    near = ref >= ref.amax() - 50
    return (out[:1].double().cpu() - ref).abs()[near].max().item()


@pytest.mark.parametrize("batch", largest_last(BATCHES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_log_mel(benchmark, provider: str, batch: int) -> None:
    fb = slaney_bank().to(DEVICE)
    fn = make_provider(provider, fb)
    x = clips(batch).to(DEVICE)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = fn(x)
        if HAS_CUDA:
            torch.cuda.synchronize()  # host sync: time the GPU work, not the launch
        return out

    out = run()  # warm-up: compiles (torch.compile, Triton) outside the timed rounds
    assert out.shape == (batch, SR * SECONDS // HOP + 1, N_MELS)
    rounds = 20 if HAS_CUDA else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)

    name = device_name()
    info = benchmark.extra_info
    info.update(
        device=name,
        torch=torch.__version__,
        triton=_triton_version(),
        commit=commit(),
        command=" ".join(sys.argv),
        provider=provider,
        batch=batch,
        clip_seconds=SECONDS,
        max_abs_db_vs_fp64=gap_to_fp64(provider, out, x, fb),
    )
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    seconds = stats.stats.median
    minimal_bytes = x.numel() * x.element_size() + out.numel() * 4
    gbps = minimal_bytes / seconds / 1e9
    roof = hbm_tbps(name)
    info.update(
        median_ms=seconds * 1e3,
        audio_hours_per_s=batch * SECONDS / 3600 / seconds,
        effective_gbps=gbps,
        hbm_roofline_pct=None if roof is None else 100 * gbps / (roof * 1e3),
    )


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
