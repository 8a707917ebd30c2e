"""``python -m export.triton``: a Triton Inference Server model repository for NVIDIA's container.

Layout written under ``--out``::

    clap_audio/            onnxruntime_onnx   config.pbtxt, 1/model.onnx
    clap_text_tokens/      onnxruntime_onnx   config.pbtxt, 1/model.onnx
    clap_audio_trt/        tensorrt_plan      config.pbtxt, 1/  (model.plan built on the target GPU)
    clap_text_tokens_trt/  tensorrt_plan      config.pbtxt, 1/
    README.md              how to build the plans and run ``tritonserver``

The ONNX graphs are the ones ``export.onnx`` writes (verified against the eager model); every
``config.pbtxt`` is generated from the graph's own input / output names, types and shapes, with
dynamic batching, an instance group and optimisation settings. A TensorRT plan is specific to
the GPU and TensorRT version that build it, so only its config is written here (TensorRT cannot
be installed on this workplace's machines: the plan side is unverified).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["model_config", "onnx_io", "write_repository", "main"]

log = logging.getLogger(__name__)

# ONNX TensorProto element type -> Triton data type
_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL"}
_NAMES = {"audio": "clap_audio", "text": "clap_text_tokens"}


def onnx_io(path: str | Path) -> tuple[list[tuple[str, str, list[int]]], ...]:
    """(inputs, outputs) of an ONNX graph as (name, Triton type, dims without the batch axis)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def desc(values) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in _TYPES:
                raise ValueError(f"{path}: {v.name} has an ONNX type ({t.elem_type}) Triton lacks")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
            out.append((v.name, _TYPES[t.elem_type], dims))
        return out

    return desc(graph.input), desc(graph.output)


def _tensors(kind: str, io: list[tuple[str, str, list[int]]]) -> str:
    items = [
        f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ] }}' for n, t, d in io
    ]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def model_config(
    name: str,
    platform: str,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    *,
    max_batch: int = 64,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: str = "KIND_GPU",
    ort_tensorrt: bool = False,
) -> str:
    """``config.pbtxt`` text for one model (Triton's ``ModelConfig`` protobuf, text format)."""
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch] or [max_batch]
    text = (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + "dynamic_batching {\n"
        + f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        + f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
    )
    if platform == "onnxruntime_onnx" and ort_tensorrt:
        text += (
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
            '  name: "tensorrt"\n  parameters { key: "precision_mode" value: "FP16" }\n'
            '  parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n} ] } }\n'
        )
    elif platform == "tensorrt_plan":
        text += "optimization { cuda { graphs: true } }\n"
    return text


def _shapes(inputs: list[tuple[str, str, list[int]]], batch: int) -> str:
    """trtexec's shape syntax: name:BxD1xD2,..."""
    return ",".join(f"{n}:{batch}x{'x'.join(map(str, d))}" for n, _, d in inputs)


README = """# CLAP model repository for Triton Inference Server

Written by `python -m export.triton` from `{source}`.

| model | backend | inputs -> output |
|---|---|---|
{rows}

Embeddings are L2-normalised FP32 (batch, {dim}). Audio input contract: {audio_contract}.
Text: token ids from the tower's tokenizer (`clap_fast` `model.tokenize`).

## Run (NVIDIA's container)

    docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
      -v $PWD:/models nvcr.io/nvidia/tritonserver:24.10-py3 \\
      tritonserver --model-repository=/models --model-control-mode=explicit \\
      --load-model=clap_audio --load-model=clap_text_tokens

The `*_trt` models need their plan first, built on the GPU that serves it (TensorRT 10):

{trt_cmds}

then add `--load-model=clap_audio_trt --load-model=clap_text_tokens_trt`. On a machine
without a GPU, change `KIND_GPU` to `KIND_CPU` in the ONNX models' `config.pbtxt`.
"""


def write_repository(
    model,
    out: str | Path,
    *,
    max_batch: int = 64,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: str = "KIND_GPU",
    ort_tensorrt: bool = False,
    source: str = "random weights",
) -> list[Path]:
    """Export both towers of ``model`` to ONNX and write the repository; returns the configs."""
    import shutil

    from export.onnx import _contract, export_tower

    out = Path(out)
    configs, rows, trt_cmds = [], [], []
    onnx_tmp = out / ".onnx"
    for tower, name in _NAMES.items():
        res = export_tower(model, tower, onnx_tmp, verify_batches=(1,))
        inputs, outputs = onnx_io(res.path)
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(res.path, out / name / "1" / "model.onnx")
        shutil.copyfile(res.sidecar, out / name / "export.json")
        kw = dict(max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances)
        for mname, platform, k in (
            (name, "onnxruntime_onnx", kind),
            (f"{name}_trt", "tensorrt_plan", "KIND_GPU"),
        ):
            (out / mname / "1").mkdir(parents=True, exist_ok=True)
            text = model_config(
                mname, platform, inputs, outputs, kind=k, ort_tensorrt=ort_tensorrt, **kw
            )
            (out / mname / "config.pbtxt").write_text(text)
            configs.append(out / mname / "config.pbtxt")
        sig = ", ".join(f"{n} {t[5:]} {d}" for n, t, d in inputs)
        rows.append(f"| {name} | onnxruntime | {sig} -> embedding |")
        rows.append(f"| {name}_trt | tensorrt_plan | same |")
        trt_cmds.append(
            f"    trtexec --onnx={name}/1/model.onnx --saveEngine={name}_trt/1/model.plan "
            f"--minShapes={_shapes(inputs, 1)} --optShapes={_shapes(inputs, min(16, max_batch))} "
            f"--maxShapes={_shapes(inputs, max_batch)} --fp16"
        )
    shutil.rmtree(onnx_tmp)
    (out / "README.md").write_text(
        README.format(
            source=source,
            rows="\n".join(rows),
            dim=model.cfg.joint_embed_shape,
            audio_contract=_contract(model, "audio"),
            trt_cmds="\n".join(trt_cmds),
        )  # fmt: skip
    )
    log.info("wrote Triton model repository %s (%d models)", out, len(configs))
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry. Exit status: 0 ok, 2 bad arguments."""
    from export.encoders import load_model
    from export.onnx import build_parser, spec_from_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser: argparse.ArgumentParser = build_parser("python -m export.triton")
    parser.set_defaults(out="model_repository")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1, help="instances per model")
    parser.add_argument("--kind", choices=("KIND_GPU", "KIND_CPU"), default="KIND_GPU")
    parser.add_argument(
        "--ort-tensorrt", action="store_true", help="ONNX models use ORT's TensorRT EP (FP16)"
    )
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.instances < 1 or args.max_queue_delay_us < 0:
        parser.exit(2, "error: --max-batch and --instances must be >= 1, the delay >= 0\n")
    try:
        spec = spec_from_args(args)
        model = load_model(spec)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    configs = write_repository(
        model, args.out, max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances, kind=args.kind, ort_tensorrt=args.ort_tensorrt,
        source=args.checkpoint or f"{args.model} (random weights)",
    )  # fmt: skip
    sys.stdout.write("\n".join(map(str, configs)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
