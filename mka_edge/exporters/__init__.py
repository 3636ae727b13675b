"""Exporters turn a (merged) Hugging Face model into a runtime artifact.

gguf.py          model -> GGUF (gguf-py writes F32/F16; llama.cpp's quantizer makes the rest)
gguf_tokenizer   tokenizer metadata (carried over from a source GGUF, or built from tokenizer.json)
gguf_inspect     read a GGUF back: integrity check, tensor types actually written, provenance
quant_types      the llama.cpp quant types as data
llama_quantize   llama.cpp's quantizer in a child process
imatrix          importance matrix for the low-bit types, from the calibration text
onnx.py          model -> ONNX folder (onnxruntime-genai builder; onnxruntime quantizer for int8/int4)
onnx_inspect     read an ONNX export back: integrity, weight bytes, quantized ops, provenance
gguf_names       HF -> GGUF tensor names (shared by gguf.py and imatrix)
paths            output-path checks shared by the exporters
"""
