"""clap_fast.compat.laion against laion_clap 1.1.7 itself: the same calls, the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clap_fast.checkpoint import save_laion_checkpoint
from clap_fast.compat import laion as shim
from tests.helpers import randomize_bn, signals
from tests.laion_hook import laion_module

TEXT = {"hf": {"num_hidden_layers": 1}}  # RoBERTa-base widths (LAION's projection), one layer
TEXTS = ["a dog barks", "rain on a tin roof", "an orchestra tunes up before the concert"]


def _tokenizer(texts):
    """A deterministic RoBERTa-shaped tokenizer (<s> ids </s> <pad>…, 77 wide): the real one's
    files are not available offline, and both sides take ``tokenizer=``."""
    ids = torch.ones(len(texts), 77, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        words = [3 + (sum(map(ord, w)) * 7919) % 50000 for w in t.split()]
        row = [0, *words, 2]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _write(path, x: np.ndarray, sr: int) -> str:
    import soundfile as sf

    sf.write(str(path), x, sr)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, laion_clap's) CLAP_Module holding one seeded LAION-layout checkpoint."""
    torch.manual_seed(0)
    ours = shim.CLAP_Module(enable_fusion=False, device="cpu", text_overrides=TEXT)
    randomize_bn(ours.model)
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    save_laion_checkpoint(ours.model, path)
    ref = laion_module(ours.model.text_branch.config, enable_fusion=False)
    ref.load_ckpt(str(path), verbose=False)
    fresh = shim.CLAP_Module(enable_fusion=False, device="cpu", text_overrides=TEXT)
    fresh.load_ckpt(str(path))  # the user's path: load the file, not reuse the model
    return fresh, ref


def _close(a, b) -> float:
    assert type(a) is type(b), (type(a), type(b))
    a, b = np.asarray(torch.as_tensor(a).detach()), np.asarray(torch.as_tensor(b).detach())
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    cos = float((a * b).sum(-1).min())
    np.testing.assert_allclose(a, b, atol=2e-5)
    return cos


def test_filelist_matches_laion_clap(pair, tmp_path):
    ours, ref = pair
    g = np.random.default_rng(1)
    files = [
        _write(tmp_path / "a.wav", 0.3 * signals(1, 3 * 44100, 44100)[0].numpy(), 44100),
        _write(tmp_path / "b.flac", 0.3 * signals(3, 12 * 22050, 22050)[2].numpy(), 22050),
        _write(tmp_path / "c.wav", (0.2 * g.standard_normal((5 * 48000, 2))).clip(-1, 1), 48000),
    ]  # 44.1 kHz, a long 22.05 kHz flac (random crop), 48 kHz stereo
    np.random.seed(3)
    a = ours.get_audio_embedding_from_filelist(files)
    np.random.seed(3)
    b = ref.get_audio_embedding_from_filelist(files)
    assert _close(a, b) >= 0.99999


def test_data_and_text_match_laion_clap(pair):
    ours, ref = pair
    x = np.zeros((3, 600_000), dtype=np.float32)
    x[:] = signals(3, 600_000).numpy()  # longer than 10 s: laion_clap's random crop
    np.random.seed(5)
    a = ours.get_audio_embedding_from_data(x)
    np.random.seed(5)
    b = ref.get_audio_embedding_from_data(x)
    assert _close(a, b) >= 0.99999
    short = signals(2, 200_000, seed=2)
    ta = ours.get_audio_embedding_from_data(short, use_tensor=True)
    tb = ref.get_audio_embedding_from_data(short, use_tensor=True)
    _close(ta, tb)
    _close(ours.get_text_embedding(TEXTS, tokenizer=_tokenizer),
           ref.get_text_embedding(TEXTS, tokenizer=_tokenizer))  # fmt: skip


def test_use_tensor_keeps_the_graph(pair):
    ours, _ = pair
    x = signals(1, 100_000).requires_grad_(True)
    emb = ours.get_audio_embedding_from_data(x, use_tensor=True)
    emb.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0


def test_soxr_load_equals_librosa(tmp_path):
    librosa = pytest.importorskip("librosa")
    g = np.random.default_rng(0)
    for sr, ch in ((44100, 2), (16000, 1), (48000, 1)):
        x = (0.3 * g.standard_normal((sr // 3, ch))).clip(-1, 1)
        f = _write(tmp_path / f"x{sr}.wav", x, sr)
        np.testing.assert_array_equal(shim.load_like_librosa(f), librosa.load(f, sr=48000)[0])


def test_refusals():
    with pytest.raises(ValueError, match="resampler"):
        shim.CLAP_Module(resampler="sinc", device="cpu", text_overrides=TEXT)
    m = shim.CLAP_Module.__new__(shim.CLAP_Module)
    with pytest.raises(ValueError, match="single path"):
        shim.CLAP_Module.get_audio_embedding_from_filelist(m, "dog.wav")
    with pytest.raises(ValueError, match="embed_audio_files|path"):
        shim.CLAP_Module.get_audio_embedding_from_data(m, ["dog.wav"])


def test_fusion_matches_laion_clap(tmp_path):
    """Fusion: short clips (4 copies of the mel) and long ones (laion_clap's random views)."""
    torch.manual_seed(1)
    ours = shim.CLAP_Module(enable_fusion=True, device="cpu", text_overrides=TEXT)
    randomize_bn(ours.model, seed=1)
    path = tmp_path / "fusion.pt"
    save_laion_checkpoint(ours.model, path)
    ref = laion_module(ours.model.text_branch.config, enable_fusion=True)
    ref.load_ckpt(str(path), verbose=False)
    ours.load_ckpt(str(path))
    x = [signals(1, 700_000, seed=4)[0].numpy(), signals(2, 300_000, seed=5)[1].numpy()]
    np.random.seed(7)
    a = ours.get_audio_embedding_from_data(np.stack([x[0], x[0]]))
    np.random.seed(7)
    b = ref.get_audio_embedding_from_data(np.stack([x[0], x[0]]))
    assert _close(a, b) >= 0.99999
    assert not np.allclose(a[0], a[1], atol=1e-4)  # two different random view sets were drawn
    assert _close(ours.get_audio_embedding_from_data(x[1]),
                  ref.get_audio_embedding_from_data(x[1][None])) >= 0.99999  # fmt: skip


def test_frames_match_laion_fine_grained_embedding(pair):
    """clap_fast.frames equals LAION HTS-AT's fine_grained_embedding (1024 frames of 10 s)."""
    from clap_fast.frames import embed_frames

    ours, ref = pair
    x = signals(2, 480_000, seed=11).numpy()
    q = torch.from_numpy(np.stack([shim._int16_round_trip_np(c) for c in x]))
    ref.model.eval()  # laion_clap's get_* calls do this; the branch is called directly here
    with torch.no_grad():
        want = ref.model.audio_branch(
            {"waveform": q, "longer": torch.tensor([False, False])}, device="cpu"
        )["fine_grained_embedding"]
    got = embed_frames(ours.model, x, project=False, normalize=False, upsample=True)
    assert want.shape == (2, 1024, got[0].embeddings.shape[1])
    for i in range(2):
        np.testing.assert_allclose(got[i].embeddings.numpy(), want[i].numpy(), atol=2e-4)
    assert float(got[0].times[1]) == pytest.approx(10 / 1024)
    short = ours.model.embed_audio(x[0][:96_000], frames=True)[
        0
    ]  # 2 s: 7 frames of 0.3125 s start in it
    assert short.embeddings.shape == (7, 512) and float(short.times[-1]) < 2.0
    torch.testing.assert_close(short.embeddings.norm(dim=-1), torch.ones(7))
