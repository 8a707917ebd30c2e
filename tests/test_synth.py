"""The built-in synthetic sound set: determinism, LAION layout, and that the classes differ."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clap_fast import synth
from clap_fast.synth import CLASSES, generate_clip, write_folder, write_webdataset

SR = synth.SAMPLE_RATE


def _find(label: str, duration: float = 2.0, **attrs: str) -> synth.SynthClip:
    """The first clip of ``label`` whose attributes match ``attrs``."""
    start = CLASSES.index(label)
    for index in range(start, start + 400 * len(CLASSES), len(CLASSES)):
        clip = generate_clip(index, seed=0, duration=duration)
        if all(clip.attributes.get(k) == v for k, v in attrs.items()):
            return clip
    raise AssertionError(f"no {label} clip with {attrs}")


def _centroid(x: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    return float(np.sum(np.fft.rfftfreq(x.size, 1 / SR) * power) / np.sum(power))


def _onsets(x: np.ndarray) -> int:
    """Number of times the 5 ms frame RMS rises above half its maximum."""
    frames = x[: x.size // 240 * 240].reshape(-1, 240)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    above = rms > 0.5 * rms.max()
    return int(np.sum(above[1:] & ~above[:-1]) + above[0])


def test_generate_clip_is_deterministic_and_seeded():
    a, b = generate_clip(5, seed=3), generate_clip(5, seed=3)
    assert a.waveform.dtype == np.float32 and a.waveform.ndim == 1
    np.testing.assert_array_equal(a.waveform, b.waveform)
    assert (a.captions, a.tags, a.attributes) == (b.captions, b.tags, b.attributes)
    assert not np.array_equal(generate_clip(5, seed=4, duration=1.0).waveform, a.waveform[:SR])
    other_split = generate_clip(5, seed=3, duration=1.0, split="valid").waveform
    assert not np.array_equal(other_split, generate_clip(5, seed=3, duration=1.0).waveform)


def test_clip_contents_and_captions():
    durations = []
    for i in range(3 * len(CLASSES) * 8):
        clip = generate_clip(i, seed=1, duration=0.05 if i >= 48 else None)
        if i < 48:
            durations.append(clip.waveform.size / SR)
        assert clip.label == CLASSES[i % len(CLASSES)] == clip.tags[0]
        assert np.isfinite(clip.waveform).all() and np.abs(clip.waveform).max() <= 1.0
        assert len(clip.captions) == synth.NUM_CAPTIONS == len(set(clip.captions))
        for text in clip.captions:
            assert "{" not in text and "  " not in text and text == text.strip()
            assert not re.search(r"\ba [aeiou]", text), text
        json.dumps(clip.attributes)  # JSON-serialisable metadata
    assert min(durations) >= 1.0 and max(durations) <= 12.0
    assert any(d > 10.0 for d in durations) and any(d < 5.0 for d in durations)
    assert generate_clip(0, duration=0.5, sample_rate=16000).waveform.size == 8000


def test_classes_are_acoustically_distinct():
    low, mid, high = (_find("tone", pitch=p).waveform for p in ("low", "mid", "high"))
    assert _centroid(low) < 300 < _centroid(mid) < 1000 < 1400 < _centroid(high)
    white, pink, brown = (_find(f"{c}_noise").waveform for c in ("white", "pink", "brown"))
    assert _centroid(brown) < 0.3 * _centroid(pink) < 0.3 * _centroid(white)

    up = _find("chirp_up", pitch="mid")
    down = _find("chirp_down", pitch="mid")
    for clip, rising in ((up, True), (down, False)):
        n = int(clip.attributes["sweep_seconds"] * SR)
        first, last = clip.waveform[: n // 4], clip.waveform[3 * n // 4 : n]
        assert (_centroid(first) < _centroid(last)) == rising

    quiet = np.abs(_find("white_noise", loudness="quiet").waveform).max()
    loud = np.abs(_find("white_noise", loudness="loud").waveform).max()
    assert loud > 5 * quiet

    for label in ("beeps", "clicks"):
        slow = _find(label, duration=4.0, rhythm="slow").waveform
        fast = _find(label, duration=4.0, rhythm="fast").waveform
        assert 2 * _onsets(slow) < _onsets(fast)
    assert _onsets(_find("tone").waveform) == 1


def test_webdataset_layout_and_byte_identical(tmp_path: Path):
    sf = pytest.importorskip("soundfile")
    splits = {"train": 10, "valid": 3}
    kw = dict(splits=splits, shard_size=4, seed=7, duration=0.5, progress=False)
    info = write_webdataset(tmp_path / "a", **kw)
    write_webdataset(tmp_path / "b", **kw)

    train = tmp_path / "a" / "synth" / "train"
    assert json.loads((train / "sizes.json").read_text()) == {"0.tar": 4, "1.tar": 4, "2.tar": 2}
    assert info["train"]["num_samples"] == 10
    assert info["train"]["shards"] == [str(train / f"{i}.tar") for i in range(3)]
    assert info["valid"]["pattern"] == str(tmp_path / "a" / "synth" / "valid" / "{0..0}.tar")
    for split in splits:
        for tar in sorted((tmp_path / "a" / "synth" / split).glob("*.tar")):
            twin = tmp_path / "b" / tar.relative_to(tmp_path / "a")
            assert tar.read_bytes() == twin.read_bytes()

    with tarfile.open(train / "2.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime < 1e9 and m.uname == "" for m in tar.getmembers())  # fixed, not now
        assert names == [f"train_00000{i}.{ext}" for i in (8, 9) for ext in ("flac", "json")]
        audio, sr = sf.read(io.BytesIO(tar.extractfile(names[2]).read()), dtype="float32")
        meta = json.loads(tar.extractfile(names[3]).read())
    assert sr == SR and audio.shape == (SR // 2,)
    clip = generate_clip(9, seed=7, duration=0.5, split="train")
    assert np.abs(audio - clip.waveform).max() <= 1 / 32767  # 16-bit FLAC
    assert meta["text"] == clip.captions and meta["tag"] == clip.tags
    assert meta["original_data"]["label"] == clip.label == CLASSES[9 % len(CLASSES)]


def test_webdataset_reads_back_with_webdataset(tmp_path: Path):
    sf = pytest.importorskip("soundfile")
    wds = pytest.importorskip("webdataset")
    info = write_webdataset(
        tmp_path, splits={"test": 5}, shard_size=2, duration=0.2, progress=False
    )
    samples = list(wds.WebDataset(info["test"]["pattern"], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"test_{i:06d}" for i in range(5)]
    assert all(json.loads(s["json"])["text"] for s in samples)
    assert sf.info(io.BytesIO(samples[0]["flac"])).samplerate == SR


@pytest.mark.parametrize("audio_format", ["flac", "wav"])
def test_write_folder(tmp_path: Path, audio_format: str):
    sf = pytest.importorskip("soundfile")
    paths = write_folder(tmp_path, n=10, seed=2, duration=0.25, audio_format=audio_format)
    assert len(paths) == 10 and all(p.suffix == f".{audio_format}" for p in paths)
    assert [p.parent.name for p in paths] == [CLASSES[i % len(CLASSES)] for i in range(10)]
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted(CLASSES)
    audio, sr = sf.read(paths[3])
    assert sr == SR and audio.shape == (SR // 4,)
    with pytest.raises(ValueError, match="audio_format"):
        write_folder(tmp_path, n=1, audio_format="mp3")
