"""The served models: request checks, engines, and their binding to Triton through PyTriton.

Runs in the server process that ``clap-fast serve`` starts (``python -m clap_fast.serve_models``,
with the serving environment first on the path; see ``clap_fast.serve``). PyTriton is imported
only inside ``run_server``, so the checks and engines import and test in the main environment.

Models (all batched on the first axis, dynamic batching on by default):

* ``clap_audio``: ``waveform`` FP32 (B, T) mono at the model's rate (48 kHz, declared in the
  model config's parameters) -> ``embedding`` FP32 (B, 512), L2-normalised. Clips shorter than
  10 s are repeat-padded, longer ones follow ``embed_audio``'s default long-audio policy
  (sliding windows, or fusion for fusion models). Requests of different lengths are batched
  by Triton only with requests of the same length.
* ``clap_text``: ``text`` BYTES (B, 1) UTF-8 strings, tokenised in the server (bound only when
  the tower's tokenizer loads offline) -> ``embedding`` FP32 (B, 512).
* ``clap_text_tokens``: ``input_ids`` / ``attention_mask`` INT64 (B, L) -> ``embedding``.

With dynamic batching on, each name above is a checking front model (no batcher;
``--front-instances`` instances for audio, a quarter of that for text) that forwards each
checked request over localhost gRPC to ``<name>_batched``, where Triton's dynamic batcher
groups them; see ``clap_fast.serve_front`` for why (PyTriton 0.7 answers a whole batch with one
error). Clients may call ``<name>_batched`` directly: faster (one pass through Triton), but a bad
request there fails every request batched with it. ``--no-dynamic-batching`` binds
each name directly, one request per execution.

Errors: Triton itself rejects a wrong datatype, rank or a batch above ``--max-batch`` before the
model runs. Our checks (empty or non-finite waveform, audio over ``--max-seconds``, empty text,
token ids outside the vocabulary, bad lengths) raise ``RequestError`` with a message naming
the problem; that request alone gets it as its error response, requests sent at the same time
get their embeddings, and the server keeps running. (A 0-sample waveform is refused earlier,
by the Python backend stub, with "cannot cast view with zeros in shape"; our code never sees
it.)
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clap_fast.serve_front import BATCHED_SUFFIX, forward_infer
from clap_fast.validate import SAMPLE_RATE_RANGE

__all__ = [
    "RequestError",
    "check_waveform",
    "check_audio",
    "check_tokens",
    "decode_texts",
    "EagerEngine",
    "OnnxEngine",
    "make_engine",
    "run_server",
]

log = logging.getLogger(__name__)


# PyTriton 0.7 start-up race with several instances of a model: instances 1.. connect to
# instance 0's handshake socket as soon as the file exists, which can be a moment before it
# listens ("Connection refused" in model.py initialize; seen on a loaded 2-core machine). The
# model then fails to load; the server is restarted, at most this many times in all.
START_TRIES = 3


class RequestError(ValueError):
    """A request the server refuses; the message names the problem."""


# ------------------------------------------------------------------------------------- checks
def check_waveform(x: np.ndarray, max_samples: int) -> list[np.ndarray]:
    """(B, T) float32 request -> B clips of (T,) float32; RequestError if unusable."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise RequestError(f"waveform must be FP32, got {x.dtype}")
    if x.ndim != 2:
        raise RequestError(f"waveform must be (batch, samples), got shape {x.shape}")
    if x.shape[1] == 0:
        raise RequestError("waveform is empty (0 samples)")
    if x.shape[1] > max_samples:
        raise RequestError(
            f"waveform too long: {x.shape[1]} samples > limit {max_samples} (--max-seconds)"
        )
    if not np.isfinite(x).all():
        raise RequestError("waveform contains NaN or Inf")
    return [np.ascontiguousarray(row) for row in x]


def check_audio(
    arrays: Mapping[str, np.ndarray], max_seconds: float, default_rate: int
) -> tuple[list[np.ndarray], list[int]]:
    """A ``clap_audio`` request -> (B clips of (T,) float32, B sample rates in Hz).

    ``sample_rate`` is optional: INT32 (B, 1), one rate per row (default ``default_rate``);
    the length limit is ``max_seconds`` at the row's rate."""
    x = np.asarray(arrays["waveform"])
    n = x.shape[0] if x.ndim else 0
    if "sample_rate" not in arrays:
        rates = [default_rate] * n
    else:
        r = np.asarray(arrays["sample_rate"])
        if r.dtype != np.int32 or r.shape != (n, 1):
            raise RequestError(
                f"sample_rate must be INT32 (batch, 1) with batch = {n} (the waveform's rows), "
                f"got {r.dtype} {r.shape}"
            )
        lo, hi = SAMPLE_RATE_RANGE
        if r.min() < lo or r.max() > hi:
            raise RequestError(f"sample_rate must be in [{lo}, {hi}] Hz, got {r[:, 0].tolist()}")
        rates = [int(v) for v in r[:, 0]]
    clips = check_waveform(x, int(max_seconds * min(rates, default=default_rate)))
    return clips, rates


def check_tokens(
    ids: np.ndarray, mask: np.ndarray, vocab: int, context: int, fixed_length: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) int64 ids and mask, checked against the tower; RequestError otherwise."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise RequestError(
            f"input_ids and attention_mask must both be (batch, length), got {ids.shape} and "
            f"{mask.shape}"
        )
    n = ids.shape[1]
    if n == 0 or n > context or (fixed_length and n != context):
        want = f"exactly {context}" if fixed_length else f"1..{context}"
        raise RequestError(f"token length must be {want}, got {n}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise RequestError(
            f"input_ids must be in [0, {vocab}), got range [{ids.min()}, {ids.max()}]"
        )
    if not np.isin(mask, (0, 1)).all():
        raise RequestError("attention_mask must hold only 0 and 1")
    if (mask.sum(axis=1) == 0).any():
        raise RequestError("attention_mask masks every token of a row")
    return ids.astype(np.int64), mask.astype(np.int64)


def decode_texts(x: np.ndarray, max_chars: int = 4096) -> list[str]:
    """(B, 1) BYTES request -> B strings; RequestError for empty / undecodable ones."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 1:
        raise RequestError(f"text must be (batch, 1) strings, got shape {x.shape}")
    out = []
    for item in x[:, 0]:
        try:
            s = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError as exc:
            raise RequestError(f"text is not valid UTF-8: {exc}") from None
        if not s.strip():
            raise RequestError("text is an empty string")
        if len(s) > max_chars:
            raise RequestError(f"text too long: {len(s)} characters > {max_chars}")
        out.append(s)
    return out


def text_limits(model) -> tuple[int, int, bool]:
    """(vocabulary size, context length, whether the length must equal the context)."""
    if model.text_type == "transformer":
        return model.token_embedding.num_embeddings, model.cfg.text.context_length, True
    vocab = model.text_branch.get_input_embeddings().num_embeddings
    return vocab, model.cfg.text.context_length, False


# ------------------------------------------------------------------------------------ engines
class EagerEngine:
    """The PyTorch model itself: ``embed_audio`` / ``embed_text_tokens``, run by one of
    ``clap_fast.engines``' PyTorch engines (``runtime``: eager | bf16 | auto | compile)."""

    def __init__(self, model, max_batch: int, runtime: str = "eager") -> None:
        self.model, self.max_batch, self.runtime = model, max_batch, runtime
        self.name = runtime

    def embed_audio(self, clips: Sequence[np.ndarray], rates: Sequence[int]) -> np.ndarray:
        """Clips of (T_i,) float32 at rates[i] Hz -> (N, 512) float32, L2-normalised; clips
        at another rate than the model's are resampled (as ``embed_audio`` does)."""
        out = np.empty((len(clips), self.model.cfg.joint_embed_shape), np.float32)
        for rate in sorted(set(rates)):  # one embed_audio call per rate in the batch
            idx = [i for i, r in enumerate(rates) if r == rate]
            waves = [torch.from_numpy(clips[i]) for i in idx]
            out[idx] = self.model.embed_audio(
                waves, rate, batch_size=self.max_batch, engine=self.runtime
            ).numpy()
        return out

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(N, L) int64 ids and mask -> (N, 512) float32, L2-normalised."""
        out = self.model.embed_text_tokens(
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            batch_size=self.max_batch,
            engine=self.runtime,
        )
        return out.numpy()


class OnnxEngine(EagerEngine):
    """Both towers exported by ``export.onnx`` and run by onnxruntime; the audio preparation
    (int16 round trip, fill, sliding windows, window pooling) is the model's own."""

    def __init__(self, model, max_batch: int, out_dir: str | Path) -> None:
        from export.onnx import export_tower
        from export.runners import OnnxRunner

        super().__init__(model, max_batch)
        self.name = "onnx"
        if model.cfg.enable_fusion:
            raise ValueError("the onnx engine serves non-fusion models only; use --engine eager")
        self.runners = {}
        for tower in ("audio", "text"):
            res = export_tower(model, tower, out_dir, verify_batches=(1,))
            self.runners[tower] = OnnxRunner(res.path, "auto")

    def embed_audio(self, clips: Sequence[np.ndarray], rates: Sequence[int]) -> np.ndarray:
        from clap_fast.audio import prepare_batch, resample

        sr = self.model.cfg.audio.sample_rate
        waves = [resample(torch.from_numpy(c), r, sr) for c, r in zip(clips, rates)]
        batch = prepare_batch(waves, self.model.cfg.audio, fusion=False)
        wins = batch.waveform
        feats = torch.cat(
            [
                self.runners["audio"].embed_audio(wins[s : s + self.max_batch])
                for s in range(0, len(wins), self.max_batch)
            ]
        )
        if len(feats) != len(clips):  # several windows per clip: mean of normalised windows
            pooled = torch.zeros(len(clips), feats.shape[1]).index_add_(0, batch.owner, feats)
            feats = pooled / torch.bincount(batch.owner, minlength=len(clips))[:, None]
        return F.normalize(feats, dim=-1).numpy()

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self.runners["text"].embed_text_tokens(torch.from_numpy(ids), torch.from_numpy(mask))
        return out.numpy()


# served engine -> clap_fast.engines runtime of EagerEngine
_TORCH_ENGINES = {"eager": "eager", "bf16": "bf16", "auto": "auto", "compiled": "compile"}


def make_engine(name: str, model, max_batch: int, onnx_dir: str | Path | None = None):
    """An engine by name; ValueError naming why for those this build cannot run."""
    if name in _TORCH_ENGINES:
        return EagerEngine(model, max_batch, _TORCH_ENGINES[name])
    if name == "onnx":
        import tempfile

        return OnnxEngine(model, max_batch, onnx_dir or tempfile.mkdtemp(prefix="clap-serve-"))
    if name == "trt":
        raise ValueError(
            "the trt engine is written against TensorRT 10, which is not installed here; "
            "deploy with `python -m export.triton` and NVIDIA's Triton container instead"
        )
    if name == "aoti":
        raise ValueError(
            "the aoti engine is not served: build the .pt2 packages with `python -m export.aoti` "
            "and load them with torch._inductor.aoti_load_package; serve --engine compiled instead"
        )
    raise ValueError(f"unknown engine {name!r}; one of {(*_TORCH_ENGINES, 'onnx')} is served")


# ------------------------------------------------------------------------- infer functions
def _split(out: np.ndarray, counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    bounds = np.cumsum([0, *counts])
    return [{"embedding": out[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]


def audio_infer(engine, max_seconds: float, default_rate: int) -> Callable:
    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        per_req = [check_audio(r, max_seconds, default_rate) for r in requests]
        clips = [c for clips, _ in per_req for c in clips]
        rates = [r for _, rates in per_req for r in rates]
        return _split(engine.embed_audio(clips, rates), [len(c) for c, _ in per_req])

    return infer


def tokens_infer(engine, limits: tuple[int, int, bool]) -> Callable:
    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        checked = [check_tokens(r["input_ids"], r["attention_mask"], *limits) for r in requests]
        return [{"embedding": engine.embed_tokens(ids, mask)} for ids, mask in checked]

    return infer


def text_infer(engine, tokenize: Callable) -> Callable:
    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        texts = [decode_texts(r["text"]) for r in requests]
        flat = [t for ts in texts for t in ts]
        tok = tokenize(flat)
        out = engine.embed_tokens(tok["input_ids"].numpy(), tok["attention_mask"].numpy())
        return _split(out, [len(t) for t in texts])

    return infer


# ------------------------------------------------------------------------------------ server
def _load_model(checkpoint: str, device: str):
    from clap_fast.model import CLAP

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return CLAP.from_pretrained(checkpoint).to(dev).eval()


def run_server(args: Any) -> int:
    """Bind the models and serve until SIGINT / SIGTERM (or the server dies)."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model = _load_model(args.checkpoint, args.device)
    engine = make_engine(args.engine, model, args.max_batch, args.onnx_dir)
    sr = model.cfg.audio.sample_rate
    dim = model.cfg.joint_embed_shape
    batcher = (
        None
        if args.no_dynamic_batching
        else DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)
    )
    cfg = ModelConfig(max_batch_size=args.max_batch, batcher=batcher)
    out = [Tensor(name="embedding", dtype=np.float32, shape=(dim,))]
    triton_cfg = TritonConfig(
        http_address="127.0.0.1", grpc_address="127.0.0.1", metrics_address="127.0.0.1",
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        log_verbose=args.log_verbose, exit_on_error=True,
    )  # fmt: skip

    def on_term(signum, frame):  # PyTriton's serve() stops cleanly on KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    front_cfg = ModelConfig(max_batch_size=args.max_batch, batcher=None)
    url = f"127.0.0.1:{args.grpc_port}"

    def bind(
        triton, name: str, infer: Callable, check: Callable, inputs: list, fronts: int
    ) -> None:
        """Without dynamic batching: one model, every execution one request. With it: the
        checking front model ``name`` before the batched ``name_batched`` (serve_front)."""
        if batcher is None:
            triton.bind(model_name=name, infer_func=infer, inputs=inputs, outputs=out,
                        config=front_cfg, strict=True)  # fmt: skip
            return
        batched = name + BATCHED_SUFFIX
        triton.bind(model_name=batched, infer_func=infer, inputs=inputs, outputs=out,
                    config=cfg, strict=True)  # fmt: skip
        # Each front instance is a Python-backend stub process; many of them starting at once
        # on a small CPU time out PyTriton's start-up handshake (seen with 3 x 16 on 2 cores).
        funcs = [forward_infer(url, batched, check) for _ in range(min(fronts, args.max_batch))]
        triton.bind(model_name=name, infer_func=funcs, inputs=inputs, outputs=out,
                    config=front_cfg, strict=True)  # fmt: skip

    limits = text_limits(model)
    text_fronts = max(1, args.front_instances // 4)  # a text forward takes milliseconds

    def bind_all(triton) -> None:
        bind(
            triton,
            "clap_audio",
            audio_infer(engine, args.max_seconds, sr),
            lambda a: check_audio(a, args.max_seconds, sr),
            [
                Tensor(name="waveform", dtype=np.float32, shape=(-1,)),
                Tensor(name="sample_rate", dtype=np.int32, shape=(1,), optional=True),
            ],
            args.front_instances,
        )
        bind(
            triton,
            "clap_text_tokens",
            tokens_infer(engine, limits),
            lambda a: check_tokens(a["input_ids"], a["attention_mask"], *limits),
            [
                Tensor(name="input_ids", dtype=np.int64, shape=(-1,)),
                Tensor(name="attention_mask", dtype=np.int64, shape=(-1,)),
            ],
            text_fronts,
        )
        try:
            model.tokenize(["probe"])
        except Exception as exc:  # RoBERTa's files are not available offline, for example
            log.warning("clap_text not served (tokenizer unavailable: %s)", exc)
        else:
            bind(
                triton,
                "clap_text",
                text_infer(engine, model.tokenize),
                lambda a: decode_texts(a["text"]),
                [Tensor(name="text", dtype=np.bytes_, shape=(1,))],
                text_fronts,
            )

    for attempt in range(1, START_TRIES + 1):
        with Triton(config=triton_cfg) as triton:
            try:
                bind_all(triton)
            except Exception as exc:  # see START_TRIES
                if attempt == START_TRIES:
                    raise
                log.warning("model load failed (%s); restarting the server (try %d of %d)",
                            str(exc).splitlines()[0], attempt + 1, START_TRIES)  # fmt: skip
                continue
            log.info(
                "serving %s (%s engine, %d Hz) on http :%d, grpc :%d, metrics :%d",
                args.checkpoint, engine.name, sr, args.http_port, args.grpc_port, args.metrics_port,
            )  # fmt: skip
            triton.serve()
        break
    log.info("server stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from clap_fast.serve import build_parser, validate_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        validate_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        return run_server(args)
    except KeyboardInterrupt:  # a signal during start-up; the Triton context has cleaned up
        log.info("interrupted; server stopped")
        return 0


if __name__ == "__main__":
    sys.exit(main())
