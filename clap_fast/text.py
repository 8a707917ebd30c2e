"""Text towers and their tokenizers.

* ``roberta`` (LAION's released checkpoints), ``bert``, ``bart``: transformers models built from
  a config (never a download at construction); LAION pools RoBERTa/BERT with ``pooler_output``
  and BART with the mean of the encoder's last hidden state.
* ``transformer``: the CLIP-style causal transformer of the original README (width 512, 12
  layers, 8 heads), pooled at the EOT token, with open_clip's BPE tokenizer (shipped inside
  open_clip_torch, works offline).

Tokenizers of the HF towers come from the Hugging Face cache (downloaded on first use when
online); offline without a cache they raise an error naming what to fetch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from clap_fast.config import TextConfig

__all__ = ["build_hf_tower", "CLIPTransformer", "get_tokenizer", "hf_tower_width", "HF_NAMES"]

HF_NAMES = {"roberta": "roberta-base", "bert": "bert-base-uncased", "bart": "facebook/bart-base"}


def _hf_config(cfg: TextConfig):
    import transformers

    if cfg.model_type == "roberta":
        # roberta-base's config, written out so that nothing is fetched.
        base = dict(
            vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )  # fmt: skip
        return transformers.RobertaConfig(**{**base, **cfg.hf})
    if cfg.model_type == "bert":
        return transformers.BertConfig(**cfg.hf)  # defaults are bert-base-uncased
    if cfg.model_type == "bart":
        return transformers.BartConfig(**cfg.hf)  # defaults are bart-base-sized
    raise ValueError(f"not a transformers tower: {cfg.model_type!r}")


def build_hf_tower(cfg: TextConfig) -> nn.Module:
    """A randomly initialised RobertaModel / BertModel / BartModel from its config."""
    import transformers

    hf_cfg = _hf_config(cfg)
    if cfg.model_type == "roberta":
        return transformers.RobertaModel(hf_cfg)
    if cfg.model_type == "bert":
        return transformers.BertModel(hf_cfg)
    return transformers.BartModel(hf_cfg)


def hf_tower_width(tower: nn.Module) -> int:
    return int(
        tower.config.hidden_size if hasattr(tower.config, "hidden_size") else tower.config.d_model
    )


def hf_tower_forward(
    kind: str, tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L) ids and mask -> (B, width) pooled features, LAION's pooling per tower."""
    if kind == "bart":
        out = tower(input_ids=input_ids, attention_mask=attention_mask)
        return out["encoder_last_hidden_state"].mean(dim=1)
    kwargs = {}
    if kind == "bert":
        kwargs["token_type_ids"] = torch.zeros_like(input_ids)
    if kind == "roberta":
        # RoBERTa's own position ids (pad + running count of non-pad tokens), from a float
        # cumsum: transformers uses an int32 CumSum, which TensorRT's ONNX parser rejects
        # (float types only). Exact below 2^24 tokens.
        pad = tower.config.pad_token_id
        keep = (input_ids != pad).float()
        kwargs["position_ids"] = (torch.cumsum(keep, dim=1) * keep).long() + pad
    return tower(input_ids=input_ids, attention_mask=attention_mask, **kwargs)["pooler_output"]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    """The residual blocks of the CLIP-style tower (LAION's ``text_branch``); (L, B, W) layout."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for blk in self.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, attn_mask)
        return x


Tokenizer = Callable[[Sequence[str]], dict[str, torch.Tensor]]


@functools.cache
def _hf_tokenizer(name: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # network, missing cache, …: one clear message
        raise RuntimeError(
            f"the tokenizer of {name!r} is not in the Hugging Face cache and could not be "
            f"downloaded ({type(exc).__name__}). Fetch it once online (e.g. "
            f"`huggingface-cli download {name} vocab.json merges.txt tokenizer_config.json "
            f"config.json`), or call embed_text_tokens() with your own token ids."
        ) from exc


def get_tokenizer(cfg: TextConfig) -> Tokenizer:
    """texts -> {"input_ids": (B, L) int64, "attention_mask": (B, L) int64}, padded to max length."""
    if cfg.model_type == "transformer":
        import open_clip

        def clip_tok(texts: Sequence[str]) -> dict[str, torch.Tensor]:
            ids = open_clip.tokenize(list(texts), context_length=cfg.context_length)
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

        return clip_tok
    tok = _hf_tokenizer(HF_NAMES[cfg.model_type])

    def hf_tok(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = tok(
            list(texts), padding="max_length", truncation=True,
            max_length=cfg.context_length, return_tensors="pt",
        )  # fmt: skip
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    return hf_tok
