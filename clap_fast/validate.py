"""Argument checks shared by the API and the CLIs: each raises ``ValueError`` naming the problem
and the allowed range, before any work is done (no file is read, no model is run)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SAMPLE_RATE_RANGE",
    "check_sample_rate",
    "check_positive_int",
    "check_labels",
    "check_template",
    "check_not_paths",
    "check_token_ids",
    "check_output_file",
    "check_output_dir",
]

SAMPLE_RATE_RANGE = (1_000, 768_000)
"""Accepted input sample rates in Hz (below ~1 kHz resampling to 48 kHz explodes memory)."""


def check_sample_rate(sample_rate: Any) -> int:
    """``sample_rate`` as an int within ``SAMPLE_RATE_RANGE`` (booleans are refused)."""
    lo, hi = SAMPLE_RATE_RANGE
    ok = isinstance(sample_rate, (int, np.integer)) and not isinstance(
        sample_rate, (bool, np.bool_)
    )
    if not ok or not lo <= int(sample_rate) <= hi:
        raise ValueError(
            f"sample_rate must be an integer number of Hz in [{lo}, {hi}], got {sample_rate!r}"
        )
    return int(sample_rate)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (booleans are refused)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_labels(labels: Any) -> list[str]:
    """A non-empty list of non-empty strings (one string alone is refused: it is not a list)."""
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"labels must be a list of strings, got the single string {labels!r}; "
                         f"pass [{labels!r}]")  # fmt: skip
    if not isinstance(labels, Sequence) or not labels:
        raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
    bad = [x for x in labels if not isinstance(x, str) or not x.strip()]
    if bad:
        raise ValueError(f"labels must be non-empty strings; bad entries: {bad[:5]!r}")
    return list(labels)


def check_template(template: Any) -> str:
    """A prompt template with exactly one ``{}`` for the label and no other fields."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(
            f"template must be a string with exactly one '{{}}' for the label, got {template!r}"
        )
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(
            f"template {template!r} has other format fields than one '{{}}' ({exc!r}); "
            "write a literal brace as '{{' or '}}'"
        ) from None
    return template


def check_not_paths(waveforms: Any) -> None:
    """Refuse file paths where waveforms are expected (they belong to ``embed_audio_files``)."""
    if isinstance(waveforms, (str, bytes, os.PathLike)):
        items = [waveforms]
    elif isinstance(waveforms, Sequence):
        items = list(waveforms[:1])
    else:
        return
    if items and isinstance(items[0], (str, bytes, os.PathLike)):
        raise ValueError(
            f"waveforms must be arrays or tensors of samples, got a path ({items[0]!r}); "
            "use embed_audio_files(paths) for files"
        )


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, max_length: int, exact: bool) -> None:
    """Token ids within ``[0, vocab_size)`` and rows of ``max_length`` (``exact``) or fewer."""
    n = input_ids.shape[1]
    if n == 0 or (n != max_length if exact else n > max_length):
        need = f"exactly {max_length}" if exact else f"1 to {max_length}"
        raise ValueError(f"token rows must hold {need} ids for this text tower, got {n}")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {vocab_size - 1}] (the tower's vocabulary), "
                f"got ids from {lo} to {hi}"
            )


def _writable_dir(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def check_output_file(path: str | os.PathLike, suffixes: Sequence[str]) -> Path:
    """An output file path: one of ``suffixes``, not a folder, in an existing writable folder."""
    p = Path(path)
    if p.suffix not in suffixes:
        raise ValueError(f"output {p} must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise ValueError(f"output {p} is a folder; give a file name ending in {suffixes[0]}")
    if not p.parent.exists():
        raise ValueError(f"output folder {p.parent} does not exist")
    if not _writable_dir(p.parent):
        raise ValueError(f"output folder {p.parent} is not a writable folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"output {p} exists and is not writable")
    return p


def check_output_dir(path: str | os.PathLike) -> Path:
    """An output folder: an existing writable folder, or creatable under a writable one."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"output {p} exists and is not a folder")
        if not _writable_dir(p):
            raise ValueError(f"output folder {p} is not writable")
        return p
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is None or not _writable_dir(parent):
        raise ValueError(f"output folder {p} cannot be created: {parent} is not a writable folder")
    return p
