"""The model is LAION CLAP: key layout, HF ClapModel parity, PANN towers, backends."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clap_fast
from clap_fast.audio import prepare_batch
from clap_fast.config import get_config
from clap_fast.model import CLAP, no_init
from tests.helpers import SMALL_CLIP_TEXT, randomize_bn, signals, small_model

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "laion-keys"


def _laion_keys(name: str) -> dict[str, list[int]]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        out[key.removeprefix("module.")] = ast.literal_eval(shape)
    return out


@pytest.mark.skipif(not KEYS.exists(), reason="shared/reference/laion-keys not present")
@pytest.mark.parametrize(
    "tsv, arch, text, fusion",
    [
        ("htsat_tiny_roberta.tsv", "HTSAT-tiny", "roberta", False),
        ("htsat_base_roberta.tsv", "HTSAT-base", "roberta", False),
        ("htsat_tiny_roberta_fusion.tsv", "HTSAT-tiny", "roberta", True),
        ("htsat_tiny_transformer.tsv", "HTSAT-tiny", "transformer", False),
        ("pann14_roberta.tsv", "PANN-14", "roberta", False),
    ],
)
def test_state_dict_keys_equal_laion(tsv, arch, text, fusion):
    ref = _laion_keys(tsv)
    with no_init():
        model = CLAP(get_config(arch, text=text, enable_fusion=fusion))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # Differences allowed by design: (1,) logit scales (FSDP2), position_ids per transformers version.
    ours = {k: ([] if k.startswith("logit_scale") else v) for k, v in ours.items()}
    ref.pop("text_branch.embeddings.position_ids", None)
    ours.pop("text_branch.embeddings.position_ids", None)
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


def _hf_pair(fusion: bool, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ClapConfig(
        text_config=dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=128,
            layer_norm_eps=1e-5,
        ),
        audio_config=dict(enable_fusion=fusion),
    )
    torch.manual_seed(0)
    hf = transformers.ClapModel(cfg).eval()
    randomize_bn(hf)
    hf.save_pretrained(tmp_path)
    ours = clap_fast.CLAP.from_pretrained(tmp_path)
    return hf, ours


def _features(out) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x a model output holding them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("fusion", [False, True])
def test_parity_with_transformers_clap(fusion, tmp_path):
    """Same random weights through our HF loader: audio and text embeddings equal to 1e-5."""
    hf, ours = _hf_pair(fusion, tmp_path)
    assert ours.cfg.enable_fusion == fusion
    length = 2 * 480000 + 12345 if fusion else 480000
    x = signals(2, length)
    with torch.inference_mode():
        batch = prepare_batch(list(x), ours.cfg.audio, fusion=fusion)
        if fusion:
            assert batch.longer.tolist() == [True, True]
            a = ours.encode_audio(mel_fusion=batch.mel_fusion, longer=batch.longer)
            h = _features(
                hf.get_audio_features(
                    input_features=batch.mel_fusion, is_longer=batch.longer[:, None]
                )
            )
        else:
            a = ours.encode_audio(batch.waveform)
            mel = ours.audio_branch.log_mel(batch.waveform)
            h = _features(hf.get_audio_features(input_features=mel))
        a, h = F.normalize(a, dim=-1), F.normalize(h, dim=-1)
        assert (a - h).abs().max().item() <= 1e-5
        ids = torch.randint(3, 50000, (3, 77), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        ids[1, 20:], mask[1, 20:] = 1, 0
        t = F.normalize(ours.encode_text(ids, mask), dim=-1)
        ht = _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        ht = F.normalize(ht, dim=-1)
        assert (t - ht).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["PANN-6", "PANN-10", "PANN-14"])
def test_pann_towers_work_inside_clap(name):
    """LAION's Cnn6/Cnn10 crash inside CLAP; ours embed (finite, normalised, input-dependent)."""
    model = small_model(name)
    emb = model.embed_audio(signals(2, 48000 * 3))
    assert emb.shape == (2, 512)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert (emb[0] - emb[1]).abs().max() > 1e-4


def test_clip_text_tower_with_open_clip_tokenizer():
    pytest.importorskip("open_clip")
    model = small_model(text="transformer")
    t = model.embed_text(["a dog barks", "rain on a roof", "a dog barks"])
    assert t.shape == (3, 512)
    torch.testing.assert_close(t[0], t[2])
    assert (t[0] - t[1]).abs().max() > 1e-4


def test_roberta_tokenizer_offline_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from clap_fast import text

    text._hf_tokenizer.cache_clear()
    model = small_model()
    try:
        emb = model.embed_text(["a dog"])
    except RuntimeError as exc:
        assert "roberta-base" in str(exc) and "embed_text_tokens" in str(exc)
    else:  # a cached tokenizer exists on this machine: then it must work
        assert emb.shape == (1, 512)


def test_training_forward_and_backward():
    model = small_model(text="transformer").train()
    ids = torch.randint(1, 1000, (2, 77))
    out = model(signals(2, 480000), ids)
    loss = -(out["audio_features"] * out["text_features"]).sum() * out["logit_scale_a"]
    loss.backward()
    assert model.logit_scale_a.grad is not None
    assert (
        model.audio_branch.layers[0].blocks[0].attn.relative_position_bias_table.grad.abs().sum()
        > 0
    )


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown model"):
        clap_fast.create_model("htsat-huge")
    with pytest.raises(ValueError, match="unknown text tower"):
        clap_fast.create_model("htsat-mini", text="gpt")
    with pytest.raises(ValueError, match="HTSAT"):
        clap_fast.create_model("pann-14", enable_fusion=True)
    assert "HTSAT-tiny" in clap_fast.list_models()


def test_small_model_config_is_separate():
    m = small_model(text="transformer")
    assert m.cfg.text.width == SMALL_CLIP_TEXT["width"]


def test_inference_first_then_training_works():
    """Constant caches built under inference_mode must not break a later backward."""
    from kernels import mel_ref, window_attention_ref

    window_attention_ref._relative_position_index_cpu.cache_clear()
    window_attention_ref._shift_mask_cpu.cache_clear()
    mel_ref._BASIS_CACHE.clear()
    model = small_model(text="transformer")
    model.embed_audio(signals(1, 480000))  # fills the caches in inference mode
    with torch.inference_mode():
        mel_ref.log_mel(signals(1, 4800), model.audio_branch.logmel_extractor.melW, dft="matmul")
    model.train()
    out = model(signals(2, 480000), torch.randint(1, 1000, (2, 77)))
    out["audio_features"].sum().backward()
    x = signals(1, 4800).requires_grad_()
    mel_ref.log_mel(x, model.audio_branch.logmel_extractor.melW, dft="matmul").sum().backward()
    assert x.grad is not None


# ------------------------------------------------- exportable forms inside the model


@pytest.mark.parametrize("n_in, n_out", [(1001, 1024), (7, 16), (250, 256)])
def test_bicubic_taps_equal_interpolate(n_in, n_out):
    from clap_fast.htsat import bicubic_taps

    index, weight = bicubic_taps(n_in, n_out)
    x = torch.randn(2, 3, n_in, 5, generator=torch.Generator().manual_seed(n_in))
    ref = F.interpolate(x, (n_out, 5), mode="bicubic", align_corners=True)
    got = x.index_select(2, index.reshape(-1)).reshape(2, 3, n_out, 4, 5) * weight[..., None]
    assert torch.allclose(got.sum(3), ref, atol=2e-6, rtol=0)


def test_eval_fusion_select_equals_fusing_only_longer_rows():
    """Eval mode fuses every row and selects: each row equals the model run on that row alone
    (the training-mode path, which fuses only longer rows), and longer rows really differ."""
    model = small_model(enable_fusion=True)
    randomize_bn(model, seed=1)
    pe = model.audio_branch.patch_embed
    with torch.no_grad():
        for p in pe.fusion_model.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(2)
    side = model.audio_branch.spec_size
    x = torch.randn(4, 4, side, side, generator=g)
    longer = torch.tensor([True, False, True, False])
    with torch.no_grad():
        got = pe.eval()(x, longer)
        rows = [pe(x[i : i + 1], longer[i : i + 1]) for i in range(4)]
        pe.train()  # the nonzero path; eval-mode BatchNorm inside the AFF for a fair comparison
        pe.fusion_model.eval()
        subset = pe(x, longer)
    assert torch.allclose(got, torch.cat(rows), atol=1e-5)
    assert torch.allclose(got, subset, atol=1e-5)
    unfused = pe.eval()(x, torch.zeros(4, dtype=torch.bool))
    assert (got[0] - unfused[0]).abs().max() > 1e-3 and torch.equal(got[1], unfused[1])
