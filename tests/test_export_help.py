"""Each export CLI describes itself and lists only the options it accepts."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module, says, absent",
    [
        ("export.aoti", "AOTInductor", ["--opset", "--fp16"]),
        ("export.trt", "TensorRT", []),
        ("export.onnx", "ONNX", []),
    ],
)
def test_export_help_describes_its_own_tool(module, says, absent, capsys):
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    description = out.split("\n\n")[1]
    assert says in description and (module == "export.onnx" or "ONNX export" not in description)
    for opt in absent:
        assert opt not in out
