"""FAISS indexes: exact search, files, and recall of the approximate kinds against flat."""

from __future__ import annotations

import numpy as np
import pytest

from clap_fast.index import IndexSettings, LibraryIndex, build_index, choose_kind, recall_at_k

faiss = pytest.importorskip("faiss")


def clustered(n: int, d: int, seed: int = 0, centers: int = 1000, intrinsic: int = 8) -> np.ndarray:
    """(n, d) float32 unit rows: cluster centres plus variation in a low-dimensional subspace
    per cluster (like real embeddings) and a little isotropic noise. Same ``seed``, same
    clusters; rows beyond the first n of a larger call are fresh points of them."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    basis = rng.standard_normal((centers, intrinsic, d)).astype(np.float32) / np.sqrt(intrinsic)
    label = rng.integers(0, centers, n)
    z = rng.standard_normal((n, intrinsic)).astype(np.float32)
    x = c[label] + 0.6 * np.einsum("ni,nid->nd", z, basis[label])
    x += 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_choose_kind_thresholds():
    assert [choose_kind(n) for n in (10, 99_999, 100_000, 1_999_999, 2_000_000)] == [
        "flat", "flat", "hnsw", "hnsw", "ivf-pq",
    ]  # fmt: skip


def test_flat_search_save_load_round_trip(tmp_path):
    x = clustered(3000, 16, centers=50)
    paths = [f"clip{i}.flac" for i in range(len(x))]
    index = LibraryIndex.build(x, paths)
    assert index.kind == "flat"
    scores, ids = index.search(x[:5], k=4)
    assert ids[:, 0].tolist() == list(range(5))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    exact = np.sort(x @ x[:5].T, axis=0)[::-1][:4].T
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    index.save(tmp_path / "idx", {"duration": np.arange(len(x), dtype=np.float64)})
    loaded = LibraryIndex.load(tmp_path / "idx")
    assert loaded.paths == paths and loaded.kind == "flat"
    assert loaded.lookup(x[7:8], k=2)[0][0] == ("clip7.flac", pytest.approx(1.0, abs=1e-5))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kind"):
        build_index(np.ones((4, 3), np.float32), kind="lsh")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        build_index(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="needs at least"):
        build_index(clustered(500, 8), kind="ivf-pq")
    index = LibraryIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="paths"):
        LibraryIndex.build(np.eye(3, dtype=np.float32), ["a"])


@pytest.mark.parametrize("kind", ["hnsw", pytest.param("ivf-pq", marks=pytest.mark.slow)])
def test_small_approximate_index_finds_itself(kind):
    x = clustered(12_000, 16, centers=100)
    index = LibraryIndex.build(x, [str(i) for i in range(len(x))], kind, IndexSettings(nlist=64))
    _, ids = index.search(x[:50], k=1)
    assert np.mean(ids[:, 0] == np.arange(50)) >= 0.9


@pytest.mark.slow  # building on 200k vectors: tens of seconds on 2 cores
@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_recall_at_10_against_flat_on_200k(kind):
    d, n = 32, 200_000
    data = clustered(n + 500, d)
    x, queries = data[:n], data[n:]
    flat, _, _ = build_index(x, "flat")
    _, exact = flat.search(queries, 10)
    index = LibraryIndex.build(x, [""] * n, kind)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact) >= 0.95
