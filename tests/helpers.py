"""Shared test helpers: small models and real-ish signals (never zeros)."""

from __future__ import annotations

import math

import torch

import clap_fast

# head dim 64, as in every released tower: LAION checkpoints carry no head count, so it is derived.
SMALL_ROBERTA = {
    "hf": {
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "num_attention_heads": 1,
        "intermediate_size": 128,
    }
}
SMALL_CLIP_TEXT = {"width": 32, "layers": 1, "heads": 2}


def small_model(name: str = "HTSAT-mini", text: str = "roberta", **kwargs) -> clap_fast.CLAP:
    overrides = SMALL_ROBERTA if text == "roberta" else SMALL_CLIP_TEXT
    return clap_fast.create_model(name, text=text, text_overrides=overrides, **kwargs)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics (eval mode uses them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def signals(n: int, length: int = 480000, sr: int = 48000, seed: int = 0) -> torch.Tensor:
    """(n, length) float32: tone + harmonics + noise mixes, a chirp, speech-like bursts."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / sr
    out = []
    for i in range(n):
        kind = i % 3
        f0 = 110.0 * (1 + i)
        if kind == 0:
            x = sum(0.3 / k * torch.sin(2 * math.pi * f0 * k * t) for k in range(1, 5))
            x = x + 0.01 * torch.randn(length, generator=g, dtype=torch.float64)
        elif kind == 1:
            phase = 2 * math.pi * (200 * t + 0.5 * (8000 - 200) * t**2 / max(t[-1].item(), 1e-3))
            x = 0.4 * torch.sin(phase) + 0.02 * torch.randn(
                length, generator=g, dtype=torch.float64
            )
        else:
            env = (torch.sin(2 * math.pi * 3 * t) > 0).double() * 0.9 + 0.1
            x = env * 0.3 * torch.randn(length, generator=g, dtype=torch.float64)
        out.append(x.float())
    return torch.stack(out)


def run_sm90_aot(script: str, config: tuple) -> None:
    """Run an ahead-of-time Triton compile script for an H100 (sm_90) in a subprocess without
    TRITON_INTERPRET: catches GPU-only compile errors on a machine without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("Triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", script, *map(str, config)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
