"""The factory (open_clip's five entry points) and the one LAION state-dict fix."""

from __future__ import annotations

import pytest
import torch

import clap_fast
from clap_fast import factory
from clap_fast.checkpoint import CheckpointError, fix_laion_state_dict, save_laion_checkpoint
from tests.helpers import small_model


def test_package_root_is_the_factory():
    for name in ("list_models", "get_config", "create_model", "from_pretrained", "load_checkpoint"):
        assert getattr(clap_fast, name) is getattr(factory, name)
    assert "HTSAT-tiny" in clap_fast.list_models()


def test_load_checkpoint_into_a_built_model_and_from_pretrained(tmp_path):
    torch.manual_seed(0)
    src = small_model(text="transformer")
    save_laion_checkpoint(src, tmp_path / "a.pt")
    torch.manual_seed(1)
    dst = small_model(text="transformer")
    assert not torch.equal(dst.audio_projection[0].weight, src.audio_projection[0].weight)
    assert clap_fast.load_checkpoint(dst, tmp_path / "a.pt") == []
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    loaded = clap_fast.from_pretrained(tmp_path / "a.pt")
    assert not loaded.training and loaded.cfg.audio.htsat.depths == src.cfg.audio.htsat.depths
    assert torch.equal(loaded.logit_scale_a, src.logit_scale_a)
    assert torch.equal(loaded.audio_projection[0].weight, src.audio_projection[0].weight)
    with pytest.raises(CheckpointError, match="shape mismatches|missing keys"):
        clap_fast.load_checkpoint(small_model("PANN-6", text="transformer"), tmp_path / "a.pt")


def test_fix_laion_state_dict():
    own = {"text_branch.embeddings.position_ids": torch.arange(4)[None]}
    sd = {
        "module.logit_scale_a": torch.tensor(2.0),
        "module.logit_scale_t": torch.tensor([3.0]),
        "module.text_branch.embeddings.token_type_ids": torch.zeros(1, 4),
    }
    filled = fix_laion_state_dict(sd, own, prefix="module.")
    assert sd["module.logit_scale_a"].shape == (1,) and float(sd["module.logit_scale_a"]) == 2.0
    assert sd["module.logit_scale_t"].shape == (1,)
    assert "module.text_branch.embeddings.token_type_ids" not in sd  # the model has none
    assert torch.equal(sd["module.text_branch.embeddings.position_ids"], torch.arange(4)[None])
    assert filled == ["text_branch.embeddings.position_ids"]
