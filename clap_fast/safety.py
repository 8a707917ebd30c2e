"""Safe reading of training checkpoint folders: nothing in them can run code.

A ``torch.distributed.checkpoint`` (DCP) folder holds three kinds of pickles, and torch reads
two of them with the unrestricted ``pickle`` module:

* ``.metadata`` (``FileSystemReader.read_metadata``: ``pickle.load``). Here it goes through
  ``RestrictedUnpickler`` with an allow-list of DCP's own metadata classes, ``torch.Size``,
  dtypes, layouts and ``pathlib`` paths, and its structure is checked (shard names inside the
  folder, every shard present and long enough: a truncated ``.distcp`` is named, not a traceback).
* non-tensor values in ``.distcp`` shards (optimiser hyper-parameters; DCP's
  ``DefaultLoadPlanner.load_bytes``: ``torch.load(weights_only=False)``). Here
  ``weights_only=True``.
* tensors in ``.distcp`` shards: torch already reads them with ``weights_only=True``.

RNG state is written as safetensors (integers and bytes only, JSON metadata), never a pickle;
an older ``rng_N.pt`` is read with ``weights_only=True`` and NumPy's array globals allow-listed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import numpy as np
import torch

__all__ = [
    "UnsafeCheckpointError",
    "RestrictedUnpickler",
    "read_dcp_metadata",
    "check_dcp_folder",
    "load_dcp",
    "read_dcp_state_dict",
    "rng_state",
    "set_rng_state",
    "save_rng_state",
    "load_rng_state",
]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that is refused: it would run code, or it is truncated / malformed."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of ``allowed`` ((module, name) -> object)."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        obj = self.allowed.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"refused to unpickle {module}.{name}: not on the allow-list of checkpoint "
                "metadata classes (the file may have been crafted to run code)"
            )
        return obj


def _dcp_globals() -> dict[tuple[str, str], Any]:
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): fs._StorageInfo,
        ("pathlib", "PosixPath"): PosixPath,
        ("pathlib", "PurePosixPath"): PurePosixPath,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    ):  # fmt: skip
        if hasattr(md, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(md, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


def _check_shard_name(folder: Path, rel: Any) -> Path:
    if not isinstance(rel, str) or not rel or rel != os.path.basename(rel) or rel in (".", ".."):
        raise UnsafeCheckpointError(
            f"{folder}/.metadata: shard name {rel!r} is not a plain file name inside the folder"
        )
    return folder / rel


def read_dcp_metadata(folder: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` of ``folder``, unpickled with the allow-list and checked.

    Raises UnsafeCheckpointError naming the problem: a missing or truncated ``.metadata``, a
    global outside the allow-list, a shard name leaving the folder, a missing or truncated shard.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    folder = Path(folder)
    meta_path = folder / ".metadata"
    if not meta_path.is_file():
        raise UnsafeCheckpointError(f"{folder}: no .metadata (not a training checkpoint folder)")
    try:
        md = RestrictedUnpickler(io.BytesIO(meta_path.read_bytes()), _dcp_globals()).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{meta_path}: {exc}") from None
    except Exception as exc:  # truncated or garbage bytes: any unpickling failure
        raise UnsafeCheckpointError(
            f"{meta_path}: truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise UnsafeCheckpointError(f"{meta_path}: not DCP metadata ({type(md).__name__})")
    need: dict[Path, int] = {}
    for info in md.storage_data.values():
        shard = _check_shard_name(folder, getattr(info, "relative_path", None))
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise UnsafeCheckpointError(f"{meta_path}: bad offset/length for {shard.name}")
        need[shard] = max(need.get(shard, 0), offset + length)
    for shard, size in sorted(need.items()):
        if not shard.is_file():
            raise UnsafeCheckpointError(f"{folder}: shard {shard.name} is missing")
        have = shard.stat().st_size
        if have < size:
            raise UnsafeCheckpointError(
                f"{folder}: shard {shard.name} is truncated ({have} of {size} bytes)"
            )
    return md


def check_dcp_folder(folder: str | os.PathLike) -> None:
    """Raise UnsafeCheckpointError unless ``folder`` is a complete, safe DCP checkpoint."""
    read_dcp_metadata(folder)


def _safe_readers() -> tuple[type, type, type]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import (
        DefaultLoadPlanner,
        _EmptyStateDictLoadPlanner,
    )
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """``FileSystemReader`` whose metadata goes through the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_dcp_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    def load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = found[1] if found else "a global"
            raise UnsafeCheckpointError(
                f"refused to unpickle {read_item.dest_index.fqn}: it references {what}, outside "
                "torch's weights_only allow-list (the file may have been crafted to run code)"
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    planner = type("SafeLoadPlanner", (DefaultLoadPlanner,), {"load_bytes": load_bytes})
    empty = type("SafeEmptyLoadPlanner", (_EmptyStateDictLoadPlanner,), {"load_bytes": load_bytes})
    return SafeReader, planner, empty


def _unwrapped(fn: Any, folder: str | os.PathLike) -> None:
    """Run a DCP load; our refusal comes out as itself, not inside DCP's multi-rank wrapper."""
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(folder)  # a clear error before DCP starts
    try:
        fn()
    except CheckpointException as exc:  # a BaseException carrying each rank's (error, trace)
        for err, _ in exc.failures.values():
            if isinstance(err, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{folder}: {err}") from None
        raise


def load_dcp(state: dict[str, Any], folder: str | os.PathLike) -> None:
    """``dcp.load(state, folder)`` with every pickle restricted (see the module docstring)."""
    import torch.distributed.checkpoint as dcp

    reader, planner, _ = _safe_readers()
    _unwrapped(
        lambda: dcp.load(state, storage_reader=reader(str(folder)), planner=planner()), folder
    )


def read_dcp_state_dict(folder: str | os.PathLike) -> dict[str, Any]:
    """The whole nested state dict of a DCP folder, in memory, on one process (no cache file)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader, _, empty = _safe_readers()
    sd: dict[str, Any] = {}
    _unwrapped(
        lambda: _load_state_dict(
            sd, storage_reader=reader(str(folder)), planner=empty(), no_dist=True
        ),
        folder,
    )
    return sd


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def save_rng_state(path: str | os.PathLike, s: dict[str, Any] | None = None) -> None:
    """Write ``rng_state()`` (or ``s``) as safetensors: integer tensors + JSON metadata."""
    from safetensors.torch import save_file

    s = s or rng_state()
    version, internal, gauss = s["python"]
    kind, keys, pos, has_gauss, cached = s["numpy"]
    tensors = {
        "python": torch.tensor(internal, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "torch": s["torch"].contiguous(),
    }
    tensors.update({f"cuda_{i}": t.cpu().contiguous() for i, t in enumerate(s["cuda"])})
    meta = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind,
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
            "numpy_cached": float(cached), "cuda": len(s["cuda"])}  # fmt: skip
    save_file(tensors, str(path), metadata={"clap_fast_rng": json.dumps(meta)})


def load_rng_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``save_rng_state``'s file (or an older ``rng_N.pt``, with ``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".pt":
        core = np._core if hasattr(np, "_core") else np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
        allowed += [type(np.dtype(t)) for t in (np.uint32, np.float64, np.int64)]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            why = (
                f"it references {found[1]}, outside the allow-list"
                if found
                else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
            raise UnsafeCheckpointError(f"{path}: refused or corrupt RNG state ({why})") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["clap_fast_rng"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        return {
            "python": (meta["python_version"], tuple(int(x) for x in t["python"].tolist()),
                       meta["python_gauss"]),
            "numpy": (meta["numpy_kind"], t["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                      meta["numpy_has_gauss"], meta["numpy_cached"]),
            "torch": t["torch"],
            "cuda": [t[f"cuda_{i}"] for i in range(int(meta["cuda"]))],
        }  # fmt: skip
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise UnsafeCheckpointError(
            f"{path}: truncated or corrupt RNG state ({type(exc).__name__}: {exc})"
        ) from None
