"""Runtime targets, one module each, registered in one table (base.TARGETS).

gguf    llama.cpp: a GGUF file from llama.cpp's quantizer
onnx    onnxruntime: an ONNX folder from onnxruntime-genai's builder

Importing this package registers both; ``get_target(name)``, ``target_for_runtime(profile.runtime)``
and ``target_for_artifact(path)`` are how the rest of mka-edge reaches them.
"""

from . import gguf, onnx  # noqa: F401  (each module registers its target)
from .base import (
    TARGETS,
    ReportMemory,
    Target,
    get_target,
    register,
    runtimes,
    target_for_artifact,
    target_for_runtime,
    unregister,
)

__all__ = [
    "TARGETS",
    "ReportMemory",
    "Target",
    "get_target",
    "register",
    "runtimes",
    "target_for_artifact",
    "target_for_runtime",
    "unregister",
]
