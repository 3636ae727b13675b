"""GGUF validation entry points kept for callers that name the format (build, benches)."""

from __future__ import annotations

from ..targets.gguf import VALIDATION as GGUF
from .core import markdown, reference_spec, validate_artifact

WORKER = GGUF.worker
validate_gguf = validate_artifact

__all__ = ["WORKER", "markdown", "reference_spec", "validate_artifact", "validate_gguf"]
