"""Embedding files that know their model, and label files.

``clap-fast embed`` writes the model's identity next to the embeddings: in the Parquet schema
metadata (key ``clap_fast``) or in a JSON sidecar ``<name>.model.json`` next to a ``.npy``.
``clap-fast search`` compares it with the model it loads and refuses a mismatch unless told
(``--allow-model-mismatch``). The identity holds:

  model              architecture name (e.g. "HTSAT-tiny") and text tower
  config_sha256      sha256 of the architecture config (canonical JSON)
  weights_sha256     sha256 over the state dict (sorted keys, raw bytes): the same weights give
                     the same value whatever file format they came from
  checkpoint         what was passed to --checkpoint (None: random weights)
  checkpoint_sha256  sha256 of that file (or of a folder's weight files), when it is local

``clap-fast embed --frames`` writes one Parquet row per frame with a ``time`` column (start
seconds); ``read_embeddings`` names such rows ``path#t=<seconds>`` (W3C media fragments), so
``search`` ranks frames.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "model_identity",
    "identity_mismatch",
    "sidecar_path",
    "write_embeddings",
    "read_embeddings",
    "read_labels_file",
]

META_KEY = b"clap_fast"
_COMPARED = ("config_sha256", "weights_sha256")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_sha256(checkpoint: str | os.PathLike | None) -> str | None:
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    if p.is_file():
        return _file_sha256(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + bytes.fromhex(_file_sha256(f)))
        return h.hexdigest() if files else None
    return None  # a released name or hub id: weights_sha256 still identifies it


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over (key, dtype, shape, bytes) of every state-dict entry, keys sorted."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(model, checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """The identity recorded with embeddings (see module docstring)."""
    cfg = json.dumps(model.cfg.to_dict(), sort_keys=True, default=str)
    return {
        "model": model.cfg.name,
        "text": model.text_type,
        "config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
        "weights_sha256": weights_sha256(model),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": _checkpoint_sha256(checkpoint),
    }


def identity_mismatch(stored: dict | None, current: dict) -> str | None:
    """None when ``stored`` matches ``current``; else one line saying what differs."""
    if stored is None:
        return "the file records no model identity (written by an older clap-fast?)"
    diff = [k for k in _COMPARED if stored.get(k) != current.get(k)]
    if not diff:
        return None
    return (f"embeddings were made by {stored.get('model')} from {stored.get('checkpoint')!r}, "
            f"the loaded model is {current.get('model')} from {current.get('checkpoint')!r} "
            f"({', '.join(diff)} differ)")  # fmt: skip


def sidecar_path(npy: Path) -> Path:
    return npy.with_suffix(".model.json")


def write_embeddings(
    out: Path, names: list[str], emb: np.ndarray, identity: dict, times: np.ndarray | None = None
) -> None:
    """``.parquet`` (path, embedding columns; identity in the schema metadata) or ``.npy``
    (+ ``.paths.txt`` and the ``.model.json`` sidecar). ``times`` (frame start seconds, one per
    row; parquet only) adds a ``time`` column."""
    if times is not None and out.suffix != ".parquet":
        raise ValueError(f"frame embeddings (with times) are written as .parquet, got {out}")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        emb = np.ascontiguousarray(emb, dtype=np.float32)
        d = emb.shape[1] if emb.ndim == 2 else 0
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)
        cols = {"path": names, "embedding": col}
        if times is not None:
            cols = {
                "path": names,
                "time": pa.array(np.asarray(times, np.float32)),
                "embedding": col,
            }
        table = pa.table(cols)
        table = table.replace_schema_metadata({META_KEY: json.dumps(identity).encode()})
        pq.write_table(table, out)
    elif out.suffix == ".npy":
        np.save(out, emb)
        out.with_suffix(".paths.txt").write_text("\n".join(names) + "\n")
        sidecar_path(out).write_text(json.dumps(identity, indent=2) + "\n")
    else:
        raise ValueError(f"output must end in .npy or .parquet, got {out}")


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray, dict | None]:
    """(names, (N, d) float32, identity or None); ValueError naming any problem."""
    if not path.is_file():
        raise ValueError(f"{path}: no such embeddings file")
    identity = None
    if path.suffix == ".parquet":
        names, emb, identity = _read_parquet(path)
    elif path.suffix == ".npy":
        try:
            emb = np.load(path, allow_pickle=False)
        except Exception as exc:  # object arrays (pickles) are refused here too
            raise ValueError(f"{path}: unreadable .npy ({type(exc).__name__}: {exc})") from None
        if emb.dtype.kind != "f":
            raise ValueError(f"{path}: embeddings must be floating point, got {emb.dtype}")
        listing = path.with_suffix(".paths.txt")
        if not listing.is_file():
            raise ValueError(f"{path}: its file list {listing} is missing")
        names = listing.read_text().splitlines()
        side = sidecar_path(path)
        if side.is_file():
            try:
                identity = json.loads(side.read_text())
            except ValueError:
                raise ValueError(f"{side}: not valid JSON") from None
    else:
        raise ValueError(f"{path}: embeddings must be a .npy or .parquet file")
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{path}: embeddings must be a non-empty (N, d) matrix, got {emb.shape}")
    if len(names) != emb.shape[0]:
        raise ValueError(f"{path}: {emb.shape[0]} embeddings but {len(names)} names")
    bad = int((~np.isfinite(emb).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{path}: {bad} rows hold NaN or inf")
    return names, np.require(emb, np.float32, ("C", "W")), identity  # Arrow buffers are read-only


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray, dict | None]:
    """Through Arrow buffers (no Python list per row)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        has_time = "time" in pq.read_schema(path).names  # a `clap-fast embed --frames` file
        table = pq.read_table(path, columns=["path", "embedding"] + ["time"] * has_time)
    except KeyError as exc:
        raise ValueError(f"{path}: no {exc} column (not written by clap-fast embed)") from None
    except Exception as exc:
        msg = str(exc)
        if "No match for FieldRef" in msg or "not in schema" in msg:
            raise ValueError(f"{path}: needs 'path' and 'embedding' columns ({msg})") from None
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    col = table.column("embedding").combine_chunks()
    if col.null_count:
        raise ValueError(f"{path}: {col.null_count} rows have no embedding")
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        values = col.flatten()
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = np.diff(col.offsets.to_numpy())
        if n and (lengths != lengths[0]).any():
            raise ValueError(f"{path}: embedding rows have different lengths")
        d = int(lengths[0]) if n else 0
        values = col.flatten()
    else:
        raise ValueError(f"{path}: the embedding column is {col.type}, not a list of floats")
    emb = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d)
    names = [str(x) for x in table.column("path").to_pylist()]
    if has_time:  # frames: W3C media-fragment names, path#t=<start seconds>
        times = table.column("time").to_numpy()
        names = [f"{n}#t={t:.2f}" for n, t in zip(names, times)]
    meta = (table.schema.metadata or {}).get(META_KEY)
    return names, emb, json.loads(meta) if meta else None


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Class names from a JSON list, an AudioSet ``class_labels_indices`` CSV (index, mid,
    display_name) or JSON ({name: index}), or a text file with one label per line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"labels file {p} does not exist")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".json":
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"labels file {p}: invalid JSON ({exc})") from None
        if isinstance(obj, dict):  # AudioSet / LAION class_labels_indices.json: {name: index}
            if not all(isinstance(v, int) for v in obj.values()):
                raise ValueError(f"labels file {p}: a JSON object must map label -> integer index")
            if sorted(obj.values()) != list(range(len(obj))):
                raise ValueError(f"labels file {p}: indices must be 0..{len(obj) - 1}, each once")
            labels = sorted(obj, key=obj.__getitem__)
        elif isinstance(obj, list):
            labels = obj
        else:
            raise ValueError(f"labels file {p}: expected a JSON list or object")
    elif p.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "display_name" not in rows[0]:
            raise ValueError(f"labels file {p}: a CSV needs a display_name column "
                             "(AudioSet's class_labels_indices.csv: index,mid,display_name)")  # fmt: skip
        if "index" in rows[0]:
            rows.sort(key=lambda r: int(r["index"]))
        labels = [r["display_name"] for r in rows]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [x for x in labels if not isinstance(x, str) or not x.strip()]
    if not labels or bad:
        raise ValueError(f"labels file {p}: needs non-empty string labels; bad: {bad[:3]!r}")
    return labels
