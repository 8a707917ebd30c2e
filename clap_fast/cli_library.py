"""``clap-fast embed SRC --out DIR [--ray [ADDRESS]]``, ``clap-fast index build``, ``clap-fast search INDEX``.

clap-fast embed /data/audio --out lib/ --checkpoint ckpt.pt                 # one process
clap-fast embed s3://bucket/tars --out s3://bucket/lib --ray auto ...       # a Ray cluster
clap-fast index build lib/ --out lib.index [--kind flat|hnsw|ivf-pq]
clap-fast search lib.index --query "a dog barks" --checkpoint ckpt.pt --top 10
clap-fast search lib.index --audio bark.wav --checkpoint ckpt.pt

``embed`` with an ``--out`` ending in .npy / .parquet (and no ``--ray``), and ``search`` over
such a file, are the single-file commands of ``clap_fast.cli_infer``; they are routed there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from clap_fast.cli_infer import _load_model, _model_args

__all__ = ["embed_main", "index_main", "search_main"]

log = logging.getLogger(__name__)
SINGLE_FILE_SUFFIXES = (".npy", ".parquet")


def embed_main(argv: list[str]) -> int:
    """Embed a library into a directory of Parquet shards (resumable); see ``clap_fast.library``."""
    parser = argparse.ArgumentParser(
        prog="clap-fast embed", description="embed an audio library into Parquet shards"
    )
    parser.add_argument("source", help="folder, .tar, audio file or list file (path or fsspec URL)")
    parser.add_argument("--out", required=True, help="output directory (path or fsspec URL)")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data; no ADDRESS = $RAY_ADDRESS, a running local cluster or a new one",
    )
    parser.add_argument("--num-cpu-actors", type=int, default=2, help="embed actors without GPUs")
    parser.add_argument("--retry-failed", action="store_true", help="retry earlier failures")
    _model_args(parser)
    args, unknown = parser.parse_known_args(argv)
    if args.ray is None and Path(args.out).suffix in SINGLE_FILE_SUFFIXES:
        from clap_fast.cli_infer import embed_main as single_file_embed

        return single_file_embed(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    out = Path(args.out)
    if "://" not in args.out and out.suffix and not out.is_dir():
        parser.error(
            f"--out {args.out}: a single output file must be .npy or .parquet; "
            "a library output is a folder"
        )
    from clap_fast.library import embed_library

    try:
        run = embed_library(
            args.source,
            args.out,
            _load_model(args),
            ray_address=args.ray,
            num_cpu_actors=args.num_cpu_actors,
            num_workers=args.workers,
            batch_size=args.batch_size,
            long_audio=args.long_audio,
            retry_failed=args.retry_failed,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    log.info(
        "%s: %d embedded, %d failed (listed in failures.json), %d already done",
        run.out, run.embedded, len(run.failed), run.skipped,
    )  # fmt: skip
    return 1 if run.failed and not args.allow_failures else 0


def _read_embeddings(source: Path) -> tuple[list[str], np.ndarray, dict, dict]:
    """paths, embeddings (N, D) float32, extra columns, run record of any embed output."""
    if source.suffix == ".npy":
        names = source.with_suffix(".paths.txt").read_text().splitlines()
        return names, np.load(source), {}, {}
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source).to_pydict()
        return table["path"], np.asarray(table["embedding"], np.float32), {}, {}
    from clap_fast.library_io import LibraryStore

    store = LibraryStore(source)
    paths, emb, extra = store.read()
    return paths, emb, extra, store.run_record()


def index_main(argv: list[str]) -> int:
    """``clap-fast index build EMB --out INDEX [--kind auto|flat|hnsw|ivf-pq]``."""
    from clap_fast.index import KINDS, IndexSettings, LibraryIndex

    parser = argparse.ArgumentParser(
        prog="clap-fast index", description="FAISS index of embeddings"
    )
    parser.add_argument("action", choices=["build"])
    parser.add_argument(
        "embeddings", type=Path, help="output of `clap-fast embed` (dir, .npy, .parquet)"
    )
    parser.add_argument("--out", required=True, type=Path, help="index directory")
    parser.add_argument("--kind", default="auto", choices=("auto", *KINDS))
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=0, help="IVF lists searched (0: derived)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        paths, emb, extra, run = _read_embeddings(args.embeddings)
        settings = IndexSettings(
            nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search
        )
        index = LibraryIndex.build(emb, paths, args.kind, settings, meta={"run": run})
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    index.save(args.out, extra)
    log.info("%s index of %d vectors written to %s", index.kind, len(paths), args.out)
    return 0


def search_main(argv: list[str]) -> int:
    """Search an index by ``--query TEXT`` or ``--audio FILE``; prints score and path per line."""
    from clap_fast.index import LibraryIndex, is_index_dir

    if argv and not argv[0].startswith("-") and not is_index_dir(argv[0]):
        from clap_fast.cli_infer import search_main as single_file_search

        return single_file_search(argv)
    parser = argparse.ArgumentParser(prog="clap-fast search", description="search a FAISS index")
    parser.add_argument("index", type=Path, help="output of `clap-fast index build`")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", help="text to search for")
    what.add_argument("--audio", help="an audio file to find similar sounds to")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _model_args(parser)
    args = parser.parse_args(argv)
    index = LibraryIndex.load(args.index)
    model = _load_model(args)
    expected = index.meta.get("run", {}).get("model")
    if expected:
        from clap_fast.library_io import model_fingerprint

        if model_fingerprint(model) != expected:
            raise SystemExit(
                "error: this model did not make the index's embeddings (weights differ); "
                "pass the --checkpoint used by `clap-fast embed`"
            )
    if args.query is not None:
        q = model.embed_text([args.query])
    else:
        q = model.embed_audio_files([args.audio], progress=False)
        if model.last_failures:
            raise SystemExit(
                f"error: cannot decode {args.audio}: {model.last_failures[args.audio]}"
            )
    hits = index.lookup(q.numpy(), args.top)[0]
    if args.json:
        sys.stdout.write(json.dumps([{"path": p, "score": s} for p, s in hits]) + "\n")
    else:
        sys.stdout.write("".join(f"{s:+.4f}  {p}\n" for p, s in hits))
    return 0
