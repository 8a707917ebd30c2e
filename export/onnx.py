"""ONNX export of CLAP's encoders, checked against PyTorch on every export.

    python -m export.onnx --model htsat-tiny [--checkpoint PATH] [--tower audio|text|both]
                          [--opset N] [--fp16] [--out DIR] [--text roberta] [--text-overrides JSON]

Graphs (see ``export/encoders.py`` for the math and the input contract):

* audio: ``waveform`` (B, 480000) float32 -> ``embedding`` (B, 512) float32, L2-normalised,
  log-mel front end inside the graph (STFT as a conv with the DFT basis; no ONNX STFT op);
  fusion models: ``mel_fusion`` (B, 4, 1001, 64) float32 + ``longer`` (B,) bool -> embedding;
* text: ``input_ids``, ``attention_mask`` (B, context_length) int64 -> ``embedding`` (B, 512).

The batch axis is dynamic. Opset 17 uses the TorchScript exporter, opsets 18–20 the dynamo
exporter (onnxscript); TensorRT's parser reads opsets up to 20. Every export ends with
``onnx.checker``, an onnxruntime run at batch 1 and 5 on real-ish inputs, a parity report
against the PyTorch fp32 model, and the TensorRT-compatibility check; parity below the
threshold (cos < 0.9999 fp32, < 0.999 fp16) raises ``ParityError`` / exits with status 1.
Each graph gets a JSON sidecar (model, checkpoint sha256, opset, shapes, versions, parity).

``--fp16``: the towers run in float16 inside the graph; the front end (whose power spectrum
overflows float16 for loud clips), the final normalisation and the graph's inputs / outputs
stay float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clap_fast.model import CLAP
from clap_fast.validate import check_output_dir
from export.encoders import (
    EagerReference,
    ModelSpec,
    TextEncoder,
    audio_encoder,
    load_model,
    parity,
    sample_fusion_inputs,
    sample_tokens,
    sample_waveforms,
    sha256_file,
)

__all__ = [
    "ExportError",
    "ParityError",
    "ExportResult",
    "MIN_OPSET",
    "MAX_OPSET",
    "COS_THRESHOLD",
    "check_opset",
    "export_tower",
    "export_model",
    "main",
]

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 17, 20
"""LayerNormalization needs opset 17; TensorRT's ONNX parser reads opsets up to 20."""
COS_THRESHOLD = {"fp32": 0.9999, "fp16": 0.999}
"""Minimum row-wise cosine to the PyTorch fp32 embedding, per graph precision."""
VERIFY_BATCHES = (1, 5)
"""Batch sizes of the onnxruntime parity run (exercises the dynamic batch axis)."""
MAX_BATCH = 4096
"""Upper bound of the dynamic batch axis declared to the dynamo exporter."""


class ExportError(RuntimeError):
    """An export that could not be produced or checked."""


class ParityError(ExportError):
    """onnxruntime's embeddings differ from PyTorch's beyond the threshold."""


@dataclass
class ExportResult:
    """One exported graph and its checks."""

    path: Path
    sidecar: Path
    tower: str
    parity: dict[str, Any]
    trt_issues: list[str] = field(default_factory=list)


def check_opset(opset: int) -> None:
    """Raise ValueError for an opset outside [MIN_OPSET, MAX_OPSET]."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
            "(LayerNormalization needs 17; TensorRT's ONNX parser reads up to 20)"
        )


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import clap_fast

    out = {
        "clap_fast": clap_fast.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:  # pragma: no cover - only the dynamo exporter needs it
        pass
    return out


def tower_inputs(
    model: CLAP, tower: str, batch: int, seed: int
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and real-ish example inputs of one tower at a batch size."""
    if tower == "text":
        ids, mask = sample_tokens(model, batch, seed=seed)
        return ["input_ids", "attention_mask"], (ids, mask)
    if model.cfg.enable_fusion:
        mel, longer = sample_fusion_inputs(batch, seed=seed)
        return ["mel_fusion", "longer"], (mel, longer)
    return ["waveform"], (sample_waveforms(batch, model.cfg.audio.clip_samples, seed=seed),)


def tower_wrapper(model: CLAP, tower: str) -> torch.nn.Module:
    return TextEncoder(model).eval() if tower == "text" else audio_encoder(model)


def _torch_to_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    path: Path,
    opset: int,
) -> str:
    """Export with a dynamic batch axis; returns the exporter's name.

    Both exporters put ``clap_fast.ops`` in its export branch by themselves (the legacy one via
    ``is_in_onnx_export``, the dynamo one via the flag ``torch.export`` sets; see
    ``clap_fast.ops._exporting``).
    """
    with torch.no_grad():
        if opset >= 18:
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            torch.onnx.export(
                module, args, str(path), dynamo=True, opset_version=opset, input_names=names,
                output_names=["embedding"], dynamic_shapes=tuple({0: batch} for _ in args),
                optimize=True, external_data=False, verbose=False,
            )  # fmt: skip
            return "dynamo"
        axes = {n: {0: "batch"} for n in [*names, "embedding"]}
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
            output_names=["embedding"], dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip
        return "torchscript"


def _static_output_width(path: Path, width: int) -> None:
    """Declare the embedding output as (batch, width): the TorchScript exporter leaves the
    width symbolic (it comes out of a Div), which shape-checking consumers cannot use."""
    import onnx

    m = onnx.load(str(path))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].dim_value != width:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = width
        onnx.save(m, str(path))


def _onnx_shapes(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def desc(vi) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": vi.name,
            "shape": dims,
            "dtype": onnx.TensorProto.DataType.Name(t.elem_type),
        }

    return {
        "inputs": [desc(v) for v in m.graph.input],
        "outputs": [desc(v) for v in m.graph.output],
    }


def verify_onnx(
    path: Path,
    reference: torch.nn.Module,
    model: CLAP,
    tower: str,
    precision: str,
    batches: Sequence[int] = VERIFY_BATCHES,
) -> dict[str, Any]:
    """onnx.checker + onnxruntime (CPU) at each batch size vs the fp32 PyTorch wrapper.

    Returns the parity report; raises ParityError when any batch is below the threshold.
    """
    import onnx

    from export.runners import OnnxRunner

    onnx.checker.check_model(str(path), full_check=True)
    runner = OnnxRunner(path, providers=["CPUExecutionProvider"])
    threshold = COS_THRESHOLD[precision]
    report: dict[str, Any] = {"threshold_cos": threshold, "runtime": "onnxruntime CPU"}
    for b in batches:
        names, args = tower_inputs(model, tower, b, seed=100 + b)
        with torch.no_grad():
            ref = reference(*args)
        # Graphs may drop an input their tower ignores (the CLIP-style tower's attention_mask).
        got = runner.run({n: a for n, a in zip(names, args) if n in runner.input_names})
        report[f"batch_{b}"] = parity(ref, got)
    worst = min(report[f"batch_{b}"]["cos_min"] for b in batches)
    report["cos_min"] = worst
    report["passed"] = worst >= threshold
    if not report["passed"]:
        raise ParityError(
            f"{path.name}: onnxruntime vs PyTorch fp32 cosine {worst:.6f} "
            f"< {threshold} ({precision})"
        )
    return report


def export_tower(
    model: CLAP,
    tower: str,
    out_dir: str | Path,
    *,
    opset: int = MIN_OPSET,
    fp16: bool = False,
    checkpoint: str | Path | None = None,
    stem: str | None = None,
    verify_batches: Sequence[int] = VERIFY_BATCHES,
) -> ExportResult:
    """Export one tower of an fp32 eval model to ONNX, verify it and write its sidecar.

    Args:
        model: fp32 CPU model in eval mode (left unchanged; fp16 exports use a copy).
        tower: "audio" or "text".
        out_dir: directory of ``<stem>_<tower>[_fp16].onnx`` and ``.json``.
        opset: 17 (TorchScript exporter) or 18–20 (dynamo exporter).
        fp16: towers in float16 inside the graph (float32 inputs / outputs and front end).
        checkpoint: recorded in the sidecar with its sha256.
    """
    import copy

    from export.trt_compat import check_onnx

    check_opset(opset)
    if tower not in ("audio", "text"):
        raise ValueError(f"tower must be audio or text, got {tower!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision = "fp16" if fp16 else "fp32"
    stem = stem or model.cfg.name.lower()
    path = out / f"{stem}_{tower}{'_fp16' if fp16 else ''}.onnx"
    reference = EagerReference(model, tower).eval()
    export_model_ = copy.deepcopy(model).half() if fp16 else model
    if fp16:  # the front end computes in fp32 (a loud frame's power overflows fp16): keep its
        # STFT basis and filterbank exact
        for name in ("spectrogram_extractor", "logmel_extractor"):
            if hasattr(export_model_.audio_branch, name):
                getattr(export_model_.audio_branch, name).float()
    module = tower_wrapper(export_model_, tower)
    names, args = tower_inputs(model, tower, 2, seed=0)
    log.info(
        "exporting %s %s tower (opset %d, %s) -> %s", model.cfg.name, tower, opset, precision, path
    )
    try:
        exporter = _torch_to_onnx(module, args, names, path, opset)
    except Exception as exc:
        raise ExportError(
            f"{tower} export failed at opset {opset}: {type(exc).__name__}: {exc}"
        ) from exc
    _static_output_width(path, model.cfg.joint_embed_shape)
    trt_issues = check_onnx(path)
    for issue in trt_issues:
        log.warning("TensorRT compatibility: %s", issue)
    sidecar = path.with_suffix(".json")
    meta: dict[str, Any] = {
        "model": model.cfg.name,
        "tower": tower,
        "text_tower": model.cfg.text.model_type,
        "enable_fusion": model.cfg.enable_fusion,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256_file(checkpoint),
        "opset": opset,
        "exporter": exporter,
        "precision": precision,
        **_onnx_shapes(path),
        "input_contract": _contract(model, tower),
        "versions": versions(),
        "trt_compat_issues": trt_issues,
        "config": model.cfg.to_dict(),
    }
    try:
        meta["parity"] = verify_onnx(path, reference, model, tower, precision, verify_batches)
    except ParityError as exc:
        meta["parity"] = {"passed": False, "error": str(exc)}
        sidecar.write_text(json.dumps(meta, indent=2))
        raise
    sidecar.write_text(json.dumps(meta, indent=2))
    log.info("%s: parity %s", path.name, _brief(meta["parity"]))
    return ExportResult(path, sidecar, tower, meta["parity"], trt_issues)


def _contract(model: CLAP, tower: str) -> str:
    if tower == "text":
        n = model.cfg.text.context_length
        return f"input_ids, attention_mask: (B, {n}) int64 from the tower's tokenizer"
    if model.cfg.enable_fusion:
        return (
            "mel_fusion: (B, 4, 1001, 64) HTK log-mel views, longer: (B,) bool "
            "(clap_fast.audio.prepare_batch)"
        )
    a = model.cfg.audio
    return (
        f"waveform: (B, {a.clip_samples}) float32 at {a.sample_rate} Hz, int16-round-tripped and "
        f"repeat-padded / cropped as clap_fast.audio.prepare_batch does"
    )


def _brief(p: dict[str, Any]) -> str:
    rows = [
        f"{k}: cos {v['cos_min']:.7f} max|d| {v['max_abs_diff']:.2e}"
        for k, v in p.items()
        if k.startswith("batch_")
    ]
    return "; ".join(rows)


def export_model(
    spec: ModelSpec,
    out_dir: str | Path,
    *,
    towers: Sequence[str] = ("audio", "text"),
    opset: int = MIN_OPSET,
    fp16: bool = False,
) -> list[ExportResult]:
    """Build / load the model of ``spec`` and export the requested towers."""
    check_opset(opset)
    model = load_model(spec)
    stem = Path(spec.checkpoint).stem if spec.checkpoint else model.cfg.name.lower()
    return [
        export_tower(
            model, t, out_dir, opset=opset, fp16=fp16, checkpoint=spec.checkpoint, stem=stem
        )
        for t in towers
    ]


def build_parser(
    prog: str = "python -m export.onnx", description: str | None = None, onnx_options: bool = True
) -> argparse.ArgumentParser:
    """The CLI's argument parser (shared with ``export.trt`` and ``export.aoti``, which pass their
    own ``description``; ``onnx_options=False`` leaves out --opset and --fp16)."""
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="HTSAT-tiny", help="architecture (random weights unless --checkpoint)"
    )
    p.add_argument("--checkpoint", default=None, help="LAION .pt / HF / clap_fast checkpoint")
    p.add_argument("--tower", choices=("audio", "text", "both"), default="both")
    if onnx_options:
        p.add_argument(
            "--opset",
            type=int,
            default=MIN_OPSET,
            help="17 (TorchScript exporter) or 18-20 (dynamo)",
        )
        p.add_argument("--fp16", action="store_true", help="float16 towers inside the graph")
    p.add_argument("--out", default="exported", help="output directory")
    p.add_argument("--text", default="roberta", help="text tower of random-weight models")
    p.add_argument(
        "--text-overrides", default=None, help="JSON TextConfig overrides, e.g. '{\"layers\": 1}'"
    )
    p.add_argument(
        "--fusion", action="store_true", help="build the fusion variant (random weights)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    return p


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """ModelSpec from parsed CLI arguments; ValueError on bad values (checked before any work)."""
    import clap_fast

    overrides = json.loads(args.text_overrides) if args.text_overrides else None
    if args.checkpoint is None:
        clap_fast.get_config(
            args.model, text=args.text, enable_fusion=args.fusion
        )  # validates names
    elif not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    return ModelSpec(
        name=args.model, checkpoint=args.checkpoint, text=args.text,
        text_overrides=overrides, enable_fusion=args.fusion, seed=args.seed,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry. Exit status: 0 ok, 1 export or parity failure, 2 bad arguments."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(
        logging.WARNING
    )  # per-pass chatter of the dynamo exporter
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_opset(args.opset)
        spec = spec_from_args(args)
        check_output_dir(args.out)  # an existing file or a read-only folder: before any work
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    towers = ("audio", "text") if args.tower == "both" else (args.tower,)
    try:
        results = export_model(spec, args.out, towers=towers, opset=args.opset, fp16=args.fp16)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except ExportError as exc:
        parser.exit(1, f"error: {exc}\n")
    summary = [
        {"onnx": str(r.path), "sidecar": str(r.sidecar), "parity": _brief(r.parity)}
        for r in results
    ]
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
