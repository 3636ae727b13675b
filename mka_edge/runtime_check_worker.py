"""Child side of the llama.cpp runtime check (``runtime_check.py``): write two tiny llama GGUFs
(every matrix Q8_0 in one, Q4_0 in the other), load each in llama.cpp and run a 64-token batch
and one decode step through it.  Why those: a batch runs the quantized matrix-multiply kernels
(and the repacked and AMX ones, where the build has them) that killed issue 22's probe with SIGILL
in a 512-token batch over Q8_0 weights, and one decode step runs the single-row ones.  Only numpy,
gguf-py and llama-cpp-python are imported; seconds in all.

    python -m mka_edge.runtime_check_worker DIR

Exit 0: passed.  Exit 3: the bindings cannot load (last stderr line ``cannot load: REASON``).
Exit 4: llama.cpp refused the check model (``llama.cpp failed: REASON``).  A signal: the parent
explains it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np

N_EMBD, N_FF, N_LAYERS, N_HEAD, N_CTX = 256, 512, 2, 4, 128
N_CTX_TRAIN = 4096  # above the context llama.cpp pads n_ctx to (256), so it does not warn
BATCH_TOKENS = 64
TYPES = ("Q8_0", "Q4_0")


def _vocab() -> tuple[list[str], list[int]]:
    """A minimal sentencepiece vocabulary llama.cpp accepts: unk, bos, eos and the 256 byte tokens
    (llama.cpp looks up ``<0x0A>`` for the newline)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    t = gguf.TokenType
    types = [t.UNKNOWN, t.CONTROL, t.CONTROL] + [t.BYTE] * 256
    return tokens, [int(x) for x in types]


def write_check_gguf(path: Path, type_name: str) -> None:
    """A random 2-layer llama whose matrices are all ``type_name`` (quantized by gguf-py), norms F32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    tokens, types = _vocab()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("mka-edge runtime check")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{type_name}"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(N_EMBD, dtype=np.float32))

    matrix("token_embd.weight", len(tokens), N_EMBD)
    for i in range(N_LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("q", "k", "v", "output"):
            matrix(f"blk.{i}.attn_{part}.weight", N_EMBD, N_EMBD)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        matrix(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        matrix(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    norm("output_norm.weight")
    matrix("output.weight", len(tokens), N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _run(path: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=1,
        n_threads_batch=1,
        n_gpu_layers=0,
        verbose=False,
        seed=0,
    )
    tokens = [3 + (i * 37) % 256 for i in range(BATCH_TOKENS)]
    llm.eval(tokens)  # one batch of 64 rows: the quantized matrix-matrix kernels
    llm.eval([tokens[0]])  # one row: the matrix-vector kernels
    llm.close()


def main(argv: list[str]) -> int:
    # a crash here is expected on a mismatched build and explained by the parent: no core file
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    folder = Path(argv[0])
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as exc:
        print(f"cannot load: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 3
    for type_name in TYPES:
        path = folder / f"check-{type_name}.gguf"
        write_check_gguf(path, type_name)
        print(f"runtime check: a {BATCH_TOKENS}-token batch over {type_name} weights", file=sys.stderr, flush=True)
        try:
            _run(path)
        except (ValueError, RuntimeError) as exc:
            print(f"llama.cpp failed: {exc}", file=sys.stderr)
            return 4
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
