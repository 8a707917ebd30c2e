"""Preprocessing, long-audio policies, the inference API and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clap_fast.audio import fill, int16_round_trip, prepare_batch
from clap_fast.config import get_config
from clap_fast.frontend import fusion_views, htk_mel_fb, slaney_mel_fb
from tests.helpers import signals, small_model


@pytest.fixture(scope="module")
def model():
    return small_model()


def test_int16_round_trip_matches_laion():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 1e-5, 0.3333, 0.99999, 1.0, 3.0])
    expect = (np.clip(x.numpy(), -1, 1) * 32767.0).astype(np.int16) / 32767.0
    torch.testing.assert_close(int16_round_trip(x), torch.from_numpy(expect.astype(np.float32)))


def test_fill_policies():
    x = torch.arange(1, 4, dtype=torch.float32)
    assert fill(x, 10, "repeatpad").tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 0]
    assert fill(x, 10, "repeat").tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    assert fill(x, 10, "pad").tolist() == [1, 2, 3, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="filling"):
        fill(x, 10, "mirror")


def test_slaney_filterbank_equals_librosa():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=48000, n_fft=1024, n_mels=64, fmin=50, fmax=14000).T
    torch.testing.assert_close(slaney_mel_fb(), torch.from_numpy(ref), rtol=1e-5, atol=1e-8)


def test_htk_filterbank_equals_torchaudio():
    ta = pytest.importorskip("torchaudio")
    ref = ta.functional.melscale_fbanks(513, 50.0, 14000.0, 64, 48000, norm=None, mel_scale="htk")
    # torchaudio builds its bank in float32 (errors ~6e-6 on weights of ~1); ours in float64.
    torch.testing.assert_close(htk_mel_fb(), ref, rtol=0, atol=1e-5)


def test_log_mel_equals_laion_conv_stft(model):
    """Our FFT front end equals LAION's STFT-as-conv weights (kept in the checkpoint) + melW."""
    x = signals(2, 48000 * 2)
    ours = model.audio_branch.log_mel(x)[:, 0]
    se = model.audio_branch.spectrogram_extractor.stft
    padded = torch.nn.functional.pad(x[:, None], (512, 512), mode="reflect")
    re = torch.nn.functional.conv1d(padded, se.conv_real.weight, stride=480)
    im = torch.nn.functional.conv1d(padded, se.conv_imag.weight, stride=480)
    mel = (re**2 + im**2).transpose(1, 2) @ model.audio_branch.logmel_extractor.melW
    ref = 10 * torch.log10(mel.clamp(min=1e-10))
    peak = ref.amax(dim=(1, 2), keepdim=True)
    near = ref > peak - 50
    assert (ours - ref).abs()[near].max() <= 1e-3


def test_fusion_resize_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    mel = torch.randn(2500, 64)
    views, longer = fusion_views(mel, 1001)
    ref = tv.transforms.Resize(size=[1001, 64])(mel[None])[0]  # laion_clap's call, today's default
    assert longer
    torch.testing.assert_close(views[0], ref, rtol=1e-5, atol=1e-5)


def test_fusion_longer_boundary():
    """A clip counts as longer only above 480 479 samples (LAION: more frames than a view)."""
    cfg = get_config("HTSAT-tiny", enable_fusion=True).audio
    clips = list(signals(1, 480479)) + list(signals(1, 480480)) + list(signals(1, 20000))
    batch = prepare_batch(clips, cfg, fusion=True)
    assert batch.longer.tolist() == [False, True, False]
    assert batch.mel_fusion.shape == (3, 4, 1001, 64)
    assert torch.equal(batch.mel_fusion[0, 0], batch.mel_fusion[0, 3])


def test_long_policies_and_seeded_randomness():
    cfg = get_config("HTSAT-mini").audio
    long = list(signals(1, 480000 * 2 + 1000))
    assert prepare_batch(long, cfg, fusion=False).waveform.shape[0] == 3  # 0, 480000, end-aligned
    assert prepare_batch(long, cfg, fusion=False, long_audio="first").waveform.shape[0] == 1
    a = prepare_batch(
        long, cfg, fusion=False, long_audio="rand_trunc", generator=torch.Generator().manual_seed(3)
    )
    b = prepare_batch(
        long, cfg, fusion=False, long_audio="rand_trunc", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.waveform, b.waveform)
    fcfg = get_config("HTSAT-tiny", enable_fusion=True).audio
    c = prepare_batch(long, fcfg, fusion=True, generator=torch.Generator().manual_seed(5))
    d = prepare_batch(long, fcfg, fusion=True, generator=torch.Generator().manual_seed(5))
    e = prepare_batch(long, fcfg, fusion=True)  # deterministic centred crops
    assert torch.equal(c.mel_fusion, d.mel_fusion)
    assert torch.equal(e.mel_fusion, prepare_batch(long, fcfg, fusion=True).mel_fusion)
    with pytest.raises(ValueError, match="only they"):
        prepare_batch(long, cfg, fusion=False, long_audio="fusion")
    with pytest.raises(ValueError, match="long-audio policy"):
        prepare_batch(long, cfg, fusion=False, long_audio="middle")


def test_embed_audio_is_deterministic_batch_invariant_and_normalised(model):
    x = signals(3, 480000)
    a = model.embed_audio(x, batch_size=3)
    b = torch.cat([model.embed_audio(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.embed_audio(list(x.numpy())), a)


def test_sliding_window_embedding_is_the_mean_of_windows(model):
    x = signals(1, 480000 * 2)[0]
    whole = model.embed_audio([x])
    parts = model.embed_audio([x[:480000], x[480000:]])
    expect = torch.nn.functional.normalize(parts.mean(dim=0, keepdim=True), dim=-1)
    torch.testing.assert_close(whole, expect, rtol=1e-5, atol=1e-6)


def test_resampling_and_int16_input(model):
    x = signals(1, 44100 * 2, sr=44100)
    assert model.embed_audio(x, sample_rate=44100).shape == (1, 512)
    pcm = (x * 32767).to(torch.int16)
    torch.testing.assert_close(
        model.embed_audio(pcm, 44100), model.embed_audio(x, 44100), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((1, 1000), float("nan")), "NaN"),
        (torch.tensor([[0.0, float("inf")] * 100]), "infinite"),
        (torch.zeros(1, 0), "empty"),
        ([np.zeros(0, dtype=np.float32)], "empty"),
        (torch.zeros(2, 3, 100), "batch, samples"),
        (torch.zeros(48000, 2), "channels='last'"),
        (np.zeros((3, 48000, 2), np.float32), "channels="),
        (torch.zeros(1, 100, dtype=torch.int32), "dtype"),
        ([], "empty batch"),
        ("a.wav", "array"),
    ],
)
def test_bad_audio_input_raises_value_error(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.embed_audio(bad)


def test_bad_sample_rate_and_missing_resampler(model, monkeypatch):
    with pytest.raises(ValueError, match="sample_rate"):
        model.embed_audio(torch.randn(1, 1000) * 0.1, sample_rate=0)
    import sys

    monkeypatch.setitem(sys.modules, "torchaudio.functional", None)
    with pytest.raises(ValueError, match="torchaudio"):
        model.embed_audio(torch.randn(1, 1000) * 0.1, sample_rate=22050)


def test_bad_text_input(model):
    with pytest.raises(ValueError, match="integer"):
        model.embed_text_tokens(torch.zeros(2, 77))
    with pytest.raises(ValueError, match="attention_mask"):
        model.embed_text_tokens(torch.zeros(2, 77, dtype=torch.long), torch.ones(2, 70))
    with pytest.raises(ValueError, match="strings"):
        model.embed_text([])


def test_embed_audio_files_reports_undecodable(model, tmp_path):
    sf = pytest.importorskip("soundfile")
    x = signals(2, 48000 * 2).numpy()
    sf.write(tmp_path / "a.flac", x[0], 48000)
    sf.write(tmp_path / "b.wav", np.stack([x[1], x[1]], axis=1), 44100)  # stereo, 44.1 kHz
    (tmp_path / "bad.flac").write_bytes(b"not audio at all")
    paths = [tmp_path / "a.flac", tmp_path / "bad.flac", tmp_path / "b.wav"]
    emb = model.embed_audio_files(paths, batch_size=2, progress=False)
    assert emb.shape == (3, 512)
    assert torch.isnan(emb[1]).all() and torch.isfinite(emb[[0, 2]]).all()
    assert list(model.last_failures) == [str(tmp_path / "bad.flac")]
    torch.testing.assert_close(emb[0:1], model.embed_audio(x[:1]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="bad.flac"):
        model.embed_audio_files(paths, strict=True, progress=False)


def test_zero_shot_probabilities(model):
    a = model.embed_audio(signals(2, 480000))
    t = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    p = model.zero_shot(a, ["dog", "rain", "car"], text_embeddings=t)
    assert p.shape == (2, 3)
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="template"):
        model.zero_shot(a, ["dog"], template="no placeholder", text_embeddings=t[:1])


def test_spec_augment_drops_bounded_stripes():
    from clap_fast.frontend import spec_augment

    torch.manual_seed(1)
    y = spec_augment(torch.ones(64, 1, 1001, 64))
    time_dropped = (y == 0).all(dim=3)[:, 0].sum(dim=1)  # whole frames zeroed per sample
    freq_dropped = (y == 0).all(dim=2)[:, 0].sum(dim=1)  # whole mel bins zeroed per sample
    assert time_dropped.max() <= 2 * 63 and freq_dropped.max() <= 2 * 7
    assert time_dropped.float().mean() > 10 and freq_dropped.float().mean() > 1


def test_bf16_autocast_embedding_is_close_and_front_end_stays_fp32(model):
    x = signals(2, 480000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.audio_branch.log_mel(x).dtype == torch.float32
    a = model.embed_audio(x)
    b = model.embed_audio(x, autocast=torch.bfloat16)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


# ------------------------------------------------ one preparation path, named options


def _wav_bytes(data: np.ndarray, sr: int = 48000) -> bytes:
    import io

    sf = pytest.importorskip("soundfile")
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_decode_audio_downmix_options(tmp_path):
    from clap_fast.audio import decode_audio, load_audio

    stereo = np.stack([signals(1, 4800)[0].numpy(), signals(1, 4800, seed=1)[0].numpy()], axis=1)
    raw = _wav_bytes(stereo)
    first = decode_audio(raw, 48000, downmix="first")
    mean = decode_audio(raw, 48000, downmix="mean")
    assert torch.allclose(first, torch.from_numpy(stereo[:, 0]))
    assert torch.allclose(mean, torch.from_numpy(stereo.mean(axis=1)), atol=1e-7)
    (tmp_path / "a.wav").write_bytes(raw)
    assert torch.equal(load_audio(str(tmp_path / "a.wav"), 48000), mean)  # the API's choice
    with pytest.raises(ValueError, match="downmix"):
        decode_audio(raw, 48000, downmix="left")
    with pytest.raises(ValueError, match="NaN"):
        decode_audio(_wav_bytes(np.full((10, 2), np.nan, dtype=np.float32)), 48000)


@pytest.mark.parametrize("fusion", [False, True])
def test_training_loader_uses_the_api_preparation(fusion):
    """data.decode_sample == audio.prepare_clip with the training options (channel 0, no
    antialias, a seeded generator), for a short and a long clip."""
    import json
    import random

    from clap_fast.audio import prepare_clip
    from clap_fast.data import DecodeSpec, SkipStats, decode_sample

    cfg = get_config("HTSAT-mini", text="transformer", enable_fusion=fusion)
    spec = DecodeSpec(cfg.audio, cfg.text, 480000, enable_fusion=fusion,
                      truncating="fusion" if fusion else "rand_trunc")  # fmt: skip
    for n in (30000, 700000):
        stereo = np.stack([signals(1, n)[0].numpy(), np.zeros(n, np.float32)], axis=1)
        group = {"flac": _wav_bytes(stereo), "json": json.dumps({"text": "a"}).encode()}
        got = decode_sample("k", group, spec, random.Random(3), "u", SkipStats())
        rng = random.Random(3)
        gen = torch.Generator().manual_seed(rng.randrange(1 << 62))
        want = prepare_clip(
            torch.from_numpy(stereo[:, 0]), cfg.audio, fusion=fusion, antialias=False,
            long_audio="fusion" if fusion else "rand_trunc", generator=gen,
        )  # fmt: skip
        if fusion:
            assert torch.equal(got["mel_fusion"], want.mel_fusion)
            assert got["longer"] == want.longer == (n > 480000)
        else:
            assert torch.equal(got["waveform"], want.windows[0])
            assert got["waveform"].shape == (480000,)


def test_input_rules_one_clip_channels_and_strings(model):
    """A 1-D clip is one clip; (T, C) needs channels= and then equals the downmix; strings and
    lists of strings are refused (a file name is not iterated character by character)."""
    x = signals(2, 48000)
    one = model.embed_audio(x[0])
    assert one.shape == (1, 512)
    torch.testing.assert_close(one, model.embed_audio(x[:1]))
    stereo_tc = torch.stack([x[0], x[1]], dim=1).numpy()  # (T, 2) as soundfile.read gives it
    with pytest.raises(ValueError, match="channels='last'"):
        model.embed_audio(stereo_tc)
    mono = model.embed_audio(((x[0] + x[1]) / 2)[None])
    torch.testing.assert_close(model.embed_audio(stereo_tc, channels="last"), mono)
    torch.testing.assert_close(model.embed_audio(stereo_tc.T, channels="first"), mono)
    batch = model.embed_audio(np.stack([stereo_tc, stereo_tc]), channels="last")
    torch.testing.assert_close(batch, mono.expand(2, -1))
    torch.testing.assert_close(model.embed_audio([stereo_tc], channels="last"), mono)
    with pytest.raises(ValueError, match="channels must be"):
        model.embed_audio(stereo_tc, channels="left")
    with pytest.raises(ValueError, match="single path"):
        model.embed_audio_files("dog.wav")
    with pytest.raises(ValueError, match="path"):
        model.embed_audio(["dog.wav", "cat.wav"])
    with pytest.raises(ValueError, match="single string"):
        model.zero_shot(one, "dog")


def test_file_decoding_overlaps_compute(model, monkeypatch):
    """While batch 0 is embedded, batch 1 is already being decoded (threads)."""
    import threading

    import clap_fast.api as api

    started: dict[str, threading.Event] = {p: threading.Event() for p in "abcd"}
    seen = []

    def fake_load(path, sr):
        started[path].set()
        return torch.full((4800,), 0.1 * (ord(path) - 96))

    real = type(model).embed_audio

    def spy(self, clips, *args, **kwargs):
        seen.append(started["c"].wait(timeout=30))  # batch 1's first file, while batch 0 embeds
        return real(self, clips, *args, **kwargs)

    monkeypatch.setattr(api, "load_audio", fake_load)
    monkeypatch.setattr(type(model), "embed_audio", spy)
    out = model.embed_audio_files(list("abcd"), batch_size=2, num_workers=2, progress=False)
    assert seen[0] is True and out.shape == (4, 512) and bool(torch.isfinite(out).all())
