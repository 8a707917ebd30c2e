"""Hugging Face interop: hub ids in, transformers' ``ClapModel`` layout out.

* ``resolve_hub_id("laion/clap-htsat-unfused")``: the repo's ``config.json`` + weights through
  huggingface_hub's cache. The offline state is checked first: offline (``HF_HUB_OFFLINE``)
  and not cached gives one ``CheckpointError`` line naming the files to fetch, with no network
  attempt; online, one download attempt (no retry loop of ours) and the same one line on failure.
* ``save_hf(model, directory)``: a folder (``config.json`` + ``model.safetensors``) that
  ``transformers.ClapModel.from_pretrained`` loads, with the same embeddings. HF's ClapModel has
  HTS-AT audio and RoBERTa text only; other towers are refused. HF does not keep LAION's STFT
  weights, filterbank or classifier head, so those are not in the folder (our loader refills them
  from their deterministic values, as for any HF checkpoint).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

__all__ = [
    "is_hub_id",
    "resolve_hub_id",
    "resolve_hub_file",
    "hf_config",
    "hf_key_to_ours",
    "QKV_PARTS",
    "to_hf_state_dict",
    "save_hf",
]

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(str(name))) and not Path(name).exists()


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def resolve_hub_id(repo_id: str) -> Path:
    """Local folder holding ``config.json`` and the weights of hub repo ``repo_id``."""
    from clap_fast.errors import CheckpointError

    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"{repo_id!r} looks like a Hugging Face hub id, which needs huggingface_hub"
        ) from exc
    patterns = ["config.json", *_WEIGHTS]
    fetch = f"huggingface-cli download {repo_id} config.json model.safetensors"
    try:  # the cache first: no network
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if any((path / w).exists() for w in _WEIGHTS):
            return path
    except Exception:  # noqa: BLE001 - not cached (the exception type varies by version)
        pass
    if _offline():
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"fetch it where there is network: {fetch}"
        )
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - one line, whatever went wrong
        raise CheckpointError(
            f"could not fetch {repo_id} from the Hugging Face hub ({type(exc).__name__}); "
            f"fetch it by hand: {fetch}"
        ) from None
    if not any((path / w).exists() for w in _WEIGHTS):
        raise CheckpointError(f"{repo_id} has no {' or '.join(_WEIGHTS)}: not a ClapModel repo")
    return path


def resolve_hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo: the cache first; offline and not cached, one line, no network."""
    from huggingface_hub import hf_hub_download

    from clap_fast.errors import CheckpointError

    fetch = f"huggingface-cli download {repo_id} {filename}"
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        pass
    if _offline():
        raise CheckpointError(
            f"{filename} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; fetch it "
            f"where there is network ({fetch}) or pass the file's path"
        )
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # noqa: BLE001 - one line, whatever went wrong
        raise CheckpointError(
            f"could not fetch {filename} from the Hugging Face repo {repo_id} "
            f"({type(exc).__name__}); fetch it by hand ({fetch}) and pass its path"
        ) from None


def hf_config(model):
    """transformers ``ClapConfig`` for a clap_fast model (HTS-AT + RoBERTa)."""
    import transformers

    cfg = model.cfg
    h = cfg.audio.htsat
    if cfg.audio.model_type != "HTSAT" or h is None or model.text_type != "roberta":
        raise ValueError(
            f"format='hf' needs HTS-AT audio and RoBERTa text (transformers' ClapModel has only "
            f"those); this model has {cfg.audio.model_type} + {model.text_type}"
        )
    text = model.text_branch.config.to_dict()
    for k in ("architectures", "model_type", "transformers_version", "_name_or_path"):
        text.pop(k, None)
    text.update(projection_dim=cfg.joint_embed_shape, projection_hidden_act="relu")
    audio = dict(
        window_size=h.window_size, num_mel_bins=cfg.audio.mel_bins, spec_size=h.spec_size,
        patch_embeds_hidden_size=h.embed_dim, depths=list(h.depths),
        num_attention_heads=list(h.num_heads), hidden_size=h.embed_dim * 2 ** (len(h.depths) - 1),
        num_classes=cfg.audio.class_num, projection_dim=cfg.joint_embed_shape,
        enable_fusion=cfg.enable_fusion, fusion_type=cfg.fusion_type if cfg.enable_fusion else None,
        projection_hidden_act="relu",
    )  # fmt: skip
    return transformers.ClapConfig(
        text_config=text, audio_config=audio, projection_dim=cfg.joint_embed_shape
    )


_HF_BLOCK = [
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attn.relative_position_index"),
    ("attention.output.dense", "attn.proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
]
_QKV = re.compile(r"(layers\.\d+\.blocks\.\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")


QKV_PARTS = ("query", "key", "value")
"""HF's separate attention projections, in the order of our fused ``qkv``."""


def hf_key_to_ours(hf_key: str) -> tuple[str, int | None]:
    """One ClapModel key -> (our key, index in ``QKV_PARTS`` of the slice of our fused ``qkv``
    it holds, or None). Used both ways: ``checkpoint.from_hf_state_dict`` and
    ``to_hf_state_dict``; keys it does not know come back unchanged."""
    if hf_key.startswith("text_model."):
        return "text_branch." + hf_key[len("text_model.") :], None
    if hf_key.startswith(("text_projection.", "audio_projection.")):
        return hf_key.replace(".linear1.", ".0.").replace(".linear2.", ".2."), None
    if hf_key.startswith("audio_model.audio_encoder."):
        rest = hf_key[len("audio_model.audio_encoder.") :]
        m = _QKV.match(rest)
        if m:
            return f"audio_branch.{m[1]}.attn.qkv.{m[3]}", QKV_PARTS.index(m[2])
        for a, b in _HF_BLOCK:
            rest = re.sub(rf"(layers\.\d+\.blocks\.\d+)\.{re.escape(a)}\b", rf"\1.{b}", rest)
        if rest.startswith("batch_norm."):
            rest = "bn0." + rest[len("batch_norm.") :]
        return "audio_branch." + rest, None
    return hf_key, None


def to_hf_state_dict(model, hf_state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Our weights under ClapModel's keys (``hf_state``: a ClapModel's state dict, for keys and
    shapes). Returns (state dict, HF keys we have no tensor for, which keep ``hf_state``'s)."""
    ours = model.state_dict()
    out, missing = {}, []
    for k, ref in hf_state.items():
        key, part = hf_key_to_ours(k)
        if key not in ours:
            out[k] = ref
            missing.append(k)
            continue
        v = ours[key].detach().cpu()
        if part is not None:
            v = v.chunk(3, dim=0)[part]
        if v.numel() != ref.numel():
            raise ValueError(
                f"{k}: our {key} has shape {tuple(v.shape)}, HF wants {tuple(ref.shape)}"
            )
        out[k] = v.reshape(ref.shape).to(ref.dtype).contiguous()
    return out, missing


def save_hf(model, directory: str | os.PathLike) -> None:
    """Write ``directory`` in transformers' ClapModel layout (``ClapModel.from_pretrained`` loads it)."""
    import transformers

    cfg = hf_config(model)
    hf = transformers.ClapModel(cfg).eval()
    sd, missing = to_hf_state_dict(model, hf.state_dict())
    if missing:
        log.info("%d ClapModel keys have no clap_fast tensor and keep HF's values (%s …)",
                 len(missing), missing[0])  # fmt: skip
    hf.load_state_dict(sd, strict=True)
    Path(directory).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory), safe_serialization=True)
