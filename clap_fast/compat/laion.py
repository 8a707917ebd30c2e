"""A drop-in for ``laion_clap.CLAP_Module``: change the import, keep the script.

    # import laion_clap
    # model = laion_clap.CLAP_Module(enable_fusion=False)
    from clap_fast.compat import laion as laion_clap
    model = laion_clap.CLAP_Module(enable_fusion=False)
    model.load_ckpt("630k-audioset-best.pt")
    a = model.get_audio_embedding_from_filelist(["dog.wav"])          # (N, 512) numpy
    a = model.get_audio_embedding_from_data(x)                        # x: (N, T) at 48 kHz
    t = model.get_text_embedding(["a dog barks", "rain"])             # (N, 512) numpy

What it reproduces of laion_clap 1.1.7's ``hook.CLAP_Module``, step by step:
  * files are read like ``librosa.load(f, sr=48000)``: soundfile, mean of the channels, soxr
    "HQ" resampling, output cut / zero-padded to ``ceil(n · 48000 / sr)`` samples
    (``resampler="torchaudio"`` uses clap_fast's own resampler instead; 48 kHz files are equal
    either way);
  * the int16 round trip in NumPy (skipped with ``use_tensor=True``, as laion_clap does);
  * clips up to 10 s are ``repeatpad``-filled; longer clips take laion_clap's random crop
    (non-fusion) or random fusion views, drawn from NumPy's global RNG exactly as laion_clap
    draws them, so ``np.random.seed(s)`` before a call gives laion_clap's result;
  * numpy float32 out by default, torch tensors with ``use_tensor=True`` (which, as in
    laion_clap, keeps the autograd graph).

Differences: messages go to ``logging`` (laion_clap prints), ``load_ckpt`` detects the
architecture from the weights and refuses a fusion / non-fusion mismatch with a ``ValueError``,
and ``load_ckpt()`` without a path fetches the released file through huggingface_hub.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import clap_fast
from clap_fast import ops
from clap_fast.audio import fill
from clap_fast.frontend import htk_mel_fb

__all__ = ["CLAP_Module", "RELEASED_IDS", "load_like_librosa"]

log = logging.getLogger(__name__)

RELEASED_IDS = (
    "630k-best.pt",
    "630k-audioset-best.pt",
    "630k-fusion-best.pt",
    "630k-audioset-fusion-best.pt",
)
"""laion_clap's ``model_id`` 0..3 (``load_ckpt(model_id=...)``)."""

RESAMPLERS = ("soxr", "torchaudio")


def _fix_length(y: np.ndarray, n: int) -> np.ndarray:
    return y[:n] if len(y) >= n else np.pad(y, (0, n - len(y)))


def load_like_librosa(path: str | os.PathLike, sr: int = 48000) -> np.ndarray:
    """A file as ``librosa.load(path, sr=sr)`` returns it: (T,) float32 mono at ``sr``.

    soundfile decoding, mean of the channels, soxr "HQ" resampling (librosa's default
    ``res_type="soxr_hq"``), then cut / zero-padded to ``ceil(T · sr / native)`` samples.
    """
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        native = f.samplerate
        y = f.read(dtype="float32", always_2d=True).T  # (C, T)
    y = np.mean(y, axis=0) if y.shape[0] > 1 else y[0]
    if native == sr:
        return y
    import soxr

    ratio = float(sr) / native  # librosa's order of operations (it decides the length)
    n = int(np.ceil(y.shape[-1] * ratio))
    return _fix_length(soxr.resample(y, native, sr, quality="soxr_hq"), n)


def _int16_round_trip_np(x: np.ndarray) -> np.ndarray:
    """laion_clap's ``int16_to_float32(float32_to_int16(x))``, in NumPy as it does it."""
    q = (np.clip(x, a_min=-1.0, a_max=1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


class CLAP_Module(torch.nn.Module):  # noqa: N801 (laion_clap's name)
    """laion_clap's ``CLAP_Module`` on clap_fast's model (``self.model``, a ``clap_fast.CLAP``).

    Args:
        enable_fusion: LAION's feature fusion for long audio.
        device: None picks cuda:0 when available, else cpu (as laion_clap).
        amodel / tmodel: audio / text architecture names (laion_clap's spelling).
        resampler: "soxr" (laion_clap's ``librosa.load``) or "torchaudio" (clap_fast's).
        text_overrides: TextConfig fields for the random init before ``load_ckpt`` (tests).
    """

    def __init__(
        self,
        enable_fusion: bool = False,
        device: str | torch.device | None = None,
        amodel: str = "HTSAT-tiny",
        tmodel: str = "roberta",
        *,
        resampler: str = "soxr",
        text_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
        self.enable_fusion = bool(enable_fusion)
        self.resampler = resampler
        self._device = ops.resolve_device("auto" if device is None else device)
        self.model = clap_fast.create_model(
            amodel, text=tmodel, enable_fusion=self.enable_fusion,
            text_overrides=text_overrides, device=self._device,
        )  # fmt: skip

    # ------------------------------------------------------------- weights
    def load_ckpt(self, ckpt: str | os.PathLike | None = None, model_id: int = -1,
                  verbose: bool = True) -> None:  # fmt: skip
        """Load a checkpoint (LAION .pt, HF, open_clip or ours); None: a released one by id.

        ``model_id``: 0 630k, 1 630k+AudioSet, 2 630k fusion, 3 630k+AudioSet fusion; -1 picks
        3 for fusion models, else 1 (laion_clap's rule).
        """
        from clap_fast.factory import from_pretrained

        if ckpt is None:
            if model_id == -1:
                model_id = 3 if self.enable_fusion else 1
            if not isinstance(model_id, int) or not 0 <= model_id < len(RELEASED_IDS):
                raise ValueError(f"model_id must be -1 or 0..3, got {model_id!r}")
            ckpt = RELEASED_IDS[model_id]
        model = from_pretrained(ckpt, device=self._device)
        if model.cfg.enable_fusion != self.enable_fusion:
            raise ValueError(
                f"{ckpt} is a {'fusion' if model.cfg.enable_fusion else 'non-fusion'} checkpoint "
                f"but this CLAP_Module has enable_fusion={self.enable_fusion}"
            )
        self.model = model
        if verbose:
            log.info("loaded %s (%s, %s text)", ckpt, model.cfg.name, model.text_type)

    # ---------------------------------------------------------------- text
    def tokenizer(self, text: Sequence[str]) -> dict[str, torch.Tensor]:
        """The text tower's tokenizer, padded to its context length (77 for RoBERTa)."""
        return self.model.tokenize(text)

    def get_text_embedding(
        self,
        x: Sequence[str],
        tokenizer: Callable[[Sequence[str]], Any] | None = None,
        use_tensor: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """(N, 512) L2-normalised text embeddings; numpy unless ``use_tensor``."""
        if isinstance(x, str):
            x = [x]  # laion_clap's tokenizer takes one string as one text
        tok = tokenizer(x) if tokenizer is not None else self.tokenizer(x)
        dev = ops.device_of(self.model)
        self.model.eval()
        with torch.inference_mode(not use_tensor):
            if isinstance(tok, torch.Tensor):  # CLIP-style tokenizers return the ids alone
                feats = self.model.encode_text(tok.to(dev))
            else:
                mask = tok.get("attention_mask")
                feats = self.model.encode_text(
                    tok["input_ids"].to(dev), None if mask is None else mask.to(dev)
                )
            out = F.normalize(feats, dim=-1)
        return out if use_tensor else out.detach().cpu().numpy()

    # --------------------------------------------------------------- audio
    def get_audio_embedding_from_filelist(
        self, x: Sequence[str | os.PathLike], use_tensor: bool = False
    ) -> np.ndarray | torch.Tensor:
        """(N, 512) embeddings of audio files (any rate, mono or multi-channel)."""
        if isinstance(x, (str, bytes, os.PathLike)):
            raise ValueError(f"x must be a list of audio files, got the single path {x!r}; "
                             f"pass [{x!r}]")  # fmt: skip
        if not x:
            raise ValueError("no audio files given")
        sr = self.model.cfg.audio.sample_rate
        clips = []
        for f in x:
            if self.resampler == "soxr":
                y = load_like_librosa(f, sr)
            else:
                from clap_fast.audio import load_audio

                y = load_audio(str(f), sr).numpy()
            clips.append(torch.from_numpy(_int16_round_trip_np(y)))
        return self._embed(clips, use_tensor)

    def get_audio_embedding_from_data(
        self, x: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
        use_tensor: bool = False,
    ) -> np.ndarray | torch.Tensor:  # fmt: skip
        """(N, 512) embeddings of mono 48 kHz clips: (N, T), a list of 1-D clips, or one (T,) clip.

        As in laion_clap, ``use_tensor=True`` expects tensors, skips the int16 round trip and
        keeps the autograd graph.
        """
        from clap_fast import validate

        validate.check_not_paths(x)
        if isinstance(x, (np.ndarray, torch.Tensor)):
            if x.ndim == 1:
                x = x[None]  # one clip
            elif x.ndim != 2:
                raise ValueError(f"x must be (N, T) mono clips, got shape {tuple(x.shape)}")
        clips = []
        for i, c in enumerate(x):
            if use_tensor:
                t = torch.as_tensor(c)
            else:
                c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
                t = torch.from_numpy(_int16_round_trip_np(c))
            if t.ndim != 1 or t.numel() == 0 or not t.is_floating_point():
                raise ValueError(
                    f"clip {i} must be non-empty 1-D float samples, got {tuple(t.shape)} {t.dtype}"
                )
            clips.append(t.float())
        return self._embed(clips, use_tensor)

    def _embed(self, clips: list[torch.Tensor], use_tensor: bool) -> np.ndarray | torch.Tensor:
        self.model.eval()
        with torch.inference_mode(not use_tensor):
            if self.enable_fusion:
                mel_fusion, longer = self._fusion_inputs(clips)
                feats = self.model.encode_audio(mel_fusion=mel_fusion, longer=longer)
            else:
                feats = self.model.encode_audio(self._crop_or_fill(clips))
            out = F.normalize(feats, dim=-1)
        return out if use_tensor else out.detach().cpu().numpy()

    def _crop_or_fill(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """(N, 480000): laion_clap's ``rand_trunc`` crop (NumPy RNG) or ``repeatpad``."""
        n = self.model.cfg.audio.clip_samples
        out = []
        for c in clips:
            if c.shape[0] > n:
                s = np.random.randint(0, c.shape[0] - n + 1)
                c = c[s : s + n]
            else:
                c = fill(c, n, "repeatpad")
            out.append(c)
        return torch.stack(out).to(ops.device_of(self.model))

    def _fusion_inputs(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """laion_clap's fusion views: (N, 4, 1001, 64) and ``longer`` (N,), NumPy RNG crops."""
        cfg = self.model.cfg.audio
        n, dev = cfg.clip_samples, ops.device_of(self.model)
        fb = htk_mel_fb(cfg.sample_rate, cfg.window_size, cfg.mel_bins, cfg.fmin, cfg.fmax)
        fb = fb.to(dev)
        chunk = n // cfg.hop_size + 1
        views, longer = [], []
        for c in clips:
            long = c.shape[0] > n
            c = c if long else fill(c, n, "repeatpad")
            mel = ops.log_mel(c[None].to(dev), fb, n_fft=cfg.window_size,
                              hop_length=cfg.hop_size)[0]  # fmt: skip
            total = mel.shape[0]
            if not long or total == chunk:
                views.append(mel.expand(4, -1, -1))
                longer.append(False)
            else:
                ranges = np.array_split(list(range(0, total - chunk + 1)), 3)
                starts = [np.random.choice(r if len(r) else [0]) for r in ranges]
                shrink = F.interpolate(
                    mel[None, None], size=(chunk, mel.shape[1]), mode="bilinear",
                    align_corners=False, antialias=True,
                )[0, 0]  # fmt: skip
                views.append(torch.stack([shrink, *(mel[s : s + chunk] for s in starts)]))
                longer.append(True)
            if long:  # laion_clap then draws (and discards) a waveform crop: keep the RNG in step
                np.random.randint(0, c.shape[0] - n + 1)
        return torch.stack(views), torch.tensor(longer, device=dev)
