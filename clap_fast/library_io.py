"""Where an audio library comes from and where its embeddings go (local paths or fsspec URLs).

Sources (``list_library``): a folder (searched recursively for audio files and LAION webdataset
``.tar`` shards), one ``.tar``, one audio file, or a text file listing any of these, one per
line. A tar member is named with fsspec's chained-URL syntax, ``tar://<member>::<tar url>``,
so every item is a string that ``fsspec.open`` can read on any worker of a cluster.

Output directory (``LibraryStore``)::

    OUT/run.json                     the model fingerprint and preprocessing of the run
    OUT/embeddings/part-<h>.parquet  path, duration (s), sample_rate (Hz), embedding (float32 × D)
    OUT/failures/part-<h>.parquet    path, error
    OUT/failures.json                {path: error} of every failed item, rewritten after each run

A shard is named by a hash of its items and written to a hidden temporary name first, then
renamed: a retried batch (an actor killed and restarted) rewrites the same shard, and a killed
run leaves no half-written shard. The items of all shards (embedded or failed) are what a
rerun skips.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np
import torch

from clap_fast.audio import read_audio, resample

__all__ = [
    "AUDIO_SUFFIXES",
    "list_library",
    "decode_item",
    "LibraryStore",
    "model_fingerprint",
]

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
TAR_PREFIX = "tar://"


def _suffix(path: str) -> str:
    return PurePosixPath(path.split("::")[0]).suffix.lower()


def _tar_members(tar_url: str) -> list[str]:
    import fsspec

    fs = fsspec.filesystem("tar", fo=tar_url)
    members = sorted(m for m in fs.find("") if _suffix(m) in AUDIO_SUFFIXES)
    return [f"{TAR_PREFIX}{m}::{tar_url}" for m in members]


def _expand(entries: Sequence[str]) -> list[str]:
    out: list[str] = []
    for e in entries:
        out += _tar_members(e) if _suffix(e) == ".tar" else [e]
    return out


def list_library(source: str | os.PathLike) -> list[str]:
    """Every audio item under ``source`` (see the module docstring), in a stable order.

    Local items are plain paths, remote ones URLs. Raises ValueError when nothing is found.
    """
    import fsspec

    source = os.fspath(source)
    fs, root = fsspec.core.url_to_fs(source)
    local = "file" in fs.protocol  # a str or a tuple of names

    def name(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    if fs.isdir(root):
        found = sorted(fs.find(root))
        items = [name(p) for p in found if _suffix(p) in AUDIO_SUFFIXES]
        items += _expand([name(p) for p in found if _suffix(p) == ".tar"])
    elif not fs.exists(root):
        raise ValueError(f"{source} does not exist")
    elif _suffix(root) in AUDIO_SUFFIXES + (".tar",):
        items = _expand([name(root)])
    else:  # a text file listing items
        with fs.open(root, "rt") as f:
            items = _expand([line.strip() for line in f if line.strip()])
    if not items:
        raise ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) or .tar shards in {source}")
    return items


def decode_item(item: str, target_sr: int) -> tuple[np.ndarray, float, int]:
    """Decode, downmix and resample one item exactly as ``load_audio`` does.

    Returns the (T,) float32 clip at ``target_sr``, the duration in seconds and the file's rate.
    """
    if "://" in item:
        import fsspec

        with fsspec.open(item, "rb") as f:
            x, sr = read_audio(io.BytesIO(f.read()), name=item)
    else:
        x, sr = read_audio(item)
    return resample(x, sr, target_sr).numpy(), x.shape[0] / sr, sr


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names and bytes): which weights made a library."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LibraryStore:
    """The output directory of ``embed_library`` (a local path or an fsspec URL)."""

    def __init__(self, out: str | os.PathLike) -> None:
        import fsspec

        self.url = os.fspath(out)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ------------------------------------------------------------------ run record
    def check_run(self, record: dict) -> None:
        """Write ``run.json``, or refuse to mix a different model / preprocessing into it."""
        path = self._path("run.json")
        if self.fs.exists(path):
            with self.fs.open(path, "rt") as f:
                old = json.load(f)
            diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
            if diff:
                raise ValueError(
                    f"{self.url} holds embeddings of another run (differs in {diff}); "
                    "use a new --out or the same model and settings"
                )
            return
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(path, "wt") as f:
            json.dump(record, f, indent=2)

    def run_record(self) -> dict:
        path = self._path("run.json")
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "rt") as f:
            return json.load(f)

    # ---------------------------------------------------------------------- shards
    def _shards(self, kind: str) -> list[str]:
        d = self._path(kind)
        if not self.fs.isdir(d):
            return []
        return sorted(
            p for p in self.fs.ls(d, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")
        )

    def _write(self, kind: str, key: str, table) -> None:
        import pyarrow.parquet as pq

        self.fs.makedirs(self._path(kind), exist_ok=True)
        final = self._path(kind, f"part-{key}.parquet")
        tmp = self._path(kind, f".tmp-{key}-{os.getpid()}.parquet")
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, final)  # a rename on local disks; object stores put whole objects anyway

    def write_batch(
        self,
        paths: Sequence[str],
        embeddings: np.ndarray,
        durations: np.ndarray,
        sample_rates: np.ndarray,
        failures: dict[str, str],
    ) -> None:
        """Write one batch: ``embeddings`` (N, D) float32 for ``paths``; ``failures`` {path: why}."""
        import pyarrow as pa

        key = hashlib.sha1("\n".join(list(paths) + sorted(failures)).encode()).hexdigest()[:20]
        if len(paths):
            emb = np.ascontiguousarray(embeddings, dtype=np.float32)
            table = pa.table(
                {
                    "path": pa.array(list(paths), pa.string()),
                    "duration": pa.array(np.asarray(durations, np.float64)),
                    "sample_rate": pa.array(np.asarray(sample_rates, np.int32)),
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(emb.reshape(-1)), emb.shape[1]
                    ),
                }
            )
            self._write("embeddings", key, table)
        if failures:
            table = pa.table({"path": list(failures), "error": list(failures.values())})
            self._write("failures", key, table)

    def _paths(self, kind: str) -> set[str]:
        import pyarrow.parquet as pq

        out: set[str] = set()
        for shard in self._shards(kind):
            with self.fs.open(shard, "rb") as f:
                out.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        return out

    def done(self) -> set[str]:
        """Items already embedded or failed (what a rerun skips)."""
        return self._paths("embeddings") | self._paths("failures")

    def failures(self) -> dict[str, str]:
        """{path: error} of every failed item, minus those a later run embedded."""
        import pyarrow.parquet as pq

        out: dict[str, str] = {}
        for shard in self._shards("failures"):
            with self.fs.open(shard, "rb") as f:
                t = pq.read_table(f).to_pydict()
            out.update(zip(t["path"], t["error"]))
        embedded = self._paths("embeddings") if out else set()
        return {k: v for k, v in out.items() if k not in embedded}

    def write_failures_file(self) -> dict[str, str]:
        failed = self.failures()
        with self.fs.open(self._path("failures.json"), "wt") as f:
            json.dump(failed, f, indent=2)
        return failed

    def read(self) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
        """All embedded rows: paths, embeddings (N, D) float32, {"duration", "sample_rate"}.

        Rows are in shard order; an item present in two shards (an interrupted rewrite) counts once.
        """
        import pyarrow.parquet as pq

        paths: list[str] = []
        embs, durs, rates = [], [], []
        seen: set[str] = set()
        for shard in self._shards("embeddings"):
            with self.fs.open(shard, "rb") as f:
                t = pq.read_table(f)
            p = t.column("path").to_pylist()
            keep = np.array([q not in seen for q in p], dtype=bool)
            seen.update(p)
            col = t.column("embedding").combine_chunks()
            e = col.values.to_numpy().reshape(len(p), col.type.list_size)
            paths += [q for q, k in zip(p, keep) if k]
            embs.append(e[keep])
            durs.append(t.column("duration").to_numpy()[keep])
            rates.append(t.column("sample_rate").to_numpy()[keep])
        if not paths:
            raise ValueError(f"no embeddings under {self.url}")
        meta = {"duration": np.concatenate(durs), "sample_rate": np.concatenate(rates)}
        return paths, np.concatenate(embs).astype(np.float32), meta
