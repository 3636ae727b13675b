"""ONNX export for onnxruntime targets, through onnxruntime-genai's model builder.

Why the builder and not another route: it is maintained by the onnxruntime team for exactly this
job (decoder-only LLMs with a KV cache), writes the fused graph onnxruntime runs fastest on CPU
(GroupQueryAttention with rotary embedding, SkipSimplifiedLayerNormalization, packed QKV), writes
the `genai_config.json` that onnxruntime-genai (the runtime phones and laptops use) needs plus
the tokenizer files, always puts weights in an external-data file (so the 2 GB protobuf limit never
bites), and quantizes with onnxruntime's own MatMulNBits quantizer.  optimum-onnx pins
transformers < 4.58 and does not install beside transformers 5; `torch.onnx.export` would leave
us writing the cache plumbing and fusions by hand.  Measured on SmolLM2-135M (docs/results.md):
fp32 export in 8 s, next-token KL 2e-11 against PyTorch.

The builder runs in a child process: it prints freely, may call sys.exit, and holds a second copy
of the weights; a failure becomes one line.  Output is assembled in a temporary sibling folder and
renamed, so a failed or interrupted export leaves nothing at --out; the builder dies with its parent
(a killed export leaves no orphan writing into a scratch folder), and a full disk, in the builder or
in our own writes, is one line saying how much space the export needs.

Injected points (``mka_edge.killpoints``): ``onnx:mid-build`` kills mka-edge after the builder wrote
its files and before they are finished, checked and renamed; ``onnx:kill-builder`` kills the builder
subprocess (not mka-edge) as it starts saving, as the kernel's out-of-memory killer would; the
failpoint ``onnx:mid-write`` fails our rewrite of the model with ENOSPC; ``before-rename:OUT`` and
``after-rename:OUT`` come from ``cache.atomic_dir``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from mka_edge.errors import UserError
from mka_edge.killpoints import ENV as KILL_ENV
from mka_edge.killpoints import failpoint, killpoint
from mka_edge.merge_log import MergeLog, provenance, read_merge_log
from mka_edge.versions import versions

from .onnx_inspect import PROVENANCE_FILE, inspect_onnx
from .paths import ensure_writable_parent

PROTOBUF_LIMIT = 2**31 - 1  # one ONNX protobuf file cannot exceed 2 GB
BUILDER_MODULE = "onnxruntime_genai.models.builder"  # a module global so tests can stand in a fake
SMALL_FILES_BYTES = 16 * 2**20  # graph, tokenizer and configs beside the weights, an upper bound

# The builder child's entry: ask the kernel to SIGKILL it when mka-edge dies (Linux's
# PR_SET_PDEATHSIG), then run the builder as `python -m` would.  Why: a killed export must not leave
# an orphan builder holding a second copy of the weights and writing into a scratch folder that the
# next run removes.  argv: parent pid, module, the module's own arguments.
_CHILD = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (OSError, AttributeError, TypeError):
    pass  # not Linux: a killed parent's builder runs on to its end
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the parent died before the prctl
module = sys.argv[2]
del sys.argv[1:3]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# How a full disk shows in the builder's output: an errno, or numpy's short write without one.
_NO_SPACE = re.compile(r"No space left on device|Errno 28\b|ENOSPC|Disk quota exceeded|requested and \d+ written")


@dataclass(frozen=True)
class OnnxQuant:
    name: str
    precision: str  # the builder's --precision
    extra: tuple[str, ...]  # the builder's --extra_options
    bytes_per_weight: float  # nominal, for the single-file size check before exporting
    description: str
    builder_ep: str = "cpu"  # the builder's --execution_provider (the graph it writes)


ONNX_QUANTS = {
    q.name: q
    for q in (
        OnnxQuant("fp32", "fp32", (), 4.0, "float32 weights and activations (the fidelity reference)"),
        # The builder's CPU fp16 graph is unfused and onnxruntime-genai cannot run it on CPU (a Cast
        # in repeat_kv fails); its CUDA fp16 graph (fused GroupQueryAttention) runs on both, so fp16
        # is built for CUDA and the provider list is cleared: CPU by default, a GPU where configured.
        OnnxQuant(
            "fp16",
            "fp16",
            (),
            2.0,
            "float16 weights and KV cache, fused graph (for GPUs/NPUs; also runs on CPU)",
            builder_ep="cuda",
        ),
        OnnxQuant(
            "int8",
            "int8",
            (),
            1.07,
            "8-bit weight-only MatMulNBits, block 32, symmetric (onnxruntime quantizer); "
            "the embedding stays float32 when tied",
        ),
        OnnxQuant(
            "int4",
            "int4",
            (),
            0.57,
            "4-bit weight-only MatMulNBits, block 32, RTN (onnxruntime quantizer); "
            "int8 activations on CPU (accuracy level 4)",
        ),
        OnnxQuant(
            "int4-mixed",
            "int4",
            ("algo_config=k_quant_mixed",),
            0.65,
            "4-bit k-quant body, 8-bit output projection and the most sensitive layers (llama.cpp's "
            "Q4_K_M-like mix), onnxruntime quantizer",
        ),
    )
}


def onnx_quant(name: str) -> OnnxQuant:
    key = name.strip().lower()
    if key not in ONNX_QUANTS:
        raise UserError(
            f"unknown ONNX quant type '{name}'; choose one of {', '.join(ONNX_QUANTS)} "
            f"(GGUF types such as Q4_K_M need --format gguf)"
        )
    return ONNX_QUANTS[key]


def quant_help() -> str:
    lines = ["ONNX quant types (onnxruntime-genai builder, onnxruntime's MatMulNBits quantizer):"]
    lines += [
        f"  {q.name:<11} ~{8 * q.bytes_per_weight:4.1f} bits/weight  {q.description}" for q in ONNX_QUANTS.values()
    ]
    return "\n".join(lines)


def check_out_dir(out: Path) -> Path:
    """--out is a folder; an existing one is replaced only if it is an earlier ONNX export of ours."""
    out = Path(out)
    if out.suffix.lower() in (".onnx", ".gguf"):
        raise UserError(
            f"--out {out} must be a folder for ONNX (model.onnx, its weights, tokenizer and genai_config.json go in it)"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE_FILE).is_file():
        raise UserError(f"--out {out} is a non-empty folder that is not an mka-edge ONNX export; choose a new folder")
    return ensure_writable_parent(out)


def check_single_file(n_params: int, q: OnnxQuant) -> None:
    """Refuse before exporting when the weights cannot fit in one protobuf file."""
    need = n_params * q.bytes_per_weight
    if need > 0.95 * PROTOBUF_LIMIT:
        raise UserError(
            f"{n_params / 1e9:.2f}B parameters in {q.name} need about {need / 2**30:.1f} GiB, over the 2 GB "
            f"limit of a single ONNX file; drop --single-file (weights then go to model.onnx.data)"
        )


def _has_source_dir(lm) -> bool:
    folder = lm.source.get("model_dir")
    return bool(folder) and (Path(folder) / "config.json").is_file()


def _source_dir(lm, stack: ExitStack, out: Path) -> Path:
    """The builder reads a Hugging Face folder: the model's own one, else a temporary save beside
    --out, named like its other scratch (``.OUT.PID.src.*``) so a killed run's copy is removed by
    the next run (``cache.clean_stale``)."""
    from mka_edge.cache import temp_sibling_prefix

    if _has_source_dir(lm):
        return Path(lm.source["model_dir"])
    prefix = f"{temp_sibling_prefix(out)}src."
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix, dir=out.parent)))
    lm.model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    return tmp


def _builder_args(src: Path, out: Path, q: OnnxQuant) -> list[str]:
    args = ["-i", str(src), "-o", str(out), "-p", q.precision, "-e", q.builder_ep, "-c", str(out / ".builder-cache")]
    return args + (["--extra_options", *q.extra] if q.extra else [])


def start_builder(args: list[str], module: str | None = None) -> subprocess.Popen:
    """Start ``module`` (the builder) in a child that dies with this process; its output, stdout and
    stderr together, comes through a text pipe."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", _CHILD, str(os.getpid()), module or BUILDER_MODULE, *args]
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:
        raise UserError(f"cannot start the ONNX builder ({exc}); reinstall onnxruntime-genai") from None


def _kill_builder_wanted() -> bool:
    """The injected point ``onnx:kill-builder``: unlike ``killpoint`` it kills the builder, not us."""
    return "onnx:kill-builder" in os.environ.get(KILL_ENV, "").split(",")


def _run_builder(src: Path, out: Path, q: OnnxQuant, n_layers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    tail: deque[str] = deque(maxlen=40)
    bar = tqdm(total=n_layers + 2, desc=f"ONNX {q.name}: reading layers", disable=not progress, leave=False)
    proc = start_builder(_builder_args(src, out, q))
    try:
        for raw in proc.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                line = line.strip()
                if not line:
                    continue
                tail.append(line)
                if (
                    line.startswith("Reading layer")
                    or line.startswith("Reading final norm")
                    or line.startswith("Reading LM head")
                ):
                    bar.update(1)
                elif line.startswith("Saving ONNX model"):
                    bar.set_description(
                        f"ONNX {q.name}: quantizing and saving"
                        if q.precision.startswith("int")
                        else f"ONNX {q.name}: saving"
                    )
                    if _kill_builder_wanted():
                        proc.kill()
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        bar.close()
    if rc != 0:
        _builder_failed(rc, list(tail), q)


def _builder_failed(rc: int, tail: list[str], q: OnnxQuant) -> NoReturn:
    """Turn a failed builder run into one line: a full disk becomes ENOSPC (reported with the space
    the export needs), a signal says which, anything else quotes the builder's last error line."""
    if any(_NO_SPACE.search(line) for line in tail):
        raise OSError(errno.ENOSPC, "No space left on device (in the ONNX builder)")
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else f"signal {-rc}"
        oom = " (the system may have run out of memory: the builder holds a second copy of the weights)"
        raise UserError(
            f"the ONNX builder for {q.name} was killed by {name}{oom if -rc == signal.SIGKILL else ''}; "
            "nothing was left at --out"
        )
    why = next((l for l in reversed(tail) if "Error" in l or "error" in l), tail[-1] if tail else "no message")
    raise UserError(f"the ONNX builder failed for {q.name}: {why[:240]}")


def _finish(out: Path, q: OnnxQuant, lm, merge_log: MergeLog | None, context: int | None, single_file: bool) -> None:
    """Runtime config for the target context, provenance inside the model and beside it, and
    (on request) weights embedded in one file."""
    import onnx

    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    if context:
        cfg["search"]["max_length"] = int(context)  # onnxruntime-genai sizes its KV buffer by this
    cfg["model"]["decoder"].setdefault("session_options", {})["provider_options"] = []  # CPU unless configured
    cfg_path.write_text(json.dumps(cfg, indent=4))
    facts = provenance(lm, merge_log)  # the same facts the GGUF exporter writes
    prov = {
        "mka_edge": facts.pop("mka_edge"),
        "format": "onnx",
        "quant": q.name,
        "builder_precision": q.precision,
        "builder_extra_options": list(q.extra),
        "builder_execution_provider": q.builder_ep,
        "versions": versions(("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir"), with_self=False),
        **facts,  # method, merge_layers, layers_before, layers, layer_map, source, source_sha256
        "context": int(cfg["search"]["max_length"]),
    }
    model_file = out / cfg["model"]["decoder"]["filename"]
    model = onnx.load(str(model_file), load_external_data=single_file)
    del model.metadata_props[:]
    for key in ("mka_edge", "quant", "method", "merge_layers", "source", "source_sha256"):
        entry = model.metadata_props.add()
        entry.key, entry.value = f"mka_edge.{key}", str(prov[key])
    if single_file:
        data_files = {str(p.name) for p in out.glob("*.data")}
        onnx.save_model(model, str(model_file), save_as_external_data=False)
        for name in data_files:
            (out / name).unlink()
    else:
        onnx.save_model(model, str(model_file))
    failpoint("onnx:mid-write")  # the disk-full tests' ENOSPC, half-way through our writes
    (out / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2))


def export_onnx(
    model: str | None,
    out: Path,
    quant: str,
    *,
    context: int | None = None,
    single_file: bool = False,
    progress: bool = True,
) -> dict:
    """`mka-edge export --format onnx`: load ``model`` (recipe, folder, GGUF, hub id) and export it."""
    import torch

    from mka_edge.models.loading import load_model

    q = onnx_quant(quant)  # a bad name fails before the slow load
    check_out_dir(out)
    lm = load_model(model, "cpu", torch.float32)
    return export_loaded_onnx(lm, out, q, context=context, single_file=single_file, progress=progress)


def export_loaded_onnx(
    lm,
    out: Path,
    quant: str | OnnxQuant,
    *,
    context: int | None = None,
    single_file: bool = False,
    progress: bool = True,
) -> dict:
    """Export a loaded model to an ONNX folder; returns the summary read back from what was written."""
    from mka_edge.cache import clean_stale

    q = quant if isinstance(quant, OnnxQuant) else onnx_quant(quant)
    out = check_out_dir(Path(out))
    n_params = sum(p.numel() for p in lm.model.parameters())
    if single_file:
        check_single_file(n_params, q)  # before any write
    model_ctx = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
    if context is not None and context < 1:
        raise UserError("--context must be positive")
    if context and model_ctx and context > model_ctx:
        raise UserError(
            f"--context {context} is longer than the model's context length ({model_ctx}); use at most {model_ctx}"
        )
    merge_log = read_merge_log(lm.source.get("model_dir"))
    clean_stale(out)  # a killed export's scratch and source copy: free their space first
    try:
        info = _export_to(lm, out, q, merge_log, context, single_file, progress)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _no_space(out, q, n_params, single_file, saves_source=not _has_source_dir(lm)) from None
    return info | {"path": str(out)}


def _no_space(out: Path, q: OnnxQuant, n_params: int, single_file: bool, saves_source: bool) -> UserError:
    """The one line for a full disk, wherever the write failed (the builder or us): what the export
    needs, what is free, and that --out was left alone (like the GGUF exporter's)."""
    need = disk_need_bytes(n_params, q, single_file, saves_source)
    what = f"{q.name} weights{' twice' if single_file else ''}, graph, tokenizer"
    what += ", a float32 copy of the model for the builder" if saves_source else ""
    return UserError(
        f"no space left on the disk of {out.parent} while writing the ONNX export: the export needs about "
        f"{need / 2**20:.0f} MB free there ({what}); {_free_mb(out.parent):.0f} MB are free; "
        "nothing was left at --out; free space or choose another --out"
    )


def disk_need_bytes(n_params: int, q: OnnxQuant, single_file: bool, saves_source: bool) -> int:
    """What the export writes beside --out at its peak: the weights (twice with --single-file, where
    model.onnx embeds them before the .data file is removed), a float32 copy of the model when it
    has no folder of its own for the builder to read, and the small files."""
    weights = n_params * q.bytes_per_weight * (2 if single_file else 1)
    return int(weights + (4 * n_params if saves_source else 0) + SMALL_FILES_BYTES)


def _free_mb(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free / 2**20
    except OSError:
        return float("nan")


def _export_to(lm, out: Path, q: OnnxQuant, merge_log, context: int | None, single_file: bool, progress: bool) -> dict:
    """export_loaded_onnx's writes: builder into a scratch sibling, our finishing touches, a read
    back, then the rename that publishes it (``atomic_dir``); returns the read-back summary."""
    from mka_edge.cache import atomic_dir

    with ExitStack() as stack:
        src = _source_dir(lm, stack, out)
        with atomic_dir(out) as tmp:
            _run_builder(src, tmp, q, lm.num_layers, progress)
            killpoint("onnx:mid-build")
            shutil.rmtree(tmp / ".builder-cache", ignore_errors=True)
            _finish(tmp, q, lm, merge_log, context, single_file)
            info = inspect_onnx(tmp)  # refuse to publish anything that does not read back
    return info
