"""Output-path checks shared by the exporters: fail on an unwritable destination before any work."""

from __future__ import annotations

import os
from pathlib import Path

from mka_edge.errors import UserError


def ensure_writable_parent(out: Path) -> Path:
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out.parent} ({exc.strerror}); choose a writable --out") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write into {out.parent}; choose a writable --out")
    return out
