"""PANN CNN audio towers (Cnn6, Cnn10, Cnn14) with LAION's state-dict keys.

LAION's Cnn6 and Cnn10 cannot be built inside CLAP (their constructors reject the fusion
arguments, and their forward expects a tensor where CLAP passes a dict); here all three share
one forward. Fusion is not built for PANN (no released checkpoint uses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clap_fast.config import AudioConfig
from clap_fast.frontend import LaionLogmel, LaionSpectrogramWeights, log_mel_for, spec_augment

__all__ = ["PANN", "PANN_WIDTHS"]

# name -> (kernel size, channels of each conv block, pool of each block)
_ARCH = {
    "Cnn6": (5, [64, 128, 256, 512], [2, 2, 2, 2]),
    "Cnn10": (3, [64, 128, 256, 512, 1024], [2, 2, 2, 2, 2]),
    "Cnn14": (3, [64, 128, 256, 512, 1024, 2048], [2, 2, 2, 2, 2, 1]),
}
PANN_WIDTHS = {name: arch[1][-1] for name, arch in _ARCH.items()}


class ConvBlock(nn.Module):
    """Two 3x3 conv+BN+ReLU (Cnn10/14) or one 5x5 (Cnn6), then average pooling."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(cin, cout, kernel, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.double = kernel == 3
        if self.double:
            self.conv2 = nn.Conv2d(cout, cout, kernel, padding=pad, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.double:
            x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class PANN(nn.Module):
    """PANN tower: (B, L) waveform -> (B, width) embedding (LAION's ``embedding`` output)."""

    def __init__(self, cfg: AudioConfig, enable_fusion: bool = False) -> None:
        super().__init__()
        if cfg.model_name not in _ARCH:
            raise ValueError(f"unknown PANN {cfg.model_name!r}; available: {', '.join(_ARCH)}")
        if enable_fusion:
            raise ValueError("fusion is not built for PANN towers")
        kernel, chans, self.pools = _ARCH[cfg.model_name]
        self.cfg = cfg
        self.spectrogram_extractor = LaionSpectrogramWeights(cfg.window_size)
        self.logmel_extractor = LaionLogmel(cfg)
        self.bn0 = nn.BatchNorm2d(cfg.mel_bins)
        cins = [1, *chans[:-1]]
        for i, (cin, cout) in enumerate(zip(cins, chans)):
            self.add_module(f"conv_block{i + 1}", ConvBlock(cin, cout, kernel))
        self.fc1 = nn.Linear(chans[-1], chans[-1])
        self.fc_audioset = nn.Linear(chans[-1], cfg.class_num)
        for fc in (self.fc1, self.fc_audioset):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, 1, T, mel_bins) Slaney log-mel (computed in fp32, in bn0's dtype)."""
        mel = log_mel_for(
            self.cfg, waveform, self.logmel_extractor.melW, self.spectrogram_extractor
        )
        return mel.unsqueeze(1).to(self.bn0.weight.dtype)  # fp32 but for a .half() model

    def forward_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, mel_bins) -> (B, width) embedding."""
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)
        if self.training:
            x = spec_augment(x)
        for i, pool in enumerate(self.pools):
            x = getattr(self, f"conv_block{i + 1}")(x, pool)
            x = F.dropout(x, p=0.2, training=self.training)
        x = x.mean(dim=3)
        x = x.amax(dim=2) + x.mean(dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        x = F.relu(self.fc1(x))
        return F.dropout(x, p=0.5, training=self.training)

    def forward(
        self,
        waveform: torch.Tensor | None = None,
        *,
        mel: torch.Tensor | None = None,
        **unused: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, L) waveform, or its ``log_mel`` (B, 1, T, mel_bins) as ``mel`` -> (B, width)."""
        if mel is None:
            if waveform is None:
                raise ValueError("a PANN tower takes a (B, L) waveform")
            mel = self.log_mel(waveform)
        return self.forward_mel(mel)
