"""The child-process worker modules that run an artifact in its runtime, by format: constants at
the bottom, so that the probes (solver/) and the targets name a worker without importing each
other (gguf-py keeps its constants the same way)."""

GGUF_WORKER = "mka_edge.validate.gguf_worker"
ONNX_WORKER = "mka_edge.validate.onnx_worker"
