"""TensorRT engines of CLAP's encoders, built from the checked ONNX graphs.

    python -m export.trt --model htsat-tiny [--checkpoint PATH] [--fp16|--bf16]
                         [--batch MIN:OPT:MAX] [--workspace GB] [--timing-cache PATH]
                         [--tower audio|text|both] [--out DIR]

Steps: export the fp32 ONNX graphs (``export.onnx``: checker, onnxruntime parity), check them
against TensorRT's published operator table (``export.trt_compat``), then with TensorRT's Python
API: builder, ONNX parser, one optimization profile over the batch axis, precision flags, a
workspace limit and a persistent timing cache; serialize ``<stem>_<tower>_<precision>.engine``
with a JSON sidecar, load it with ``TRTEncoder`` and check parity against PyTorch fp32
(cos >= 0.9999 fp32, 0.999 fp16, 0.995 bf16).

Without TensorRT or a CUDA GPU the command writes the ONNX graphs, then exits with status 3 and
one line saying what is missing. **This TensorRT path has not been executed in this project's
CI** (TensorRT cannot be installed there); its argument handling and error paths are tested.

Exit status: 0 ok, 1 export / build / parity failure, 2 bad arguments, 3 TensorRT or GPU absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clap_fast.validate import check_output_dir
from export.encoders import EagerReference, load_model, parity, sha256_file
from export.onnx import ExportError, build_parser, check_opset, spec_from_args, tower_inputs

__all__ = [
    "BatchProfile",
    "BuildConfig",
    "TRTUnavailable",
    "COS_THRESHOLD",
    "parse_batch",
    "precision_of",
    "builder_flags",
    "profile_shapes",
    "trt_unavailable_reason",
    "build_engine",
    "TRTEncoder",
    "main",
]

log = logging.getLogger(__name__)

COS_THRESHOLD = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995}
"""Minimum row-wise cosine of engine vs PyTorch fp32 embeddings, per build precision."""
EXIT_UNAVAILABLE = 3


class TRTUnavailable(RuntimeError):
    """TensorRT's Python package or a CUDA GPU is missing."""


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of the engine's optimization profile (min <= opt <= max)."""

    min: int
    opt: int
    max: int


def parse_batch(text: str) -> BatchProfile:
    """ "MIN:OPT:MAX" (or one number N for N:N:N) -> BatchProfile; ValueError when malformed."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise ValueError(f"--batch must be MIN:OPT:MAX or N, got {text!r}")
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--batch must be integers MIN:OPT:MAX, got {text!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
    return BatchProfile(lo, opt, hi)


def precision_of(fp16: bool, bf16: bool) -> str:
    """ "fp32" | "fp16" | "bf16" from the two CLI flags (both set: ValueError)."""
    if fp16 and bf16:
        raise ValueError("--fp16 and --bf16 are mutually exclusive")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def builder_flags(precision: str) -> list[str]:
    """Names of the ``tensorrt.BuilderFlag`` members to set for a precision.

    fp32 sets none (TensorRT 10 may still use TF32 unless told otherwise; we leave its default).
    """
    flags = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"]}
    if precision not in flags:
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    return flags[precision]


def profile_shapes(
    onnx_path: str | Path, batch: BatchProfile
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input: axis 0 from the profile, the rest static.

    Raises ValueError for an input with a dynamic non-batch axis (TensorRT would need more
    profile dimensions than the batch; our graphs have none).
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        rest = []
        for i, d in enumerate(dims[1:], start=1):
            if d.dim_param or d.dim_value <= 0:
                raise ValueError(f"input {vi.name!r} axis {i} is dynamic; only the batch may be")
            rest.append(d.dim_value)
        out[vi.name] = tuple((b, *rest) for b in (batch.min, batch.opt, batch.max))
    return out


def trt_unavailable_reason() -> str | None:
    """One line saying why engines cannot be built here, or None when they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return (
            "TensorRT's Python package is not installed (pip install tensorrt, on a CUDA machine)"
        )
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible; TensorRT engines are built and run on a GPU"
    return None


@dataclass
class BuildConfig:
    """What ``build_engine`` builds."""

    onnx_path: Path
    """fp32 ONNX graph (from ``export.onnx``)."""
    engine_path: Path
    """Where the serialized engine goes."""
    batch: BatchProfile
    """Optimization profile over the batch axis."""
    precision: str = "fp16"
    """fp32 | fp16 | bf16 (builder flags; the graph stays fp32)."""
    workspace_gb: float = 4.0
    """Builder workspace memory-pool limit in GiB."""
    timing_cache: Path | None = None
    """Timing cache to read (if present) and write back after the build."""


def build_engine(cfg: BuildConfig) -> Path:
    """Parse the ONNX graph and build / serialize a TensorRT engine (TensorRT 10 API)."""
    reason = trt_unavailable_reason()
    if reason:
        raise TRTUnavailable(reason)
    import tensorrt as trt

    if cfg.workspace_gb <= 0:
        raise ValueError(f"workspace must be > 0 GB, got {cfg.workspace_gb}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(cfg.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {cfg.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    for flag in builder_flags(cfg.precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_bytes = (
        cfg.timing_cache.read_bytes() if cfg.timing_cache and cfg.timing_cache.exists() else b""
    )
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(cfg.onnx_path, cfg.batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {cfg.onnx_path}")
    cfg.engine_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.engine_path.write_bytes(bytes(serialized))
    if cfg.timing_cache:
        cfg.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return cfg.engine_path


class TRTEncoder:
    """A TensorRT engine of one tower, run on torch CUDA tensors on the current CUDA stream.

    Drop-in for the model's ``embed_audio`` (prepared (B, 480000) waveforms) and
    ``embed_text_tokens``; batches above the profile's maximum are split.
    """

    def __init__(self, engine_path: str | Path, max_batch: int | None = None) -> None:
        reason = trt_unavailable_reason()
        if reason:
            raise TRTUnavailable(reason)
        import numpy as np
        import tensorrt as trt

        self.path = Path(engine_path)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT could not deserialize {self.path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]

        def torch_dtype(name: str) -> torch.dtype:
            np_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype

        self.dtypes = {n: torch_dtype(n) for n in names}
        profile_max = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0]
        self.max_batch = min(max_batch or profile_max, profile_max)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The tower's inputs (graph order) -> (B, 512) float32 CUDA embedding."""
        if len(tensors) != len(self.inputs):
            raise ValueError(f"engine takes {self.inputs}, got {len(tensors)} tensors")
        n = tensors[0].shape[0]
        if n > self.max_batch:
            chunks = [
                self(*(t[i : i + self.max_batch] for t in tensors))
                for i in range(0, n, self.max_batch)
            ]
            return torch.cat(chunks)
        stream = torch.cuda.current_stream()
        keep = []
        for name, t in zip(self.inputs, tensors):
            t = t.to("cuda", self.dtypes[name]).contiguous()
            keep.append(t)  # alive until the enqueue is done
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out_name = self.outputs[0]
        out = torch.empty(
            tuple(self.context.get_tensor_shape(out_name)),
            dtype=self.dtypes[out_name],
            device="cuda",
        )
        self.context.set_tensor_address(out_name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")
        return out.float()

    def embed_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 480000) prepared float32 waveform -> (B, 512) L2-normalised embedding."""
        return self(waveform)

    def embed_text_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) int64 ids and mask -> (B, 512) L2-normalised embedding."""
        if len(self.inputs) == 1:
            return self(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self(input_ids, mask)


def _verify(
    engine: Path, model: Any, tower: str, precision: str, batch: BatchProfile
) -> dict[str, Any]:
    """Engine vs PyTorch fp32 (CPU) at the profile's min and max batch."""
    enc = TRTEncoder(engine)
    reference = EagerReference(model, tower).eval()
    report: dict[str, Any] = {"threshold_cos": COS_THRESHOLD[precision], "runtime": "TensorRT"}
    for b in sorted({batch.min, batch.max}):
        names, args = tower_inputs(model, tower, b, seed=100 + b)
        with torch.no_grad():
            ref = reference(*args)
        feeds = [a for n, a in zip(names, args) if n in enc.inputs]
        got = enc(*feeds)
        torch.cuda.synchronize()  # host sync: the result is compared on the CPU
        report[f"batch_{b}"] = parity(ref, got.cpu())
    report["cos_min"] = min(v["cos_min"] for k, v in report.items() if k.startswith("batch_"))
    report["passed"] = report["cos_min"] >= COS_THRESHOLD[precision]
    return report


def build_parser_trt() -> argparse.ArgumentParser:
    """``export.onnx``'s arguments plus the engine builder's."""
    p = build_parser("python -m export.trt", description=__doc__.split("\n\n")[0])
    p.add_argument("--bf16", action="store_true", help="build with BF16 enabled")
    p.add_argument("--batch", default="1:8:64", help="optimization profile MIN:OPT:MAX")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace (GiB)")
    p.add_argument("--timing-cache", default=None, help="timing cache file (read and updated)")
    p.set_defaults(fp16=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; see the module docstring for exit statuses."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(
        logging.WARNING
    )  # per-pass chatter of the dynamo exporter
    parser = build_parser_trt()
    args = parser.parse_args(argv)
    try:
        precision = precision_of(args.fp16, args.bf16)
        batch = parse_batch(args.batch)
        if args.workspace <= 0:
            raise ValueError(f"--workspace must be > 0 GB, got {args.workspace}")
        check_opset(args.opset)
        spec = spec_from_args(args)
        check_output_dir(args.out)  # an existing file or a read-only folder: before any work
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    from export.onnx import export_tower

    towers = ("audio", "text") if args.tower == "both" else (args.tower,)
    out = Path(args.out)
    try:
        model = load_model(spec)
        stem = Path(spec.checkpoint).stem if spec.checkpoint else model.cfg.name.lower()
        graphs = [
            export_tower(model, t, out, opset=args.opset, checkpoint=spec.checkpoint, stem=stem)
            for t in towers
        ]
    except ExportError as exc:
        parser.exit(1, f"error: {exc}\n")
    for g in graphs:
        if g.trt_issues:
            parser.exit(
                1,
                f"error: {g.path.name} uses ONNX features TensorRT does not support: {g.trt_issues[0]}\n",
            )
    reason = trt_unavailable_reason()
    if reason:
        written = ", ".join(str(g.path) for g in graphs)
        parser.exit(
            EXIT_UNAVAILABLE, f"error: wrote {written} but cannot build engines: {reason}\n"
        )
    summary = []
    for g in graphs:
        engine = out / f"{g.path.stem}_{precision}.engine"
        cfg = BuildConfig(
            g.path, engine, batch, precision, args.workspace,
            Path(args.timing_cache) if args.timing_cache else None,
        )  # fmt: skip
        try:
            build_engine(cfg)
            report = _verify(engine, model, g.tower, precision, batch)
        except (ExportError, RuntimeError) as exc:
            parser.exit(1, f"error: {exc}\n")
        import tensorrt as trt

        meta = json.loads(g.sidecar.read_text())
        meta.update(
            engine=str(engine), onnx_sha256=sha256_file(g.path), precision=precision,
            profile=asdict(batch), workspace_gb=args.workspace, tensorrt=trt.__version__,
            gpu=torch.cuda.get_device_name(), parity=report,
        )  # fmt: skip
        engine.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        if not report["passed"]:
            parser.exit(
                1, f"error: {engine.name}: parity cos {report['cos_min']:.6f} below threshold\n"
            )
        summary.append({"engine": str(engine), "cos_min": report["cos_min"]})
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
