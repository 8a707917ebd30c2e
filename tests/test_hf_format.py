"""Hugging Face interop: save_pretrained(format="hf") loads in transformers' ClapModel with
equal embeddings; hub ids resolve through the cache, offline with one line naming the fetch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clap_fast
from clap_fast.checkpoint import CheckpointError
from tests.helpers import SMALL_ROBERTA, randomize_bn, signals

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = clap_fast.create_model("HTSAT-tiny", text="roberta", text_overrides=SMALL_ROBERTA)
    randomize_bn(model)
    d = tmp_path_factory.mktemp("hf") / "clap-hf"
    model.save_pretrained(d, format="hf")
    return model, d


def _tokens(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(3, 50000, (n, 20), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    ids[0, 12:] = 1
    return ids, mask


def _features(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


def test_hf_folder_loads_in_clapmodel_with_equal_embeddings(saved):
    model, d = saved
    hf = transformers.ClapModel.from_pretrained(str(d)).eval()
    ids, mask = _tokens()
    with torch.inference_mode():
        t_hf = F.normalize(
            _features(hf.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1
        )
    torch.testing.assert_close(model.embed_text_tokens(ids, mask), t_hf, atol=1e-5, rtol=0)

    x = signals(2, 480_000).numpy()
    q = ((np.clip(x, -1, 1) * 32767.0).astype(np.int16) / 32767.0).astype(np.float32)
    fe = transformers.ClapFeatureExtractor(
        frequency_min=50, frequency_max=14000, truncation="rand_trunc", padding="repeatpad"
    )
    inputs = fe(list(q), sampling_rate=48000, return_tensors="pt")
    with torch.inference_mode():
        a_hf = F.normalize(_features(hf.get_audio_features(**inputs)), dim=-1)
    a = model.embed_audio(x)
    assert float(F.cosine_similarity(a, a_hf).min()) > 0.9999
    torch.testing.assert_close(a, a_hf, atol=1e-4, rtol=0)  # HF's NumPy STFT vs ours


def test_hf_folder_round_trips_and_hub_id_resolves_from_cache(saved, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    model, d = saved
    snap = tmp_path / "hub" / "models--someone--clap-test" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(d / f, snap / f)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    back = clap_fast.CLAP.from_pretrained("someone/clap-test")
    x = signals(1, 100_000, seed=3)
    torch.testing.assert_close(back.embed_audio(x), model.embed_audio(x), atol=1e-6, rtol=0)
    ids, mask = _tokens()
    torch.testing.assert_close(
        back.embed_text_tokens(ids, mask), model.embed_text_tokens(ids, mask), atol=1e-6, rtol=0
    )

    with pytest.raises(CheckpointError) as err:
        clap_fast.CLAP.from_pretrained("laion/clap-htsat-unfused")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download laion/clap-htsat-unfused" in msg


def test_hf_format_refuses_other_towers(tmp_path):
    m = clap_fast.create_model("HTSAT-mini", text="transformer",
                               text_overrides={"width": 32, "layers": 1, "heads": 2})  # fmt: skip
    with pytest.raises(ValueError, match="RoBERTa"):
        m.save_pretrained(tmp_path / "x", format="hf")
    with pytest.raises(ValueError, match="format"):
        m.save_pretrained(tmp_path / "x", format="onnx")


def test_released_name_offline_is_one_line_without_network(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    from clap_fast.cli import main

    real = huggingface_hub.hf_hub_download
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            pytest.fail("a network download was attempted while offline")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        clap_fast.CLAP.from_pretrained("630k-audioset-best")
    msg = str(err.value)
    assert (
        "\n" not in msg
        and "huggingface-cli download lukewys/laion_clap 630k-audioset-best.pt" in msg
    )
    assert calls == [True]
    (tmp_path / "a.wav").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["embed", str(tmp_path / "a.wav"), "--out", str(tmp_path / "e.npy"),
              "--checkpoint", "630k-audioset-best"])  # fmt: skip
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
