"""onnxruntime runner for the exported encoders.

The CPU build of onnxruntime (``pip install onnxruntime``) offers ``CPUExecutionProvider``; the
GPU build (``onnxruntime-gpu``, which cannot be installed beside ``onnxruntime``: both own the
``onnxruntime`` module and overwrite each other) adds ``CUDAExecutionProvider`` and, where
TensorRT's libraries are present, ``TensorrtExecutionProvider``. ``providers="auto"`` takes the
best available in that order, always ending with the CPU.

    runner = OnnxRunner("exported/htsat-tiny_audio.onnx")
    emb = runner.embed_audio(waveform)                 # (B, 480000) float32 -> (B, 512)
    emb = OnnxRunner("…_text.onnx").embed_text_tokens(input_ids, attention_mask)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OnnxRunner", "available_providers", "resolve_providers"]

_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime build."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """ "auto" -> the available ones among TensorRT, CUDA, CPU (in that order); "cpu" / "cuda" /
    "tensorrt" or explicit names -> checked against the build, with a clear error naming the fix."""
    have = available_providers()
    if providers == "auto":
        return [p for p in _PREFERENCE if p in have]
    alias = {
        "cpu": "CPUExecutionProvider",
        "cuda": "CUDAExecutionProvider",
        "tensorrt": "TensorrtExecutionProvider",
    }
    names = [providers] if isinstance(providers, str) else list(providers)
    wanted = [alias.get(p, p) for p in names]
    missing = [p for p in wanted if p not in have]
    if missing:
        hint = (
            " (install onnxruntime-gpu instead of onnxruntime)"
            if "CPUExecutionProvider" not in missing
            else ""
        )
        raise RuntimeError(
            f"onnxruntime provider(s) {missing} not available; this build has {have}{hint}"
        )
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")  # fallback for nodes the GPU providers skip
    return wanted


class OnnxRunner:
    """An onnxruntime session over one exported encoder graph.

    Args:
        path: the ``.onnx`` file.
        providers: "auto", "cpu", "cuda", "tensorrt" or a list of provider names.
        threads: intra-op threads (None: onnxruntime's default, all cores).
        provider_options: per-provider options, e.g. ``{"TensorrtExecutionProvider":
            {"trt_fp16_enable": True, "trt_engine_cache_enable": True}}``.
    """

    def __init__(
        self,
        path: str | Path,
        providers: str | Sequence[str] = "auto",
        *,
        threads: int | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"ONNX graph not found: {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.providers = resolve_providers(providers)
        popts = [dict((provider_options or {}).get(p, {})) for p in self.providers]
        self.session = ort.InferenceSession(
            str(self.path), opts, providers=self.providers, provider_options=popts
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, torch.Tensor | np.ndarray]) -> torch.Tensor:
        """Named inputs -> the first output as a CPU float32 tensor."""
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise ValueError(
                f"unknown inputs {sorted(unknown)}; the graph takes {self.input_names}"
            )
        arrays = {
            k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in feeds.items()
        }
        out = self.session.run(None, arrays)[0]
        return torch.from_numpy(np.ascontiguousarray(out)).float()

    def embed_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 480000) float32 prepared waveform -> (B, 512) L2-normalised embedding."""
        return self.run({"waveform": waveform.float()})

    def embed_audio_fusion(self, mel_fusion: torch.Tensor, longer: torch.Tensor) -> torch.Tensor:
        """Fusion graphs: (B, 4, 1001, 64) mel views + (B,) bool -> (B, 512)."""
        return self.run({"mel_fusion": mel_fusion.float(), "longer": longer.bool()})

    def embed_text_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) int64 ids and mask -> (B, 512) L2-normalised embedding.

        A None mask means all ones; graphs without a mask input (CLIP-style) ignore it."""
        feeds = {"input_ids": input_ids.long()}
        if "attention_mask" in self.input_names:  # CLIP-style graphs drop the unused mask
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            feeds["attention_mask"] = mask.long()
        return self.run(feeds)
