"""Test-wide setup. Runs before any test module imports ``kernels``.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before the kernel modules are imported (``triton.jit`` reads TRITON_INTERPRET at decoration).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite checks fp32 parity: engine="auto" would take bf16 on CPUs with bf16 units.
# tests/test_engines.py clears this to test auto itself.
os.environ.setdefault("CLAP_FAST_ENGINE", "eager")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
