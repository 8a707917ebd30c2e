"""torch.export + AOTInductor packages of CLAP's encoders (a deployment target without TensorRT).

    python -m export.aoti --model htsat-tiny [--checkpoint PATH] [--tower audio|text|both]
                          [--device cpu|cuda] [--batch N] [--out DIR] [--text roberta]

The same wrappers as the ONNX export (``export/encoders.py``: raw waveform or token ids in,
L2-normalised embedding out, front end inside) go through ``torch.export`` and
``torch._inductor.aoti_compile_and_package`` into one ``.pt2`` file holding the compiled
kernels and the weights. It loads from Python with ``load_package`` (below) or from C++ with
``torch::inductor::AOTIModelPackageLoader``. The package is specific to the device it was
compiled for (CPU packages need the same ISA; CUDA packages the same GPU architecture).

Batch: ``--batch N`` compiles a static batch of N (fast to compile); without it the batch axis
is dynamic (1..4096), which compiles much more slowly on a small CPU. After compiling, the
package is loaded and checked against the PyTorch fp32 model (cos >= 0.9999, else exit 1); a
JSON sidecar records model, checkpoint sha256, shapes, versions and parity.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clap_fast import ops
from clap_fast.model import CLAP
from export.encoders import EagerReference, ModelSpec, load_model, parity, sha256_file
from export.onnx import (
    COS_THRESHOLD,
    ExportError,
    ParityError,
    build_parser,
    spec_from_args,
    tower_inputs,
    tower_wrapper,
    versions,
)

__all__ = ["AOTIResult", "export_tower_aoti", "load_package", "main"]

log = logging.getLogger(__name__)
MAX_BATCH = 4096


@dataclass
class AOTIResult:
    """One compiled package and its parity report."""

    path: Path
    sidecar: Path
    tower: str
    parity: dict[str, Any]


def load_package(path: str | Path) -> Callable[..., torch.Tensor]:
    """Load a ``.pt2`` AOTInductor package: a callable taking the tower's input tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"AOTInductor package not found: {path}")
    return torch._inductor.aoti_load_package(str(path))


def export_tower_aoti(
    model: CLAP,
    tower: str,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    batch: int | None = None,
    checkpoint: str | Path | None = None,
    stem: str | None = None,
) -> AOTIResult:
    """Export one tower with torch.export, compile it with AOTInductor, load and verify it.

    Args:
        model: fp32 eval model (moved to ``device`` for compiling; the CPU copy is the reference).
        tower: "audio" or "text".
        device: "cpu" or "cuda" (the package runs only there).
        batch: static batch size, or None for a dynamic batch axis.
        checkpoint: recorded in the sidecar with its sha256.
    """
    if tower not in ("audio", "text"):
        raise ValueError(f"tower must be audio or text, got {tower!r}")
    dev = ops.resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or model.cfg.name.lower()
    path = out / f"{stem}_{tower}_{dev.type}{'' if batch is None else f'_b{batch}'}.pt2"
    reference = EagerReference(model, tower).eval()
    module = tower_wrapper(model.to(dev), tower)
    names, args = tower_inputs(model, tower, batch or 2, seed=0)
    args = tuple(a.to(dev) for a in args)
    dynamic = None
    if batch is None:
        b = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic = tuple({0: b} for _ in args)
    log.info(
        "torch.export %s %s tower (%s, batch %s)", model.cfg.name, tower, dev, batch or "dynamic"
    )
    try:
        with torch.no_grad():  # torch.export puts clap_fast.ops in its export branch
            ep = torch.export.export(module, args, dynamic_shapes=dynamic)
            log.info("AOTInductor compile -> %s", path)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    except Exception as exc:
        raise ExportError(f"AOTInductor export of the {tower} tower failed: {exc}") from exc
    finally:
        model.cpu()
    runner = load_package(path)
    report: dict[str, Any] = {
        "threshold_cos": COS_THRESHOLD["fp32"],
        "runtime": f"AOTInductor {dev}",
    }
    for b in [batch] if batch is not None else [1, 5]:
        _, x = tower_inputs(model, tower, b, seed=100 + b)
        with torch.no_grad():
            ref = reference(*x)
            got = runner(*(t.to(dev) for t in x))
        report[f"batch_{b}"] = parity(ref, got.cpu())
    worst = min(v["cos_min"] for k, v in report.items() if k.startswith("batch_"))
    report["cos_min"], report["passed"] = worst, worst >= COS_THRESHOLD["fp32"]
    sidecar = path.with_suffix(".json")
    meta = {
        "model": model.cfg.name,
        "tower": tower,
        "device": str(dev),
        "batch": batch if batch is not None else f"dynamic 1..{MAX_BATCH}",
        "inputs": {
            n: [("batch" if i == 0 and batch is None else s) for i, s in enumerate(a.shape)]
            for n, a in zip(names, args)
        },  # fmt: skip
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256_file(checkpoint),
        "versions": versions(),
        "parity": report,
        "config": model.cfg.to_dict(),
    }
    sidecar.write_text(json.dumps(meta, indent=2))
    if not report["passed"]:
        raise ParityError(f"{path.name}: AOTInductor vs PyTorch fp32 cosine {worst:.6f} < 0.9999")
    log.info("%s: parity %s", path.name, report)
    return AOTIResult(path, sidecar, tower, report)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry. Exit status: 0 ok, 1 export or parity failure, 2 bad arguments."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(
        logging.WARNING
    )  # per-pass chatter of the dynamo exporter
    parser = build_parser(
        "python -m export.aoti", description=__doc__.split("\n\n")[0], onnx_options=False
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="static batch (default: dynamic)")
    args = parser.parse_args(argv)
    try:
        spec: ModelSpec = spec_from_args(args)
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        ops.resolve_device(args.device)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    towers = ("audio", "text") if args.tower == "both" else (args.tower,)
    try:
        model = load_model(spec)
        stem = Path(spec.checkpoint).stem if spec.checkpoint else model.cfg.name.lower()
        results = [
            export_tower_aoti(
                model,
                t,
                args.out,
                device=args.device,
                batch=args.batch,
                checkpoint=spec.checkpoint,
                stem=stem,
            )  # fmt: skip
            for t in towers
        ]
    except ExportError as exc:
        parser.exit(1, f"error: {exc}\n")
    summary = [
        {"package": str(r.path), "sidecar": str(r.sidecar), "cos_min": r.parity["cos_min"]}
        for r in results
    ]
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
