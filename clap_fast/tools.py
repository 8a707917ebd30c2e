"""The seed's maintenance tools: ``clap-fast test-tars`` and ``clap-fast check-ckpt``.

``test-tars`` (the seed's ``test_tars.py``): read every member of shards ``<tar-path>/<i>.tar``
for ``i`` in ``[start, end)`` minus ``--exclude``, decoding audio and json exactly as training
does, and name every broken tar and member; exit status 1 if any. ``--tar-path`` may be a
``pipe:`` command prefix (``pipe:aws s3 cp s3://bucket/audioset/unbalanced_train``).

``check-ckpt``: ``keys_in_state_dict(path)`` lists a checkpoint's keys and shapes;
``check_ckpt_diff(a, b, key)`` lists which tensors whose name contains ``key`` differ (e.g. to
prove ``--freeze-text`` kept ``text_branch`` fixed). Both read LAION ``.pt`` files, our
safetensors, and ``clap_fast.train`` checkpoint directories (torch.distributed.checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import torch

from clap_fast.data import SkipStats, read_tar_samples

__all__ = [
    "test_tars",
    "test_tars_main",
    "keys_in_state_dict",
    "check_ckpt_diff",
    "check_ckpt_main",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- test-tars
def test_tars(urls: list[str], batch_size: int = 1) -> SkipStats:
    """Read and decode every sample of ``urls``; the returned stats name every problem.

    ``batch_size`` is accepted for the seed's CLI (decoding is per sample either way).
    """
    from clap_fast.config import AudioConfig, TextConfig
    from clap_fast.data import DecodeSpec, decode_sample

    spec = DecodeSpec(
        AudioConfig(), TextConfig(model_type="transformer"), 480000, all_captions=True
    )
    stats = SkipStats()
    rng = random.Random(0)
    for url in urls:
        n = 0
        for key, group in read_tar_samples(url, stats):
            n += decode_sample(key, group, spec, rng, url, stats) is not None
        log.info("%s: %d good samples", url, n)
        stats.clips += n
    return stats


def test_tars_main(argv: list[str] | None = None) -> int:
    """``clap-fast test-tars --tar-path P --start 0 --end 100 --exclude 11 21 [--order]``."""
    p = argparse.ArgumentParser(prog="clap-fast test-tars", description=__doc__.split("\n\n")[1])
    p.add_argument("--tar-path", required=True, help="directory or pipe: prefix holding <i>.tar")
    p.add_argument("--start", type=int, default=0, help="first shard number")
    p.add_argument(
        "--end", type=int, default=None, help="one past the last shard (default: all in sizes.json)"
    )
    p.add_argument("--exclude", type=int, nargs="*", default=[], help="shard numbers to skip")
    p.add_argument("--batch-size", type=int, default=1, help="accepted for compatibility")
    p.add_argument("--order", action="store_true", help="test in numeric order (default: random)")
    args = p.parse_args(argv)
    end = args.end
    if end is None:
        from clap_fast.data import read_sizes

        try:
            sizes = read_sizes(args.tar_path.rstrip("/") + "/sizes.json")
        except ValueError as exc:
            p.error(str(exc))
        if sizes is None:
            p.error(f"--end not given and {args.tar_path}/sizes.json is missing: pass --end")
        ids = [int(k.split(".")[0]) for k in sizes if k.split(".")[0].isdigit()]
        if not ids:
            p.error(f"{args.tar_path}/sizes.json names no <i>.tar shard: pass --end")
        end = 1 + max(ids)
    ids = [i for i in range(args.start, end) if i not in set(args.exclude)]
    if not args.order:
        random.shuffle(ids)
    urls = [f"{args.tar_path.rstrip('/')}/{i}.tar" for i in ids]
    stats = test_tars(urls, args.batch_size)
    lines = [f"{reason}\t{shard}\t{member}" for reason, shard, member in stats.details]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.write(
        f"tested {len(urls)} tars, {stats.clips} good samples, {len(lines)} problems\n"
    )
    return 1 if lines else 0


# ------------------------------------------------------------------------ check-ckpt
def _load(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a LAION .pt / safetensors / HF file, or a train checkpoint directory."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").exists():
        # In memory, through the allow-listed reader: no cache file is written or trusted.
        from clap_fast.safety import read_dcp_state_dict

        sd = read_dcp_state_dict(path).get("model", {})
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    from clap_fast.checkpoint import read_state_dict

    return read_state_dict(path)[0]


def keys_in_state_dict(path: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of a checkpoint (keys without LAION's ``module.`` prefix)."""
    return [(k, tuple(v.shape)) for k, v in _load(path).items()]


def check_ckpt_diff(a: str | Path, b: str | Path, key: str = "") -> list[str]:
    """Names of the tensors containing ``key`` that differ between checkpoints ``a`` and ``b``.

    A tensor present in only one of them, or of another shape, counts as differing.
    """
    sa, sb = _load(a), _load(b)
    names = sorted(k for k in set(sa) | set(sb) if key in k)
    differ = []
    for k in names:
        x, y = sa.get(k), sb.get(k)
        if x is None or y is None or x.shape != y.shape or not torch.equal(x, y):
            differ.append(k)
    return differ


def check_ckpt_main(argv: list[str] | None = None) -> int:
    """``clap-fast check-ckpt A`` lists keys; ``clap-fast check-ckpt A B --key text_branch``
    lists the differing tensors (exit status 1 if any differ)."""
    p = argparse.ArgumentParser(
        prog="clap-fast check-ckpt", description="list keys or diff two checkpoints"
    )
    p.add_argument("a", help="checkpoint (.pt, .safetensors, or a train checkpoint directory)")
    p.add_argument("b", nargs="?", help="second checkpoint to compare with")
    p.add_argument("--key", default="", help="only tensors whose name contains this")
    args = p.parse_args(argv)
    try:  # a refused, truncated or missing checkpoint: one line naming it, exit status 2
        if args.b is None:
            rows = [f"{k}\t{list(s)}" for k, s in keys_in_state_dict(args.a) if args.key in k]
            sys.stdout.write("".join(r + "\n" for r in rows))
            return 0
        differ = check_ckpt_diff(args.a, args.b, args.key)
        total = sum(args.key in k for k in _load(args.a))
    except ValueError as exc:
        sys.stderr.write(f"clap-fast check-ckpt: error: {exc}\n")
        return 2
    sys.stdout.write("".join(f"differs\t{k}\n" for k in differ))
    sys.stdout.write(f"{len(differ)} of {total} tensors matching {args.key!r} differ\n")
    return 1 if differ else 0
