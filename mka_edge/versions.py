"""Installed versions of the libraries an artifact depends on: one function for the manifest, the
ONNX provenance and the validation report."""

from __future__ import annotations

from importlib import metadata

from . import __version__

# everything that changes what a build writes or measures
BUILD_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "gguf",
    "llama-cpp-python",
    "onnx",
    "onnxruntime",
    "onnxruntime-genai",
    "numpy",
)


def dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(dists: tuple[str, ...] = BUILD_DISTRIBUTIONS, with_self: bool = True) -> dict[str, str | None]:
    return ({"mka-edge": __version__} if with_self else {}) | {d: dist_version(d) for d in dists}
