"""Checkpoints in and out: LAION ``.pt``, HF ``ClapModel``, our safetensors + JSON format.

Loading never unpickles arbitrary code: ``.pt`` files go through ``torch.load(weights_only=True)``
with only NumPy's scalar/dtype globals allow-listed (LAION's envelope stores a NumPy scalar).
The architecture (HTSAT tiny/base/large or PANN 6/10/14, fusion, text tower and its size) is
detected from the weights, so a HTSAT-base checkpoint cannot be loaded into a tiny model.

This module knows formats, not the model class (it imports nothing of ``clap_fast.model``):
``clap_fast.factory`` / ``CLAP.from_pretrained`` build the model from ``read_checkpoint``.
``fix_laion_state_dict`` is the one place where LAION / transformers-version differences
between a checkpoint and our model are reconciled.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clap_fast.config import CLAPConfig, HTSATConfig, get_config
from clap_fast.errors import CheckpointError

if TYPE_CHECKING:
    from clap_fast.model import CLAP

__all__ = [
    "RELEASED",
    "CheckpointError",
    "read_state_dict",
    "detect_config",
    "from_hf_state_dict",
    "to_laion_state_dict",
    "save_laion_checkpoint",
    "read_checkpoint",
    "fix_laion_state_dict",
    "save_pretrained",
    "load_into",
]

log = logging.getLogger(__name__)

# Released LAION checkpoints (Hugging Face repo lukewys/laion_clap): name -> (file, audio arch).
HF_REPO = "lukewys/laion_clap"
RELEASED = {
    "630k-best": "630k-best.pt",
    "630k-audioset-best": "630k-audioset-best.pt",
    "630k-fusion-best": "630k-fusion-best.pt",
    "630k-audioset-fusion-best": "630k-audioset-fusion-best.pt",
    "music_audioset_epoch_15_esc_90.14": "music_audioset_epoch_15_esc_90.14.pt",
    "music_speech_epoch_15_esc_89.25": "music_speech_epoch_15_esc_89.25.pt",
    "music_speech_audioset_epoch_15_esc_89.98": "music_speech_audioset_epoch_15_esc_89.98.pt",
}


def _numpy_scalar():
    """``multiarray.scalar`` by module import, not attribute access: under numpy 1.26 a
    ``numpy._core`` stub can exist (e.g. after transformers touched it) without ``multiarray``."""
    import importlib
    import warnings

    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return importlib.import_module(name).scalar
        except (ImportError, AttributeError):
            continue
    raise CheckpointError(f"numpy {np.__version__}: no multiarray.scalar found")


def _numpy_globals() -> list:
    import numpy.dtypes as npd

    scalar = _numpy_scalar()
    allowed = [
        scalar,
        np.dtype,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    allowed += [getattr(npd, n) for n in dir(npd) if n.endswith("DType")]
    return allowed


def _safe_torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file references code outside the allow-list of "
            f"tensors, containers and NumPy scalars ({str(exc).splitlines()[0][:300]})"
        ) from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    except Exception as exc:  # random bytes end in arbitrary errors ("pop from empty list")
        raise CheckpointError(
            f"{path}: not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read weights from a file or directory, converted to our (LAION, unprefixed) key layout.

    Returns (state_dict, info) where info has "format" (laion | ours | hf) and, for our format,
    the saved "config".
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    info: dict = {}
    if path.is_dir():
        if (path / "config.json").exists() and (path / "model.safetensors").exists():
            cfg = json.loads((path / "config.json").read_text())
            if "clap_fast" in cfg:
                info.update(format="ours", config=cfg["clap_fast"])
                return _read_safetensors(path / "model.safetensors"), info
            info.update(format="hf", hf_config=cfg)
            return from_hf_state_dict(_read_safetensors(path / "model.safetensors")), info
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model.bin"))
        if not files:
            raise CheckpointError(
                f"{path}: no model.safetensors / pytorch_model.bin in the directory"
            )
        path = files[0]
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path)
        meta = _safetensors_metadata(path)
        if "clap_fast" in meta:
            info.update(format="ours", config=json.loads(meta["clap_fast"]))
            return sd, info
    else:
        obj = _safe_torch_load(path)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            info["epoch"] = obj.get("epoch")
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
        sd = dict(obj)
    sd = _strip_prefix(sd)
    if any(k.startswith(("audio_model.", "text_model.")) for k in sd):
        info["format"] = "hf"
        return from_hf_state_dict(sd), info
    info["format"] = "laion"
    return sd, info


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefix LAION-layout weights sit under: DDP's ``module.``, or the wrapper of
    open_clip-style CLAP copies embedded in other models (AudioLDM / MusicLDM keep them under
    ``cond_stage_model.model.``). Keys outside that prefix (the host model's own) are ignored."""
    anchor = next((k for k in sd if "audio_branch." in k or k.startswith("audio_model.")), None)
    if anchor is None:
        return dict(sd)
    prefix = anchor[: anchor.index("audio_branch.")] if "audio_branch." in anchor else ""
    if not prefix:
        return dict(sd)
    kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if len(kept) < len(sd):
        log.info(
            "using the %d tensors under %r; %d others ignored",
            len(kept),
            prefix,
            len(sd) - len(kept),
        )
    return kept


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# ------------------------------------------------------------------ HF ClapModel


def from_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ClapModel keys -> LAION keys (q, k, v re-fused into qkv).

    HF drops the STFT weights, the filterbank, the shift masks, the classifier head and the
    MLP-loss transforms; those keys are simply absent here and are filled from the model's own
    (deterministic or freshly initialised) values by ``load_into``.
    """
    from clap_fast.hf_format import QKV_PARTS, hf_key_to_ours

    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        key, part = hf_key_to_ours(k)  # other keys are left for load_into to report
        if part is None:
            out[key] = v
        else:
            qkv.setdefault(key, {})[part] = v
    for key, parts in qkv.items():
        if len(parts) != len(QKV_PARTS):
            have = sorted(QKV_PARTS[i] for i in parts)
            raise CheckpointError(f"HF checkpoint lacks part of {key}: has {have}")
        out[key] = torch.cat([parts[i] for i in range(len(QKV_PARTS))], dim=0)
    return out


# ------------------------------------------------------------ architecture detection
def _builtin_htsat(embed_dim: int, depths: list[int], heads: list[int], window: int) -> str | None:
    """The built-in HTSAT architecture with exactly these sizes, if any."""
    from clap_fast.config import list_models

    for name in list_models():
        h = get_config(name).audio.htsat
        if h is not None and (h.embed_dim, list(h.depths), list(h.num_heads), h.window_size) == (
            embed_dim, list(depths), list(heads), window
        ):  # fmt: skip
            return name
    return None


def detect_config(sd: Mapping[str, torch.Tensor]) -> CLAPConfig:
    """The CLAPConfig that fits a LAION-layout state dict (no prefix)."""
    if "audio_branch.patch_embed.proj.weight" in sd:
        c = sd["audio_branch.patch_embed.proj.weight"].shape[0]
        depths = []
        while any(k.startswith(f"audio_branch.layers.{len(depths)}.") for k in sd):
            i = len(depths)
            depths.append(
                len(
                    {
                        k.split(".")[4]
                        for k in sd
                        if k.startswith(f"audio_branch.layers.{i}.blocks.")
                    }
                )
            )
        heads = [
            int(sd[f"audio_branch.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
            for i in range(len(depths))
        ]
        window = (
            int(
                sd["audio_branch.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
                ** 0.5
            )
            + 1
        ) // 2
        names = {96: "tiny", 128: "base", 256: "large"}
        builtin = _builtin_htsat(c, depths, heads, window)  # e.g. HTSAT-mini keeps its name
        base = builtin or f"HTSAT-{names.get(c, 'tiny')}"
        cfg = get_config(base)
        cfg.audio.htsat = HTSATConfig(
            embed_dim=c, depths=depths, num_heads=heads, window_size=window
        )
        if builtin is None:
            cfg.audio.model_name = names.get(c, f"custom-{c}")
        cfg.enable_fusion = "audio_branch.patch_embed.mel_conv2d.weight" in sd
    elif "audio_branch.conv_block1.conv1.weight" in sd:
        if "audio_branch.conv_block6.conv1.weight" in sd:
            name = "PANN-14"
        elif "audio_branch.conv_block5.conv1.weight" in sd:
            name = "PANN-10"
        else:
            name = "PANN-6"
        cfg = get_config(name)
    else:
        raise CheckpointError(
            "cannot detect the audio tower: no HTSAT patch_embed or PANN conv_block1 weights"
        )
    if "audio_branch.head.weight" in sd:
        cfg.audio.class_num = int(sd["audio_branch.head.weight"].shape[0])
    elif "audio_branch.fc_audioset.weight" in sd:
        cfg.audio.class_num = int(sd["audio_branch.fc_audioset.weight"].shape[0])
    cfg.embed_dim = int(sd["audio_projection.0.weight"].shape[1])
    cfg.joint_embed_shape = int(sd["audio_projection.0.weight"].shape[0])
    cfg.text = _detect_text(sd, cfg)
    return cfg


def _detect_text(sd: Mapping[str, torch.Tensor], cfg: CLAPConfig):
    t = cfg.text
    if "token_embedding.weight" in sd:
        t.model_type = "transformer"
        t.vocab_size, t.width = (int(x) for x in sd["token_embedding.weight"].shape)
        t.context_length = int(sd["positional_embedding"].shape[0])
        t.layers = len({k.split(".")[2] for k in sd if k.startswith("text_branch.resblocks.")})
        t.heads = max(1, t.width // 64)
        return t
    if "text_branch.shared.weight" in sd:
        t.model_type = "bart"
        vocab, d = sd["text_branch.shared.weight"].shape
        enc = len({k.split(".")[3] for k in sd if k.startswith("text_branch.encoder.layers.")})
        dec = len({k.split(".")[3] for k in sd if k.startswith("text_branch.decoder.layers.")})
        t.hf = dict(vocab_size=int(vocab), d_model=int(d), encoder_layers=enc, decoder_layers=dec)
        return t
    emb = sd.get("text_branch.embeddings.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(
            "cannot detect the text tower: no token_embedding / text_branch embeddings"
        )
    vocab, hidden = (int(x) for x in emb.shape)
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_branch.encoder.layer.")})
    inter = int(sd["text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0])
    positions = int(sd["text_branch.embeddings.position_embeddings.weight"].shape[0])
    types = int(sd["text_branch.embeddings.token_type_embeddings.weight"].shape[0])
    t.model_type = "roberta" if types == 1 else "bert"
    t.hf = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        max_position_embeddings=positions, num_attention_heads=max(1, hidden // 64), type_vocab_size=types,
    )  # fmt: skip
    return t


# ----------------------------------------------------------------- load / save
# Buffers some transformers versions keep in RoBERTa/BERT state dicts and others do not.
OPTIONAL_TEXT_BUFFERS = (
    "text_branch.embeddings.position_ids",
    "text_branch.embeddings.token_type_ids",
)


def fix_laion_state_dict(
    sd: MutableMapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], prefix: str = ""
) -> list[str]:
    """Reconcile a LAION-layout state dict with our model, in place; returns the keys filled.

    * ``logit_scale_a/_t``: LAION stores them 0-d; ours are shape (1,) (FSDP2 refuses 0-d
      parameters), so 0-d values are reshaped (``to_laion_state_dict`` writes them 0-d again).
    * RoBERTa / BERT ``position_ids`` / ``token_type_ids`` buffers, which some transformers
      versions keep and others do not: dropped when the model lacks them, taken from the model
      (``own``, keys without ``prefix``) when the checkpoint lacks them.
    """
    for name in ("logit_scale_a", "logit_scale_t"):
        key = prefix + name
        if key in sd and sd[key].dim() == 0:
            sd[key] = sd[key].reshape(1)
    filled = []
    for name in OPTIONAL_TEXT_BUFFERS:
        key = prefix + name
        if name not in own:
            sd.pop(key, None)
        elif key not in sd:
            sd[key] = own[name].detach().clone()
            filled.append(name)
    return filled


def load_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, fill_missing: tuple[str, ...] = ()
) -> list[str]:
    """Strictly load ``sd`` into ``model``; keys matching ``fill_missing`` prefixes/substrings may
    be absent (they keep the model's values). Returns the keys that were filled.

    Raises CheckpointError naming missing / unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    sd = dict(sd)
    filled = fix_laion_state_dict(sd, own)
    missing = [k for k in own if k not in sd]
    filled += [k for k in missing if any(f in k for f in fill_missing)]
    missing = [k for k in missing if k not in filled]
    unexpected = [k for k in sd if k not in own]
    not_tensors = [k for k in sd if k in own and not isinstance(sd[k], torch.Tensor)]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and k not in not_tensors and sd[k].shape != own[k].shape
    ]
    # float weights from integer / bool tensors would be cast silently by load_state_dict
    dtypes = [
        f"{k}: checkpoint {sd[k].dtype} vs model {own[k].dtype}"
        for k in sd
        if k in own and k not in not_tensors and own[k].is_floating_point()
        and not sd[k].is_floating_point()
    ]  # fmt: skip
    if missing or unexpected or shapes or dtypes or not_tensors:
        parts = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
            ("integer tensors for float weights", dtypes),
            ("values that are not tensors", not_tensors),
        ):
            if items:
                more = f" … and {len(items) - 12} more" if len(items) > 12 else ""
                parts.append(f"{len(items)} {title}: {', '.join(items[:12])}{more}")
        raise CheckpointError("checkpoint does not fit the model — " + "; ".join(parts))
    for k in filled:
        sd[k] = own[k]
    model.load_state_dict(sd, strict=True)
    return filled


# Keys HF ClapModel does not carry; filled from the model (deterministic buffers or fresh init).
HF_FILLED = (
    "spectrogram_extractor.", "logmel_extractor.", "attn_mask", "tscam_conv.", "audio_branch.head.",
    "audio_transform.", "text_transform.",
)  # fmt: skip


def _resolve_released(name: str) -> Path:
    fname = RELEASED[name.removesuffix(".pt")]
    from clap_fast.hf_format import resolve_hub_file

    return resolve_hub_file(HF_REPO, fname)  # cache first; offline: one line, no retries


def read_checkpoint(
    name_or_path: str | os.PathLike, *, text_overrides: dict[str, Any] | None = None
) -> tuple[CLAPConfig, dict[str, torch.Tensor], dict]:
    """A checkpoint (path, or a released name fetched via huggingface_hub) -> (the config that
    fits it, its state dict in our layout, info with "format" (laion | ours | hf) and "path")."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path).removesuffix(".pt") in RELEASED:
        path = _resolve_released(str(name_or_path))
    elif not path.exists():
        from clap_fast import hf_format

        if hf_format.is_hub_id(str(name_or_path)):  # e.g. laion/clap-htsat-unfused
            path = hf_format.resolve_hub_id(str(name_or_path))
    sd, info = read_state_dict(path)
    cfg = (
        CLAPConfig.from_dict(info["config"]) if info.get("format") == "ours" else detect_config(sd)
    )
    hf_text = (info.get("hf_config") or {}).get("text_config") or {}
    for k in ("num_attention_heads", "layer_norm_eps"):
        if k in hf_text and cfg.text.model_type != "transformer":
            cfg.text.hf[k] = hf_text[k]
    for k, v in (text_overrides or {}).items():
        setattr(cfg.text, k, v)
    info["path"] = path
    return cfg, sd, info


def to_laion_state_dict(model: CLAP) -> dict[str, torch.Tensor]:
    """Our model's weights in LAION's layout: ``module.`` prefix, 0-d logit scales, position_ids."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "text_branch.embeddings.token_type_ids":
            continue
        v = v.detach().cpu()
        if k in ("logit_scale_a", "logit_scale_t"):
            v = v.reshape(())
        sd["module." + k] = v
    if model.text_type == "roberta" and "module.text_branch.embeddings.position_ids" not in sd:
        n = model.text_branch.config.max_position_embeddings
        sd["module.text_branch.embeddings.position_ids"] = torch.arange(n)[None]
    return sd


def save_laion_checkpoint(
    model: CLAP, path: str | os.PathLike, *, epoch: int = 0, name: str | None = None
) -> None:
    """A single-file LAION-format checkpoint ({epoch, name, state_dict}) that laion_clap loads."""
    torch.save(
        {"epoch": epoch, "name": name or model.cfg.name, "state_dict": to_laion_state_dict(model)},
        path,
    )


def save_pretrained(model: CLAP, directory: str | os.PathLike) -> None:
    """Our format: ``model.safetensors`` (config in its metadata too) + ``config.json``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.to_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = d / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"clap_fast": json.dumps(cfg)})
    os.replace(tmp, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"clap_fast": cfg}, indent=2))
