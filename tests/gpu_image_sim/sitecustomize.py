"""Make this Python look like the GPU machine's image, as far as imports go.

Put this folder first on ``PYTHONPATH`` and every Python started with it (subprocesses too)
behaves as on the lent GPU machine for the modules that image lacks (``gpu_image.json`` next to
this file, key ``"missing"``: module name -> distribution name):

* ``import <module>`` raises ``ModuleNotFoundError`` (so ``pytest.importorskip`` skips);
* ``importlib.util.find_spec("<module>")`` returns ``None``;
* ``importlib.metadata.version / distribution("<distribution>")`` raise ``PackageNotFoundError``

(the last two are how transformers and others probe for optional packages; a finder that only
raised would break their probes, which never raise on the real image). Add modules with
``GPU_IMAGE_MISSING="pkg1,pkg2"`` in the environment. Versions are not simulated: run under a
transformers 5.x put first on PYTHONPATH for that (see scripts/test.sh).

    PYTHONPATH=tests/gpu_image_sim:. python -m pytest -m gpu tests --collect-only -q

The project's copy of ../shared/gpu-image-sim/sitecustomize.py (tests/test_gpu_image.py uses it).
"""

import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

_DATA = json.loads((Path(__file__).resolve().parent / "gpu_image.json").read_text())
MISSING_MODULES = set(_DATA["missing"])
MISSING_MODULES |= {m for m in os.environ.get("GPU_IMAGE_MISSING", "").split(",") if m}
MISSING_DISTS = {d.lower().replace("_", "-") for d in _DATA["missing"].values()}
MISSING_DISTS |= {m.lower().replace("_", "-") for m in MISSING_MODULES}


def _missing(name: str) -> bool:
    return name.split(".")[0] in MISSING_MODULES


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _missing(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)
        return None


_find_spec = importlib.util.find_spec
_distribution = importlib.metadata.distribution


def _sim_find_spec(name, package=None):
    if _missing(importlib.util.resolve_name(name, package) if name.startswith(".") else name):
        return None
    return _find_spec(name, package)


def _sim_distribution(distribution_name):
    if distribution_name.lower().replace("_", "-") in MISSING_DISTS:
        raise importlib.metadata.PackageNotFoundError(distribution_name)
    return _distribution(distribution_name)


sys.meta_path.insert(0, _Blocker())
importlib.util.find_spec = _sim_find_spec
importlib.metadata.distribution = _sim_distribution
