"""The inference API, mixed into ``CLAP``: embed audio and text, classify zero-shot.

All ``embed_*`` methods run in inference mode, in batches, and return L2-normalised float32
CPU tensors of shape (N, 512) (``normalize=False`` for the raw projections).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clap_fast import engines, ops, validate
from clap_fast.audio import as_waveform_list, load_audio, prepare_batch, resample

__all__ = ["InferenceMixin", "DEFAULT_TEMPLATE"]

log = logging.getLogger(__name__)
DEFAULT_TEMPLATE = "This is a sound of {}."


def _chunks(n: int, size: int) -> Iterator[range]:
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


class InferenceMixin:
    """Methods users call on a CLAP model (see DESIGN.md, "Public API")."""

    @property
    def device(self) -> torch.device:
        return ops.device_of(self)

    # --------------------------------------------------------------- audio
    def embed_audio(
        self,
        waveforms: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
        sample_rate: int = 48000,
        *,
        batch_size: int = 32,
        long_audio: str | None = None,
        data_filling: str = "repeatpad",
        generator: torch.Generator | None = None,
        normalize: bool = True,
        progress: bool = False,
        autocast: torch.dtype | None = None,
        channels: str | None = None,
        frames: bool = False,
        engine: str | None = None,
    ) -> torch.Tensor:
        """Audio embeddings (B, 512) from a (B, T) array / tensor or a list of 1-D clips.

        A 1-D array is one clip. Multi-channel audio needs ``channels="last"`` ((T, C) clips as
        ``soundfile.read`` returns them, or (B, T, C)) or ``"first"`` ((C, T), (B, C, T)); it is
        downmixed by mean. Without it a (T, C) array is refused (see ``audio.as_waveform_list``).

        ``frames=True`` returns, instead, a list with one ``clap_fast.frames.Frames`` per clip:
        LAION's fine-grained HTS-AT frames (0.3125 s steps) projected into the joint space, with
        start times (approximate for text alignment; see ``clap_fast.frames``).

        Args:
            sample_rate: rate of the input; other rates than the model's are resampled.
            batch_size: clips per forward pass (windows of long clips count individually).
            long_audio: sliding (default) | first | rand_trunc; fusion models use fusion.
            data_filling: repeatpad (default) | repeat | pad, for clips shorter than 10 s.
            generator: makes rand_trunc / fusion crops random (LAION) and reproducible.
            autocast: e.g. torch.bfloat16 to run the towers under autocast (the front end stays
                fp32; implies the eager engine); None (default): as the engine decides.
            engine: None (default: ``CLAP_FAST_ENGINE`` or fp32 eager, LAION's numbers) | auto |
                eager | bf16 | compile | onnx | openvino | openvino_bf16 | int8; see
                ``clap_fast.engines`` for what each runs and what ``auto`` picks (and logs).
        """
        if frames:
            from clap_fast.frames import embed_frames

            if autocast is not None or engine not in (None, "eager"):
                raise ValueError(
                    "frames=True runs the fp32 eager model: leave autocast and engine unset"
                )
            return embed_frames(
                self, waveforms, sample_rate, normalize=normalize, channels=channels
            )
        sample_rate = validate.check_sample_rate(sample_rate)
        batch_size = validate.check_positive_int(batch_size, "batch_size")
        validate.check_not_paths(waveforms)
        cfg = self.cfg.audio
        clips = [
            resample(c, sample_rate, cfg.sample_rate) for c in as_waveform_list(waveforms, channels)
        ]
        out = torch.empty(len(clips), self.cfg.joint_embed_shape)
        bar = tqdm(total=len(clips), desc="embed audio", unit="clip", disable=not progress)
        choice = engines.select(
            self, engine, "audio", normalize=normalize, autocast=autocast, clips=len(clips)
        )
        with torch.inference_mode(), choice.autocast(self.device):
            for idx in _chunks(len(clips), batch_size):
                out[idx.start : idx.stop] = self._embed_clips(
                    [clips[i] for i in idx],
                    long_audio,
                    data_filling,
                    generator,
                    normalize,
                    batch_size,
                    encode=choice.encode,
                )
                bar.update(len(idx))
        bar.close()
        return out

    def _embed_clips(
        self, clips, long_audio, data_filling, generator, normalize, batch_size, encode=None
    ) -> torch.Tensor:
        dev = self.device
        encode = encode or self.encode_audio
        batch = prepare_batch(
            clips, self.cfg.audio, fusion=self.cfg.enable_fusion, data_filling=data_filling,
            long_audio=long_audio, generator=generator, device=dev,
        )  # fmt: skip
        if batch.waveform is not None:
            feats = torch.cat(
                [
                    encode(batch.waveform[r.start : r.stop])
                    for r in _chunks(len(batch.waveform), batch_size)
                ]
            )
        else:
            feats = encode(mel_fusion=batch.mel_fusion, longer=batch.longer)
        feats = feats.float().cpu()
        if len(feats) != len(clips):  # several windows per clip: mean of normalised windows
            pooled = torch.zeros(len(clips), feats.shape[1]).index_add_(
                0, batch.owner, F.normalize(feats, dim=-1)
            )
            feats = pooled / torch.bincount(batch.owner, minlength=len(clips))[:, None]
        return F.normalize(feats, dim=-1) if normalize else feats

    def embed_audio_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        batch_size: int = 64,
        num_workers: int = 4,
        strict: bool = False,
        progress: bool = True,
        **kwargs,
    ) -> torch.Tensor | list:
        """Embeddings (N, 512) of audio files, row i for paths[i].

        Files are decoded with soundfile (wav / flac / ogg), downmixed by mean and resampled to
        48 kHz in ``num_workers`` threads. A file that cannot be decoded is logged by name and
        counted; its row is NaN (``strict=True`` raises instead). ``self.last_failures`` holds
        {path: reason} of the last call. Other keyword arguments go to ``embed_audio``; with
        ``frames=True`` the result is a list with one ``Frames`` per path (None where decoding
        failed).
        """
        frames = bool(kwargs.get("frames"))
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise ValueError(f"paths must be a list of files, got the single path {paths!r}")
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError("no audio files given")
        batch_size = validate.check_positive_int(batch_size, "batch_size")
        sr = self.cfg.audio.sample_rate
        out: torch.Tensor | list = (
            [None] * len(paths)
            if frames
            else torch.full((len(paths), self.cfg.joint_embed_shape), float("nan"))
        )
        failures: dict[str, str] = {}

        def decode(p: str):
            try:
                return load_audio(p, sr)
            except Exception as exc:  # any decoding problem is reported by name, never dropped
                if strict:
                    raise ValueError(f"cannot decode {p}: {exc}") from exc
                return exc

        if not frames and kwargs.get("engine") in (None, "auto"):
            # auto decides for the whole job (int8_compile pays back over many files), once
            kwargs["engine"] = engines.select(
                self,
                kwargs.get("engine"),
                "audio",
                normalize=kwargs.get("normalize", True),
                autocast=kwargs.get("autocast"),
                clips=len(paths),
            ).engine
        bar = tqdm(total=len(paths), desc="embed files", unit="file", disable=not progress)
        chunks = list(_chunks(len(paths), batch_size))
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            pending = [pool.submit(decode, paths[i]) for i in chunks[0]]
            for n, idx in enumerate(chunks):
                decoded = [f.result() for f in pending]
                # the next batch decodes in the threads while this one is embedded
                nxt = chunks[n + 1] if n + 1 < len(chunks) else ()
                pending = [pool.submit(decode, paths[i]) for i in nxt]
                ok = [i for i, d in zip(idx, decoded) if isinstance(d, torch.Tensor)]
                for i, d in zip(idx, decoded):
                    if not isinstance(d, torch.Tensor):
                        failures[paths[i]] = f"{type(d).__name__}: {d}"
                        log.warning("could not decode %s: %s", paths[i], d)
                if ok:
                    clips = [d for d in decoded if isinstance(d, torch.Tensor)]
                    got = self.embed_audio(clips, sr, batch_size=batch_size, **kwargs)
                    if frames:  # a list of Frames, one per decoded clip
                        for i, f in zip(ok, got):
                            out[i] = f
                    else:
                        out[ok] = got
                bar.update(len(idx))
        bar.close()
        if failures:
            log.warning(
                "%d of %d files could not be decoded; their rows are NaN", len(failures), len(paths)
            )
        self.last_failures = failures
        return out

    # ---------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The text tower's tokenizer: {"input_ids", "attention_mask"}, (B, context_length)."""
        from clap_fast.text import get_tokenizer

        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        return get_tokenizer(self.cfg.text)(texts)

    def embed_text(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 256,
        normalize: bool = True,
        engine: str | None = None,
    ) -> torch.Tensor:
        """Text embeddings (B, 512); needs the tower's tokenizer (see ``embed_text_tokens``)."""
        tok = self.tokenize(texts)
        return self.embed_text_tokens(
            tok["input_ids"], tok["attention_mask"], batch_size=batch_size, normalize=normalize,
            engine=engine,
        )  # fmt: skip

    def embed_text_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        batch_size: int = 256,
        normalize: bool = True,
        engine: str | None = None,
    ) -> torch.Tensor:
        """Text embeddings (B, 512) from (B, L) token ids (and mask); no tokenizer needed.

        ``engine``: as in ``embed_audio`` (``clap_fast.engines``)."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be a (batch, length) integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
        batch_size = validate.check_positive_int(batch_size, "batch_size")
        self._check_tokens(input_ids)
        dev = self.device
        outs = []
        choice = engines.select(self, engine, "text", normalize=normalize)
        encode = choice.encode or self.encode_text
        with torch.inference_mode(), choice.autocast(dev):
            for r in _chunks(len(input_ids), batch_size):
                mask = (
                    attention_mask[r.start : r.stop].to(dev) if attention_mask is not None else None
                )
                outs.append(encode(input_ids[r.start : r.stop].to(dev).long(), mask).float().cpu())
        feats = torch.cat(outs)
        return F.normalize(feats, dim=-1) if normalize else feats

    def _check_tokens(self, input_ids: torch.Tensor) -> None:
        """Ids inside the tower's vocabulary, rows no longer than its positions allow."""
        t = self.cfg.text
        if self.text_type == "transformer":
            validate.check_token_ids(input_ids, t.vocab_size, t.context_length, exact=True)
            return
        c = self.text_branch.config
        limit = c.max_position_embeddings
        if self.text_type == "roberta":  # positions start after the padding index
            limit -= (c.pad_token_id or 0) + 1
        validate.check_token_ids(input_ids, c.vocab_size, limit, exact=False)

    # ----------------------------------------------------------- zero-shot
    def zero_shot(
        self,
        audio_embeddings: torch.Tensor,
        labels: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        *,
        text_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class probabilities (B, C): softmax over labels of exp(logit_scale_a) · a · tᵀ.

        ``text_embeddings`` (C, 512) skips the tokenizer (e.g. from ``embed_text_tokens``).
        """
        labels = validate.check_labels(labels)
        template = validate.check_template(template)
        a = torch.as_tensor(audio_embeddings).float().cpu()
        if a.ndim != 2 or a.shape[1] != self.cfg.joint_embed_shape:
            raise ValueError(
                f"audio_embeddings must be (B, {self.cfg.joint_embed_shape}), got {tuple(a.shape)}"
            )
        t = (
            text_embeddings
            if text_embeddings is not None
            else self.embed_text([template.format(x) for x in labels])
        )
        if t.shape[0] != len(labels):
            raise ValueError(f"{t.shape[0]} text embeddings for {len(labels)} labels")
        scale = self.logit_scale_a.detach().float().cpu().exp()
        return torch.softmax(scale * a @ t.float().cpu().T, dim=-1)
