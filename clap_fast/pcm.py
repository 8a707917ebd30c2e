"""Pre-decoded PCM shards, so that training is never decode-bound.

Layout: LAION's (``<dir>/N.tar`` next to ``sizes.json``), the same keys and the same ``json``
(and any other) members, except that each sample's audio member (flac / wav / mp3 / ogg) is
replaced by ``<key>.npy``: a 1-D little-endian int16 NumPy array (no pickle) holding channel 0 at
48 kHz after LAION's quantisation, ``q = trunc(clamp(x, -1, 1) * 32767)``. ``q / 32767`` is then
bit for bit LAION's int16 round trip of the source clip, so the loader can keep ``q`` as int16
(half the bytes of float32) until it is on the device, where :func:`to_float` finishes the round
trip for free. Reading a sample is a memcpy: no decoder, no resampler.

``clap-fast prepare-pcm SRC DST`` (:func:`prepare_pcm`) converts every ``*.tar`` under ``SRC``
into the same relative path under ``DST``, one shard per task over ``--workers`` processes,
streaming (one sample in memory per worker). It is resumable: a shard counts as done when its
tar and its report ``N.tar.report.json`` both exist and agree; it is written as ``.part`` files
and renamed, so a killed run never leaves a half shard that looks complete. Counts are checked
(samples read = converted + failed, the written tar re-read, and the source ``sizes.json`` when
there is one: ``count_mismatch``, ``missing_shard``), and every sample that could not be converted
is named by reason, shard and member (the loader's ``SKIP_REASONS``) in
``DST/prepare_pcm_report.json`` and on stdout. SRC is a local directory (no ``pipe:`` URLs).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clap_fast.data import AUDIO_EXTS, SkipStats, _captions, probe_sample, read_tar_samples
from clap_fast.pcm_format import (
    PCM_EXT,
    PCM_RATE,
    decode_pcm,
    encode_pcm,
    pcm_length,
    quantize,
    stack_waveforms,
    to_float,
)

__all__ = [
    "PCM_EXT",
    "PCM_RATE",
    "quantize",
    "to_float",
    "encode_pcm",
    "decode_pcm",
    "pcm_length",
    "stack_waveforms",
    "probe_sample",
    "convert_sample",
    "convert_shard",
    "prepare_pcm",
    "prepare_pcm_main",
]

log = logging.getLogger(__name__)

_MTIME = 946684800  # fixed member times: the same source gives byte-identical PCM tars
REPORT = "prepare_pcm_report.json"


def _source_audio(group: dict[str, bytes]) -> str | None:
    return next((e for e in AUDIO_EXTS if e in group and e != PCM_EXT), None)


def convert_sample(
    key: str, group: dict[str, bytes], url: str, stats: Any, sample_rate: int = PCM_RATE
) -> dict[str, bytes] | None:
    """One LAION sample → its PCM members (audio replaced by ``npy``), or None (counted).

    Checks what the loader would: a json with ``text``, decodable finite audio; the same
    decode (soundfile, channel 0, resample to ``sample_rate``) then :func:`quantize`.
    """
    import soundfile as sf

    from clap_fast.audio import resample

    if "json" not in group:
        stats.add("missing_text", url, key)
        return None
    try:
        meta = json.loads(group["json"])
    except (ValueError, UnicodeDecodeError):
        stats.add("bad_json", url, f"{key}.json")
        return None
    if _captions(meta) is None:
        stats.add("missing_text", url, f"{key}.json")
        return None
    if PCM_EXT in group:  # already PCM: check it and pass it through
        try:
            decode_pcm(group[PCM_EXT])
        except ValueError as exc:
            stats.add("undecodable_audio", url, f"{key}.{PCM_EXT} ({exc})")
            return None
        return dict(group)
    ext = _source_audio(group)
    if ext is None:
        stats.add("missing_audio", url, key)
        return None
    try:
        data, sr = sf.read(io.BytesIO(group[ext]), dtype="float32", always_2d=True)
        if data.shape[0] == 0 or not np.isfinite(data).all():
            raise ValueError("empty or non-finite audio")
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        stats.add("undecodable_audio", url, f"{key}.{ext} ({type(exc).__name__})")
        return None
    x = resample(torch.from_numpy(np.ascontiguousarray(data[:, 0])), int(sr), sample_rate)
    out = {e: b for e, b in group.items() if e != ext}
    out[PCM_EXT] = encode_pcm(quantize(x).numpy())
    return out


# -------------------------------------------------------------------------- shards
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _report_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".report.json")


def _done(dst: Path) -> dict[str, Any] | None:
    """The report of a finished shard, or None when it must be (re)converted."""
    rp = _report_path(dst)
    try:
        rep = json.loads(rp.read_text())
        return rep if dst.stat().st_size == rep["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def convert_shard(
    src: str, dst: str, expected: int | None = None, sample_rate: int = PCM_RATE
) -> dict[str, Any]:
    """Convert one tar (streaming) → its report.

    Report: ``{"src", "dst", "read": samples seen, "written", "failed": [[reason, shard,
    member], ...], "expected": source sizes.json count or None, "bytes": size of dst,
    "audio_bytes": bytes of PCM members, "resumed": bool}``. Raises RuntimeError if the counts
    disagree (a bug, never bad data).
    """

    out = Path(dst)
    rep = _done(out)
    if rep is not None:
        return {**rep, "resumed": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    stats, read, written, audio_bytes = SkipStats(), 0, 0, 0
    with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, group in read_tar_samples(src, stats):
            read += 1
            members = convert_sample(key, group, src, stats, sample_rate)
            if members is None:
                continue
            for ext in sorted(members, key=lambda e: (e != "json", e)):
                _add(tar, f"{key}.{ext}", members[ext])
            written += 1
            audio_bytes += len(members[PCM_EXT])
    check = SkipStats()
    reread = sum(1 for _ in read_tar_samples(str(part), check))
    failed = [list(x) for x in stats.details]
    sample_failures = sum(1 for r, _, _ in stats.details if r not in ("truncated_tar",))
    if reread != written or check.details or read != written + sample_failures:
        raise RuntimeError(
            f"{src}: counts disagree (read {read}, written {written}, re-read {reread}, "
            f"failed {sample_failures}, output problems {check.details})"
        )
    if expected is not None and expected != read:
        failed.append(["count_mismatch", src, f"sizes.json says {expected}, the tar held {read}"])
    os.replace(part, out)
    rep = {
        "src": src, "dst": str(out), "read": read, "written": written, "failed": failed,
        "expected": expected, "bytes": out.stat().st_size, "audio_bytes": audio_bytes,
    }  # fmt: skip
    tmp = _report_path(out).with_suffix(".part")
    tmp.write_text(json.dumps(rep, indent=1) + "\n")
    os.replace(tmp, _report_path(out))
    return {**rep, "resumed": False}


def _convert_task(args: tuple[str, str, int | None]) -> dict[str, Any]:
    torch.set_num_threads(1)  # one core per worker process: parallelism is across shards
    return convert_shard(*args)


def _jobs(src: Path, dst: Path) -> tuple[list[tuple[str, str, int | None]], list[list[str]]]:
    """(convert jobs, [["missing_shard", shard, note]] for shards a sizes.json lists but lacks)."""
    jobs, missing, sizes_of = [], [], {}
    out = dst.resolve()
    for tar in sorted(src.rglob("*.tar")):
        if out == tar.resolve().parent or out in tar.resolve().parents:
            continue  # DST inside SRC: never convert our own output
        if tar.parent not in sizes_of:
            try:
                sizes_of[tar.parent] = json.loads((tar.parent / "sizes.json").read_text())
            except (OSError, ValueError):
                sizes_of[tar.parent] = {}
        exp = sizes_of[tar.parent].get(tar.name)
        jobs.append((str(tar), str(dst / tar.relative_to(src)), None if exp is None else int(exp)))
    for d, sizes in sizes_of.items():
        for name in sorted(set(sizes) - {p.name for p in d.glob("*.tar")}):
            missing.append(["missing_shard", str(d / name), "listed in sizes.json, not on disk"])
    return jobs, missing


def prepare_pcm(src: str | Path, dst: str | Path, workers: int = 1) -> dict[str, Any]:
    """Convert every ``*.tar`` under ``src`` to a PCM shard under ``dst`` (see module doc).

    Writes ``sizes.json`` (samples written) next to each converted split and
    ``dst/prepare_pcm_report.json``. Returns ``{"shards", "resumed", "read", "written",
    "failed": [[reason, shard, member], ...], "src_bytes", "dst_bytes", "audio_bytes"}``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"prepare-pcm: SRC {src} is not a directory")
    if src.resolve() == dst.resolve():
        raise ValueError("prepare-pcm: DST must differ from SRC")
    jobs, missing = _jobs(src, dst)
    if not jobs:
        raise ValueError(f"prepare-pcm: no .tar files under {src}")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    reports: list[dict[str, Any]] = []
    if workers == 1:
        results = map(_convert_task, jobs)
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"))
        results = pool.map(_convert_task, jobs)
    try:
        for rep in results:
            reports.append(rep)
            log.info("%s: %d/%d samples%s", rep["dst"], rep["written"], rep["read"],
                     " (already done)" if rep["resumed"] else "")  # fmt: skip
    finally:
        if workers > 1:
            pool.shutdown()
    by_dir: dict[Path, dict[str, int]] = {}
    for rep in reports:
        p = Path(rep["dst"])
        by_dir.setdefault(p.parent, {})[p.name] = rep["written"]
    for d, sizes in by_dir.items():
        (d / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    summary = {
        "shards": len(reports),
        "resumed": sum(r["resumed"] for r in reports),
        "read": sum(r["read"] for r in reports),
        "written": sum(r["written"] for r in reports),
        "failed": missing + [f for r in reports for f in r["failed"]],
        "src_bytes": sum(Path(r["src"]).stat().st_size for r in reports),
        "dst_bytes": sum(r["bytes"] for r in reports),
        "audio_bytes": sum(r["audio_bytes"] for r in reports),
    }
    dst.mkdir(parents=True, exist_ok=True)
    (dst / REPORT).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def prepare_pcm_main(argv: list[str] | None = None) -> int:
    """``clap-fast prepare-pcm SRC DST [--workers N]``: exit 0 if every sample converted, else 1."""
    p = argparse.ArgumentParser(
        prog="clap-fast prepare-pcm",
        description="convert LAION FLAC webdataset tars into int16 PCM tars (resumable)",
    )
    p.add_argument("src", help="directory holding the source tars (searched recursively)")
    p.add_argument("dst", help="output directory (same relative layout)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = p.parse_args(argv)
    try:
        s = prepare_pcm(args.src, args.dst, args.workers)
    except ValueError as exc:
        p.error(str(exc))
    for reason, shard, member in s["failed"]:
        sys.stdout.write(f"{reason}\t{shard}\t{member}\n")
    log.info(
        "%d shards (%d already done): %d of %d samples converted, %d problems; "
        "%.1f -> %.1f MB; report in %s",
        s["shards"], s["resumed"], s["written"], s["read"], len(s["failed"]),
        s["src_bytes"] / 1e6, s["dst_bytes"] / 1e6, Path(args.dst) / REPORT,
    )  # fmt: skip
    return 1 if s["failed"] else 0
