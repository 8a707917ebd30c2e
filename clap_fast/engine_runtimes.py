"""Builders of the non-eager engines (see ``clap_fast.engines``): compile, onnx, openvino, int8.

Each returns a callable with the signature of the tower's ``encode_*`` method:

* audio: ``encode(waveform=None, *, mel_fusion=None, longer=None) -> (B, 512)``, waveform
  (B, clip_samples) float32 prepared by ``clap_fast.audio``; fusion models take mel_fusion
  (B, 4, 1001, 64) float32 and longer (B,) bool;
* text: ``encode(input_ids, attention_mask=None) -> (B, 512)``, (B, L) int64.

The exported engines run the graphs of ``export/`` (``export.onnx.export_tower``, checked
against PyTorch at export) and return L2-normalised float32 CPU embeddings; the compiled engine
returns what the model's method returns. The model's maths lives in the model and in
``export/encoders.py`` only; nothing here re-implements it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config as _inductor_config
import torch.nn.functional as F
from torch import nn

__all__ = [
    "build",
    "quantize_int8",
    "int8_nodes",
    "calibration_inputs",
    "quantise_audio_int8",
    "OpenVinoRunner",
]

KEEP_FP32_SCHEMES: dict[str, tuple[str, ...]] = {
    "all": (),
    "keep_ends": ("/layers.3/", "projection/"),
}
"""int8 schemes: node-name fragments whose linear layers stay fp32 (``quantize_int8``'s
``keep_fp32``). ``all`` (engine ``int8``): every linear layer; ``keep_ends``: the audio tower's
last Swin stage and both projections stay fp32 (the patch embedding is a convolution and is
never quantised)."""

log = logging.getLogger(__name__)

FRONT_END_SCOPE = "/frontend/"
"""Name prefix of the audio graph's log-mel nodes (``AudioEncoder.frontend``), kept in fp32."""


def build(
    model: nn.Module, engine: str, tower: str, keep_fp32: tuple[str, ...] = ()
) -> Callable[..., torch.Tensor]:
    """The encode callable of ``engine`` ("compile" | "int8_compile" | "onnx" | "openvino" |
    "openvino_bf16" | "int8"); ``keep_fp32``: node-name fragments left in fp32 by int8 (see
    ``quantize_int8``)."""
    if engine == "compile":
        return _compiled(model, tower)
    if engine == "int8_compile":
        return _int8_compiled(model, tower)
    if engine not in ("onnx", "openvino", "openvino_bf16", "int8"):
        raise ValueError(f"no builder for engine {engine!r}")
    with tempfile.TemporaryDirectory(prefix="clap_fast_engine_") as tmp, _model_state(model):
        path = _export(model, tower, Path(tmp))
        if engine == "int8":
            from clap_fast.engines import cpu_info

            dst = path.with_name(f"{path.stem}_int8.onnx")
            path = quantize_int8(path, dst, cpu_info(), keep_fp32=keep_fp32)
        if engine in ("openvino", "openvino_bf16"):
            runner = OpenVinoRunner(path, "bf16" if engine == "openvino_bf16" else "f32")
        else:
            from export.runners import OnnxRunner

            runner = OnnxRunner(path, providers="cpu")  # the session holds the graph in memory
        encode = _graph_encoder(runner, tower)
        if engine in ("int8", "openvino_bf16"):
            _check_fidelity(model, tower, encode, engine)
    return encode


# ---------------------------------------------------------------------------------- compile
def _compiled(model: nn.Module, tower: str) -> Callable[..., torch.Tensor]:
    """torch.compile of the tower's method with static shapes; each call's batch is padded to
    the next power of two (repeating its last row) so that a run compiles O(log B) graphs."""
    fn = torch.compile(model.encode_audio if tower == "audio" else model.encode_text, dynamic=False)

    def encode(*args: torch.Tensor | None, **kwargs: torch.Tensor | None) -> torch.Tensor:
        first = next(t for t in (*args, *kwargs.values()) if t is not None)
        n = first.shape[0]
        target = _next_power_of_two(n)
        padded = [_pad_rows(t, target) for t in args]
        named = {k: _pad_rows(v, target) for k, v in kwargs.items()}
        return fn(*padded, **named)[:n]

    return encode


# ----------------------------------------------------------------------------- int8_compile
CALIBRATION_CLIPS = 16
"""Built-in synthetic clips (``clap_fast.synth``, 2 per class) that set int8_compile's
activation scales."""


class _AfterFrontEnd(nn.Module):
    """``encode_audio`` from the fp32 log-mel on: (B, 1, T, F) ``mel``, or fusion views and
    ``longer``. What int8_compile exports, quantises and compiles."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor, longer: torch.Tensor | None = None) -> torch.Tensor:
        if longer is None:
            return self.model.encode_audio(mel=mel)
        return self.model.encode_audio(mel_fusion=mel, longer=longer)


def calibration_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """int8_compile's calibration rows: ``CALIBRATION_CLIPS`` synthetic clips through the same
    preparation as ``embed_audio`` (``prepare_batch``; sliding windows for long clips), as
    ``_AfterFrontEnd`` inputs: (log-mel,) or (mel_fusion, longer)."""
    from clap_fast.audio import prepare_batch
    from clap_fast.synth import generate_clip

    cfg = model.cfg.audio
    clips = [
        torch.from_numpy(
            generate_clip(i, sample_rate=cfg.sample_rate, split="calibration").waveform
        )
        for i in range(CALIBRATION_CLIPS)
    ]
    batch = prepare_batch(clips, cfg, fusion=model.cfg.enable_fusion, device=torch.device("cpu"))
    with torch.no_grad():
        if batch.waveform is not None:
            return (model.audio_branch.log_mel(batch.waveform),)
        return (batch.mel_fusion.float(), batch.longer.bool())


def quantise_audio_int8(model: nn.Module) -> torch.fx.GraphModule:
    """The audio tower after the front end (``_AfterFrontEnd``) as a PT2E int8 graph: exported
    with a dynamic batch, annotated by ``X86InductorQuantizer`` (int8 weights per output
    channel, uint8 activations per tensor; linear layers only, convolutions stay fp32),
    calibrated on ``calibration_inputs`` and converted. Run eagerly it simulates int8 (quantise /
    dequantise around fp32 maths); inductor with freezing lowers it to oneDNN's int8 kernels."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as exc:
        raise ValueError(
            "engine 'int8_compile' needs torchao: pip install torchao (extra: clap_fast[int8])"
        ) from exc

    calib = calibration_inputs(model)
    body = _AfterFrontEnd(model).eval()
    rows = calib[0].shape[0]
    log.info("int8_compile: exporting the audio tower, calibrating on %d rows", rows)
    from clap_fast.engines import cpu_info

    batch = torch.export.Dim("batch", min=1, max=4096)
    with _model_state(model), torch.no_grad():
        # strict export: the quantizer finds linear layers by dynamo's source records
        graph = torch.export.export(
            body, tuple(t[:2] for t in calib), dynamic_shapes=[{0: batch}] * len(calib),
            strict=True,
        ).module()  # fmt: skip
        quantizer = xiq.X86InductorQuantizer()
        # without VNNI / AMX, oneDNN's u8·s8 multiply-adds saturate: 7-bit activations
        # (AVX2 simulation: cosine 0.9986 to fp32 with full range)
        reduce_range = not cpu_info().int8_dot
        quantizer.set_global(
            xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
        )
        # convolutions stay fp32: HTS-AT's one is the patch embedding (2 ms of ~400 per batch
        # of 8); an int8 one failed inductor's weight prepack in one trial configuration and
        # was not pursued. PANN towers get int8 in their linear layers only.
        quantizer.set_module_type_qconfig(nn.Conv2d, None)
        prepared = prepare_pt2e(graph, quantizer)
        for i in range(0, rows, 8):
            prepared(*(t[i : i + 8] for t in calib))
        return convert_pt2e(prepared)


MICRO_BATCH = 2
"""Rows per call of int8_compile's compiled graph. Larger batches run in chunks of this size:
measured on 2 cores (HTSAT-tiny, 8 clips), chunks of 2 took ~300 ms against ~400 ms for one
batch of 8, whose 30–70 MB intermediates glibc maps fresh (and the kernel zeroes) on every call
(~36,000 page faults per batch against ~20 in chunks), and they keep the working set in cache.
A short last chunk is padded; a call with one row runs unpadded (a second compiled size, built
on first use: padded, a single clip took 100 ms, against 43 ms unpadded in a later run)."""


def _int8_compiled(model: nn.Module, tower: str) -> Callable[..., torch.Tensor]:
    """Static int8 audio tower (``quantise_audio_int8``) compiled by inductor with freezing to
    oneDNN int8 kernels (VNNI / AMX where the CPU has them); the log-mel front end runs fp32
    eager before it. Text: fp32 eager (``model.encode_text``).

    Quantised once (export, calibration, conversion: about 37 s on 2 cores for HTSAT-tiny);
    compiled with static shapes for ``MICRO_BATCH`` rows (about 45 s on 2 cores): each call runs
    in chunks of that many rows, a short last chunk padded by repeating its last row; calls with
    one row compile (once) and run a one-row graph."""
    if tower == "text":
        log.info("int8_compile quantises the audio tower only; the text tower runs fp32 eager")
        return model.encode_text
    graph = quantise_audio_int8(model)
    # the fidelity check runs the graph eagerly (simulated int8): no extra compiled size
    _check_fidelity(model, tower, _after_front_end(model, graph), "int8_compile")
    log.info(
        "int8_compile: quantised; the first call compiles the graph for %d-row chunks "
        "(about 45 s on 2 cores; once more for a single-row call)",
        MICRO_BATCH,
    )
    return _after_front_end(model, torch.compile(graph, dynamic=False), chunk=MICRO_BATCH)


def _after_front_end(
    model: nn.Module, fn: Callable[..., torch.Tensor], chunk: int | None = None
) -> Callable[..., torch.Tensor]:
    """The audio encode callable over ``fn`` (an ``_AfterFrontEnd`` graph): fp32 log-mel, then
    ``fn``; with ``chunk`` (a compiled graph), both in chunks of at most that many rows."""

    def inputs(
        waveform: torch.Tensor | None,
        mel_fusion: torch.Tensor | None,
        longer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        if waveform is not None:
            return (model.audio_branch.log_mel(waveform.float()),)
        return (mel_fusion.float(), longer.bool())

    def encode(
        waveform: torch.Tensor | None = None,
        *,
        mel_fusion: torch.Tensor | None = None,
        longer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if chunk is None:
            with torch.no_grad():
                return fn(*inputs(waveform, mel_fusion, longer))
        n = (waveform if waveform is not None else mel_fusion).shape[0]
        size = min(n, chunk)  # one row alone is not padded (its own compiled size)
        out = []
        # Freezing (weights as constants, prepacked for oneDNN) is what lowers the int8 pattern
        # to oneDNN's int8 linear; it must be in inductor's global config while the graph
        # compiles (as torch.compile(options={"freezing": True}) the weight prepacks met fake
        # tensors and failed). Outside inference mode: inductor wants plain tensors.
        with torch.inference_mode(False), torch.no_grad(), _inductor_config.patch(freezing=True):
            for i in range(0, n, size):
                # a short last chunk repeats its last row: no compiled size for the remainder
                part = (
                    None if t is None else _pad_rows(t[i : i + size], size).clone()
                    for t in (waveform, mel_fusion, longer)
                )
                out.append(fn(*inputs(*part))[: n - i])
        return torch.cat(out)

    return encode


def in_chunks(
    fn: Callable[..., torch.Tensor], rows: int = MICRO_BATCH
) -> Callable[..., torch.Tensor]:
    """``fn`` (an encode callable) called on at most ``rows`` rows at a time, outputs joined: the
    bf16 engine's audio tower on the CPU (same rows, smaller intermediates; see MICRO_BATCH).
    Measured there (HTSAT-tiny, 2 cores, one process, alternating): 32 clips 2.6 s against 3.8 s
    in one call, 8 clips 3–12 % faster."""

    def encode(*args: torch.Tensor | None, **kwargs: torch.Tensor | None) -> torch.Tensor:
        n = next(t for t in (*args, *kwargs.values()) if t is not None).shape[0]
        if n <= rows:
            return fn(*args, **kwargs)
        parts = []
        for i in range(0, n, rows):
            cut = slice(i, i + rows)
            parts.append(
                fn(
                    *(None if t is None else t[cut] for t in args),
                    **{k: None if v is None else v[cut] for k, v in kwargs.items()},
                )
            )
        return torch.cat(parts)

    return encode


def _next_power_of_two(n: int) -> int:
    """The batch size the compile engine pads ``n`` rows to (one static graph per size)."""
    return 1 << max(0, (n - 1).bit_length())


def _pad_rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if t is None or t.shape[0] == n:
        return t
    return torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


# ----------------------------------------------------------------------------------- export
@contextlib.contextmanager
def _model_state(model: nn.Module) -> Iterator[None]:
    """Export outside inference mode, in eval mode, and give the caller its modes back."""
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.inference_mode(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shape guards
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def _export(model: nn.Module, tower: str, out: Path) -> Path:
    """The tower's ONNX graph (opset 17), verified by ``export_tower`` against PyTorch."""
    from export.onnx import export_tower

    log.info("exporting the %s tower to ONNX for the engine (once per model and weights)", tower)
    return export_tower(model.eval(), tower, out, stem="engine", verify_batches=(1,)).path


def int8_nodes(path: str | Path, keep_fp32: tuple[str, ...] = ()) -> list[str]:
    """Names of the graph's linear layers: MatMul / Gemm nodes whose second input is a weight
    (an initializer), outside the log-mel front end and without any of ``keep_fp32`` in their
    name. Attention's activation × activation matmuls and the resize matrix (its constant is
    the first input) are not among them."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm")
        and len(n.input) > 1
        and n.input[1] in weights
        and not _in_front_end(n.name)
        and not any(k in n.name for k in keep_fp32)
    ]


def _in_front_end(name: str) -> bool:
    """The log-mel front end runs in the audio branch's own forward: its matmul against the mel
    filterbank is a node directly in the ``/audio_branch/`` scope, while every linear layer is a
    node of a submodule (``/audio_branch/layers.0/.../qkv/MatMul``, ``/audio_projection/...``)."""
    parts = name.strip("/").split("/")
    return name.startswith(FRONT_END_SCOPE) or (len(parts) == 2 and parts[0] == "audio_branch")


def quantize_int8(src: Path, dst: Path, info, keep_fp32: tuple[str, ...] = ()) -> Path:
    """Dynamic int8 quantisation of ``int8_nodes(src)``: int8 weights per output channel,
    uint8 activations quantised per call. Without VNNI / AMX (``info.int8_dot`` False) the
    weights use 7 bits (``reduce_range``): the AVX2 u8·s8 multiply-add saturates otherwise."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = int8_nodes(src, keep_fp32)
    if not nodes:
        raise ValueError(f"{src.name}: no linear layers to quantise")
    quiet = _BelowError()  # onnxruntime's quantiser logs per tensor on the root logger
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        quantize_dynamic(
            src, dst, nodes_to_quantize=nodes, per_channel=True,
            reduce_range=not info.int8_dot, weight_type=QuantType.QInt8,
        )  # fmt: skip
    finally:
        root.removeFilter(quiet)
    log.info(
        "int8: quantised %d linear layers (reduce_range=%s, kept fp32: %s)",
        len(nodes),
        not info.int8_dot,
        keep_fp32 or "none",
    )
    return dst


class _BelowError(logging.Filter):
    """Drops records below ERROR logged on the logger it is attached to (not propagated ones)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _check_fidelity(
    model: nn.Module, tower: str, encode: Callable[..., torch.Tensor], engine: str
) -> None:
    """Log a reduced-precision graph's cosine to fp32 eager on two real-ish inputs; warn below
    its bound (int8: ``INT8_MIN_COSINE``, openvino_bf16: ``AUTO_MIN_COSINE``). Two inputs can
    miss a failure (openvino_bf16 passed here and failed on a trained model): measure on your
    data (``bench/int8_fidelity.py``)."""
    from clap_fast.engines import AUTO_MIN_COSINE, INT8_MIN_COSINE
    from export.onnx import tower_inputs

    bound = INT8_MIN_COSINE if engine.startswith("int8") else AUTO_MIN_COSINE

    _, args = tower_inputs(model, tower, 2, seed=7)
    with torch.inference_mode():
        if tower == "text":
            ref, got = model.encode_text(*args), encode(*args)
        elif len(args) == 2:  # fusion: (mel_fusion, longer)
            ref = model.encode_audio(mel_fusion=args[0], longer=args[1])
            got = encode(mel_fusion=args[0], longer=args[1])
        else:
            ref, got = model.encode_audio(args[0]), encode(args[0])
    cos = float(F.cosine_similarity(ref.float(), got.float(), dim=-1).min())
    level = logging.INFO if cos >= bound else logging.WARNING
    log.log(level, "%s %s engine: cosine to fp32 eager %.6f (bound %s)", engine, tower, cos, bound)


# ------------------------------------------------------------------------------ runners
class OpenVinoRunner:
    """An OpenVINO CPU model compiled from an ONNX graph; ``run`` as ``export.runners.OnnxRunner``.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: "f32" (engine ``openvino``: exact;
    OpenVINO would otherwise pick bf16 by itself on CPUs with bf16 units) or "bf16" (engine
    ``openvino_bf16``: matmuls and convolutions in bf16 with fp32 accumulation)."""

    PRECISIONS = ("f32", "bf16")

    def __init__(self, path: str | Path, precision: str = "f32") -> None:
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {precision!r}")
        try:
            import openvino as ov
        except ImportError as exc:
            raise ValueError(
                "engine 'openvino' needs OpenVINO: pip install openvino (extra: clap_fast[openvino])"
            ) from exc
        core = ov.Core()
        ov_model = core.read_model(str(path))
        self.precision = precision
        try:
            self.compiled = core.compile_model(
                ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision}
            )
        except RuntimeError as exc:  # e.g. bf16 under ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16
            if precision == "f32":
                raise
            last = str(exc).strip().splitlines()[-1][:200]
            log.warning("OpenVINO cannot compile at %s here (%s): f32 instead", precision, last)
            self.precision = "f32"
            self.compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]

    def run(self, feeds: Mapping[str, torch.Tensor | np.ndarray]) -> torch.Tensor:
        arrays = {
            k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in feeds.items()
        }
        out = self.compiled(arrays)[self.compiled.outputs[0]]
        return torch.from_numpy(np.ascontiguousarray(out)).float()


def _graph_encoder(runner, tower: str) -> Callable[..., torch.Tensor]:
    """The encode callable over a runner with ``run(feeds)`` and ``input_names``."""
    if tower == "text":

        def encode_text(
            input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
        ) -> torch.Tensor:
            feeds = {"input_ids": input_ids.long()}
            if "attention_mask" in runner.input_names:  # CLIP-style graphs drop the mask
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
                feeds["attention_mask"] = mask.long()
            return runner.run(feeds)

        return encode_text

    def encode_audio(
        waveform: torch.Tensor | None = None,
        *,
        mel_fusion: torch.Tensor | None = None,
        longer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mel_fusion is not None:
            return runner.run({"mel_fusion": mel_fusion.float(), "longer": longer.bool()})
        return runner.run({"waveform": waveform.float()})

    return encode_audio
