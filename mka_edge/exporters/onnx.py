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
renamed, so a failed or interrupted export leaves nothing at --out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mka_edge.errors import UserError
from mka_edge.merge_log import MergeLog, provenance, read_merge_log
from mka_edge.versions import versions

from .onnx_inspect import PROVENANCE_FILE, inspect_onnx
from .paths import ensure_writable_parent

PROTOBUF_LIMIT = 2**31 - 1  # one ONNX protobuf file cannot exceed 2 GB


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


def _source_dir(lm, stack: ExitStack, parent: Path) -> Path:
    """The builder reads a Hugging Face folder: the model's own one, else a temporary save."""
    folder = lm.source.get("model_dir")
    if folder and (Path(folder) / "config.json").is_file():
        return Path(folder)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".onnx-src.", dir=parent)))
    lm.model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    return tmp


def _run_builder(src: Path, out: Path, q: OnnxQuant, n_layers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(src),
        "-o",
        str(out),
        "-p",
        q.precision,
        "-e",
        q.builder_ep,
        "-c",
        str(out / ".builder-cache"),
    ]
    if q.extra:
        cmd += ["--extra_options", *q.extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=40)
    bar = tqdm(total=n_layers + 2, desc=f"ONNX {q.name}: reading layers", disable=not progress, leave=False)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:
        raise UserError(f"cannot start the ONNX builder ({exc}); reinstall onnxruntime-genai") from None
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
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        bar.close()
    if rc != 0:
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
    from mka_edge.cache import atomic_dir

    q = quant if isinstance(quant, OnnxQuant) else onnx_quant(quant)
    out = check_out_dir(Path(out))
    if single_file:
        check_single_file(sum(p.numel() for p in lm.model.parameters()), q)
    model_ctx = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
    if context is not None and context < 1:
        raise UserError("--context must be positive")
    if context and model_ctx and context > model_ctx:
        raise UserError(
            f"--context {context} is longer than the model's context length ({model_ctx}); use at most {model_ctx}"
        )
    merge_log = read_merge_log(lm.source.get("model_dir"))
    with ExitStack() as stack:
        src = _source_dir(lm, stack, out.parent)
        with atomic_dir(out) as tmp:
            _run_builder(src, tmp, q, lm.num_layers, progress)
            shutil.rmtree(tmp / ".builder-cache", ignore_errors=True)
            _finish(tmp, q, lm, merge_log, context, single_file)
            info = inspect_onnx(tmp)  # refuse to publish anything that does not read back
    return info | {"path": str(out)}
