"""``clap-fast embed | zero-shot | search``: inference from the command line.

clap-fast embed AUDIO_DIR_OR_LIST --checkpoint 630k-audioset-best --out emb.npy
clap-fast zero-shot AUDIO_DIR --labels dog rain car --checkpoint ckpt.pt
clap-fast search emb.npy --query "a dog barks" --checkpoint ckpt.pt --top 5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from clap_fast.engines import ENGINES

__all__ = ["embed_main", "zero_shot_main", "search_main", "find_audio_files", "AUDIO_SUFFIXES"]

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def find_audio_files(source: str) -> list[Path]:
    """A folder (recursively, sorted), a text file with one path per line, or one audio file."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
    elif p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES:
        files = [p]
    elif p.is_file():
        files = [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
    else:
        raise SystemExit(f"error: {source} is neither a folder, an audio file nor a file list")
    if not files:
        raise SystemExit(f"error: no audio files ({', '.join(AUDIO_SUFFIXES)}) under {source}")
    return files


def _model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        help="LAION .pt, HF dir, our dir, or a released name (e.g. 630k-audioset-best)",
    )
    g.add_argument(
        "--model",
        default="HTSAT-tiny",
        help="architecture when no checkpoint is given (random weights)",
    )
    g.add_argument("--text", default="roberta", help="text tower when no checkpoint is given")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="inference engine (clap_fast.engines); auto picks from the CPU and logs why",
    )


def _load_model(args: argparse.Namespace):
    import clap_fast

    if args.checkpoint:
        return clap_fast.CLAP.from_pretrained(args.checkpoint, device=args.device)
    log.warning(
        "no --checkpoint: using %s with RANDOM weights (for testing the pipeline only)", args.model
    )
    return clap_fast.create_model(args.model, text=args.text, device=args.device)


def _write_embeddings(out: Path, names: list[str], emb: np.ndarray) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {"path": names, "embedding": pa.array(list(emb), type=pa.list_(pa.float32()))}
        )
        pq.write_table(table, out)
    elif out.suffix == ".npy":
        np.save(out, emb)
        out.with_suffix(".paths.txt").write_text("\n".join(names) + "\n")
    else:
        raise SystemExit(f"error: --out must end in .npy or .parquet, got {out}")


def embed_main(argv: list[str]) -> int:
    """Embed audio files; rows of failed files are dropped from the output and listed."""
    parser = argparse.ArgumentParser(prog="clap-fast embed", description="embed audio files")
    parser.add_argument("source", help="a folder, an audio file, or a text file listing paths")
    parser.add_argument(
        "--out", required=True, type=Path, help="output .npy (+ .paths.txt) or .parquet"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first undecodable file")
    _model_args(parser)
    args = parser.parse_args(argv)
    files = find_audio_files(args.source)
    model = _load_model(args)
    emb = model.embed_audio_files(
        files, batch_size=args.batch_size, strict=args.strict, engine=args.engine
    )
    ok = torch.isfinite(emb).all(dim=1)
    names = [str(f) for f, good in zip(files, ok.tolist()) if good]
    _write_embeddings(args.out, names, emb[ok].numpy())
    failed = model.last_failures
    log.info("embedded %d of %d files into %s", len(names), len(files), args.out)
    if failed:
        report = args.out.with_suffix(".failed.json")
        report.write_text(json.dumps(failed, indent=2))
        log.warning("%d files could not be decoded; listed in %s", len(failed), report)
    return 1 if failed else 0


def zero_shot_main(argv: list[str]) -> int:
    """Classify audio files among --labels; prints a table (file, top label, probability)."""
    parser = argparse.ArgumentParser(
        prog="clap-fast zero-shot", description="zero-shot audio classification"
    )
    parser.add_argument("source", help="a folder, an audio file, or a text file listing paths")
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--template", default="This is a sound of {}.")
    parser.add_argument("--out", type=Path, help="optional .json with every file's probabilities")
    _model_args(parser)
    args = parser.parse_args(argv)
    files = find_audio_files(args.source)
    model = _load_model(args)
    emb = model.embed_audio_files(files, batch_size=args.batch_size, engine=args.engine)
    ok = torch.isfinite(emb).all(dim=1)
    text = model.embed_text([args.template.format(x) for x in args.labels], engine=args.engine)
    probs = model.zero_shot(emb[ok], args.labels, template=args.template, text_embeddings=text)
    kept = [str(f) for f, good in zip(files, ok.tolist()) if good]
    lines = [f"{'file':<60} {'label':<20} prob"]
    for name, p in zip(kept, probs):
        j = int(p.argmax())
        lines.append(f"{name[-60:]:<60} {args.labels[j]:<20} {float(p[j]):.3f}")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.out:
        args.out.write_text(
            json.dumps(
                {n: dict(zip(args.labels, p.tolist())) for n, p in zip(kept, probs)}, indent=2
            )
        )
    return 1 if model.last_failures else 0


def search_main(argv: list[str]) -> int:
    """Rank stored audio embeddings (.npy + .paths.txt, or .parquet) against a text query."""
    parser = argparse.ArgumentParser(prog="clap-fast search", description="text-to-audio search")
    parser.add_argument("embeddings", type=Path, help="output of `clap-fast embed`")
    parser.add_argument("--query", required=True)
    parser.add_argument("--top", type=int, default=10)
    _model_args(parser)
    args = parser.parse_args(argv)
    if args.embeddings.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(args.embeddings).to_pydict()
        names, emb = table["path"], np.asarray(table["embedding"], dtype=np.float32)
    else:
        emb = np.load(args.embeddings)
        names = args.embeddings.with_suffix(".paths.txt").read_text().splitlines()
    model = _load_model(args)
    q = model.embed_text([args.query], engine=args.engine)
    scores = torch.from_numpy(emb) @ q[0]
    top = torch.topk(scores, min(args.top, len(names)))
    lines = [f"{float(s):+.4f}  {names[i]}" for s, i in zip(top.values, top.indices.tolist())]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
