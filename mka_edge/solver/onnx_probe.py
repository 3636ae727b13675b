"""What each ONNX quant type costs on the model at hand: weight bytes per layer and outside the
layers (read from the written initializers), quality loss (KL to the reference in onnxruntime),
and how much of the weights onnxruntime keeps resident after loading.  Measured by exporting the
unmerged model once per type; cached by content hash like the GGUF probe."""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from mka_edge.exporters.onnx import export_loaded_onnx, onnx_quant
from mka_edge.exporters.onnx_inspect import initializer_nbytes, inspect_onnx, resolve

from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..validate.jobs import AccuracyJob, LatencyJob
from ..validate.reference import compact_reference
from ..validate.runner import run_child
from .memory import Shape
from .onnx_memory import PROMPT_TOKENS, predict_onnx
from .quant_probe import cached_entries

PROBE_VERSION = 2
RATIO_CONTEXT = 1024
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
WORKER = "mka_edge.validate.onnx_worker"


def initializer_bytes_split(folder: Path) -> dict:
    """Bytes inside transformer layers (per layer) and outside them, from the initializers' names."""

    _, model_file = resolve(folder)
    model = onnx.load(str(model_file), load_external_data=False)
    per_layer: dict[int, int] = defaultdict(int)
    other = 0
    for init in model.graph.initializer:
        n = initializer_nbytes(init)
        m = _LAYER.match(init.name)
        if m:
            per_layer[int(m.group(1))] += n
        else:
            other += n
    layers = sorted(per_layer)
    return {"per_layer": [per_layer[i] for i in layers], "repack_per_layer": [0] * len(layers), "other": other}


def probe_onnx(lm, quants: list[str], chunks: int = 2, threads: int = 2, progress: bool = True) -> dict[str, dict]:
    """{quant: {'per_layer', 'other', 'kl', 'top1', 'ppl', 'resident_ratio', 'host_gen_tps', 'quantized_ops',
    'format': 'onnx'}}: ``host_gen_tps`` is the decode speed the target's speed calibration starts from."""

    folder = cache_root() / "quant_probe"
    keys = {
        q: stable_hash({"model": lm.fingerprint, "quant": q, "chunks": chunks, "format": "onnx", "v": PROBE_VERSION})
        for q in quants
    }
    for q in quants:
        onnx_quant(q)
    results, missing = cached_entries(folder, "onnx-", keys)
    if not missing:
        return results
    with entry_lock(folder / f"onnx-probe-{lm.fingerprint[:20]}", "the ONNX quant probe of this model"):
        results, missing = cached_entries(folder, "onnx-", keys)  # measured while this process waited?
        if missing:
            _measure_onnx(lm, missing, keys, results, folder, chunks, threads, progress)
    return results


def _measure_onnx(
    lm,
    missing: list[str],
    keys: dict[str, str],
    results: dict[str, dict],
    folder: Path,
    chunks: int,
    threads: int,
    progress: bool,
) -> None:
    """Export, run and time each missing type; called with the probe's lock held (``probe_onnx``),
    so two plans started together measure once."""
    ref_path, _ = compact_reference(lm, chunks, progress=progress)
    prompt = np.load(ref_path)["ids"].reshape(-1)[:PROMPT_TOKENS].tolist()
    shape = Shape.from_config(lm.model.config)
    with tempfile.TemporaryDirectory(prefix="mka-edge-onnx-probe-") as tmp:
        for q in tqdm(missing, desc="measuring ONNX quant types", disable=not progress, leave=False):
            art = Path(tmp) / q
            export_loaded_onnx(lm, art, q, progress=False)
            acc = run_child(
                WORKER,
                AccuracyJob(str(art), threads, reference=str(ref_path)),
                3600,
                f"ONNX probe of {q}",
            )
            lat = run_child(
                WORKER,
                LatencyJob(str(art), threads, context=RATIO_CONTEXT, prompt_ids=prompt, gen_tokens=32, repeats=1),
                1200,
                f"ONNX probe of {q}",
            )
            split = initializer_bytes_split(art)
            wb = sum(split["per_layer"]) + split["other"]
            info = inspect_onnx(art)
            # what onnxruntime keeps of the weights during a validation-sized run: the peak less
            # every other term of the model (the terms are the ones predictions use)
            rest = predict_onnx(shape, 0.0, 1.0, RATIO_CONTEXT, q, prompt_tokens=len(prompt)).total_mb
            res = {
                **split,
                "format": "onnx",
                "kl": acc["kl"],
                "top1": acc["top1"],
                "ppl": acc["ppl"],
                "resident_ratio": (lat["peak_rss_mb"] - rest) * 2**20 / wb,
                "loaded_rss_mb": lat["loaded_rss_mb"],
                "peak_rss_mb": lat["peak_rss_mb"],
                "host_gen_tps": lat["gen_tps"]["median"],
                "tensor_types": info["quantized_ops"] or {"float": 1},
                "measured_on": f"{chunks} x 512 held-out tokens",
            }
            atomic_write_text(folder / f"onnx-{q}-{keys[q][:20]}.json", json.dumps(res))
            results[q] = res
