"""Whole-model equality of the `triton` and `reference` backends (kernels through the
interpreter on the CPU), forward and parameter gradients, plus the dispatch rules."""

from __future__ import annotations

import pytest
import torch

from clap_fast import ops
from tests.helpers import signals, small_model


def _run(model, x, ids, backend: str):
    model.zero_grad(set_to_none=True)
    with ops.use_backend(backend):
        out = model(x, ids)
        loss = (out["audio_features"] * out["text_features"]).sum() * out["logit_scale_a"].squeeze()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["audio_features"].detach(), grads


@pytest.mark.skipif(
    not ops._interpreting() and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a GPU",
)
def test_small_htsat_triton_equals_reference_forward_and_grads():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = small_model(text="transformer").train()
    # dropout-free comparison: stochastic depth off, SpecAugment's RNG reseeded per run
    for m in model.modules():
        if hasattr(m, "p") and isinstance(m.p, float):
            m.p = 0.0
    x = signals(2, 480000)
    ids = torch.randint(1, 1000, (2, 77))
    torch.manual_seed(1)
    a_ref, g_ref = _run(model, x, ids, "reference")
    torch.manual_seed(1)
    a_tri, g_tri = _run(model, x, ids, "triton")
    torch.testing.assert_close(a_tri, a_ref, rtol=1e-4, atol=1e-5)
    assert g_tri.keys() == g_ref.keys()
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp(min=1e-6)
        err = (g_tri[name] - g_ref[name]).abs().max() / scale
        assert err < 1e-3, f"{name}: relative gradient error {err:.2e}"


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(1, 10)
    monkeypatch.setenv("CLAP_FAST_BACKEND", "reference")
    assert ops.backend() == "reference" and not ops._use_triton(x)
    with ops.use_backend("auto"):
        assert ops.backend() == "auto"
        assert ops._use_triton(x) is False  # CPU tensor under auto: the reference
    monkeypatch.setenv("CLAP_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CLAP_FAST_BACKEND"):
        ops.backend()
    with pytest.raises(ValueError, match="backend must be"):
        with ops.use_backend("cuda"):
            pass
    monkeypatch.setenv("CLAP_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops._use_triton(x)


def test_mel_outside_the_kernels_limits_takes_the_reference_under_auto(monkeypatch):
    """n_fft < 256 (or not a power of two) cannot be factored by the kernel: under "auto" a
    tensor the kernel would get goes to the reference; forced "triton" gets the kernel's error."""
    from clap_fast import frontend

    called = []
    monkeypatch.setattr(ops, "_use_triton", lambda t: True)
    monkeypatch.setattr(ops, "_kernel", lambda name: called.append(name) or pytest.fail("kernel"))
    fb = frontend.slaney_mel_fb(48000, 128, 16, 50, 14000).float()
    x = signals(1, 4800)
    with ops.use_backend("auto"):
        out = ops.log_mel(x, fb, n_fft=128, hop_length=64)
    assert out.shape == (1, 4800 // 64 + 1, 16) and not called


def test_compiled_model_is_one_graph_and_not_the_export_branch():
    """torch.compile traces the whole audio tower as one graph (dynamo could not trace the
    ContextVar that ``use_backend`` was) and takes the compile branch, not the export one
    (dynamo folds ``torch.compiler.is_exporting()`` to True in every trace, which had sent
    compiled models to the STFT-as-conv export path and, on a GPU, past the Triton kernels)."""
    torch.manual_seed(0)
    model = small_model(text="transformer").eval()
    x = signals(1, 480000)
    targets: set[str] = set()

    def backend(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        got = torch.compile(model.encode_audio, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(got, model.encode_audio(x), rtol=1e-4, atol=1e-5)
    assert any("fft_rfft" in t for t in targets), "the compiled front end is not the FFT one"
    assert not any("conv1d" in t for t in targets), "the compiled graph took the export branch"


def test_dispatch_inside_compile_and_export():
    """``_exporting()`` is False under torch.compile and True under torch.export; a
    ``use_backend`` change recompiles instead of reusing the other backend's graph."""

    class Probe(torch.nn.Module):
        def forward(self, x):
            exporting = 1.0 if ops._exporting() else 0.0
            reference = 10.0 if ops.backend() == "reference" else 0.0
            return x + exporting + reference

    probe, x = Probe(), torch.zeros(1)
    # what a GPU model's dispatch reads under compile traces too (no find_spec / import_module)
    torch.compile(lambda t: t + float(ops._triton_available()), backend="eager", fullgraph=True)(x)
    compiled = torch.compile(probe, backend="eager", fullgraph=True)
    assert compiled(x).item() == 0.0
    with ops.use_backend("reference"):
        assert compiled(x).item() == 10.0
    assert compiled(x).item() == 0.0
    assert torch.export.export(probe, (x,)).module()(x).item() == 1.0
