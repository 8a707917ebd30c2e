"""Error types shared across modules (a leaf module: it imports nothing of clap_fast)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (the message says why)."""
