"""ONNX / AOTInductor export of the encoders, TensorRT-compatibility checks and CLI errors (CPU).

Small architectures only (HTSAT-mini, PANN-6, one-layer text towers): exports take seconds with
the TorchScript exporter (opset 17); the dynamo exporter (opset 18) and AOTInductor take longer
and carry the ``slow`` marker where they exceed about a minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from export.encoders import (  # noqa: E402
    EagerReference,
    ModelSpec,
    audio_encoder,
    load_model,
    parity,
    sample_waveforms,
)
from export.onnx import ParityError, export_tower  # noqa: E402
from export.runners import OnnxRunner  # noqa: E402
from export.trt_compat import check_model, check_onnx, load_rules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {"width": 64, "layers": 1, "heads": 2}
TINY_ROBERTA = {
    "hf": {
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    }
}


def _spec(name: str = "HTSAT-mini", text: str = "transformer", **kw) -> ModelSpec:
    return ModelSpec(
        name, text=text, text_overrides=TINY_ROBERTA if text == "roberta" else TINY_CLIP, **kw
    )


@pytest.fixture(scope="module")
def mini():
    return load_model(_spec())


@pytest.fixture(scope="module")
def mini_audio_onnx(mini, tmp_path_factory):
    return export_tower(mini, "audio", tmp_path_factory.mktemp("onnx"))


def _check_graph_and_sidecar(res, model, tower: str) -> dict:
    onnx.checker.check_model(str(res.path), full_check=True)
    meta = json.loads(res.sidecar.read_text())
    assert meta["model"] == model.cfg.name and meta["tower"] == tower
    assert meta["parity"]["passed"] and meta["parity"]["cos_min"] >= 0.9999
    assert {"torch", "onnx", "onnxruntime"} <= set(meta["versions"])
    assert meta["inputs"][0]["shape"][0] == "batch"  # dynamic batch axis
    assert meta["outputs"][0]["shape"] == ["batch", 512]
    assert check_onnx(res.path) == [], check_onnx(res.path)
    return meta


# ------------------------------------------------------------------------------- audio


def test_audio_graph_has_front_end_and_no_stft(mini, mini_audio_onnx):
    meta = _check_graph_and_sidecar(mini_audio_onnx, mini, "audio")
    assert meta["inputs"][0] == {"name": "waveform", "shape": ["batch", 480000], "dtype": "FLOAT"}
    g = onnx.load(str(mini_audio_onnx.path)).graph
    op_types = {n.op_type for n in g.node}
    assert not op_types & {"STFT", "DFT", "Resize", "NonZero"}
    assert "Conv" in op_types  # the STFT as a convolution


@pytest.mark.parametrize("batch", [1, 5])
def test_audio_onnxruntime_parity_dynamic_batch(mini, mini_audio_onnx, batch):
    x = sample_waveforms(batch, seed=7 + batch)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(mini.encode_audio(x), dim=-1)
    got = OnnxRunner(mini_audio_onnx.path, "cpu").embed_audio(x)
    p = parity(ref, got)
    assert got.shape == (batch, 512)
    assert p["cos_min"] >= 0.9999 and p["max_abs_diff"] < 1e-4, p
    assert torch.allclose(got.norm(dim=-1), torch.ones(batch), atol=1e-5)


def test_wrapper_matches_eager_model_rows_differ(mini):
    x = sample_waveforms(3, seed=3)
    with torch.no_grad():
        ref = EagerReference(mini, "audio")(x)
        got = audio_encoder(mini)(x)
    assert parity(ref, got)["max_abs_diff"] < 1e-5
    assert (ref[0] - ref[1]).abs().max() > 1e-3  # distinct inputs give distinct embeddings


def test_laion_checkpoint_export(mini, tmp_path):
    from clap_fast.checkpoint import save_laion_checkpoint

    ckpt = tmp_path / "mini.pt"
    save_laion_checkpoint(mini, ckpt)
    model = load_model(ModelSpec(checkpoint=str(ckpt), text_overrides=TINY_CLIP))
    res = export_tower(model, "audio", tmp_path / "out", checkpoint=ckpt, stem="mini")
    meta = _check_graph_and_sidecar(res, model, "audio")
    import hashlib

    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    x = sample_waveforms(2, seed=11)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(mini.encode_audio(x), dim=-1)  # the original weights
    assert parity(ref, OnnxRunner(res.path).embed_audio(x))["cos_min"] >= 0.9999


def test_pann_export(tmp_path):
    model = load_model(_spec("PANN-6"))
    _check_graph_and_sidecar(export_tower(model, "audio", tmp_path), model, "audio")


def test_fusion_export_both_branches(tmp_path):
    model = load_model(_spec(enable_fusion=True))
    with torch.no_grad():  # non-trivial AFF weights and BN statistics, so the fusion matters
        for p in model.audio_branch.patch_embed.fusion_model.parameters():
            p.normal_(0, 0.3)
    res = export_tower(model, "audio", tmp_path)
    meta = _check_graph_and_sidecar(res, model, "audio")
    assert [i["name"] for i in meta["inputs"]] == ["mel_fusion", "longer"]
    mel = -40 + 15 * torch.randn(4, 4, 1001, 64)
    longer = torch.tensor([True, False, True, False])
    with torch.no_grad():
        ref = EagerReference(model, "audio")(mel, longer)
        no_fuse = EagerReference(model, "audio")(mel, torch.zeros(4, dtype=torch.bool))
    got = OnnxRunner(res.path).embed_audio_fusion(mel, longer)
    assert parity(ref, got)["cos_min"] >= 0.9999
    assert (ref[0] - no_fuse[0]).abs().max() > 1e-4  # the longer rows really take the fused path


def test_fp16_export_within_its_threshold(mini, tmp_path):
    res = export_tower(mini, "audio", tmp_path, fp16=True)
    meta = json.loads(res.sidecar.read_text())
    assert meta["precision"] == "fp16" and meta["parity"]["threshold_cos"] == 0.999
    assert meta["parity"]["passed"]
    assert meta["inputs"][0]["dtype"] == "FLOAT" and meta["outputs"][0]["dtype"] == "FLOAT"
    types = {i.data_type for i in onnx.load(str(res.path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert check_onnx(res.path) == []


def test_parity_failure_is_loud(mini, tmp_path, monkeypatch):
    import export.onnx as eo

    class Broken(torch.nn.Module):  # the exported graph silently differs from the model
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            return torch.nn.functional.normalize(self.enc(x) + 0.5, dim=-1)

    monkeypatch.setattr(eo, "tower_wrapper", lambda m, t: Broken(audio_encoder(m)))
    with pytest.raises(ParityError, match="cosine"):
        eo.export_tower(mini, "audio", tmp_path)
    assert json.loads((tmp_path / "htsat-mini_audio.json").read_text())["parity"]["passed"] is False


# -------------------------------------------------------------------------------- text


@pytest.mark.parametrize("text", ["transformer", "roberta"])
def test_text_export(text, tmp_path):
    model = load_model(_spec(text=text))
    res = export_tower(model, "text", tmp_path)
    _check_graph_and_sidecar(res, model, "text")
    from export.encoders import sample_tokens

    ids, mask = sample_tokens(model, 5, seed=9)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(ids, mask), dim=-1)
    p = parity(ref, OnnxRunner(res.path).embed_text_tokens(ids, mask))
    assert p["cos_min"] >= 0.9999, p


@pytest.mark.slow
def test_dynamo_exporter_opset18(mini, tmp_path):
    res = export_tower(mini, "audio", tmp_path, opset=18)
    meta = _check_graph_and_sidecar(res, mini, "audio")
    assert meta["exporter"] == "dynamo" and meta["opset"] == 18


# ------------------------------------------------------------------ TensorRT checker


def test_trt_rules_file_names_its_source():
    rules = load_rules()
    assert "onnx-tensorrt" in rules["source"] and rules["source_commit"] in rules["source"]
    assert rules["opset_range"] == [9, 20]
    assert rules["operators"]["STFT"]["supported"] is False
    assert rules["operators"]["MatMul"]["supported"] is True


def _graph(nodes, inputs, outputs, inits=(), opset=17):
    g = onnx.helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])


def test_trt_checker_flags_what_tensorrt_rejects():
    f = onnx.TensorProto.FLOAT
    vi = onnx.helper.make_tensor_value_info
    x = vi("x", f, ["batch", 8])
    # a supported graph: nothing to report
    ok = _graph([onnx.helper.make_node("Relu", ["x"], ["y"])], [x], [vi("y", f, ["batch", 8])])
    assert check_model(ok) == []
    # unsupported op, cubic resize, float64, dynamic non-batch axis, opset out of range
    bad = _graph(
        [
            onnx.helper.make_node("Cast", ["x"], ["xd"], to=onnx.TensorProto.DOUBLE),
            onnx.helper.make_node("Cast", ["xd"], ["x2"], to=f),
            onnx.helper.make_node("Resize", ["x2", "", "scales"], ["r"], mode="cubic"),
            onnx.helper.make_node("HannWindow", ["n"], ["w"]),
        ],
        [vi("x", f, ["batch", "length"]), vi("n", onnx.TensorProto.INT64, [])],
        [vi("r", f, None), vi("w", f, None)],
        [onnx.numpy_helper.from_array(torch.ones(2).numpy(), "scales")],
        opset=21,
    )
    text = "\n".join(check_model(bad))
    assert "HannWindow" in text and "not supported" in text
    assert "mode='cubic'" in text
    assert "DOUBLE" in text
    assert "dynamic non-batch" in text
    assert "opset 21" in text


def test_trt_checker_flags_int_cumsum_and_runtime_axes():
    i32, i64 = onnx.TensorProto.INT32, onnx.TensorProto.INT64
    vi = onnx.helper.make_tensor_value_info
    m = _graph(
        [
            onnx.helper.make_node("CumSum", ["x", "axis"], ["c"]),
            onnx.helper.make_node("Unsqueeze", ["c", "ax"], ["u"]),
        ],
        [vi("x", i32, ["batch", 4]), vi("axis", i64, []), vi("ax", i64, [1])],
        [vi("u", i32, None)],
    )
    text = "\n".join(check_model(m))
    assert "CumSum" in text and "INT32" in text
    assert "axis" in text and "must be an initializer" in text


# --------------------------------------------------------------------- AOTInductor


@pytest.mark.slow
def test_aoti_package_matches_eager(mini, tmp_path):
    from export.aoti import export_tower_aoti, load_package

    res = export_tower_aoti(mini, "audio", tmp_path, batch=2)
    assert res.parity["passed"] and res.parity["cos_min"] >= 0.9999
    x = sample_waveforms(2, seed=21)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(mini.encode_audio(x), dim=-1)
        got = load_package(res.path)(x)
    assert parity(ref, got)["cos_min"] >= 0.9999


# ----------------------------------------------------------------- CLI and errors


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--checkpoint", "/nonexistent/ckpt.pt"], "checkpoint not found"),
        (["--model", "htsat-mini", "--fusion", "--opset", "16"], "opset 16 is not supported"),
        (["--model", "htsat-mini", "--opset", "21"], "opset 21 is not supported"),
        (["--model", "pann-6", "--fusion"], "fusion"),
    ],
)
def test_onnx_cli_bad_arguments(args, message, tmp_path):
    r = _cli("export.onnx", *args, "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("*.onnx"))


def test_onnx_cli_end_to_end(tmp_path):
    r = _cli(
        "export.onnx", "--model", "htsat-mini", "--tower", "both", "--text", "transformer",
        "--text-overrides", json.dumps(TINY_CLIP), "--out", str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert [Path(s["onnx"]).name for s in summary] == [
        "htsat-mini_audio.onnx",
        "htsat-mini_text.onnx",
    ]
    for s in summary:
        assert json.loads(Path(s["sidecar"]).read_text())["parity"]["passed"]


def test_aoti_cli_bad_arguments(tmp_path):
    r = _cli("export.aoti", "--model", "htsat-mini", "--batch", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "--batch must be >= 1" in r.stderr


# ------------------------------------------------------------------------- TensorRT


def test_trt_batch_profile_parsing():
    from export.trt import BatchProfile, parse_batch

    assert parse_batch("1:8:64") == BatchProfile(1, 8, 64)
    assert parse_batch("4") == BatchProfile(4, 4, 4)
    for bad in ["8:4:2", "0:1:2", "1:2", "a:b:c", "1:2:3:4"]:
        with pytest.raises(ValueError, match="--batch"):
            parse_batch(bad)


def test_trt_precision_flags():
    from export.trt import builder_flags, precision_of

    assert precision_of(False, False) == "fp32" and builder_flags("fp32") == []
    assert builder_flags(precision_of(True, False)) == ["FP16"]
    assert builder_flags(precision_of(False, True)) == ["BF16"]
    with pytest.raises(ValueError, match="mutually exclusive"):
        precision_of(True, True)
    with pytest.raises(ValueError):
        builder_flags("int8")


def test_trt_profile_shapes_from_exported_graph(mini_audio_onnx, tmp_path):
    from export.trt import BatchProfile, profile_shapes

    shapes = profile_shapes(mini_audio_onnx.path, BatchProfile(1, 8, 64))
    assert shapes == {"waveform": ((1, 480000), (8, 480000), (64, 480000))}
    vi = onnx.helper.make_tensor_value_info
    f = onnx.TensorProto.FLOAT
    g = _graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], [vi("x", f, ["b", "t"])], [vi("y", f, None)]
    )
    onnx.save(g, tmp_path / "dyn.onnx")
    with pytest.raises(ValueError, match="axis 1 is dynamic"):
        profile_shapes(tmp_path / "dyn.onnx", BatchProfile(1, 1, 1))


def test_trt_build_without_tensorrt_raises_clearly(mini_audio_onnx, tmp_path):
    from export.trt import (
        BatchProfile,
        BuildConfig,
        TRTEncoder,
        TRTUnavailable,
        build_engine,
        trt_unavailable_reason,
    )

    if trt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    cfg = BuildConfig(mini_audio_onnx.path, tmp_path / "x.engine", BatchProfile(1, 1, 1))
    with pytest.raises(TRTUnavailable, match="TensorRT|CUDA"):
        build_engine(cfg)
    with pytest.raises(TRTUnavailable):
        TRTEncoder(tmp_path / "x.engine")


def test_trt_cli_writes_onnx_then_exits_nonzero(tmp_path):
    from export.trt import trt_unavailable_reason

    if trt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: the CLI would build an engine")
    r = _cli(
        "export.trt", "--model", "htsat-mini", "--tower", "audio", "--fp16", "--batch", "1:2:4",
        "--text", "transformer", "--text-overrides", json.dumps(TINY_CLIP), "--out", str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "cannot build engines" in last and "htsat-mini_audio.onnx" in last
    assert (tmp_path / "htsat-mini_audio.onnx").exists()
    assert not list(tmp_path.glob("*.engine"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fp16", "--bf16"], "mutually exclusive"),
        (["--batch", "8:4:2"], "MIN <= OPT <= MAX"),
        (["--workspace", "0"], "--workspace"),
        (["--model", "nope"], "unknown model"),
    ],
)
def test_trt_cli_bad_arguments(args, message, tmp_path):
    r = _cli("export.trt", "--model", "htsat-mini", *args, "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
