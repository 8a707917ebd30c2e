"""laion_clap 1.1.7's own ``hook.CLAP_Module``, built offline for parity tests.

laion_clap's package ``__init__`` and ``training/data.py`` fetch RoBERTa / BERT / BART tokenizers
from the hub at import, and ``hook.py`` imports ``wget``. Here:
  * ``laion_clap`` and ``laion_clap.clap_module`` are empty parent packages, so only the real
    ``clap_module.factory`` / ``model`` modules run (as ``bench/bench_embed.py`` does);
  * ``laion_clap.training.data`` is a module holding laion_clap's own ``get_audio_features``,
    ``get_mel``, ``int16_to_float32`` and ``float32_to_int16``, compiled from its source file
    (the functions only, not the module's hub-fetching top level);
  * ``hook.py`` itself is then imported unchanged; its ``RobertaTokenizer`` is replaced by a stub
    (texts are tokenised by the test and passed as ``tokenizer=``), and ``RobertaModel
    .from_pretrained("roberta-base")`` builds a random RoBERTa of the given config.
Install as the benchmarks do: ``pip install --no-deps laion_clap==1.1.7 torchlibrosa``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

_DATA_FUNCS = ("get_audio_features", "get_mel", "int16_to_float32", "float32_to_int16")


def _stub_package(name: str, path: str) -> None:
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        sys.modules[name] = mod


def import_hook():
    """laion_clap's ``hook`` module (skips the test when laion_clap or its deps are absent)."""
    if "laion_clap.hook" in sys.modules:  # built already (its stub parents have no __spec__)
        return sys.modules["laion_clap.hook"]
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("laion_clap is not installed (pip install --no-deps laion_clap==1.1.7)")
    for dep in ("torchlibrosa", "librosa", "torchvision", "torchaudio"):
        pytest.importorskip(dep)
    root = list(spec.submodule_search_locations)[0]
    _stub_package("laion_clap", root)
    _stub_package("laion_clap.clap_module", f"{root}/clap_module")
    _stub_package("laion_clap.training", f"{root}/training")
    for absent in ("h5py", "wget"):  # imported at the top of modules, unused on this path
        if importlib.util.find_spec(absent) is None:
            sys.modules[absent] = types.ModuleType(absent)
    try:
        from laion_clap.clap_module import factory
    except ImportError as exc:
        pytest.skip(f"laion_clap's modules do not import here: {exc}")
    cm = sys.modules["laion_clap.clap_module"]
    cm.create_model = factory.create_model
    sys.modules.setdefault("clap_module", cm)  # hook.py's absolute imports
    sys.modules.setdefault("clap_module.factory", factory)

    data = types.ModuleType("laion_clap.training.data")
    import torchaudio
    import torchvision

    data.__dict__.update(np=np, torch=torch, F=F, torchaudio=torchaudio,
                         torchvision=torchvision, suppress=contextlib.suppress)  # fmt: skip
    src_path = f"{root}/training/data.py"
    with open(src_path) as f:
        tree = ast.parse(f.read())
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in _DATA_FUNCS]
    exec(compile(tree, src_path, "exec"), data.__dict__)  # laion_clap's own functions
    sys.modules["laion_clap.training.data"] = data

    hook_spec = importlib.util.spec_from_file_location("laion_clap.hook", f"{root}/hook.py")
    hook = importlib.util.module_from_spec(hook_spec)
    sys.modules["laion_clap.hook"] = hook
    hook_spec.loader.exec_module(hook)
    return hook


def laion_module(text_config, enable_fusion: bool = False, amodel: str = "HTSAT-tiny"):
    """``hook.CLAP_Module(enable_fusion, device="cpu", amodel)`` with an offline random RoBERTa."""
    hook = import_hook()
    from laion_clap.clap_module import model as lmodel

    class _OfflineRoberta:
        @staticmethod
        def from_pretrained(name: str):
            assert name == "roberta-base", name
            import transformers

            return transformers.RobertaModel(text_config)

    class _NoTokenizer:
        @staticmethod
        def from_pretrained(name: str):
            return None  # the tests pass tokenizer= (RoBERTa's files are not available offline)

    saved = lmodel.RobertaModel, hook.RobertaTokenizer
    lmodel.RobertaModel, hook.RobertaTokenizer = _OfflineRoberta, _NoTokenizer
    try:
        return hook.CLAP_Module(enable_fusion=enable_fusion, device="cpu", amodel=amodel)
    finally:
        lmodel.RobertaModel, hook.RobertaTokenizer = saved
