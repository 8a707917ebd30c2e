"""Library embedding (one process vs Ray Data) and FAISS index build / query benchmark.

    python -m bench.bench_library --out bench/results                  # tiny CPU defaults
    python -m bench.bench_library --clips 64 --sizes 100000 1000000 --out bench/results

Part 1, clips/s: the same generated clips (``clap_fast.synth``, 10 s FLAC files) embedded by
``clap_fast.library.embed_library`` in one process (decode threads + the model, torch's own
threads) and on a local Ray cluster (``ray.init(num_cpus=CPUS)``) with ``--actors`` CPU embed
actors, into fresh output directories; the same random HTSAT weights. Ray's start-up
(``ray.init``) is timed apart; the pipeline time includes building the actors' models.

Part 2, FAISS: for each size, clustered synthetic unit vectors (D = 512 by default) indexed as
flat, hnsw and ivf-pq (``clap_fast.index`` defaults): build time, then single-query latency
(p50 / p99 over ``--queries`` queries, one at a time) and recall@10 against flat.

Writes ``library_<device>_<date>.{json,md}`` into ``--out``. ``pytest bench`` runs a tiny smoke
of both parts (``test_smoke``) without Ray.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench_library")


def _clustered(n: int, d: int, seed: int = 0, centers: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    label = rng.integers(0, centers, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # a low-rank variation per cluster, in chunks (memory)
        lab = label[s : s + 100_000]
        z = rng.standard_normal((len(lab), 8)).astype(np.float32)
        basis = np.random.default_rng([seed, 1]).standard_normal((centers, 8, d)).astype(np.float32)
        x[s : s + len(lab)] = c[lab] + 0.2 * np.einsum("ni,nid->nd", z, basis[lab])
    x += 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_embedding(clips: int, actors: int, cpus: int, model_name: str, use_ray: bool) -> dict:
    import clap_fast
    from clap_fast import synth
    from clap_fast.library import embed_library

    model = clap_fast.create_model(
        model_name, text="transformer", text_overrides={"width": 32, "layers": 1, "heads": 2}
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        synth.write_folder(src, clips, duration=10.0)
        out: dict = {"clips": clips, "model": model_name, "audio_seconds": 10.0 * clips}
        t0 = time.perf_counter()
        run = embed_library(
            src, Path(tmp) / "one", model, batch_size=8, num_workers=2, progress=False
        )
        out["single_process_s"] = time.perf_counter() - t0
        out["single_process_clips_per_s"] = run.embedded / out["single_process_s"]
        if use_ray:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            out["ray_init_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            run = embed_library(
                src, Path(tmp) / "ray", model, use_ray=True, num_cpu_actors=actors,
                batch_size=8, progress=False,
            )  # fmt: skip
            out["ray_s"] = time.perf_counter() - t0
            out["ray_clips_per_s"] = run.embedded / out["ray_s"]
            out.update(ray_actors=actors, ray_cpus=cpus, ray_version=ray.__version__)
            ray.shutdown()
    return out


def bench_index(n: int, d: int, queries: int, kinds: list[str]) -> list[dict]:
    import faiss

    from clap_fast.index import LibraryIndex, recall_at_k

    data = _clustered(n + queries, d)
    x, q = data[:n], data[n:]
    rows, exact = [], None
    for kind in kinds:
        t0 = time.perf_counter()
        index = LibraryIndex.build(x, [""] * n, kind)
        build = time.perf_counter() - t0
        lat = []
        found = np.empty((queries, 10), np.int64)
        for i in range(queries):
            t0 = time.perf_counter()
            _, ids = index.search(q[i : i + 1], 10)
            lat.append(time.perf_counter() - t0)
            found[i] = ids[0]
        if kind == "flat":
            exact = found
        lat_ms = np.array(lat) * 1e3
        rows.append(
            {
                "n": n, "d": d, "kind": kind, "build_s": build,
                "query_p50_ms": float(np.percentile(lat_ms, 50)),
                "query_p99_ms": float(np.percentile(lat_ms, 99)),
                "recall_at_10_vs_flat": recall_at_k(found, exact) if exact is not None else None,
                "bytes_per_vector": faiss.serialize_index(index.index).nbytes / n,
            }
        )  # fmt: skip
        log.info("%s", rows[-1])
    return rows


def _env() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("GIT_COMMIT", "unknown")
    import faiss

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "load_average": os.getloadavg(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _markdown(doc: dict) -> str:
    e, emb = doc["env"], doc["embedding"]
    lines = [
        f"# Benchmark `library` — cpu ({e['cores']} cores) — {e['date'][:10]}",
        "",
        f"- commit: {e['commit']}",
        f"- command: `{doc['command']}`",
        f"- torch {e['torch']}, faiss {e['faiss']}, torch threads {e['torch_threads']}",
        f"- load average during the run: {e['load_average']}",
        "",
        "## Embedding a library: clips/s",
        "",
        f"{emb['clips']} generated 10 s clips, {emb['model']} (random weights), batch 8.",
        "",
        "| path | seconds | clips/s | × one process |",
        "|---|---|---|---|",
        f"| one process | {emb['single_process_s']:.1f} | {emb['single_process_clips_per_s']:.2f} | 1 |",
    ]
    if "ray_s" in emb:
        ratio = emb["ray_clips_per_s"] / emb["single_process_clips_per_s"]
        lines += [
            f"| Ray Data, {emb['ray_actors']} CPU actors ({emb['ray_cpus']} logical CPUs) | "
            f"{emb['ray_s']:.1f} | {emb['ray_clips_per_s']:.2f} | {ratio:.2f}× |",
            "",
            f"`ray.init` took {emb['ray_init_s']:.1f} s more (not in the table).",
        ]
    lines += [
        "",
        "## FAISS: build time, single-query latency, recall@10 against flat",
        "",
        "| vectors | D | kind | build s | query p50 ms | query p99 ms | recall@10 | bytes/vector |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["index"]:
        rec = "—" if r["recall_at_10_vs_flat"] is None else f"{r['recall_at_10_vs_flat']:.3f}"
        lines.append(
            f"| {r['n']:,} | {r['d']} | {r['kind']} | {r['build_s']:.1f} | {r['query_p50_ms']:.3f} "
            f"| {r['query_p99_ms']:.3f} | {rec} | {r['bytes_per_vector']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--model", default="HTSAT-tiny")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray logical CPUs")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf-pq"])
    p.add_argument("--out", type=Path, help="write library_<device>_<date>.{json,md} here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    doc = {
        "command": "python -m bench.bench_library "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "embedding": bench_embedding(
            args.clips, args.actors, args.cpus, args.model, not args.no_ray
        ),
        "index": [
            r for n in args.sizes for r in bench_index(n, args.dim, args.queries, args.kinds)
        ],
    }
    doc["env"] = _env()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"library_cpu-{doc['env']['cores']}core_{doc['env']['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
        stem.with_suffix(".md").write_text(_markdown(doc))
        log.info("wrote %s.{json,md}", stem)
    return doc


def test_smoke(tmp_path):
    """Both parts at toy sizes, without Ray and IVF-PQ training (tests/ cover both)."""
    import pytest

    pytest.importorskip("faiss")
    doc = main(["--clips", "2", "--model", "HTSAT-mini", "--no-ray", "--sizes", "12000", "--dim",
                "16", "--queries", "20", "--kinds", "flat", "hnsw", "--out", str(tmp_path)])  # fmt: skip
    assert doc["embedding"]["single_process_clips_per_s"] > 0
    assert [r["kind"] for r in doc["index"]] == ["flat", "hnsw"]
    assert list(tmp_path.glob("library_*.md"))


if __name__ == "__main__":
    main()
