"""``clap-fast serve``: request checks (always), and a real Triton server on free localhost ports
queried through ``tritonclient`` HTTP and gRPC (when ``scripts/setup_serve.sh`` has been run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clap_fast import serve
from clap_fast.serve_models import (
    RequestError,
    check_audio,
    check_tokens,
    check_waveform,
    decode_texts,
    make_engine,
)
from clap_fast.serve_process import ServerProcess
from tests.helpers import randomize_bn, signals, small_model

MAX_BATCH = 4
MAX_SECONDS = 15.0


# ------------------------------------------------------------------ checks (no server needed)
@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((1, 0), np.float32), "empty"),
        (np.full((1, 100), np.nan, np.float32), "NaN"),
        (np.zeros((1, 16 * 48000), np.float32), "too long"),
        (np.zeros((1, 10), np.float64), "FP32"),
        (np.zeros((1, 2, 3), np.float32), r"\(batch, samples\)"),
    ],
)
def test_check_waveform_names_the_problem(x, match):
    with pytest.raises(RequestError, match=match):
        check_waveform(x, int(MAX_SECONDS * 48000))


def test_check_waveform_passes_rows():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    rows = check_waveform(x, 100)
    assert len(rows) == 3 and all(np.array_equal(r, x[i]) for i, r in enumerate(rows))


def test_check_audio_sample_rate():
    x = np.zeros((2, 16000 * 16), np.float32)  # 16 s at 16 kHz
    rate = np.full((2, 1), 16000, np.int32)
    clips, rates = check_audio({"waveform": x}, 20.0, 48000)
    assert rates == [48000, 48000] and len(clips) == 2
    with pytest.raises(RequestError, match="too long"):  # the limit is in seconds at the rate
        check_audio({"waveform": x, "sample_rate": rate}, 15.0, 48000)
    assert check_audio({"waveform": x, "sample_rate": rate}, 17.0, 48000)[1] == [16000, 16000]
    for bad, match in [(rate.astype(np.int64), "INT32"), (rate[:1], r"\(batch, 1\)"),
                       (np.full((2, 1), 10, np.int32), r"in \[")]:  # fmt: skip
        with pytest.raises(RequestError, match=match):
            check_audio({"waveform": x, "sample_rate": bad}, 20.0, 48000)


def test_unserved_engines_say_why():
    with pytest.raises(ValueError, match="TensorRT"):
        make_engine("trt", None, 4)
    with pytest.raises(ValueError, match="export.aoti"):
        make_engine("aoti", None, 4)
    assert make_engine("compiled", None, 4).runtime == "compile"


def test_check_tokens_and_texts():
    ids, mask = np.array([[5, 7, 2]]), np.ones((1, 3), np.int64)
    assert check_tokens(ids, mask, 10, 4, False)[0].dtype == np.int64
    with pytest.raises(RequestError, match="in \\[0, 10\\)"):
        check_tokens(np.array([[5, 70]]), np.ones((1, 2)), 10, 4, False)
    with pytest.raises(RequestError, match="exactly 4"):
        check_tokens(ids, mask, 10, 4, True)
    with pytest.raises(RequestError, match="0 and 1"):
        check_tokens(ids, mask * 2, 10, 4, False)
    assert decode_texts(np.array([[b"a dog"], [b"rain"]], dtype=object)) == [
        "a dog",
        "rain",
    ]
    with pytest.raises(RequestError, match="empty string"):
        decode_texts(np.array([[b"  "]], dtype=object))


def test_serve_without_env_says_how_to_create_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLAP_FAST_SERVE_ENV", str(tmp_path / "missing"))
    assert serve.serve_main(["ckpt"]) == 2
    assert serve.SETUP_HINT in caplog.text
    assert serve.serve_main(["ckpt", "--http-port", "1", "--grpc-port", "1"]) == 2
    assert "must differ" in caplog.text
    assert serve.serve_main(["ckpt", "--front-instances", "0"]) == 2
    assert "--front-instances must be >= 1" in caplog.text


def test_server_env_puts_libpython_first():
    import sysconfig

    env = serve.server_env({"LD_LIBRARY_PATH": "/x", "PYTHONPATH": "/y"})
    assert env["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert env["PYTHONPATH"].endswith("/y")


# ------------------------------------------------------------------------- a real server
def _cos(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    b = b.numpy()
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _start(tmp_path_factory, engine: str):
    if serve.find_serve_env() is None:
        pytest.skip(f"no serving environment; create it with: {serve.SETUP_HINT}")
    pytest.importorskip("tritonclient.http")
    d = tmp_path_factory.mktemp(f"serve-{engine}")
    model = small_model(text="transformer").eval()
    randomize_bn(model)
    model.save_pretrained(d / "ckpt")
    from clap_fast.model import CLAP

    model = CLAP.from_pretrained(d / "ckpt").eval()  # exactly what the server loads
    args = ["--engine", engine, "--max-batch", str(MAX_BATCH), "--max-seconds", str(MAX_SECONDS),
            "--max-queue-delay-us", "200000", "--onnx-dir", str(d / "onnx")]  # fmt: skip
    models = ("clap_audio", "clap_text", "clap_text_tokens")
    srv = ServerProcess(d / "ckpt", args, log_path=d / "server.log", models=models).start()
    return srv, model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv, model = _start(tmp_path_factory, "eager")
    yield srv, model
    code = srv.stop()
    assert code == 0, srv.log_tail()
    assert not srv.leftover, f"server processes left running: {srv.leftover}"


def _http(srv, timeout_s: float = 60.0):
    import tritonclient.http as http

    client = http.InferenceServerClient(srv.http_url, concurrency=8, network_timeout=timeout_s)
    return http, client


def _infer(mod, client, model_name, arrays: dict[str, np.ndarray]):
    dt = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32", np.int64: "INT64",
          np.object_: "BYTES"}  # fmt: skip
    inputs = []
    for name, a in arrays.items():
        i = mod.InferInput(name, list(a.shape), dt[a.dtype.type])
        i.set_data_from_numpy(a)
        inputs.append(i)
    return client.infer(model_name, inputs).as_numpy("embedding")


def test_audio_http_matches_embed_audio(served):
    srv, model = served
    http, client = _http(srv)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("clap_audio")
    x = signals(2, 3 * 48000).numpy()
    long = signals(1, 12 * 48000, seed=1).numpy()  # > 10 s: sliding windows, as embed_audio
    for wave in (x, long):
        got = _infer(http, client, "clap_audio", {"waveform": wave})
        assert got.shape == (len(wave), 512)
        assert _cos(got, model.embed_audio(torch.from_numpy(wave))).min() >= 0.99999
    low = signals(2, 2 * 16000, seed=3).numpy()  # declared 16 kHz: resampled in the server
    rate = np.full((2, 1), 16000, np.int32)
    got = _infer(http, client, "clap_audio", {"waveform": low, "sample_rate": rate})
    assert _cos(got, model.embed_audio(torch.from_numpy(low), 16000)).min() >= 0.99999
    assert _cos(got, model.embed_audio(torch.from_numpy(low))).max() < 0.999  # rate was used


def test_text_grpc_matches_embed_text(served):
    import tritonclient.grpc as grpc

    srv, model = served
    client = grpc.InferenceServerClient(srv.grpc_url)
    texts = ["a dog barks", "rain on a tin roof", "an orchestra tunes up"]
    got = _infer(
        grpc, client, "clap_text", {"text": np.array([[t.encode()] for t in texts], dtype=object)}
    )
    assert _cos(got, model.embed_text(texts)).min() >= 0.99999
    tok = model.tokenize(texts)
    ids, mask = tok["input_ids"].numpy(), tok["attention_mask"].numpy().astype(np.int64)
    got = _infer(grpc, client, "clap_text_tokens", {"input_ids": ids, "attention_mask": mask})
    assert (
        _cos(got, model.embed_text_tokens(tok["input_ids"], tok["attention_mask"])).min() >= 0.99999
    )
    wave = signals(1, 48000, seed=2).numpy()
    got = _infer(grpc, client, "clap_audio", {"waveform": wave})
    assert _cos(got, model.embed_audio(torch.from_numpy(wave))).min() >= 0.99999


def _counts(srv, model_name: str) -> tuple[float, float]:
    """(inferences, executions) of a model from the Prometheus metrics endpoint."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics") as r:
        text = r.read().decode()

    def metric(name: str) -> float:
        m = re.search(rf'^{name}{{model="{model_name}",version="1"}} (\S+)$', text, re.M)
        assert m, f"{name} missing from the metrics"
        return float(m.group(1))

    return metric("nv_inference_count"), metric("nv_inference_exec_count")


def test_concurrent_requests_are_batched(served):
    srv, model = served
    http, client = _http(srv)
    waves = [signals(1, 2 * 48000, seed=10 + i).numpy() for i in range(6)]
    before = _counts(srv, "clap_audio_batched")
    pending = []
    for w in waves:
        i = http.InferInput("waveform", list(w.shape), "FP32")
        i.set_data_from_numpy(w)
        pending.append(client.async_infer("clap_audio", [i]))
    got = np.concatenate([p.get_result().as_numpy("embedding") for p in pending])
    want = model.embed_audio(torch.from_numpy(np.concatenate(waves)))
    assert _cos(got, want).min() >= 0.99999
    after = _counts(srv, "clap_audio_batched")
    n_inf, n_exec = after[0] - before[0], after[1] - before[1]
    assert n_inf == 6 and n_exec < n_inf, (n_inf, n_exec)  # requests shared executions


def test_bad_request_in_a_batch_fails_alone(served):
    """A NaN clip sent with good ones into one batching window: only it gets an error."""
    from tritonclient.utils import InferenceServerException

    srv, model = served
    http, client = _http(srv)
    waves = [signals(1, 2 * 48000, seed=20 + i).numpy() for i in range(3)]
    bad = np.full((1, 2 * 48000), np.nan, np.float32)
    before = _counts(srv, "clap_audio_batched")
    pending = []
    for w in (waves[0], bad, *waves[1:]):
        i = http.InferInput("waveform", list(w.shape), "FP32")
        i.set_data_from_numpy(w)
        pending.append(client.async_infer("clap_audio", [i]))
    with pytest.raises(InferenceServerException, match="NaN"):
        pending[1].get_result()
    got = np.concatenate([p.get_result().as_numpy("embedding") for p in [pending[0], *pending[2:]]])
    want = model.embed_audio(torch.from_numpy(np.concatenate(waves)))
    assert _cos(got, want).min() >= 0.99999
    n_inf, n_exec = (a - b for a, b in zip(_counts(srv, "clap_audio_batched"), before))
    assert n_inf == 3 and n_exec < n_inf, (n_inf, n_exec)  # the good ones shared a forward


def test_bad_requests_get_named_errors_and_server_stays_up(served):
    from tritonclient.utils import InferenceServerException

    srv, model = served
    http, client = _http(srv)
    ok = signals(1, 48000).numpy()
    bad = [
        ("clap_audio", {"waveform": ok.astype(np.float64)}, "FP64"),
        ("clap_audio", {"waveform": ok[None]}, "shape"),
        # PyTriton's proxy refuses a 0-sample tensor before our check sees it
        ("clap_audio", {"waveform": np.zeros((1, 0), np.float32)}, "zeros in shape"),
        ("clap_audio", {"waveform": np.full((1, 100), np.nan, np.float32)}, "NaN"),
        ("clap_audio", {"waveform": np.zeros((1, int(MAX_SECONDS * 48000) + 1), np.float32)}, "too long"),
        ("clap_audio", {"waveform": np.repeat(ok, MAX_BATCH + 1, 0)}, "batch"),
        ("clap_text", {"text": np.array([[b""]], dtype=object)}, "empty string"),
        ("clap_text_tokens", {"input_ids": np.full((1, 77), 10**6, np.int64),
                              "attention_mask": np.ones((1, 77), np.int64)}, "input_ids must be in"),
    ]  # fmt: skip
    for name, arrays, match in bad:
        with pytest.raises(InferenceServerException, match=match):
            _infer(http, client, name, arrays)
    assert client.is_server_ready()
    got = _infer(http, client, "clap_audio", {"waveform": ok})
    assert _cos(got, model.embed_audio(torch.from_numpy(ok))).min() >= 0.99999


@pytest.mark.parametrize("engine", ["onnx", pytest.param("compiled", marks=pytest.mark.slow)])
def test_engine_matches_eager_model(tmp_path_factory, engine):
    srv, model = _start(tmp_path_factory, engine)
    try:  # compiled: the first request of each batch size compiles (minutes on 2 cores)
        http, client = _http(srv, 900.0 if engine == "compiled" else 60.0)
        for wave in (signals(2, 3 * 48000).numpy(), signals(1, 12 * 48000, seed=1).numpy()):
            got = _infer(http, client, "clap_audio", {"waveform": wave})
            assert _cos(got, model.embed_audio(torch.from_numpy(wave))).min() >= 0.99999
        tok = model.tokenize(["a dog barks", "thunder"])
        ids, mask = tok["input_ids"].numpy(), tok["attention_mask"].numpy().astype(np.int64)
        got = _infer(http, client, "clap_text_tokens", {"input_ids": ids, "attention_mask": mask})
        want = model.embed_text_tokens(tok["input_ids"], tok["attention_mask"])
        assert _cos(got, want).min() >= 0.99999
    finally:
        client.close()  # an open connection holds the server's shutdown for 30 s
        code = srv.stop()
    assert code == 0 and not srv.leftover, srv.log_tail()
