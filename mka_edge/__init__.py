"""mka-edge: shrink a language model to fit an edge device, and prove it still works there."""

__version__ = "0.1.0"
