"""Training data: LAION's webdataset tars decoded into fixed-shape batches, robust to bad data.

Layout (LAION's): ``<datasetpath>/<name>/<split>/N.tar`` next to ``sizes.json``
(``{"N.tar": samples}``). ``datasetpath`` may be a ``pipe:<command> <prefix>`` URL: the shard
path is appended to the command and its stdout is read (``pipe:aws s3 cp s3://bucket``).
Samples are consecutive tar members sharing a key (the name up to the first dot of its
basename, folder prefix included, as webdataset does): an audio member (flac / wav / ogg / mp3,
decoded with soundfile, or ``npy``: int16 PCM of a ``clap-fast prepare-pcm`` shard, see
``clap_fast.pcm``) and a ``json`` with ``"text"`` (a caption or a list of them). PCM samples
stay int16 through crop / pad and batching (``waveform`` is then int16) until
``clap_fast.pcm.to_float`` on the device; a batch mixing both layouts is float32.

Pipeline, per rank and data-loader worker (all in the worker process):
shard list shuffled with (seed, epoch) → split by rank, then by worker (or, ``resampled``,
drawn with replacement) → tar stream → samples → shuffle buffer → decode (channel 0, int16
round trip, crop / pad to ``clip_samples``, or the 4 fusion mel views: ``clap_fast.audio``'s
``decode_audio`` + ``prepare_clip``, the API's path with LAION's training options) and
tokenise → batches.
The log-mel of non-fusion models is computed in the train step on the accelerator.

Bad data never crashes a run and is never silent: each problem is counted by reason
(``SKIP_REASONS``) with its shard and member, and the counts travel back to the training
process inside each batch (``batch["stats"]``, the delta since the previous batch) and in a
final stats-only item at the end of each worker's epoch (``{"stats": ..., "final": True}``).
``SkipStats`` adds them up for the end-of-epoch report.
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clap_fast.audio import decode_audio, prepare_clip, resample
from clap_fast.config import AudioConfig, TextConfig
from clap_fast.pcm_format import (
    PCM_EXT,
    PCM_RATE,
    decode_pcm,
    pcm_length,
    stack_waveforms,
    to_float,
)

__all__ = [
    "SKIP_REASONS",
    "AUDIO_EXTS",
    "SkipStats",
    "split_urls",
    "split_exists",
    "read_sizes",
    "read_tar_samples",
    "WebAudioDataset",
    "make_loader",
]

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "truncated_tar",  # the tar ends inside a member or without its end-of-archive marker
    "unreadable_tar",  # the shard cannot be opened at all
    "bad_json",  # the json member does not parse
    "missing_text",  # no json member, or a json without "text"
    "missing_audio",  # no audio member
    "undecodable_audio",  # soundfile cannot decode the audio member, or it is empty / not finite
)
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", PCM_EXT)
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


@dataclass
class SkipStats:
    """Counts of skipped items by reason, with (reason, shard, member) details."""

    counts: Counter = field(default_factory=Counter)
    details: list[tuple[str, str, str]] = field(default_factory=list)
    clips: int = 0
    """Samples successfully decoded."""
    busy_s: float = 0.0
    """Seconds the producer spent reading and decoding."""

    def add(self, reason: str, shard: str, member: str) -> None:
        self.counts[reason] += 1
        self.details.append((reason, shard, member))

    def merge(self, other: dict[str, Any] | SkipStats) -> None:
        d = other.to_dict() if isinstance(other, SkipStats) else other
        self.counts.update(d["counts"])
        self.details.extend(tuple(x) for x in d["details"])
        self.clips += d["clips"]
        self.busy_s += d["busy_s"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "details": [list(x) for x in self.details],
            "clips": self.clips,
            "busy_s": self.busy_s,
        }

    def take(self) -> dict[str, Any]:
        """The counts so far as a dict, then reset (the per-batch side channel)."""
        d = self.to_dict()
        self.counts, self.details, self.clips, self.busy_s = Counter(), [], 0, 0.0
        return d


# ------------------------------------------------------------------- shard lists
def _read_bytes(url: str) -> bytes:
    """Bytes of a local path or of ``pipe:<command>``'s stdout."""
    if url.startswith("pipe:"):
        return subprocess.run(url[5:], shell=True, check=True, capture_output=True).stdout
    with open(url, "rb") as f:
        return f.read()


def _join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def read_sizes(url: str) -> dict[str, int] | None:
    """A ``sizes.json`` as {shard file: samples}; None if the file does not exist.

    Raises ValueError naming the file when it exists but is not a JSON object of
    non-negative integer sample counts (a garbage file is never taken for a missing one).
    """
    try:
        raw = _read_bytes(url)
    except (FileNotFoundError, NotADirectoryError, subprocess.CalledProcessError):
        return None
    except OSError as exc:
        raise ValueError(f"{url}: unreadable ({type(exc).__name__}: {exc})") from None
    try:
        sizes = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(sizes, dict):
        raise ValueError(
            f"{url}: must map shard names to sample counts, got {type(sizes).__name__}"
        )
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise ValueError(f"{url}: sample counts must be integers >= 0; bad entries: {bad[:5]}")
    return {str(k): v for k, v in sizes.items()}


def _sizes(datasetpath: str, name: str, split: str) -> dict[str, int] | None:
    return read_sizes(_join(datasetpath, name, split, "sizes.json"))


def split_exists(datasetpath: str, name: str, split: str) -> bool:
    """Whether ``<datasetpath>/<name>/<split>/sizes.json`` exists (ValueError if garbage)."""
    return _sizes(datasetpath, name, split) is not None


def split_urls(datasetpath: str, name: str, split: str) -> tuple[list[str], int]:
    """(shard URLs in numeric order, total samples) of one split, from its ``sizes.json``."""
    sizes = _sizes(datasetpath, name, split)
    if sizes is None:
        raise FileNotFoundError(f"no readable sizes.json under {_join(datasetpath, name, split)}")

    def order(k: str) -> tuple[int, str]:
        stem = k.rsplit(".", 1)[0]
        return (int(stem), k) if stem.isdigit() else (1 << 60, k)

    keys = sorted(sizes, key=order)
    return [_join(datasetpath, name, split, k) for k in keys], sum(sizes.values())


# ------------------------------------------------------------------ tar reading
def _exact(raw: Any, n: int) -> bytes:
    """``n`` bytes of a stream (fewer only at its end); one copy for a regular file or a pipe."""
    data = raw.read(n)
    if len(data) < n and data:
        parts = [data]
        while sum(map(len, parts)) < n and (more := raw.read(n - sum(map(len, parts)))):
            parts.append(more)
        data = b"".join(parts)
    return data


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    pos, path = 0, None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _tar_members(raw: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a ustar / pax / GNU tar stream, in order.

    Reads each member with one ``read`` (tarfile's stream mode copies every byte several times,
    which made reading the tar most of the cost of a PCM sample). Raises ``tarfile.ReadError``
    on a short member, an invalid header, or an end without the end-of-archive zero block.
    """
    long_name: str | None = None
    while True:
        header = _exact(raw, _BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError(
                "no end-of-archive marker" if not header else "truncated header"
            )
        if header == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(f"invalid header ({exc})") from None
        name = long_name or info.name
        pad = -info.size % _BLOCK
        data = _exact(raw, info.size)
        if len(data) < info.size or len(_exact(raw, pad)) < pad:
            exc = tarfile.ReadError("unexpected end of data")
            exc.member = name  # the member being read, for the report
            raise exc
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
            continue
        long_name = None
        if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
            if not name.endswith("/"):
                yield name, data


def _open(url: str) -> tuple[Any, subprocess.Popen | None]:
    if url.startswith("pipe:"):
        proc = subprocess.Popen(
            url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        return proc.stdout, proc
    return open(url, "rb"), None


def read_tar_samples(url: str, stats: SkipStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) groups of consecutive members of one tar.

    A tar that cannot be opened is counted as ``unreadable_tar``; one that ends inside a
    member or without its end-of-archive marker as ``truncated_tar`` (naming the member being
    read, or the last complete one); the samples before the break are still yielded, the
    sample being read when it broke is dropped with the tar.
    """
    try:
        raw, proc = _open(url)
    except OSError as exc:
        stats.add("unreadable_tar", url, f"({type(exc).__name__}: {exc})")
        return
    key, group = None, {}
    try:
        for name, data in _tar_members(raw):
            match = _KEY_RE.match(name)
            k = match.group(1) if match else None
            if group and k != key:  # a sample ends where the next key starts
                yield key, group
                group = {}
            if match is None:
                continue  # no extension: not part of a sample (as webdataset)
            key = k
            group[match.group(2).lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        member = getattr(exc, "member", None)
        stats.add(
            "truncated_tar", url, f"{member or (key and f'after {key}') or '(start)'} ({exc})"
        )
        m = _KEY_RE.match(member or "")
        if member is None or (m.group(1) if m else None) == key:
            return  # the sample being read breaks with the tar
    finally:
        raw.close()
        if proc is not None:
            proc.wait()
    if group:
        yield key, group


# ----------------------------------------------------------------------- decoding
@dataclass
class DecodeSpec:
    """Everything a worker needs to turn a sample into model inputs (picklable)."""

    audio: AudioConfig
    text: TextConfig
    clip_samples: int
    filling: str = "repeatpad"
    truncating: str = "rand_trunc"
    enable_fusion: bool = False
    all_captions: bool = False
    """Evaluation: keep every caption (else one drawn at random, as LAION trains)."""


def _captions(meta: Any) -> list[str] | None:
    if not isinstance(meta, dict) or "text" not in meta:
        return None
    text = meta["text"]
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list) else []
    texts = [t for t in texts if isinstance(t, str) and t]
    return texts or None


def decode_sample(
    key: str,
    group: dict[str, bytes],
    spec: DecodeSpec,
    rng: random.Random,
    url: str,
    stats: SkipStats,
) -> dict[str, Any] | None:
    """One sample's waveform / fusion views and captions, or None (counted in ``stats``)."""
    audio_ext = next((e for e in AUDIO_EXTS if e in group), None)
    if "json" not in group:
        stats.add("missing_text", url, key)
        return None
    try:
        meta = json.loads(group["json"])
    except (ValueError, UnicodeDecodeError):
        stats.add("bad_json", url, f"{key}.json")
        return None
    texts = _captions(meta)
    if texts is None:
        stats.add("missing_text", url, f"{key}.json")
        return None
    if audio_ext is None:
        stats.add("missing_audio", url, key)
        return None
    import soundfile as sf  # here, not at module level: the GPU image has no soundfile

    try:
        if audio_ext == PCM_EXT:  # int16, already quantised at 48 kHz: kept int16
            x = decode_pcm(group[audio_ext], copy=False)
        else:  # LAION's training loader keeps channel 0
            x = decode_audio(group[audio_ext], spec.audio.sample_rate, downmix="first")
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        stats.add("undecodable_audio", url, f"{key}.{audio_ext} ({type(exc).__name__})")
        return None
    if audio_ext == PCM_EXT and spec.audio.sample_rate != PCM_RATE:
        x = resample(to_float(x), PCM_RATE, spec.audio.sample_rate)
    out: dict[str, Any] = {"key": key, "seconds": x.numel() / spec.audio.sample_rate}
    # LAION's random crops: a generator seeded from the worker's stream, per fusion sample or
    # long clip (the same draws from ``rng`` as before the one preparation path).
    random_crop = spec.enable_fusion or x.numel() > spec.clip_samples
    gen = torch.Generator().manual_seed(rng.randrange(1 << 62)) if random_crop else None
    prep = prepare_clip(
        x, spec.audio, fusion=spec.enable_fusion, data_filling=spec.filling,
        long_audio="fusion" if spec.enable_fusion else spec.truncating, generator=gen,
        antialias=False, clip_samples=spec.clip_samples,
    )  # fmt: skip
    if spec.enable_fusion:
        out["mel_fusion"], out["longer"] = prep.mel_fusion, prep.longer
    else:
        out["waveform"] = prep.windows[0]
    out["texts"] = texts if spec.all_captions else [rng.choice(texts)]
    return out


# ----------------------------------------------------------------------- dataset


def probe_sample(
    key: str,
    group: dict[str, bytes],
    spec: DecodeSpec,
    rng: random.Random,
    url: str,
    stats: SkipStats,
) -> dict[str, Any] | None:
    """``decode_sample``'s outcome without its audio: ``{"key", "seconds", "placeholder"}`` or
    None, with the same skip counts and the same draws from ``rng`` (mid-epoch resume).

    A PCM member's length comes from its header (no copy); other layouts (and fusion or a model
    rate other than 48 kHz, whose draws need the audio) are decoded in full and dropped.
    """
    ext = next((e for e in AUDIO_EXTS if e in group), None)
    if ext != PCM_EXT or spec.enable_fusion or spec.audio.sample_rate != PCM_RATE:
        item = decode_sample(key, group, spec, rng, url, stats)
        return None if item is None else {"key": key, "seconds": item["seconds"], "placeholder": 1}
    # the checks of decode_sample, in its order (tests/test_pcm.py holds the two together)
    if "json" not in group:
        stats.add("missing_text", url, key)
        return None
    try:
        texts = _captions(json.loads(group["json"]))
    except (ValueError, UnicodeDecodeError):
        stats.add("bad_json", url, f"{key}.json")
        return None
    if texts is None:
        stats.add("missing_text", url, f"{key}.json")
        return None
    try:
        n = pcm_length(group[PCM_EXT])
        if n == 0:
            raise ValueError("empty PCM member")
    except ValueError as exc:
        stats.add("undecodable_audio", url, f"{key}.{PCM_EXT} ({type(exc).__name__})")
        return None
    if n > spec.clip_samples:  # the seed of the random crop's generator
        rng.randrange(1 << 62)
    if not spec.all_captions:  # the caption's draw
        rng.choice(texts)
    return {"key": key, "seconds": n / PCM_RATE, "placeholder": 1}


def _mix(*values: int) -> int:
    """A seed from integers, stable across processes (unlike ``hash`` of str-bearing tuples)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class WebAudioDataset(IterableDataset):
    """Batches of one rank from webdataset shards (see the module docstring).

    Yields ``{"waveform": (B, clip_samples) float32 | "mel_fusion": (B, 4, T, F) + "longer":
    (B,) bool, "input_ids": (M, L) int64, "attention_mask": (M, L), "caption_owner": (M,)
    int64, "keys": [B], "seconds": float, "stats": dict}`` and, last, ``{"stats": ...,
    "final": True, "worker": id}``. Training draws one caption per clip (M = B).
    """

    def __init__(
        self,
        urls: list[str],
        spec: DecodeSpec,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.urls, self.spec, self.batch_size = list(urls), spec, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer if shuffle else 1)
        self.resampled, self.drop_last = resampled, drop_last
        self.epoch, self.resume_batches = 0, 0
        self._tokenizer = None

    def set_epoch(self, epoch: int, resume_batches: int = 0) -> None:
        """Shard order and shuffling depend on (seed, epoch) only: resumable and reproducible.

        ``resume_batches``: the trainer already consumed this many batches of the epoch; each
        worker then yields its share of them as placeholders (``{"placeholder": True, "keys",
        "seconds", "stats"}``) found without decoding PCM audio (``probe_sample``),
        with the same random draws, so the next real batch is the uninterrupted run's.
        """
        self.epoch, self.resume_batches = epoch, resume_batches

    def my_shards(self, worker: int, num_workers: int) -> list[str]:
        """This (rank, worker)'s shards for the current epoch."""
        if self.resampled:
            rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, 0))
            per = max(1, len(self.urls) // (self.world_size * num_workers))
            return [rng.choice(self.urls) for _ in range(per)]
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        return urls[self.rank :: self.world_size][worker::num_workers]

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            from clap_fast.text import get_tokenizer

            self._tokenizer = get_tokenizer(self.spec.text)
        return self._tokenizer(texts)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if items[0].get("placeholder"):
            return {"placeholder": True, "keys": [it["key"] for it in items],
                    "seconds": float(sum(it["seconds"] for it in items))}  # fmt: skip
        texts = [t for it in items for t in it["texts"]]
        owner = [i for i, it in enumerate(items) for _ in it["texts"]]
        tok = self._tokenize(texts)
        batch: dict[str, Any] = {
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "caption_owner": torch.tensor(owner, dtype=torch.int64),
            "keys": [it["key"] for it in items],
            "seconds": float(sum(it["seconds"] for it in items)),
        }
        if self.spec.enable_fusion:
            batch["mel_fusion"] = torch.stack([it["mel_fusion"] for it in items])
            batch["longer"] = torch.tensor([it["longer"] for it in items])
        else:
            batch["waveform"] = stack_waveforms([it["waveform"] for it in items])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, 1))
        stats = SkipStats()
        buffer: list[tuple[str, str, dict[str, bytes]]] = []
        pending: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        # DataLoader workers take batch slots in turn: this worker's share of the skipped ones
        probe_left = len(range(worker, self.resume_batches, num_workers)) * self.batch_size

        def emit_ready() -> Iterator[dict[str, Any]]:
            nonlocal t0
            if len(pending) >= self.batch_size:
                batch = self._collate(pending[: self.batch_size])
                del pending[: self.batch_size]
                stats.busy_s += time.perf_counter() - t0
                batch["stats"] = stats.take()
                yield batch
                t0 = time.perf_counter()

        def decode(url: str, key: str, group: dict[str, bytes]) -> None:
            nonlocal probe_left
            if probe_left:
                item = probe_sample(key, group, self.spec, rng, url, stats)
                probe_left -= item is not None
            else:
                item = decode_sample(key, group, self.spec, rng, url, stats)
            if item is not None:
                stats.clips += 1
                pending.append(item)

        for url in self.my_shards(worker, num_workers):
            for key, group in read_tar_samples(url, stats):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append((url, key, group))
                    if len(buffer) < self.shuffle_buffer:
                        continue
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                decode(*buffer.pop())
                yield from emit_ready()
        rng.shuffle(buffer)
        for entry in buffer:
            decode(*entry)
            yield from emit_ready()
        if pending and not self.drop_last:
            batch = self._collate(pending)
            pending.clear()
            stats.busy_s += time.perf_counter() - t0
            batch["stats"] = stats.take()
            yield batch
            t0 = time.perf_counter()
        stats.busy_s += time.perf_counter() - t0
        dropped = len(pending)
        yield {"stats": stats.take(), "final": True, "worker": worker, "dropped": dropped}


def make_loader(
    dataset: WebAudioDataset, workers: int, prefetch_factor: int = 2, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader that passes the dataset's ready-made batches through unchanged.

    Its own generator keeps the global torch RNG untouched (resumed runs replay it exactly).
    ``pin_memory`` (on a CUDA host) pins each batch so ``to(device, non_blocking=True)`` is async.
    """
    kw: dict[str, Any] = {
        "generator": torch.Generator().manual_seed(_mix(dataset.seed, dataset.epoch))
    }
    if workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kw)
