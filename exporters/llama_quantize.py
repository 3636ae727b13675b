"""Run llama.cpp's own quantizer (through the llama-cpp-python bindings) in a child process.

A child, because llama.cpp aborts the whole process on some failures; the parent turns a
non-zero exit into one clear error and removes the half-written output.

    python -m exporters.llama_quantize IN.gguf OUT.gguf FTYPE NTHREAD [IMATRIX.npz]
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

from mka_edge.errors import UserError


def _imatrix_array(path: str):
    """A NULL-terminated llama_model_imatrix_data array (and the buffers it points into)."""
    import numpy as np
    import llama_cpp

    data = np.load(path)
    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()
    for i, name in enumerate(data.files):
        vals = np.ascontiguousarray(data[name], dtype=np.float32)
        keep.append(vals)
        arr[i].name = name.encode()
        arr[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = vals.size
    arr[len(data.files)].name = None
    return arr, keep


def main(argv: list[str]) -> int:
    import llama_cpp

    src, dst, ftype, nthread = argv[0], argv[1], int(argv[2]), int(argv[3])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep = None
    if len(argv) > 4:
        arr, keep = _imatrix_array(argv[4])
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    del keep
    return 0 if rc == 0 else 1


def quantize(src: Path, dst: Path, ftype: int, nthread: int, imatrix: Path | None = None) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp; UserError with llama.cpp's reason on failure."""
    cmd = [sys.executable, "-m", "exporters.llama_quantize", str(src), str(dst), str(ftype), str(nthread)]
    if imatrix is not None:
        cmd.append(str(imatrix))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr or "").splitlines() if l.strip()]
        why = next((l for l in reversed(lines) if "error" in l.lower() or "failed" in l.lower()), lines[-1] if lines else "")
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode}" + (f"; {why}" if why else "")
        raise UserError(f"llama.cpp's quantizer failed ({why[:200]}); try another --quant")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
