"""What llama.cpp itself reports for its buffers when it loads a GGUF (model, KV cache, compute,
output), read from its load log in a child process.  The memory model is checked against these."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from ..child_exit import explain_exit
from ..runtime_check import check_llama_cpp

_PATTERNS = {
    "model_mb": re.compile(r"model buffer size\s*=\s*([\d.]+) MiB"),
    "kv_mb": re.compile(r"KV buffer size\s*=\s*([\d.]+) MiB"),
    "compute_mb": re.compile(r"compute buffer size\s*=\s*([\d.]+) MiB"),
    "output_mb": re.compile(r"output buffer size\s*=\s*([\d.]+) MiB"),
}


def parse(log: str) -> dict:
    out = {}
    for key, pat in _PATTERNS.items():
        vals = [float(v) for v in pat.findall(log)]
        if vals:
            out[key] = vals[0] if key != "model_mb" else sum(vals)
    return out


def reported_buffers(
    artifact: str,
    context: int,
    threads: int = 2,
    kv_type: int = 1,
    flash_attn: bool = False,
    type_v: int | None = None,
) -> dict:
    """llama.cpp's buffer sizes (MiB) for ``artifact`` loaded with ``context``: ``kv_type`` the K
    cache's ggml type id (1 = f16), ``type_v`` the V cache's (default: the same), ``flash_attn``
    the attention path (passed explicitly: the bindings' default is "disabled")."""
    code = (
        "from llama_cpp import Llama; "
        f"Llama(model_path={artifact!r}, n_ctx={context}, n_batch=512, n_ubatch=512, n_threads={threads}, "
        f"type_k={kv_type}, type_v={kv_type if type_v is None else type_v}, flash_attn={bool(flash_attn)}, "
        "verbose=True)"
    )
    check_llama_cpp()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    res = parse(proc.stderr + proc.stdout)
    if proc.returncode != 0 or "model_mb" not in res:  # a tool for tests and bench/memory_model.py: no UserError
        last = proc.stderr.strip().splitlines()[-1:]
        raise RuntimeError(
            explain_exit(proc.returncode, f"llama.cpp loading {artifact}", "".join(last))
            or f"llama.cpp did not load {artifact}: {last}"
        )
    return res


if __name__ == "__main__":
    print(json.dumps(reported_buffers(sys.argv[1], int(sys.argv[2]))))
