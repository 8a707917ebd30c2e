"""Data engine: loader clips/s per worker for LAION FLAC tars vs ``prepare-pcm`` int16 PCM tars.

Benchmarks (10 s synthetic clips at 48 kHz, one shard; ``CLAP_BENCH_DATA_CLIPS`` clips, default
8 so that a CPU smoke run stays short; use 256 or more for numbers worth quoting):

* ``test_loader_per_worker[flac|pcm]``: the training loader's whole per-worker pipeline
  (tar read, shuffle buffer, decode, channel 0, int16 round trip, random crop / pad, tokenise,
  batch) run in this process, i.e. one worker on one core. ``extra_info``: ``clips_per_s``
  (wall clock), ``clips_per_cpu_s`` (clips per second of this process's CPU time: the per-core
  rate, robust to a shared machine), ``bytes_per_clip`` (shard bytes / clips) and ``layout``; ``flac`` is the baseline (LAION's
  layout), so the report's speed-up column is PCM's gain per core.
* ``test_audio_per_worker[flac|pcm]``: the audio half alone (tar read, json, decode, crop /
  pad; no tokeniser, no batching): what the layout changes. The loader rate above is bounded by
  the tokeniser too (open_clip's BPE here costs about a millisecond a caption on a busy core),
  which is the same for both layouts.
* ``test_prepare_pcm``: ``clap-fast prepare-pcm`` with one worker: conversion clips/s per core
  (a one-off cost per dataset).

Cores per GPU: a GPU training at R clips/s needs R / clips_per_s loader cores per layout (the
GPU train-step rate is in ``bench/results/train_*``; no GPU number was measured for this suite).

Run: ``pytest bench/bench_data.py --benchmark-json out.json``; ``--benchmark-disable`` for a
smoke run (each body once).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from pathlib import Path

import pytest

from clap_fast import synth
from clap_fast.config import get_config
from clap_fast.data import DecodeSpec, SkipStats, WebAudioDataset, decode_sample, read_tar_samples
from clap_fast.pcm import prepare_pcm

CLIPS = int(os.environ.get("CLAP_BENCH_DATA_CLIPS", "8"))
SECONDS = 10.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_data")
    synth.write_webdataset(
        root / "flac", "synth", {"train": CLIPS}, shard_size=CLIPS, duration=SECONDS,
        progress=False,
    )  # fmt: skip
    prepare_pcm(root / "flac", root / "pcm")
    return {k: root / k / "synth" / "train" / "0.tar" for k in ("flac", "pcm")}


@pytest.mark.parametrize("provider", ["flac", "pcm"])
def test_loader_per_worker(benchmark, shards, provider: str) -> None:
    cfg = get_config("HTSAT-tiny", text="transformer")
    spec = DecodeSpec(cfg.audio, cfg.text, cfg.audio.clip_samples)
    url = str(shards[provider])

    cpu: list[float] = []

    def load() -> int:
        t = time.process_time()
        ds = WebAudioDataset([url], spec, batch_size=4, seed=0, shuffle_buffer=8, drop_last=False)
        n = sum(len(b["keys"]) for b in ds if not b.get("final"))
        cpu.append(time.process_time() - t)
        return n

    assert load() == CLIPS
    benchmark.group = "loader_10s_clips"
    benchmark.extra_info.update(
        provider=provider, role="baseline" if provider == "flac" else "ours", items=CLIPS,
        layout=provider, bytes_per_clip=shards[provider].stat().st_size / CLIPS,
    )  # fmt: skip
    if benchmark.disabled:
        benchmark(load)
        return
    cpu.clear()
    benchmark.pedantic(load, rounds=3, iterations=1)
    benchmark.extra_info["clips_per_s"] = CLIPS / benchmark.stats.stats.median
    benchmark.extra_info["clips_per_cpu_s"] = CLIPS / statistics.median(cpu)


@pytest.mark.parametrize("provider", ["flac", "pcm"])
def test_audio_per_worker(benchmark, shards, provider: str) -> None:
    cfg = get_config("HTSAT-tiny", text="transformer")
    spec = DecodeSpec(cfg.audio, cfg.text, cfg.audio.clip_samples)
    url = str(shards[provider])
    cpu: list[float] = []

    def audio() -> int:
        t, stats, rng = time.process_time(), SkipStats(), random.Random(0)
        n = sum(
            decode_sample(k, g, spec, rng, url, stats) is not None
            for k, g in read_tar_samples(url, stats)
        )
        cpu.append(time.process_time() - t)
        return n

    assert audio() == CLIPS
    benchmark.group = "audio_10s_clips"
    benchmark.extra_info.update(
        provider=provider, role="baseline" if provider == "flac" else "ours", items=CLIPS
    )
    if benchmark.disabled:
        benchmark(audio)
        return
    cpu.clear()
    benchmark.pedantic(audio, rounds=3, iterations=1)
    benchmark.extra_info["clips_per_s"] = CLIPS / benchmark.stats.stats.median
    benchmark.extra_info["clips_per_cpu_s"] = CLIPS / statistics.median(cpu)


def test_prepare_pcm(benchmark, shards, tmp_path: Path) -> None:
    src = shards["flac"].parent.parent.parent

    def convert() -> int:
        dst = tmp_path / "pcm"
        shutil.rmtree(dst, ignore_errors=True)
        return prepare_pcm(src, dst)["written"]

    benchmark.group = "prepare_pcm_10s_clips"
    benchmark.extra_info.update(items=CLIPS, provider="prepare_pcm_1_worker")
    if benchmark.disabled:
        benchmark(convert)
        return
    benchmark.pedantic(convert, rounds=2, iterations=1)
    benchmark.extra_info["clips_per_s"] = CLIPS / benchmark.stats.stats.median
