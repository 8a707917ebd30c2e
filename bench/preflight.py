"""gpu_run.sh's first step (seconds): versions, imports, and one launch of every Triton kernel on
a small shape, each compared with its PyTorch reference. Written to OUTDIR/preflight.json.

    python -m bench.preflight OUTDIR

On a GPU the kernels run on CUDA; elsewhere (``gpu_run.sh --dry-run``) through Triton's
interpreter (``TRITON_INTERPRET=1`` must be set before this starts). One failing launch does
not stop the others; the exit status is 1 when any import or launch failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

DISTS = ("torch", "triton", "transformers", "numpy", "onnx", "onnxruntime", "pytest-benchmark",
         "matplotlib", "safetensors", "huggingface_hub", "tokenizers", "soundfile", "librosa",
         "nnAudio", "open_clip_torch", "webdataset")  # fmt: skip
MODULES = ("kernels.mel", "kernels.window_attention", "kernels.contrastive", "clap_fast",
           "clap_fast.ops", "clap_fast.model", "clap_fast.train", "export.onnx", "bench.report")  # fmt: skip


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in DISTS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _mel(device: str) -> dict[str, float]:
    from clap_fast.frontend import slaney_mel_fb
    from kernels import mel, mel_ref

    g = torch.Generator().manual_seed(0)
    wave = (0.3 * torch.randn(2, 4800, generator=g)).to(device)
    fb = slaney_mel_fb().to(device)
    out = mel.log_mel(wave, fb)
    ref = mel_ref.log_mel(wave.double(), fb.double())
    return {"max_abs_db": (out.double() - ref).abs().max().item()}


def _window_attention(device: str) -> dict[str, float]:
    from kernels import window_attention, window_attention_ref

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 16, 16, 3 * 48, generator=g).to(device, dtype).requires_grad_()
    table = torch.randn(15 * 15, 2, generator=g).to(device).requires_grad_()
    kw = dict(num_heads=2, window_size=8, shift_size=4)
    out = window_attention.window_attention(qkv, table, **kw)
    out.float().square().sum().backward()  # launches the backward kernel
    grads = (qkv.grad.clone(), table.grad.clone())
    qkv.grad = table.grad = None
    ref = window_attention_ref.window_attention(qkv.float(), table, **kw)
    ref.square().sum().backward()
    return {
        "out_rel": _rel_err(out, ref),
        "dqkv_rel": _rel_err(grads[0], qkv.grad),
        "dtable_rel": _rel_err(grads[1], table.grad),
    }


def _contrastive(device: str) -> dict[str, float]:
    from kernels import contrastive, contrastive_ref

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(96, 64, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(96, 64, generator=g), dim=1)
    scale = torch.tensor(20.0, device=device)
    errs = {}
    for name in ("contrastive_loss", "contrastive_loss_symmetric"):
        xa = a.to(device, dtype).clone().requires_grad_()
        xb = b.to(device, dtype).clone().requires_grad_()
        loss = getattr(contrastive, name)(xa, xb, scale)
        loss.backward()  # launches the backward kernel
        ra = a.to(device, torch.float64).clone().requires_grad_()
        rb = b.to(device, torch.float64).clone().requires_grad_()
        ref = getattr(contrastive_ref, name)(ra, rb, scale.double())
        ref.backward()
        errs[f"{name}_rel"] = _rel_err(loss, ref)
        errs[f"{name}_da_rel"] = _rel_err(xa.grad, ra.grad)
    return errs


LAUNCHES: dict[str, Callable[[str], dict[str, float]]] = {
    "mel": _mel,
    "window_attention": _window_attention,
    "contrastive": _contrastive,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else Path(".")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"versions": versions(), "imports": {}, "launches": {}}
    ok = True
    for name in MODULES:
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
            result["imports"][name] = {"ok": True, "s": round(time.perf_counter() - t0, 2)}
        except Exception as exc:  # recorded, and the exit status says so
            ok = False
            result["imports"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    for name, launch in LAUNCHES.items():
        t0 = time.perf_counter()
        try:
            errs = launch(device)
            if device == "cuda":
                torch.cuda.synchronize()
            result["launches"][name] = {"ok": True, "s": round(time.perf_counter() - t0, 2)} | errs
        except Exception:
            ok = False
            result["launches"][name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    (out_dir / "preflight.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
