"""clap_fast: a performance edition of LAION CLAP.

import clap_fast
model = clap_fast.CLAP.from_pretrained("630k-audioset-best")
model = clap_fast.create_model("htsat-tiny", text="roberta")
"""

from __future__ import annotations

from clap_fast.config import CLAPConfig
from clap_fast.factory import (
    create_model,
    from_pretrained,
    get_config,
    list_models,
    load_checkpoint,
)
from clap_fast.model import CLAP

__all__ = [
    "CLAP", "CLAPConfig", "create_model", "from_pretrained", "get_config", "list_models",
    "load_checkpoint", "__version__",
]  # fmt: skip
__version__ = "0.1.0"
