"""Embedding a library in process and on a local Ray cluster; the embed / index / search CLI."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from clap_fast import synth
from clap_fast.cli import main
from clap_fast.library import embed_library
from clap_fast.library_io import LibraryStore, list_library
from tests.helpers import small_model

sf = pytest.importorskip("soundfile")

BROKEN = ("broken.flac", "empty.wav", "truncated.flac")


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one cluster per module
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Generated audio: plain files (one 12 s, one stereo 22.05 kHz), a tar shard, broken files.

    Returns (root, model, {item: reference embedding from embed_audio_files}, broken items).
    """
    root = tmp_path_factory.mktemp("library")
    src = root / "src"
    files = synth.write_folder(src, 4, duration=None, split="lib")
    files.append(src / "long.flac")
    sf.write(files[-1], synth.generate_clip(9, duration=12.0).waveform, 48000)
    stereo = np.stack([synth.generate_clip(10, 0, 22050).waveform] * 2, axis=1)
    files.append(src / "stereo.wav")
    sf.write(files[-1], stereo * np.array([1.0, 0.5], np.float32), 22050)
    shards = synth.write_webdataset(src / "tars", splits={"t": 2}, duration=2.0, progress=False)
    (src / "broken.flac").write_bytes(b"not audio at all")
    (src / "empty.wav").write_bytes(b"")
    (src / "truncated.flac").write_bytes(files[0].read_bytes()[:200])
    model = small_model(text="transformer")
    items = [str(f) for f in files]
    extracted = root / "extracted"
    with tarfile.open(shards["t"]["shards"][0]) as tar:
        members = sorted(m for m in tar.getnames() if m.endswith(".flac"))
        tar.extractall(extracted, filter="data")
    items += [f"tar://{m}::{shards['t']['shards'][0]}" for m in members]
    ref = model.embed_audio_files(
        [str(f) for f in files] + [str(extracted / m) for m in members], progress=False
    ).numpy()
    broken = [str(src / b) for b in BROKEN]
    return root, model, dict(zip(items, ref)), broken


def _check_accounted(out, refs: dict, broken: list[str]) -> None:
    paths, emb, meta = LibraryStore(out).read()
    failures = json.loads((out / "failures.json").read_text())
    assert sorted(failures) == sorted(broken)  # every broken file named, with a reason
    assert all(failures.values())
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(refs)  # rows + failures = inputs, nothing silently lost
    cos = np.sum(emb * np.stack([refs[p] for p in paths]), axis=1)
    assert cos.min() >= 0.99999, cos
    dur = dict(zip(paths, meta["duration"]))
    rate = dict(zip(paths, meta["sample_rate"]))
    assert dur[next(p for p in paths if p.endswith("long.flac"))] == pytest.approx(12.0)
    assert rate[next(p for p in paths if p.endswith("stereo.wav"))] == 22050


def test_list_library_finds_files_tar_members_and_lists(library, tmp_path):
    root, _, refs, broken = library
    items = list_library(root / "src")
    assert sorted(items) == sorted(list(refs) + broken)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(items[:3]) + "\n")
    assert list_library(listing) == items[:3]
    with pytest.raises(ValueError, match="does not exist"):
        list_library(tmp_path / "missing")


def test_in_process_matches_embed_audio_files_and_resumes(library):
    root, model, refs, broken = library
    out = root / "out_local"
    run = embed_library(root / "src", out, model, batch_size=3, progress=False)
    assert (run.embedded, sorted(run.failed)) == (len(refs), sorted(broken))
    _check_accounted(out, refs, broken)
    again = embed_library(root / "src", out, model, batch_size=3, progress=False)
    assert (again.embedded, again.failed, again.skipped) == (0, {}, len(refs) + len(broken))
    torch.manual_seed(1234)  # not the fixture's RNG state (it may also be seed 0's)
    other = small_model(text="transformer")  # new random weights: another embedding space
    with pytest.raises(ValueError, match="another run"):
        embed_library(root / "src", out, other, progress=False)


@pytest.mark.slow  # Ray start-up and actor imports: tens of seconds on 2 cores
def test_ray_matches_embed_audio_files_and_rerun_embeds_nothing(ray_session, library):
    root, model, refs, broken = library
    out = root / "out_ray"
    kw = dict(use_ray=True, num_cpu_actors=1, batch_size=3, progress=False)
    run = embed_library(root / "src", out, model, **kw)
    assert (run.embedded, sorted(run.failed)) == (len(refs), sorted(broken))
    _check_accounted(out, refs, broken)
    shards = sorted((out / "embeddings").iterdir())
    again = embed_library(root / "src", out, model, **kw)
    assert (again.embedded, again.skipped) == (0, len(refs) + len(broken))
    assert sorted((out / "embeddings").iterdir()) == shards


@pytest.mark.slow
def test_ray_killed_actor_still_accounts_for_every_file(ray_session, library, tmp_path):
    root, model, refs, broken = library
    out, marker = tmp_path / "out", tmp_path / "killed"
    run = embed_library(
        root / "src", out, model, use_ray=True, num_cpu_actors=1, batch_size=2,
        progress=False, crash_marker=str(marker),
    )  # fmt: skip
    assert marker.exists()  # an actor was SIGKILLed after writing a shard; Ray restarted it
    assert run.embedded + len(run.failed) == len(refs) + len(broken)
    _check_accounted(out, refs, broken)
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(f).num_rows for f in (out / "embeddings").glob("part-*.parquet"))
    assert rows == len(refs)  # the retried batch rewrote its shard: no row twice


def test_cli_embed_index_search(library, tmp_path, capsys):
    pytest.importorskip("faiss")
    root, model, refs, broken = library
    model.save_pretrained(tmp_path / "ckpt")
    ck = ["--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu"]
    lib, idx = tmp_path / "lib", tmp_path / "lib.index"
    assert main(["embed", str(root / "src"), "--out", str(lib), *ck, "--batch-size", "4"]) == 1
    assert sorted(json.loads((lib / "failures.json").read_text())) == sorted(broken)
    assert main(["index", "build", str(lib), "--out", str(idx)]) == 0
    assert json.loads((idx / "meta.json").read_text())["kind"] == "flat"
    query = next(p for p in refs if p.endswith("long.flac"))
    capsys.readouterr()
    assert main(["search", str(idx), "--audio", query, "--top", "3", "--json", *ck]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == query and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3
    assert main(["search", str(idx), "--query", "a rising chirp", "--top", "2", *ck]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split()[1] in refs for line in lines)
    with pytest.raises(SystemExit, match="did not make"):
        main(["search", str(idx), "--query", "x", "--model", "HTSAT-mini", "--text", "transformer"])
