"""Checkpoints: LAION .pt (safe loading), detection, round trips, clear errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import clap_fast
from clap_fast.checkpoint import (
    CheckpointError,
    detect_config,
    read_state_dict,
    save_laion_checkpoint,
    to_laion_state_dict,
)
from clap_fast.config import get_config
from clap_fast.model import CLAP, no_init
from tests.helpers import SMALL_ROBERTA, randomize_bn, signals, small_model


def _laion_file(model: CLAP, path, with_position_ids: bool = True) -> None:
    """Write what LAION's trainer writes: module. prefix, optimizer state, a NumPy scalar."""
    sd = to_laion_state_dict(model)
    if not with_position_ids:
        sd.pop("module.text_branch.embeddings.position_ids", None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad][:3], lr=1e-3)
    envelope = {
        "epoch": np.int64(7),
        "name": "2022_09_11-model_HTSAT-tiny",
        "state_dict": sd,
        "optimizer": opt.state_dict(),
        "best_metric": np.float64(0.8123),
    }
    torch.save(envelope, path)


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_laion_checkpoint_loads_strictly_and_embeds_identically(tmp_path, with_position_ids):
    model = small_model()
    randomize_bn(model)
    _laion_file(model, tmp_path / "epoch_7.pt", with_position_ids)
    loaded = clap_fast.CLAP.from_pretrained(tmp_path / "epoch_7.pt")
    assert loaded.cfg.audio.htsat.depths == model.cfg.audio.htsat.depths
    x = signals(2, 480000)
    torch.testing.assert_close(loaded.embed_audio(x), model.embed_audio(x), rtol=0, atol=0)
    ids = torch.randint(3, 1000, (2, 77))
    torch.testing.assert_close(
        loaded.embed_text_tokens(ids), model.embed_text_tokens(ids), rtol=0, atol=0
    )
    # and plain torch: a LAION state dict (prefix stripped) loads with strict=True
    sd = {k.removeprefix("module."): v for k, v in to_laion_state_dict(model).items()}
    assert sd["logit_scale_a"].dim() == 0
    fresh = small_model()
    fresh.load_state_dict(sd, strict=True)


def test_round_trip_laion_ours_laion_is_identical(tmp_path):
    model = small_model()
    _laion_file(model, tmp_path / "a.pt")
    a = clap_fast.CLAP.from_pretrained(tmp_path / "a.pt")
    a.save_pretrained(tmp_path / "ours")
    b = clap_fast.CLAP.from_pretrained(tmp_path / "ours")
    sd_in = torch.load(tmp_path / "a.pt", weights_only=False)["state_dict"]
    sd_out = to_laion_state_dict(b)
    assert sorted(sd_in) == sorted(sd_out)
    for k in sd_in:
        assert sd_in[k].dtype == sd_out[k].dtype and torch.equal(sd_in[k], sd_out[k]), k
    save_laion_checkpoint(b, tmp_path / "c.pt")
    sd_c = torch.load(tmp_path / "c.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sd_c[k], sd_in[k]) for k in sd_in)


@pytest.mark.parametrize(
    "arch, text, fusion, expect",
    [
        ("HTSAT-tiny", "roberta", False, ("tiny", 96, False, "roberta")),
        ("HTSAT-base", "roberta", False, ("base", 128, False, "roberta")),
        ("HTSAT-tiny", "roberta", True, ("tiny", 96, True, "roberta")),
        ("HTSAT-tiny", "transformer", False, ("tiny", 96, False, "transformer")),
        ("PANN-14", "roberta", False, ("Cnn14", None, False, "roberta")),
        ("PANN-6", "roberta", False, ("Cnn6", None, False, "roberta")),
    ],
)
def test_architecture_is_detected_from_weights(arch, text, fusion, expect):
    with no_init():
        sd = CLAP(get_config(arch, text=text, enable_fusion=fusion)).state_dict()
    cfg = detect_config(sd)
    width = cfg.audio.htsat.embed_dim if cfg.audio.htsat else None
    assert (cfg.audio.model_name, width, cfg.enable_fusion, cfg.text.model_type) == expect
    if arch == "HTSAT-base":
        assert cfg.audio.htsat.depths == [2, 2, 12, 2] and cfg.embed_dim == 1024


def test_truncated_checkpoint_is_refused(tmp_path):
    model = small_model()
    _laion_file(model, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        clap_fast.CLAP.from_pretrained(tmp_path / "cut.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(path)
    # a plain pickle file (not a torch zip) with code in it is refused too
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        read_state_dict(legacy)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    tiny = small_model()
    sd = to_laion_state_dict(tiny)
    sd["module.audio_projection.0.weight"] = torch.zeros(512, 7)
    sd.pop("module.audio_branch.norm.bias")
    sd["module.some.extra.weight"] = torch.zeros(1)
    model = small_model()
    from clap_fast.checkpoint import load_into

    with pytest.raises(CheckpointError) as err:
        load_into(model, {k.removeprefix("module."): v for k, v in sd.items()})
    msg = str(err.value)
    assert (
        "audio_branch.norm.bias" in msg
        and "some.extra.weight" in msg
        and "audio_projection.0.weight" in msg
    )


def test_released_name_offline_names_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="630k-audioset-best.pt"):
        clap_fast.CLAP.from_pretrained("630k-audioset-best")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        clap_fast.CLAP.from_pretrained(tmp_path / "nope.pt")


def test_small_text_overrides_survive_our_format(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    again = clap_fast.CLAP.from_pretrained(tmp_path)
    assert again.cfg.text.hf["hidden_size"] == SMALL_ROBERTA["hf"]["hidden_size"]


def test_open_clip_style_embedded_clap_loads(tmp_path):
    """A LAION-layout CLAP inside another model (AudioLDM's cond_stage_model.model.) loads."""
    model = small_model()
    sd = {
        "cond_stage_model.model." + k.removeprefix("module."): v
        for k, v in to_laion_state_dict(model).items()
    }
    sd["first_stage_model.decoder.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "audioldm.ckpt")
    loaded = clap_fast.CLAP.from_pretrained(tmp_path / "audioldm.ckpt")
    x = signals(1, 480000)
    torch.testing.assert_close(loaded.embed_audio(x), model.embed_audio(x), rtol=0, atol=0)


def test_numpy_globals_survive_a_core_stub_without_multiarray(monkeypatch):
    """numpy 1.26 + transformers: ``numpy._core`` exists but has no ``multiarray`` attribute."""
    import types

    import numpy as np

    from clap_fast.checkpoint import _numpy_globals

    monkeypatch.setattr(np, "_core", types.ModuleType("numpy._core"), raising=False)
    allowed = _numpy_globals()
    assert any(getattr(a, "__name__", "") == "scalar" for a in allowed)


def test_builtin_htsat_keeps_its_name_after_a_round_trip(tmp_path):
    """A LAION-layout HTSAT-mini reloads as HTSAT-mini, not "HTSAT-tiny (custom-8)"."""
    from tests.helpers import small_model

    m = small_model("HTSAT-mini")
    save_laion_checkpoint(m, tmp_path / "mini.pt")
    back = CLAP.from_pretrained(tmp_path / "mini.pt")
    assert back.cfg.name == "HTSAT-mini" and back.cfg.audio.model_name == "mini"
