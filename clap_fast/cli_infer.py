"""``clap-fast embed | zero-shot | search``: inference from the command line.

clap-fast embed AUDIO_DIR_OR_LIST --checkpoint 630k-audioset-best --out emb.npy
clap-fast embed AUDIO_DIR --checkpoint ckpt.pt --frames --out frames.parquet  # per 0.3125 s
clap-fast zero-shot AUDIO_DIR --labels dog rain car --checkpoint ckpt.pt
clap-fast search emb.npy --query "a dog barks" --checkpoint ckpt.pt --top 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from clap_fast.engines import ENGINES

__all__ = [
    "embed_main",
    "zero_shot_main",
    "search_main",
    "find_audio_files",
    "scan_audio_files",
    "AUDIO_SUFFIXES",
]

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def find_audio_files(source: str) -> list[Path]:
    """A folder (recursively, sorted), a text file with one path per line, or one audio file."""
    return scan_audio_files(source)[0]


def _walk(root: Path, skipped: dict[str, str]) -> list[Path]:
    """Audio files under ``root``; folders that cannot be listed go to ``skipped`` by name."""

    def onerror(exc: OSError) -> None:
        skipped[str(exc.filename)] = f"unreadable folder ({type(exc).__name__}: {exc.strerror})"

    found = []
    for d, _, names in os.walk(root, onerror=onerror):
        found += [Path(d) / n for n in names if Path(n).suffix.lower() in AUDIO_SUFFIXES]
    return sorted(found)


def scan_audio_files(source: str) -> tuple[list[Path], dict[str, str]]:
    """``find_audio_files`` -> (files, {skipped folder: reason}): nothing is skipped unnamed."""
    p = Path(source)
    skipped: dict[str, str] = {}
    if p.is_dir():
        files = _walk(p, skipped)
    elif p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES:
        files = [p]
    elif p.is_file():
        files = [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
    else:
        raise SystemExit(f"error: {source} is neither a folder, an audio file nor a file list")
    for folder, why in skipped.items():
        log.warning("skipped %s: %s", folder, why)
    if not files:
        raise SystemExit(f"error: no audio files ({', '.join(AUDIO_SUFFIXES)}) under {source}")
    return files, skipped


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
        "--long-audio",
        choices=("sliding", "first", "rand_trunc"),
        help="clips over 10 s: sliding windows (default), the first 10 s, or LAION's random crop; "
        "fusion checkpoints always use fusion",
    )
    g.add_argument(
        "--precision",
        choices=tuple(_PRECISIONS),
        default="fp32",
        help="fp32 (default, LAION's numbers) or bf16 / fp16 autocast for the towers",
    )
    g.add_argument(
        "--engine",
        default=None,
        choices=ENGINES,
        help="inference engine (clap_fast.engines); default fp32 eager (LAION's numbers); "
        "auto picks for this CPU and job, and logs why: int8_compile for 1,000+ files (3,000+ "
        "with bf16 units; x86, needs torchao), else bf16 where the CPU has bf16 units, else fp32",
    )
    g.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    g.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when files or rows were dropped (they are still listed)",
    )


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _audio_kwargs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """embed_audio_files keyword arguments from --workers / --long-audio / --precision."""
    from clap_fast import validate

    return {
        "num_workers": _check(parser, validate.check_positive_int, args.workers, "--workers"),
        "long_audio": args.long_audio,
        "autocast": _PRECISIONS[args.precision],
        "engine": args.engine,
    }


def _check_long_audio(parser: argparse.ArgumentParser, model, args: argparse.Namespace) -> None:
    if args.long_audio and model.cfg.enable_fusion:
        parser.error(f"--long-audio {args.long_audio}: this is a fusion checkpoint (fusion only)")


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """--device names a device that exists here (one line, before any file is read)."""
    from clap_fast import ops

    try:
        ops.resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--device: {exc}")


def _check(parser: argparse.ArgumentParser, fn, *args):
    """Run a validate.* check; a bad value ends the command with its message (exit 2)."""
    try:
        return fn(*args)
    except ValueError as exc:
        parser.error(str(exc))


def _load_model(args: argparse.Namespace):
    import clap_fast

    if args.checkpoint:
        from clap_fast.checkpoint import CheckpointError

        try:
            return clap_fast.CLAP.from_pretrained(args.checkpoint, device=args.device)
        except CheckpointError as exc:  # one line (e.g. offline: the file to fetch), no traceback
            raise SystemExit(f"error: {exc}") from None
    log.warning(
        "no --checkpoint: using %s with RANDOM weights (for testing the pipeline only)", args.model
    )
    return clap_fast.create_model(args.model, text=args.text, device=args.device)


def embed_main(argv: list[str]) -> int:
    """Embed audio files; rows of failed files are dropped from the output and listed."""
    parser = argparse.ArgumentParser(prog="clap-fast embed", description="embed audio files")
    parser.add_argument("source", help="a folder, an audio file, or a text file listing paths")
    parser.add_argument(
        "--out", required=True, type=Path, help="output .npy (+ .paths.txt) or .parquet"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first undecodable file")
    parser.add_argument(
        "--frames",
        action="store_true",
        help="frame embeddings (0.3125 s steps, HTS-AT, fp32 eager) instead of one per file: one "
        "row per frame with its start time; needs --out .parquet",
    )
    _model_args(parser)
    args = parser.parse_args(argv)
    from clap_fast import validate

    _check(parser, validate.check_output_file, args.out, (".npy", ".parquet"))
    if args.frames and args.out.suffix != ".parquet":
        parser.error(
            "--frames writes one row per frame (path, time, embedding): use --out .parquet"
        )
    if args.frames and (args.engine not in (None, "eager") or args.precision != "fp32"):
        parser.error("--frames runs the fp32 eager model: leave --engine and --precision unset")
    if args.frames and args.long_audio:
        parser.error("--frames covers long clips with 10 s windows every 10 s: drop --long-audio")
    _check_device(parser, args.device)
    _check(parser, validate.check_positive_int, args.batch_size, "--batch-size")
    if args.out.suffix == ".parquet":
        _check(parser, _need_pyarrow)
    kwargs = _audio_kwargs(parser, args)
    files, skipped = scan_audio_files(args.source)
    model = _load_model(args)
    _check_long_audio(parser, model, args)
    if args.frames and (model.cfg.audio.model_type != "HTSAT" or model.cfg.enable_fusion):
        parser.error("--frames needs a non-fusion HTS-AT model")
    if args.frames:
        kwargs = {"num_workers": kwargs["num_workers"], "frames": True}
    try:
        emb = model.embed_audio_files(
            files, batch_size=args.batch_size, strict=args.strict, **kwargs
        )
    except ValueError as exc:  # --strict: the first undecodable file stops the run, by name
        sys.stderr.write(f"clap-fast embed: error: {exc}\n")
        return 1
    if args.frames:
        return _write_frames(args, model, files, emb, skipped)
    ok = torch.isfinite(emb).all(dim=1)
    names = [str(f) for f, good in zip(files, ok.tolist()) if good]
    from clap_fast.embed_files import model_identity, write_embeddings

    write_embeddings(args.out, names, emb[ok].numpy(), model_identity(model, args.checkpoint))
    dropped = {**skipped, **model.last_failures}
    for f, good in zip(files, ok.tolist()):
        if not good and str(f) not in dropped:  # decoded, but the model gave NaN / inf
            dropped[str(f)] = "non-finite embedding (NaN or inf from the model)"
    log.info("embedded %d of %d files into %s", len(names), len(files), args.out)
    return _report_dropped(args, dropped, len(files) + len(skipped))


def _write_frames(args, model, files: list[Path], frames: list, skipped: dict[str, str]) -> int:
    """--frames: one parquet row per frame (path, time, embedding) and the model identity."""
    from clap_fast.embed_files import model_identity, write_embeddings

    dropped = {**skipped, **model.last_failures}
    names, times, rows = [], [], []
    for f, fr in zip(files, frames):
        if fr is None:
            continue
        good = torch.isfinite(fr.embeddings).all(dim=1)
        if not bool(good.all()):
            dropped[str(f)] = "non-finite frame embedding (NaN or inf from the model)"
            continue
        names += [str(f)] * len(fr.times)
        times.append(fr.times)
        rows.append(fr.embeddings)
    if rows:
        emb, t = torch.cat(rows).numpy(), torch.cat(times).numpy()
    else:
        emb, t = np.zeros((0, model.cfg.joint_embed_shape), np.float32), np.zeros(0, np.float32)
    identity = {**model_identity(model, args.checkpoint), "frames": True}
    write_embeddings(args.out, names, emb, identity, times=t)
    log.info("embedded %d frames of %d files into %s", len(names), len(rows), args.out)
    return _report_dropped(args, dropped, len(files) + len(skipped))


def _need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("--out .parquet needs pyarrow (pip install pyarrow)") from None


def _report_dropped(args: argparse.Namespace, dropped: dict[str, str], total: int) -> int:
    """Name every dropped file / row in ``<out>.failed.json`` (if --out), the log and stderr;
    exit status 1 if any unless --allow-failures."""
    if not dropped:
        return 0
    report = args.out.with_suffix(".failed.json") if getattr(args, "out", None) else None
    if report is not None:
        report.write_text(json.dumps(dropped, indent=2))
    for name, why in dropped.items():
        log.warning("dropped %s: %s", name, why)
    where = f"; listed in {report}" if report else ""
    sys.stderr.write(f"{len(dropped)} of {total} inputs dropped{where}\n")
    return 0 if args.allow_failures else 1


def zero_shot_main(argv: list[str]) -> int:
    """Classify audio files among --labels; prints a table (file, top label, probability)."""
    parser = argparse.ArgumentParser(
        prog="clap-fast zero-shot", description="zero-shot audio classification"
    )
    parser.add_argument("source", help="a folder, an audio file, or a text file listing paths")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels", nargs="+", help="class names")
    which.add_argument(
        "--labels-file",
        help="JSON list, AudioSet class_labels_indices .csv / .json, or one label per line",
    )
    parser.add_argument("--template", default="This is a sound of {}.")
    parser.add_argument("--out", type=Path, help="optional .json with every file's probabilities")
    _model_args(parser)
    args = parser.parse_args(argv)
    from clap_fast import validate

    if args.labels_file is not None:
        from clap_fast.embed_files import read_labels_file

        args.labels = _check(parser, read_labels_file, args.labels_file)
    _check(parser, validate.check_labels, args.labels)
    _check_device(parser, args.device)
    _check(parser, validate.check_template, args.template)
    _check(parser, validate.check_positive_int, args.batch_size, "--batch-size")
    if args.out is not None:
        _check(parser, validate.check_output_file, args.out, (".json",))
    kwargs = _audio_kwargs(parser, args)
    files, skipped = scan_audio_files(args.source)
    model = _load_model(args)
    _check_long_audio(parser, model, args)
    emb = model.embed_audio_files(files, batch_size=args.batch_size, **kwargs)
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
    dropped = {**skipped, **model.last_failures}
    for f, good in zip(files, ok.tolist()):
        if not good and str(f) not in dropped:
            dropped[str(f)] = "non-finite embedding (NaN or inf from the model)"
    return _report_dropped(args, dropped, len(files) + len(skipped))


def search_main(argv: list[str]) -> int:
    """Rank stored audio embeddings (.npy + .paths.txt, or .parquet) against a text query."""
    parser = argparse.ArgumentParser(prog="clap-fast search", description="text-to-audio search")
    parser.add_argument("embeddings", type=Path, help="output of `clap-fast embed`")
    parser.add_argument("--query", required=True, nargs="+", help="one or more text queries")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="rank even when the file records another model than --checkpoint",
    )
    _model_args(parser)
    args = parser.parse_args(argv)
    from clap_fast import validate

    _check(parser, validate.check_positive_int, args.top, "--top")
    _check(parser, validate.check_positive_int, args.batch_size, "--batch-size")
    if not all(q.strip() for q in args.query):
        parser.error("--query is empty")
    if not args.checkpoint:
        parser.error("search needs --checkpoint: the model that made the embeddings")
    _check_device(parser, args.device)
    from clap_fast.embed_files import identity_mismatch, model_identity, read_embeddings

    names, emb, stored = _check(parser, read_embeddings, args.embeddings)
    model = _load_model(args)
    if emb.shape[1] != model.cfg.joint_embed_shape:
        parser.error(
            f"{args.embeddings}: embeddings are {emb.shape[1]} wide, the model's are "
            f"{model.cfg.joint_embed_shape} (made by another model?)"
        )
    if stored is None:
        log.warning("%s records no model identity; cannot check it was made by this model",
                    args.embeddings)  # fmt: skip
    else:
        why = identity_mismatch(stored, model_identity(model, args.checkpoint))
        if why and not args.allow_model_mismatch:
            parser.error(f"{args.embeddings}: {why}; pass --allow-model-mismatch to rank anyway")
        if why:
            log.warning("%s: %s", args.embeddings, why)
    q = model.embed_text(
        args.query, engine=args.engine
    )  # every query in one pass of one model load
    scores = torch.from_numpy(emb) @ q.T
    lines = []
    for j, query in enumerate(args.query):
        top = torch.topk(scores[:, j], min(args.top, len(names)))
        if len(args.query) > 1:
            lines.append(f"# {query}")
        lines += [f"{float(s):+.4f}  {names[i]}" for s, i in zip(top.values, top.indices.tolist())]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
