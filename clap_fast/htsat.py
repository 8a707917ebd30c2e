"""HTS-AT (hierarchical token-semantic audio transformer), LAION CLAP's audio tower.

State-dict keys equal LAION's (``shared/reference/laion-keys/htsat_*.tsv``). Differences from
LAION's code, none of which changes the embedding:

* window attention runs through ``ops.window_attention`` (a fused Triton kernel on the GPU;
  the roll / partition / mask arithmetic of the reference on the CPU), with the qkv projection
  applied before the shift (both act per token, so the order does not matter);
* no attention maps are kept or averaged in eval mode;
* the embedding is the mean of the final tokens; the classifier head (``tscam_conv``, ``head``)
  and the frame-level outputs are kept as weights only (``forward_classifier`` computes them).

The forward is the one every exporter traces (ONNX, AOTInductor, TensorRT through ONNX), so it
is written in exportable forms: the bicubic time resize is a constant 4-tap gather + weighted
sum (what ``F.interpolate(bicubic, align_corners=True)`` computes; TensorRT has no cubic
Resize), the log-mel's export branch lives in ``ops.log_mel``, and in eval mode the fusion
patch embed fuses every row and selects with ``where`` (no ``nonzero``, no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clap_fast import ops
from clap_fast.config import AudioConfig, HTSATConfig
from clap_fast.frontend import LaionLogmel, LaionSpectrogramWeights, log_mel_for, spec_augment
from kernels.window_attention_ref import relative_position_index, shift_mask

__all__ = ["HTSAT", "AFF", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x / keep * torch.floor(mask + keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """qkv projection -> ops.window_attention -> output projection, on a (B, H, W, C) grid."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size).clone()
        )
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, shift_size: int) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        out = ops.window_attention(
            self.qkv(x),
            self.relative_position_bias_table,
            num_heads=self.num_heads,
            window_size=self.window_size,
            shift_size=shift_size,
            scale=self.scale,
        )
        return self.proj(out)


class SwinBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window_size: int,
        shift: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        if resolution <= window_size:  # as LAION: one window covers the grid, no shift
            window_size, shift = resolution, False
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)
        if self.shift_size:
            # Kept for checkpoint compatibility only: the ops compute the mask from indices.
            mask = shift_mask(resolution, resolution, window_size, self.shift_size)
            self.register_buffer("attn_mask", mask.clone())
        else:
            self.register_buffer("attn_mask", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r = self.resolution
        y = self.attn(self.norm1(x).view(b, r, r, c), self.shift_size).view(b, n, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window_size, i % 2 == 1, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class AFF(nn.Module):
    """Attentional feature fusion (2-D): out = 2·x·w + 2·r·(1 − w), w = σ(local + global)."""

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        inter = channels // r
        self.local_att = nn.Sequential(
            nn.Conv2d(channels, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(inplace=True),
            nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels),
        )  # fmt: skip
        self.global_att = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(inplace=True),
            nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x, residual: (B, C, H, W) -> (B, C, H, W)."""
        xa = x + residual
        # As LAION: BatchNorm in training mode needs two samples. Eval-mode BatchNorm uses
        # running statistics, where the guard would only pin an exported batch size.
        single = self.training and xa.shape[0] == 1
        if single:
            xa = torch.cat([xa, xa], dim=0)
        w = torch.sigmoid(self.local_att(xa) + self.global_att(xa))
        if single:
            w = w[:1]
        return 2 * x * w + 2 * residual * (1 - w)


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch: int, fusion: bool) -> None:
        super().__init__()
        self.fusion = fusion
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)
        if fusion:
            self.mel_conv2d = nn.Conv2d(
                1, embed_dim, kernel_size=(patch, patch * 3), stride=(patch, patch * 3)
            )
            self.fusion_model = AFF(embed_dim)

    def forward(self, x: torch.Tensor, longer: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_in, S, S) image -> (B, tokens, embed_dim); fusion views in channels 1..3,
        ``longer`` (B,) bool marks the rows that take the fusion."""
        g = self.proj(x[:, :1])
        if self.fusion and longer is not None:
            if self.training:
                # Training-mode BatchNorm statistics depend on which rows are fused: fuse only
                # the longer rows, as LAION does.
                idx = torch.nonzero(longer, as_tuple=True)[0]  # host sync: data-dependent rows
                if idx.numel() > 0:
                    g = g.clone()
                    g[idx] = self.fusion_model(g[idx], self._local(x[idx, 1:], g.shape[-1]))
            else:
                # Eval: BatchNorms use running statistics, so a row's fusion does not depend on
                # the other rows. Fuse every row and select: no host sync, static shapes (what
                # exporters need), at the cost of the AFF block for short rows too.
                fused = self.fusion_model(g, self._local(x[:, 1:], g.shape[-1]))
                g = torch.where(longer.reshape(-1, 1, 1, 1), fused, g)
        return self.norm(g.flatten(2).transpose(1, 2))

    def _local(self, views: torch.Tensor, width: int) -> torch.Tensor:
        """(N, 3, H, W) crop views -> (N, embed_dim, H', width) local features (LAION's
        ``mel_conv2d`` over each view, the views side by side, padded / cut to ``width``)."""
        nb, nc, h, w = views.shape
        local = self.mel_conv2d(views.reshape(nb * nc, 1, h, w))
        local = local.reshape(nb, nc, *local.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)
        if local.shape[-1] < width:
            return F.pad(local, (0, width - local.shape[-1]))
        return local[..., :width]


def bicubic_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-tap form of ``F.interpolate(mode="bicubic", align_corners=True)`` along one axis.

    Returns (index (n_out, 4) int64, weight (n_out, 4) float32) such that output row i is
    ``sum_k weight[i, k] * input[index[i, k]]``. The weights are read off PyTorch's own
    interpolation of an identity (its float32 arithmetic, edge taps clamped and merged), so
    the gather form equals ``F.interpolate`` to float32 rounding. Built once, eagerly.
    """
    with torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float32)[None, None]
        m = F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=True)[0, 0]
        index = m.abs().topk(4, dim=1).indices.sort(dim=1).values  # the (at most) 4 taps
        return index.contiguous(), m.gather(1, index).contiguous()


class HTSAT(nn.Module):
    """HTS-AT audio tower: waveform (or fusion mel views) -> pooled embedding (B, 8C)."""

    def __init__(self, cfg: AudioConfig, enable_fusion: bool = False) -> None:
        super().__init__()
        h = cfg.htsat or HTSATConfig()
        self.cfg = cfg
        self.enable_fusion = enable_fusion
        self.spec_size = h.spec_size
        self.freq_ratio = h.spec_size // cfg.mel_bins
        self.num_features = h.embed_dim * 2 ** (len(h.depths) - 1)
        self.spectrogram_extractor = LaionSpectrogramWeights(cfg.window_size)
        self.logmel_extractor = LaionLogmel(cfg)
        self.bn0 = nn.BatchNorm2d(cfg.mel_bins)
        patch = 4
        self.patch_embed = PatchEmbed(h.embed_dim, patch, enable_fusion)
        res = h.spec_size // patch
        dpr = torch.linspace(0, h.drop_path_rate, sum(h.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(h.depths):
            lo = sum(h.depths[:i])
            self.layers.append(
                BasicLayer(
                    h.embed_dim * 2**i, res // 2**i, depth, h.num_heads[i], h.window_size,
                    dpr[lo : lo + depth], downsample=i < len(h.depths) - 1,
                )
            )  # fmt: skip
        self.norm = nn.LayerNorm(self.num_features)
        sf = h.spec_size // 2 ** (len(h.depths) - 1) // patch // self.freq_ratio
        self.tscam_conv = nn.Conv2d(
            self.num_features, cfg.class_num, kernel_size=(sf, 3), padding=(0, 1)
        )
        self.head = nn.Linear(cfg.class_num, cfg.class_num)
        self.apply(_init_weights)
        self.register_buffer("resize_index", None, persistent=False)
        self.register_buffer("resize_weight", None, persistent=False)
        self._set_resize(cfg.clip_samples // cfg.hop_size + 1, torch.device("cpu"))

    def _set_resize(self, frames: int, device: torch.device) -> None:
        """The constant 4-tap bicubic resize of ``frames`` mel frames to the image's time axis
        (non-persistent buffers: not in the state dict; None when no resize is needed).
        Computed at construction, and again only if a clip length other than the config's
        arrives (eagerly; exporters see the constants)."""
        target = self.spec_size * self.freq_ratio
        self._resize_frames = frames
        if frames >= target:
            self.resize_index = self.resize_weight = None
            return
        index, weight = bicubic_taps(frames, target)
        self.resize_index, self.resize_weight = index.to(device), weight.to(device)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, L) waveform -> (B, 1, T, mel_bins) Slaney log-mel (non-fusion input), computed
        in fp32 and returned in bn0's dtype (fp32 but for a ``.half()`` model)."""
        mel = log_mel_for(
            self.cfg, waveform, self.logmel_extractor.melW, self.spectrogram_extractor
        )
        return mel.unsqueeze(1).to(self.bn0.weight.dtype)

    def _to_image(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) normalised mel -> (B, C, S, S): time resized to 4·S/… and folded."""
        target_t = self.spec_size * self.freq_ratio
        if mel.shape[2] < target_t:
            if mel.shape[2] != self._resize_frames:  # e.g. a run with another clip length
                self._set_resize(mel.shape[2], mel.device)
            b, c, t, f = mel.shape
            taps = mel.index_select(2, self.resize_index.reshape(-1))  # (B, C, 4·target, F)
            taps = taps.reshape(b, c, target_t, 4, f)
            mel = (taps * self.resize_weight.to(mel.dtype)[:, :, None]).sum(dim=3)
        b, c, t, f = mel.shape
        x = mel.transpose(2, 3).reshape(b, c, f, self.freq_ratio, t // self.freq_ratio)
        return x.permute(0, 1, 3, 2, 4).reshape(b, c, f * self.freq_ratio, t // self.freq_ratio)

    def forward_mel(self, mel: torch.Tensor, longer: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, mel_bins) log-mel (C = 1, or 4 fusion views) -> tokens (B, N, 8C)."""
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)
        if self.training:
            x = spec_augment(x)
        x = self.patch_embed(self._to_image(x), longer if self.enable_fusion else None)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(
        self,
        waveform: torch.Tensor | None = None,
        *,
        mel: torch.Tensor | None = None,
        mel_fusion: torch.Tensor | None = None,
        longer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled embedding (B, 8C) from a (B, L) waveform (or its ``log_mel`` (B, 1, T, F) as
        ``mel``), or (fusion) (B, 4, T, F) + (B,) bool."""
        if self.enable_fusion:
            if mel_fusion is None:
                raise ValueError("a fusion model takes mel_fusion (B, 4, T, F) and longer (B,)")
            if self.training and longer is not None and not bool(longer.any()):
                # LAION marks one random row as longer when none is (training only).
                longer = longer.clone()
                longer[torch.randint(0, longer.shape[0], (1,))] = True
            tokens = self.forward_mel(mel_fusion.to(self.bn0.weight.dtype), longer)
        else:
            if mel is None:
                if waveform is None:
                    raise ValueError("a non-fusion model takes a (B, L) waveform")
                mel = self.log_mel(waveform)
            tokens = self.forward_mel(mel)
        return tokens.mean(dim=1)

    def forward_classifier(self, tokens: torch.Tensor) -> torch.Tensor:
        """Clip-wise AudioSet probabilities (B, class_num) from final tokens (B, N, 8C), as LAION."""
        b, n, c = tokens.shape
        side = int(n**0.5)
        x = tokens.transpose(1, 2).reshape(b, c, side, side)
        cf = side // self.freq_ratio
        x = x.reshape(b, c, side // cf, cf, side).permute(0, 1, 3, 2, 4).reshape(b, c, cf, -1)
        x = self.tscam_conv(x).flatten(2)
        return torch.sigmoid(x.mean(dim=-1))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
