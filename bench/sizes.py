"""Size switches shared by the benchmark suites (read by ``bench/gpu_run.sh``).

* ``CLAP_BENCH_TINY=1``: every suite uses tiny sizes (``gpu_run.sh --dry-run`` walks every step
  on the CPU with it; the numbers mean nothing).
* ``largest_last(values)``: parametrize values with the largest one marked ``largest``;
  ``gpu_run.sh`` runs ``-m "not largest"`` (every provider, baselines included) for every suite
  first and ``-m largest`` last with one round (``CLAP_BENCH_MAX_ROUNDS=1``, applied by
  bench/conftest.py), so the largest sizes can never eat the baselines' time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

TINY = os.environ.get("CLAP_BENCH_TINY") == "1"


def largest_last(values: Sequence, is_largest=None) -> list:
    """``values`` with the largest (the last, or those where ``is_largest(v)``) marked ``largest``."""
    values = list(values)
    if is_largest is None:
        last = values[-1]
        is_largest = last.__eq__
    return [
        pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.largest)
        if is_largest(v)
        else v
        for v in values
    ]
