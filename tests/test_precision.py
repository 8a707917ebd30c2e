"""--precision is decided once: typed choices, LAION aliases, one autocast from the device."""

from __future__ import annotations

import logging

import pytest
import torch

from clap_fast.train import precision as P
from clap_fast.train.params import TrainConfig, choices, parse_args

BASE = ["--datasetpath", "x", "--datasetnames", "a"]


@pytest.mark.parametrize("given, want", [("fp32", "fp32"), ("bf16", "bf16"), ("amp", "bf16"),
                                         ("amp_bf16", "bf16"), ("AMP_BFLOAT16", "bf16")])  # fmt: skip
def test_precision_aliases_are_normalised(given, want):
    assert parse_args([*BASE, "--precision", given]).precision == want


def test_choices_come_from_the_typed_config():
    c = choices()
    assert c["precision"] == ("fp32", "bf16")
    assert c["tmodel"] == ("roberta", "transformer", "bert", "bart")
    assert c["data_filling"] == ("repeatpad", "repeat", "pad")
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--precision", "fp16"])
    with pytest.raises(SystemExit, match="--optimizer"):  # programmatic configs validated too
        from clap_fast.train.params import _validate

        _validate(TrainConfig(datasetpath="x", datasetnames=["a"], optimizer="sgd"))


def test_cpu_without_bf16_units_warns_once_and_runs_fp32(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_has_bf16_units", lambda: False)
    with caplog.at_level(logging.WARNING, logger="clap_fast.train"):
        prec = P.resolve_precision("bf16", torch.device("cpu"), sharded=False)
    assert prec.name == "fp32" and not prec.bf16
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fp32" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    with prec.autocast():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_cpu_with_bf16_units_autocasts(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_bf16_units", lambda: True)
    prec = P.resolve_precision("bf16", torch.device("cpu"), sharded=True)
    assert prec.bf16 and prec.device_type == "cpu" and not prec.fsdp_mixed  # CPU: autocast
    with prec.autocast():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
        with prec.fp32():
            assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_gpu_policy_without_touching_a_gpu():
    cuda = torch.device("cuda", 0)
    assert P.resolve_precision("bf16", cuda, sharded=True).fsdp_mixed
    assert not P.resolve_precision("bf16", cuda, sharded=False).fsdp_mixed
    assert P.resolve_precision("fp32", cuda, sharded=True) == P.Precision("fp32", "cuda")
    with pytest.raises(ValueError, match="precision"):
        P.resolve_precision("amp", cuda, sharded=False)  # aliases are parse_args' job


def test_cpu_bf16_detection_reads_the_flags(monkeypatch):
    P.cpu_has_bf16_units.cache_clear()
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    assert not P.cpu_has_bf16_units()
    P.cpu_has_bf16_units.cache_clear()
    monkeypatch.setattr(P, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    has = P.cpu_has_bf16_units()
    P.cpu_has_bf16_units.cache_clear()
    assert has == (torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX"))


def test_bf16_train_step_on_cpu(monkeypatch):
    """The real train_step under the resolved precision: bf16 forward, fp32 loss and weights."""
    from clap_fast.loss import ClipLoss
    from clap_fast.train import param_groups, train_step
    from tests.helpers import signals, small_model

    monkeypatch.setattr(P, "cpu_has_bf16_units", lambda: True)
    prec = P.resolve_precision("bf16", torch.device("cpu"), sharded=False)
    torch.manual_seed(0)
    model = small_model(text="transformer").train()
    model.cfg.audio.clip_samples = 48000
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    x = {
        "waveform": signals(2, 48000),
        "input_ids": torch.randint(1, 100, (2, 77)),
        "attention_mask": torch.ones(2, 77, dtype=torch.long),
    }
    loss, out = train_step(model, opt, ClipLoss(), x, 1e-4, prec)
    assert out["audio_features"].dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and model.audio_projection[0].weight.dtype == torch.float32
