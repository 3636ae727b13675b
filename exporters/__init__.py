"""Exporters turn a (merged) Hugging Face model into a runtime artifact (GGUF, ONNX).

They arrive with the export issues; the package exists so the layout reads as the pipeline.
"""
