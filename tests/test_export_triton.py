"""``python -m export.triton``: every ``config.pbtxt`` parses with Triton's own protobuf schema
and agrees with the ONNX graph it serves."""

from __future__ import annotations

import pytest

from tests.helpers import small_model

pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_repository_configs_parse_and_match_graphs(tmp_path):
    from google.protobuf import text_format

    from export.triton import onnx_io, write_repository

    model = small_model(text="transformer").eval()
    configs = write_repository(model, tmp_path, max_batch=8, max_queue_delay_us=500, instances=2)
    names = {c.parent.name for c in configs}
    assert names == {"clap_audio", "clap_text_tokens", "clap_audio_trt", "clap_text_tokens_trt"}
    for path in configs:
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        name = path.parent.name
        base = name.removesuffix("_trt")
        assert cfg.name == name and cfg.max_batch_size == 8
        assert cfg.platform == ("tensorrt_plan" if name.endswith("_trt") else "onnxruntime_onnx")
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
        assert cfg.instance_group[0].count == 2
        inputs, outputs = onnx_io(tmp_path / base / "1" / "model.onnx")
        types = model_config_pb2.DataType
        assert [(i.name, types.Name(i.data_type), list(i.dims)) for i in cfg.input] == inputs
        assert [(o.name, list(o.dims)) for o in cfg.output] == [("embedding", [512])]
        assert outputs[0][2] == [512]
    assert [n for n, _, _ in onnx_io(tmp_path / "clap_audio/1/model.onnx")[0]] == ["waveform"]
    readme = (tmp_path / "README.md").read_text()
    assert "trtexec --onnx=clap_audio/1/model.onnx" in readme and "tritonserver" in readme


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    from export.triton import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--max-batch", "0"])
    assert e.value.code == 2 and "--max-batch" in capsys.readouterr().err
