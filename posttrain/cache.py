"""Where posttrain keeps what it builds once per machine: the embedded start models (rl/sft.py, rl/prm.py) and
the compiled CPU kernels (kernels/native.py)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "POSTTRAIN_CACHE"  # the folder; default ~/.cache/posttrain


def cache_dir() -> Path:
    """$POSTTRAIN_CACHE, else ~/.cache/posttrain (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "posttrain").expanduser()
