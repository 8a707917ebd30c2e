"""Search an embedded library through a FAISS index (inner product = cosine on L2-normalised rows).

Kinds:

=========  =============================================  =====================================
kind       FAISS index                                    when (``kind="auto"``)
=========  =============================================  =====================================
flat       ``IndexFlatIP``: exact, 4·D bytes per vector    fewer than 10⁵ vectors
hnsw       ``IndexHNSWFlat`` (M=32): graph, exact vectors  10⁵ to 2·10⁶ vectors
ivf-pq     ``IVF{nlist},PQ{D/8}x8,Refine(SQ8)``: inverted  2·10⁶ vectors and more
           lists of 8-bit PQ codes, candidates re-ranked
           by 8-bit scalar-quantised vectors (D/8 + D
           bytes per vector)
=========  =============================================  =====================================

An index directory holds ``index.faiss`` (FAISS's own binary format; nothing is unpickled),
``paths.parquet`` (row i of the index is ``path[i]``, with its duration and sample rate) and
``meta.json`` (kind, count, dimension, search settings, and the embedding run's ``run.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["KINDS", "IndexSettings", "LibraryIndex", "build_index", "choose_kind", "recall_at_k"]

log = logging.getLogger(__name__)
KINDS = ("flat", "hnsw", "ivf-pq")
FLAT_BELOW, HNSW_BELOW = 100_000, 2_000_000


@dataclass
class IndexSettings:
    """Build and search settings of the approximate kinds (0 = derived from the data)."""

    nlist: int = 0
    """IVF lists; 0 = about √N (at least 16)."""
    pq_m: int = 0
    """PQ sub-quantizers (8 bits each); 0 = max(D/8, 8), rounded down to a divisor of D."""
    nprobe: int = 0
    """IVF lists visited per query; 0 = max(16, nlist/16)."""
    k_factor: int = 16
    """IVF-PQ: k·k_factor candidates are re-ranked by their SQ8 vectors."""
    hnsw_m: int = 32
    """HNSW neighbours per node."""
    ef_construction: int = 40
    """HNSW build beam."""
    ef_search: int = 64
    """HNSW search beam (raised to k when k is larger)."""
    train_size: int = 0
    """IVF-PQ training sample; 0 = min(N, max(50·nlist, 10 000))."""
    extra: dict = field(default_factory=dict)


def choose_kind(n: int) -> str:
    """flat below 10⁵ vectors, hnsw below 2·10⁶, ivf-pq above."""
    return "flat" if n < FLAT_BELOW else "hnsw" if n < HNSW_BELOW else "ivf-pq"


def _as_matrix(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a non-empty (N, D) float array, got {x.shape} {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(
    embeddings: np.ndarray,
    kind: str = "auto",
    settings: IndexSettings | None = None,
    seed: int = 0,
):
    """A FAISS inner-product index over ``embeddings`` (N, D) float32 (L2-normalised rows).

    Returns ``(index, kind, settings)`` with the derived settings filled in.
    """
    import faiss

    x = _as_matrix(embeddings)
    n, d = x.shape
    s = IndexSettings(**asdict(settings)) if settings else IndexSettings()
    kind = choose_kind(n) if kind == "auto" else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be auto or one of {KINDS}, got {kind!r}")
    t0 = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = s.ef_construction
    else:
        s.nlist = s.nlist or max(16, int(math.sqrt(n)))
        m = s.pq_m or max(d // 8, min(d, 8))  # D/8 bytes, but no fewer than 8 codes
        while d % m:
            m -= 1
        s.pq_m = m
        s.nprobe = s.nprobe or max(16, s.nlist // 16)
        s.train_size = s.train_size or min(n, max(50 * s.nlist, 10_000))
        if n < s.nlist * 39 or n < 256 * 39:
            raise ValueError(
                f"ivf-pq with {s.nlist} lists needs at least {max(s.nlist, 256) * 39} vectors to "
                f"train, got {n}; use --kind flat or hnsw"
            )
        index = faiss.index_factory(
            d, f"IVF{s.nlist},PQ{m}x8,Refine(SQ8)", faiss.METRIC_INNER_PRODUCT
        )
        sample = np.random.default_rng(seed).choice(n, s.train_size, replace=False)
        index.train(x[np.sort(sample)])
    index.add(x)
    log.info("built %s index of %d × %d in %.1f s", kind, n, d, time.perf_counter() - t0)
    return index, kind, s


def _apply_search_settings(index, kind: str, s: IndexSettings, k: int) -> None:
    import faiss

    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = max(s.ef_search, k)
    elif kind == "ivf-pq":
        top = faiss.downcast_index(index)
        top.k_factor = float(s.k_factor)
        faiss.downcast_index(top.base_index).nprobe = s.nprobe


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of ``exact`` (Q, k) ids that ``found`` (Q, k) also holds."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found[:, :k], exact)]))


class LibraryIndex:
    """A FAISS index plus the path of each row. Build with ``LibraryIndex.build``."""

    def __init__(
        self, index, kind: str, settings: IndexSettings, paths: list[str], meta: dict
    ) -> None:
        if index.ntotal != len(paths):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(paths)} paths")
        self.index, self.kind, self.settings, self.paths, self.meta = (
            index,
            kind,
            settings,
            paths,
            meta,
        )

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        paths: list[str],
        kind: str = "auto",
        settings: IndexSettings | None = None,
        meta: dict | None = None,
    ) -> LibraryIndex:
        """Index ``embeddings`` (N, D) float32, row i belonging to ``paths[i]``."""
        if len(paths) != len(embeddings):
            raise ValueError(f"{len(embeddings)} embeddings but {len(paths)} paths")
        index, kind, s = build_index(embeddings, kind, settings)
        return cls(index, kind, s, list(paths), dict(meta or {}))

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each of ``queries`` (Q, D): scores (Q, k) float32, ids (Q, k) int64.

        Ids of -1 (fewer than k results) have score -inf.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.index.d:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.index.d}")
        _apply_search_settings(self.index, self.kind, self.settings, k)
        scores, ids = self.index.search(q, min(k, self.index.ntotal))
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def lookup(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """For each query, [(path, score)] best first."""
        scores, ids = self.search(queries, k)
        return [
            [(self.paths[i], float(s)) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write ``index.faiss``, ``paths.parquet`` and ``meta.json`` into ``directory``."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / "index.faiss"))
        cols = {"path": pa.array(self.paths, pa.string())}
        cols.update({k: pa.array(v) for k, v in (extra or {}).items()})
        pq.write_table(pa.table(cols), d / "paths.parquet")
        meta = {
            "kind": self.kind,
            "count": len(self.paths),
            "dim": self.index.d,
            "settings": asdict(self.settings),
            **self.meta,
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LibraryIndex:
        import faiss
        import pyarrow.parquet as pq

        d = Path(directory)
        if not (d / "index.faiss").is_file():
            raise ValueError(f"{d} is not an index directory (no index.faiss)")
        meta = json.loads((d / "meta.json").read_text())
        paths = pq.read_table(d / "paths.parquet", columns=["path"]).column("path").to_pylist()
        settings = IndexSettings(**meta.pop("settings"))
        kind = meta.pop("kind")
        return cls(faiss.read_index(str(d / "index.faiss")), kind, settings, paths, meta)


def is_index_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "index.faiss").is_file()
