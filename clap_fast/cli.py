"""``clap-fast`` command line: embed, zero-shot, search, index, test-tars, prepare-pcm,
check-ckpt, serve.

Each subcommand lives in the module that owns its logic; this file only routes to them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main"]

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
SUBCOMMANDS = {
    "embed": (
        "clap_fast.cli_library",
        "embed_main",
        "embed audio files into .npy / .parquet, or a library into Parquet shards (--ray)",
    ),
    "zero-shot": (
        "clap_fast.cli_infer",
        "zero_shot_main",
        "zero-shot classify audio files against labels",
    ),
    "search": (
        "clap_fast.cli_library",
        "search_main",
        "rank audio embeddings or a FAISS index against a text or audio query",
    ),
    "index": ("clap_fast.cli_library", "index_main", "build a FAISS index of embeddings"),
    "test-tars": ("clap_fast.tools", "test_tars_main", "check webdataset tars for broken members"),
    "prepare-pcm": (
        "clap_fast.pcm",
        "prepare_pcm_main",
        "convert LAION FLAC tars into int16 PCM tars for training",
    ),
    "check-ckpt": (
        "clap_fast.tools",
        "check_ckpt_main",
        "list checkpoint keys or diff two checkpoints",
    ),
    "serve": ("clap_fast.serve", "serve_main", "serve the model on Triton Inference Server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="clap-fast", description="clap_fast command line")
    parser.add_argument(
        "command",
        choices=sorted(SUBCOMMANDS),
        help="; ".join(f"{k}: {v[2]}" for k, v in SUBCOMMANDS.items()),
    )
    if not argv:
        parser.print_usage(sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # prints help (exit 0) or the invalid choice (exit 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module, func, _ = SUBCOMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
