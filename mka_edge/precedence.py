"""The one precedence rule for a setting, at the bottom so that every layer applies the same rule
(profiles, planning, validation) without importing the others."""

from __future__ import annotations

from typing import Any


def resolved(given: Any, profile: Any, field: str, fallback: Any = None) -> Any:
    """A value given (command line, or a recipe's default the CLI applied) wins, else the
    profile's field (``profile`` may be None), else the fallback.  0 counts as given: it is
    checked, not silently replaced."""
    if given is not None:
        return given
    if profile is not None:
        return getattr(profile, field)
    return fallback
