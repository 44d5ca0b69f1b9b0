"""Where the parity tests find their golden vectors: tests/golden/ in the repository, or AVATARCLI_GOLDEN."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "golden"


def golden_root() -> Path:
    """The fixture root: one folder per fixture set (stableavatar/, sfd/, ...), each with README.md + config.json."""
    return Path(os.environ.get("AVATARCLI_GOLDEN", DEFAULT))
