"""PCM shards: conversion parity with LAION's int16 round trip, broken sources, resume, loader."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clap_fast import synth
from clap_fast.audio import int16_round_trip, resample
from clap_fast.config import AudioConfig, TextConfig
from clap_fast.data import DecodeSpec, SkipStats, WebAudioDataset, decode_sample, read_tar_samples
from clap_fast.pcm import (
    decode_pcm,
    encode_pcm,
    pcm_length,
    prepare_pcm,
    prepare_pcm_main,
    stack_waveforms,
    to_float,
)

sf = pytest.importorskip("soundfile")  # not on the GPU image


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for m, b in members:
            m.size = len(b)
            t.addfile(m, io.BytesIO(b))


def _stereo_44k() -> bytes:
    """A stereo 44.1 kHz FLAC whose channels differ (channel 0 must be the one kept)."""
    t = np.arange(22050) / 44100
    x = np.stack([0.6 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 97 * t)], 1)
    buf = io.BytesIO()
    sf.write(buf, x, 44100, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """synth/train: 3 shards of 4 (0.5 s clips), with a stereo 44.1 kHz clip in shard 2."""
    root = tmp_path_factory.mktemp("flac")
    synth.write_webdataset(root, "synth", {"train": 12}, shard_size=4, duration=0.5, progress=False)
    shard = root / "synth" / "train" / "2.tar"
    members = _members(shard)
    members = [(m, _stereo_44k() if m.name == "train_000009.flac" else b) for m, b in members]
    _write(shard, members)
    return root


def _laion_float(flac: bytes) -> torch.Tensor:
    """LAION's path: decode, channel 0, resample to 48 kHz, int16 round trip."""
    data, sr = sf.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    return int16_round_trip(resample(torch.from_numpy(np.ascontiguousarray(data[:, 0])), sr, 48000))


def test_pcm_member_round_trip_and_rejects_bad_headers() -> None:
    q = torch.tensor([-32767, -1, 0, 1, 32767], dtype=torch.int16)
    data = encode_pcm(q.numpy())
    assert pcm_length(data) == 5
    assert torch.equal(decode_pcm(data), q)
    assert torch.equal(decode_pcm(data, copy=False), q)
    for bad in (b"not npy", data[:-2], encode_pcm(q[:0].numpy())):
        with pytest.raises(ValueError):
            decode_pcm(bad)
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="<i2"):
        decode_pcm(buf.getvalue())
    mixed = stack_waveforms([q, to_float(q)])
    assert mixed.dtype == torch.float32 and torch.equal(mixed[0], mixed[1])


def test_conversion_matches_laion_int16_round_trip(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pcm"
    summary = prepare_pcm(src, dst)
    assert (summary["read"], summary["written"], summary["failed"]) == (12, 12, [])
    split = dst / "synth" / "train"
    assert json.loads((split / "sizes.json").read_text()) == {"0.tar": 4, "1.tar": 4, "2.tar": 4}
    for i in range(3):
        source = dict(read_tar_samples(str(src / "synth" / "train" / f"{i}.tar"), SkipStats()))
        out = dict(read_tar_samples(str(split / f"{i}.tar"), SkipStats()))
        assert list(out) == list(source)
        for key, group in source.items():
            assert set(out[key]) == {"json", "npy"}
            assert out[key]["json"] == group["json"]
            q = decode_pcm(out[key]["npy"])
            assert q.dtype == torch.int16
            assert torch.equal(to_float(q), _laion_float(group["flac"])), key
    # the stereo 44.1 kHz clip: channel 0 at 48 kHz, not channel 1
    q = decode_pcm(dict(read_tar_samples(str(split / "2.tar"), SkipStats()))["train_000009"]["npy"])
    assert q.numel() == 24000 and abs(float(to_float(q).abs().max()) - 0.6) < 0.02


@pytest.mark.parametrize("clip", [16000, 30000])  # random crop / repeat-pad, in int16 for PCM
def test_loader_gives_identical_batches_from_both_layouts(src: Path, tmp_path: Path, clip) -> None:
    dst = tmp_path / "pcm"
    prepare_pcm(src, dst)
    spec = DecodeSpec(AudioConfig(), TextConfig(model_type="transformer"), clip, "repeatpad")
    batches = {}
    for name, root in (("flac", src), ("pcm", dst)):
        urls = [str(root / "synth" / "train" / f"{i}.tar") for i in range(3)]
        ds = WebAudioDataset(urls, spec, batch_size=4, seed=3, shuffle_buffer=5)
        ds.set_epoch(1)
        batches[name] = [b for b in ds if not b.get("final")]
    assert len(batches["flac"]) == len(batches["pcm"]) == 3
    for a, b in zip(batches["flac"], batches["pcm"]):
        assert a["keys"] == b["keys"]
        assert a["waveform"].dtype == torch.float32 and b["waveform"].dtype == torch.int16
        assert torch.equal(to_float(b["waveform"]), a["waveform"])
        assert torch.equal(a["input_ids"], b["input_ids"])
    from clap_fast.train.evaluate import to_device

    x = to_device(batches["pcm"][0], torch.device("cpu"))
    assert x["waveform"].dtype == torch.float32
    assert torch.equal(x["waveform"], batches["flac"][0]["waveform"])


def test_fusion_and_resampling_accept_pcm() -> None:
    q = torch.randint(-20000, 20000, (48000,), dtype=torch.int16)
    group = {"json": b'{"text": "a tone"}', "npy": encode_pcm(q.numpy())}
    spec = DecodeSpec(AudioConfig(sample_rate=32000), TextConfig(model_type="transformer"), 32000)
    item = decode_sample("k", group, spec, random.Random(0), "u", SkipStats())
    assert item["waveform"].dtype == torch.float32 and item["waveform"].numel() == 32000
    assert torch.equal(item["waveform"], int16_round_trip(resample(to_float(q), 48000, 32000)))


@pytest.fixture()
def broken(src: Path, tmp_path: Path) -> tuple[Path, set[tuple[str, str]]]:
    """A copy of ``src`` whose shard 0 has garbage audio, bad JSON and a sample without audio,
    and whose shard 1 is truncated inside a member."""
    root = tmp_path / "broken"
    split = root / "synth" / "train"
    split.mkdir(parents=True)
    for f in (src / "synth" / "train").iterdir():
        (split / f.name).write_bytes(f.read_bytes())
    out = []
    for m, b in _members(split / "0.tar"):
        if m.name == "train_000001.flac":
            b = b"garbage, not a flac file" * 40
        elif m.name == "train_000002.json":
            b = b'{"text": ["broken'
        elif m.name == "train_000003.flac":
            continue
        out.append((m, b))
    _write(split / "0.tar", out)
    raw = (split / "1.tar").read_bytes()
    with tarfile.open(split / "1.tar") as t:
        cut = next(m for m in t.getmembers() if m.name == "train_000006.flac")
    (split / "1.tar").write_bytes(raw[: cut.offset_data + 300])
    sizes = json.loads((split / "sizes.json").read_text())
    (split / "sizes.json").write_text(json.dumps({**sizes, "9.tar": 4}))  # a shard gone missing
    expected = {
        ("undecodable_audio", "train_000001.flac"),
        ("bad_json", "train_000002.json"),
        ("missing_audio", "train_000003"),
        ("truncated_tar", "train_000006.flac"),
        ("count_mismatch", "sizes.json"),  # shard 1 held fewer samples than sizes.json says
        ("missing_shard", "listed"),
    }
    return root, expected


def test_broken_sources_are_counted_and_named(broken, tmp_path: Path, capsys) -> None:
    root, expected = broken
    dst = root / "pcm"  # inside SRC: its own output must never become input
    assert prepare_pcm_main([str(root), str(dst), "--workers", "2"]) == 1
    lines = [x.split("\t") for x in capsys.readouterr().out.splitlines() if "\t" in x]
    assert {(r, m.split(" ")[0]) for r, _, m in lines} == expected
    report = json.loads((dst / "prepare_pcm_report.json").read_text())
    assert (report["read"], report["written"]) == (4 + 2 + 4, 1 + 2 + 4)
    sizes = json.loads((dst / "synth" / "train" / "sizes.json").read_text())
    assert sizes == {"0.tar": 1, "1.tar": 2, "2.tar": 4}
    for name, n in sizes.items():  # the written shards hold exactly what sizes.json says
        stats = SkipStats()
        assert sum(1 for _ in read_tar_samples(str(dst / "synth" / "train" / name), stats)) == n
        assert not stats.details
    again = prepare_pcm(root, dst)
    assert (again["shards"], again["resumed"], len(again["failed"])) == (3, 3, len(expected))


def test_prepare_pcm_resumes_where_it_stopped(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pcm"
    prepare_pcm(src, dst)
    split = dst / "synth" / "train"
    first = {p.name: p.read_bytes() for p in split.glob("*.tar")}
    # a run killed mid-shard: shard 1's report is gone and a half-written part lies around
    (split / "1.tar.report.json").unlink()
    (split / "1.tar").write_bytes(first["1.tar"][:1000])
    (split / "2.tar.part").write_bytes(b"half")
    summary = prepare_pcm(src, dst)
    assert (summary["shards"], summary["resumed"], summary["written"]) == (3, 2, 12)
    assert {p.name: p.read_bytes() for p in split.glob("*.tar")} == first  # byte-identical
    with pytest.raises(ValueError, match="not a directory"):
        prepare_pcm(tmp_path / "missing", dst)


def _stream(root: Path, workers: int, resume: int) -> list[dict]:
    from clap_fast.data import make_loader

    spec = DecodeSpec(AudioConfig(), TextConfig(model_type="transformer"), 12000, "repeatpad")
    urls = [str(root / "synth" / "train" / f"{i}.tar") for i in range(3)]
    ds = WebAudioDataset(urls * 2, spec, batch_size=2, seed=5, shuffle_buffer=3)
    ds.set_epoch(2, resume_batches=resume)
    return list(make_loader(ds, workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_seeks_to_the_uninterrupted_next_batch(src: Path, tmp_path: Path, workers) -> None:
    dst = tmp_path / "pcm"
    prepare_pcm(src, dst)
    shard = dst / "synth" / "train" / "1.tar"  # a sample the probe must skip as the decoder does
    _write(
        shard,
        [(m, b'{"text": [' if m.name == "train_000005.json" else b) for m, b in _members(shard)],
    )
    for root, probed in ((dst, True), (src, False)):
        full = _stream(root, workers, 0)
        real = [b for b in full if not b.get("final")]
        assert len(real) == (11 if probed else 12) and not any(b.get("placeholder") for b in real)
        for n in (1, 3, 6):
            resumed = _stream(root, workers, n)
            items = [b for b in resumed if not b.get("final")]
            assert all(b.get("placeholder") for b in items[:n])
            assert not any(b.get("placeholder") for b in items[n:])
            assert [b["keys"] for b in items] == [b["keys"] for b in real]
            for a, b in zip(real[n:], items[n:]):
                assert torch.equal(a["waveform"], b["waveform"])
                assert torch.equal(a["input_ids"], b["input_ids"])
            counts = [SkipStats(), SkipStats()]
            for stats, stream in zip(counts, (full, resumed)):
                for b in stream:
                    stats.merge(b["stats"])
            assert counts[0].counts == counts[1].counts and counts[0].clips == counts[1].clips
            assert (sum(counts[0].counts.values()) == 2) == probed  # the bad json, twice


@pytest.mark.slow
def test_training_on_pcm_shards_matches_flac_bit_for_bit(src: Path, tmp_path: Path) -> None:
    """One epoch (3 steps) of ``clap_fast.train`` on each layout: the same weights exactly
    (PCM batches reach the model as int16 and become q / 32767 in ``to_device``)."""
    import os
    import subprocess
    import sys

    from clap_fast.checkpoint import read_state_dict

    prepare_pcm(src, tmp_path / "pcm")
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    env.pop("RANK", None)
    weights = []
    for name, root in (("flac", src), ("pcm", tmp_path / "pcm")):
        args = [
            "--dataset-type", "webdataset", "--datasetnames", "synth", "--datasetinfos", "train",
            "--model", "HTSAT-mini", "--tmodel", "transformer", "--clip-samples", "16000",
            "--text-overrides", '{"width": 32, "layers": 1, "heads": 2}', "--batch-size", "4",
            "--lr", "2e-3", "--warmup", "2", "--workers", "1", "--seed", "3", "--epochs", "1",
            "--no-eval", "--datasetpath", str(root), "--logdir", str(tmp_path), "--name", name,
        ]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "clap_fast.train", *args],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights.append(read_state_dict(tmp_path / name / "checkpoints" / "final_laion.pt")[0])
    a, b = weights
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved == []
