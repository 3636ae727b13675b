"""Run llama.cpp's own quantizer (through the llama-cpp-python bindings) in a child process.

A child, because llama.cpp aborts the whole process on some failures; the parent turns a
non-zero exit into one clear error and removes the half-written output.

    python -m mka_edge.exporters.llama_quantize IN.gguf OUT.gguf FTYPE NTHREAD [IMATRIX.npz]
    python -m mka_edge.exporters.llama_quantize --dry-run IN.gguf FTYPE [FTYPE ...]

The dry run is llama.cpp's own: it decides every tensor's type for a file type without reading
or writing any tensor data, so it also works on a data-less file (``gguf.write_shape_gguf``).

With an importance matrix (``imatrix.py``'s .npz) the output records where it came from as
llama.cpp's ``llama-quantize`` does: ``quantize.imatrix.file`` / ``.dataset`` (strings),
``.entries_count`` / ``.chunks_count`` (llama.cpp writes its integer overrides as u32), passed as
the quantize params' kv_overrides so that llama.cpp itself writes them.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mka_edge.child_exit import explain_exit
from mka_edge.errors import UserError
from mka_edge.runtime_check import check_llama_cpp


def _read_imatrix(path: str) -> tuple[dict, dict]:
    """({tensor name: column means}, meta) of an imatrix .npz; numpy only (the child loads no torch)."""
    import numpy as np

    with np.load(path) as data:
        meta = json.loads(str(data["__meta__"])) if "__meta__" in data.files else {}
        arrays = {n: np.ascontiguousarray(data[n], dtype=np.float32) for n in data.files if not n.startswith("__")}
    return arrays, meta


def _imatrix_array(arrays: dict):
    """A NULL-terminated llama_model_imatrix_data array (and the buffers it points into)."""
    import llama_cpp

    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for i, (name, vals) in enumerate(arrays.items()):
        name_b = name.encode()
        keep.append((name_b, vals))
        arr[i].name = name_b
        arr[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = vals.size
    arr[len(arrays)].name = None
    return arr, keep


IMATRIX_KEYS = {  # llama.cpp tools/quantize/quantize.cpp, LLM_KV_QUANTIZE_IMATRIX_*
    "file": "quantize.imatrix.file",
    "dataset": "quantize.imatrix.dataset",
    "entries_count": "quantize.imatrix.entries_count",
    "chunks_count": "quantize.imatrix.chunks_count",
}


def imatrix_overrides(path: str, n_entries: int, meta: dict):
    """llama_model_kv_override array (terminated by an empty key) with the provenance llama-quantize
    records: file and dataset as strings (at most 127 bytes, as llama.cpp cuts them), entries and
    chunks as integers (the chunk count only when known, as llama.cpp does)."""
    import llama_cpp

    rows: list[tuple[str, object]] = [("file", Path(path).name)]
    if meta.get("dataset"):
        rows.append(("dataset", str(meta["dataset"])))
    rows.append(("entries_count", int(n_entries)))
    if int(meta.get("chunks", 0)) > 0:
        rows.append(("chunks_count", int(meta["chunks"])))
    arr = (llama_cpp.llama_model_kv_override * (len(rows) + 1))()
    for i, (name, value) in enumerate(rows):
        arr[i].key = IMATRIX_KEYS[name].encode()
        if isinstance(value, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = value.encode()[:127].decode(errors="ignore").encode()
    arr[len(rows)].key = b""
    return arr


def tensor_pattern(name: str) -> str:
    """The override pattern that names exactly one tensor (llama.cpp matches patterns with
    std::regex_search, ECMAScript syntax: anchored, dots escaped)."""
    return "^" + re.escape(name) + "$"


def override_array(overrides: dict[str, str]):
    """A llama_model_tensor_override array (terminated by a NULL pattern) from {pattern: ggml type
    name}, and the buffers it points into (kept alive by the caller): llama.cpp's per-tensor types,
    what ``llama-quantize --tensor-type PATTERN=TYPE`` passes.  The first matching pattern wins, and
    llama.cpp still falls back from a type a tensor's row length cannot take (as for its own mixes)."""
    import gguf
    import llama_cpp

    arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    keep = []
    for i, (pattern, type_name) in enumerate(overrides.items()):
        raw = pattern.encode()
        keep.append(raw)
        arr[i].pattern = raw
        arr[i].type = int(gguf.GGMLQuantizationType[type_name.upper()].value)
    return arr, keep


def _read_overrides(path: str | None) -> dict[str, str]:
    return json.loads(Path(path).read_text()) if path else {}


# one line of llama.cpp's quantizer log per tensor: "[  3/272] blk.0.attn_q.weight - [576, 576, 1, 1],
# type =    f32, size = 1.266 MiB -> 0.356 MiB (q4_K)"; no "->" when the type stays.
_TENSOR_LINE = re.compile(
    r"\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(\w+),\s+size\s*=\s*[\d.]+\s+MiB"
    r"(?:\s*->\s*[\d.]+\s+MiB\s+\((\w+)\))?"
)


def _dry_run(src: str, ftypes: list[int], overrides: dict[str, str] | None = None) -> int:
    """Print {ftype: {tensor: ggml type name}} as JSON: llama.cpp's choices, read from its log
    (with ``overrides``: per-tensor types, as the real quantize call would pass them)."""
    import llama_cpp

    text: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, message, user_data):
        text.append(message.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    out = {}
    for ftype in ftypes:
        text.clear()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.dry_run = True
        if overrides:
            tt, keep = override_array(overrides)
            params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        if llama_cpp.llama_model_quantize(src.encode(), b"", ctypes.byref(params)) != 0:
            print("".join(text)[-2000:], file=sys.stderr)  # llama.cpp's reason went to the callback
            return 1
        out[ftype] = {m.group(1): (m.group(3) or m.group(2)) for m in _TENSOR_LINE.finditer("".join(text))}
    print(json.dumps(out))
    return 0


def dry_run_types(src: Path, ftypes: list[int], overrides: dict[str, str] | None = None) -> dict[int, dict[str, str]]:
    """The ggml type llama.cpp's quantizer would give each tensor of ``src``, per file type (with
    ``overrides``, {pattern: type}, applied as the quantize call applies them)."""
    check_overrides(overrides or {})
    check_llama_cpp()
    cmd = [sys.executable, "-m", "mka_edge.exporters.llama_quantize", "--dry-run", str(src), *map(str, ftypes)]
    with tempfile.TemporaryDirectory(prefix="mka-edge-overrides-") as tmp:
        if overrides:
            cmd += ["--overrides", _write_overrides(Path(tmp), overrides)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = ((proc.stderr or "").strip().splitlines() or ["no message"])[-1]
        killed = explain_exit(proc.returncode, "llama.cpp's quantizer (dry run)", last)
        raise UserError(killed or f"llama.cpp's quantizer could not size this model (dry run failed: {last[:200]})")
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str]) -> int:
    import llama_cpp

    over = None
    if "--overrides" in argv:
        i = argv.index("--overrides")
        over, argv = _read_overrides(argv[i + 1]), argv[:i] + argv[i + 2 :]
    if argv and argv[0] == "--dry-run":
        return _dry_run(argv[1], [int(a) for a in argv[2:]], over)

    src, dst, ftype, nthread = argv[0], argv[1], int(argv[2]), int(argv[3])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep = None
    if len(argv) > 4:
        arrays, meta = _read_imatrix(argv[4])
        arr, bufs = _imatrix_array(arrays)
        kv = imatrix_overrides(argv[4], len(arrays), meta)
        keep = (arr, bufs, kv)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if over:
        tt, tt_keep = override_array(over)
        keep = (keep, tt, tt_keep)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    del keep
    return 0 if rc == 0 else 1


def check_overrides(overrides: dict[str, str]) -> None:
    """Each pattern a valid regular expression and each type a ggml type, refused in one line here
    rather than by the quantizer's child."""
    import gguf

    for pattern, type_name in overrides.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"tensor type override {pattern!r} is not a regular expression ({exc})") from None
        if str(type_name).upper() not in gguf.GGMLQuantizationType.__members__:
            raise UserError(f"tensor type override {pattern!r}: unknown ggml type {type_name!r}")


def _write_overrides(folder: Path, overrides: dict[str, str]) -> str:
    path = folder / "overrides.json"
    path.write_text(json.dumps(overrides))
    return str(path)


def quantize(
    src: Path,
    dst: Path,
    ftype: int,
    nthread: int,
    imatrix: Path | None = None,
    progress: bool = False,
    overrides: dict[str, str] | None = None,
) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp; UserError with llama.cpp's reason on failure.
    ``progress``: an elapsed-time line while it runs (minutes for a 7-8B model).  ``overrides``:
    {pattern: ggml type} per-tensor types (``tensor_pattern`` names one tensor), in one quantize call."""
    from mka_edge.validate.runner import run_with_progress

    check_overrides(overrides or {})
    check_llama_cpp()
    cmd = [sys.executable, "-m", "mka_edge.exporters.llama_quantize", str(src), str(dst), str(ftype), str(nthread)]
    if imatrix is not None:
        cmd.append(str(imatrix))
    with tempfile.TemporaryDirectory(prefix="mka-edge-overrides-") as tmp:
        if overrides:
            cmd += ["--overrides", _write_overrides(Path(tmp), overrides)]
        proc = run_with_progress(cmd, None, "llama.cpp quantizer", progress)
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr or "").splitlines() if l.strip()]
        why = next(
            (l for l in reversed(lines) if "error" in l.lower() or "failed" in l.lower()), lines[-1] if lines else ""
        )
        killed = explain_exit(proc.returncode, "llama.cpp's quantizer", why)
        raise UserError(killed or f"llama.cpp's quantizer failed ({why[:200]}); try another --quant")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
