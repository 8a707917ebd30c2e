"""Check an ONNX graph against TensorRT's published ONNX operator support, without TensorRT.

The rules come from ``export/trt_onnx_ops.json``, a data file written from onnx-tensorrt's
``docs/operators.md`` (source URL, commit and TensorRT version inside). Checked, per node:

* the op type is in the table and marked supported (custom domains are rejected);
* the data type of the node's first input (its output for ops without inputs) is among the
  op's supported types;
* the restrictions the table states, as far as they can be read off the graph: inputs that
  must be initializers / constants (``axes`` of Pad, Slice, Squeeze, Unsqueeze, Reduce*…),
  allowed attribute values (Resize modes, TopK ``sorted``…), forbidden attributes, unused
  extra outputs (LayerNormalization), pooling rank and dilations, static input shapes;

and per graph: the default-domain opset is within the table's range, no tensor has a type
outside what TensorRT takes (float64, complex, strings, …), and graph inputs have static
shapes except on axis 0 (the batch axis, which TensorRT covers with optimization profiles).

What this cannot see: TensorRT's per-layer tactics and its own shape-dependent limits; a clean
report means "nothing the published table rules out", not "TensorRT builds it".
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["load_rules", "check_onnx", "check_model"]

# ONNX TensorProto type names -> the table's names.
_TYPE_NAMES = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64",
    "BOOL": "BOOL", "UINT8": "UINT8", "INT8": "INT8", "INT4": "INT4", "DOUBLE": "DOUBLE",
    "FLOAT8E4M3FN": "FP8",
}  # fmt: skip
# Types a tensor anywhere in the graph may have (DOUBLE only "limited": rejected here).
_GRAPH_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8", "INT8", "INT4", "FP8"}


@cache
def load_rules() -> dict[str, Any]:
    """The parsed ``trt_onnx_ops.json`` (source, version, opset range, operators)."""
    text = (resources.files("export") / "trt_onnx_ops.json").read_text()
    return json.loads(text)


def _type_name(elem_type: int) -> str:
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type)
    return _TYPE_NAMES.get(name, name)


def check_onnx(path: str | Path) -> list[str]:
    """Issues of the graph at ``path`` (empty list: nothing the published table rules out)."""
    import onnx

    return check_model(onnx.load(str(path), load_external_data=False))


def check_model(model: Any) -> list[str]:
    """Issues of an ``onnx.ModelProto``; see the module docstring for what is checked."""
    import onnx

    rules = load_rules()
    table: dict[str, dict[str, Any]] = rules["operators"]
    lo, hi = rules["opset_range"]
    issues: list[str] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            issues.append(f"opset {imp.version} outside TensorRT's range {lo}..{hi}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; checks below still run
        inferred = model
    g = inferred.graph
    types: dict[str, str] = {}
    shapes: dict[str, list[int | str]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            types[vi.name] = _type_name(tt.elem_type)
            if tt.HasField("shape"):
                shapes[vi.name] = [d.dim_param or d.dim_value or "?" for d in tt.shape.dim]
    constants = {init.name for init in g.initializer}
    for init in g.initializer:
        types[init.name] = _type_name(init.data_type)
    for node in g.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = _type_name(a.t.data_type)

    for name, t in sorted(types.items()):
        if t not in _GRAPH_TYPES:
            issues.append(f"tensor {name!r} has type {t}, which TensorRT does not take")
    for vi in g.input:
        dims = shapes.get(vi.name, [])
        dynamic = [i for i, d in enumerate(dims) if i > 0 and not isinstance(d, int)]
        if dynamic:
            issues.append(f"graph input {vi.name!r} has dynamic non-batch axes {dynamic} ({dims})")

    for node in g.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            issues.append(f"{where}: custom domain {node.domain!r} (needs a TensorRT plugin)")
            continue
        rule = table.get(node.op_type)
        if rule is None or not rule["supported"]:
            issues.append(f"{where}: op type not supported by TensorRT's ONNX parser")
            continue
        first = next((i for i in node.input if i), None)
        dtype = types.get(first) if first else types.get(node.output[0])
        if dtype is not None and rule["types"] and dtype not in rule["types"]:
            issues.append(f"{where}: input type {dtype} not in supported types {rule['types']}")
        issues.extend(
            f"{where}: {msg}"
            for msg in _node_checks(node, rule.get("checks", {}), constants, shapes)
        )
    return issues


def _node_checks(
    node: Any, checks: dict[str, Any], constants: set[str], shapes: dict[str, list[int | str]]
) -> list[str]:
    import onnx

    out: list[str] = []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    for idx, name in checks.get("constant_inputs", {}).items():
        i = int(idx)
        if i < len(node.input) and node.input[i] and node.input[i] not in constants:
            out.append(f"input {i} ({name}) must be an initializer / constant")
    for name, allowed in checks.get("attribute_values", {}).items():
        if name in attrs:
            v = attrs[name]
            v = v.decode() if isinstance(v, bytes) else v
            if v not in allowed:
                out.append(f"attribute {name}={v!r} not supported (allowed: {allowed})")
    for name in checks.get("forbidden_attributes", []):
        if name in attrs:
            out.append(f"attribute {name} is not supported")
    if "max_used_outputs" in checks:
        used = [o for o in node.output if o]
        if len(used) > checks["max_used_outputs"]:
            n = checks["max_used_outputs"]
            out.append(f"only the first {n} output(s) are supported, {len(used)} used")
    for name in checks.get("attribute_all_ones", []):
        if name in attrs and any(v != 1 for v in attrs[name]):
            out.append(f"attribute {name}={list(attrs[name])} must be all ones")
    if "input_rank" in checks and node.input[0] in shapes:
        rank = len(shapes[node.input[0]])
        if rank not in checks["input_rank"]:
            out.append(f"input rank {rank} not in {checks['input_rank']}")
    if checks.get("static_input_shape"):
        dims = shapes.get(node.input[0])
        if dims is None or not all(isinstance(d, int) for d in dims):
            out.append("input must have static dimensions")
    return out
