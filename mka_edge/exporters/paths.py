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


def check_creatable(out: Path, option: str = "--out") -> None:
    """``out`` can be made later without touching anything now: its nearest existing parent is a
    writable folder.  For commands that write their output only after minutes of work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file; choose a folder path")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"{option} {out} cannot be created: {parent} is a file, not a folder; choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out} cannot be created: {parent} is not writable; choose another {option}")
