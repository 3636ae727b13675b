"""Exporters turn a (merged) Hugging Face model into a runtime artifact.

gguf.py          model -> GGUF (gguf-py writes F32/F16; llama.cpp's quantizer makes the rest)
gguf_deci        layers without attention -> llama.cpp's deci architecture (per-layer head counts)
gguf_tokenizer   tokenizer metadata (carried over from a source GGUF, or built from tokenizer.json)
gguf_inspect     read a GGUF back: integrity check, tensor types actually written, provenance
quant_types      the llama.cpp quant types as data
llama_quantize   llama.cpp's quantizer in a child process
imatrix          importance matrix from the calibration text (cached per model stack and text)
onnx.py          model -> ONNX folder (onnxruntime-genai builder; onnxruntime quantizer for int8/int4)
onnx_inspect     read an ONNX export back: integrity, weight bytes, quantized ops, provenance
gguf_names       HF -> GGUF tensor names (shared by gguf.py and imatrix)
paths            output-path checks shared by the exporters
"""
