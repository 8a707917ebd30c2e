"""Per-request errors under dynamic batching: a checking front model before a batched one.

Why a second model: PyTriton 0.7 answers one Triton execution (one dynamic batch) either with
one response per request or with one error for all of them. Its proxy builds every response
with output tensors only (``pytriton/proxy/model.py``, ``_wrap_response``, lines 163-177: no
``InferenceResponse(error=...)``), and an exception of the infer function becomes one error
for the whole ``requests_id`` (``pytriton/proxy/inference.py``, ``_handle_requests``, lines
397-409, turned into one ``TritonModelException`` for the execution in
``pytriton/proxy/model.py`` lines 213-216 and 491-492). A bad request inside a batch therefore
fails every request batched with it, whatever the infer function does.

So each served name (``clap_audio`` ...) is a *front* model without a batcher: Triton hands
each of its executions exactly one request, which is checked on its own (a bad one gets its
own named error and nothing else is touched) and then forwarded over localhost gRPC to the
*batched* model (``clap_audio_batched`` ...), where Triton's dynamic batcher groups the checked
requests of all front instances into one forward. The front has ``instances`` copies (one
thread each in the server process), which bounds how many requests can wait in the batcher at
once. Cost: one more pass through Triton per request (measured in ``bench/bench_serve.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["BATCHED_SUFFIX", "forward_infer"]

log = logging.getLogger(__name__)

BATCHED_SUFFIX = "_batched"
_TRITON_DTYPES = {np.float32: "FP32", np.int32: "INT32", np.int64: "INT64", np.object_: "BYTES"}


class _Client:
    """A gRPC client of this server, connected on first use (the server is not up yet when the
    models are bound)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = None
        self._lock = threading.Lock()

    def infer(self, model: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """arrays: input name -> (B, ...) array -> the batched model's (B, D) ``embedding``."""
        import tritonclient.grpc as grpc
        from tritonclient.utils import InferenceServerException

        with self._lock:
            if self._client is None:
                self._client = grpc.InferenceServerClient(self.url)
        inputs = []
        for name, a in arrays.items():
            i = grpc.InferInput(name, list(a.shape), _TRITON_DTYPES[a.dtype.type])
            i.set_data_from_numpy(a)
            inputs.append(i)
        try:
            res = self._client.infer(model, inputs)
        except InferenceServerException as exc:  # passed on as the front request's error
            raise RuntimeError(f"{model}: {exc.message()}") from None
        return res.as_numpy("embedding")


def forward_infer(
    url: str, batched_model: str, check: Callable[[Mapping[str, np.ndarray]], None]
) -> Callable[[list], list[dict[str, np.ndarray]]]:
    """The infer function of one front instance.

    Args:
        url: ``host:port`` of this server's gRPC endpoint.
        batched_model: the model the checked requests go to.
        check: raises ``RequestError`` naming the problem of a request (input name -> array).

    Returns:
        infer(requests) -> [{"embedding": (B, D) float32}] for PyTriton (one request per call:
        the front model has no batcher).
    """
    client = _Client(url)

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        out = []
        for r in requests:
            arrays = {k: np.asarray(v) for k, v in r.items()}
            check(arrays)
            out.append({"embedding": client.infer(batched_model, arrays)})
        return out

    return infer
