"""What each cache mode (attention path x KV cache type) costs in quality on the model at hand,
measured once in llama.cpp and cached, as the weight quant probe is.

The unmerged model is written as Q8_0 (close to the reference, so the cache's own error is what
moves) and run on the held-out reference once per mode; a mode's cost is its KL minus the KL of
the baseline mode (f16 cache, no flash attention) on the same file, floored at
``records.CACHE_KL_FLOOR`` (never free): the plan adds it to the merge's and the weight type's loss.  On SmolLM2 the flash-attention path alone moves KL
by a few thousandths of a nat (it rounds Q to f16), a q8_0 cache barely more, q4_0 an order more.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..kv_cache import BASELINE, CacheMode
from ..records import CACHE_KL_FLOOR

PROBE_VERSION = 1
PROBE_QUANT = "Q8_0"
SPEED_GEN_TOKENS = 8  # decode steps timed with the cache filled to the plan's context


def _key(lm, mode: CacheMode, chunks: int) -> str:
    return stable_hash(
        {"model": lm.fingerprint, "mode": mode.label, "chunks": chunks, "quant": PROBE_QUANT, "v": PROBE_VERSION}
    )


def _speed_key(lm, mode: CacheMode, context: int) -> str:
    return stable_hash({"model": lm.fingerprint, "mode": mode.label, "context": context, "v": PROBE_VERSION})


def probe_cache_modes(
    lm,
    modes: list[CacheMode],
    chunks: int = 2,
    threads: int = 2,
    progress: bool = True,
    context: int | None = None,
    q8_file=None,
) -> dict[str, dict]:
    """{mode label: {'kl': nats on the Q8_0 file, 'kl_cost': extra nats over the baseline mode,
    'top1', 'ppl', 'attention', 'measured_on'}} for every mode asked (and the baseline).

    ``context``: also time decoding with the cache filled to this many tokens, per mode
    ('gen_tps', and 'speed_factor' = its share of the baseline's).  On a CPU a quantized cache
    decodes slower at long contexts (llama.cpp dequantizes it on every step: at 4096 tokens SmolLM2
    went from 69.7 tokens/s to 49.8 with q8_0 and 29.4 with q4_0 on this 2-core host): a cheap byte
    is not always a usable one.

    ``q8_file``: a callable giving the unmerged model's Q8_0 file when one is already made (the
    plan's quant probe session shares it), else the probe writes its own."""

    folder = cache_root() / "cache_probe"
    wanted = list(dict.fromkeys([BASELINE, *modes]))
    results: dict[str, dict] = {}
    missing = []
    for m in wanted:
        path = folder / f"{m.label.replace('/', '-')}-{_key(lm, m, chunks)[:20]}.json"
        if path.is_file():
            results[m.label] = json.loads(path.read_text())
        else:
            missing.append((m, path))
    speed_missing = []
    if context:
        for m in wanted:
            spath = folder / f"speed-{m.label.replace('/', '-')}-{_speed_key(lm, m, context)[:20]}.json"
            if spath.is_file():
                results[m.label] = {**results.get(m.label, {}), **json.loads(spath.read_text())}
            else:
                speed_missing.append((m, spath))
    if missing or speed_missing:
        with entry_lock(folder / f"modes-{lm.fingerprint[:20]}", "the cache-mode probe of this model"):
            _measure(lm, missing, speed_missing, results, chunks, threads, progress, context, q8_file)
    base = results[BASELINE.label]
    for label, r in results.items():
        r["kl_cost"] = 0.0 if label == BASELINE.label else max(CACHE_KL_FLOOR, r["kl"] - base["kl"])
        if "gen_tps" in r:
            r["speed_factor"] = r["gen_tps"] / base["gen_tps"]
    return {m.label: results[m.label] for m in wanted}


def _measure(
    lm, missing, speed_missing, results: dict, chunks: int, threads: int, progress: bool, context, q8_file=None
) -> None:
    """Measure the modes not in the cache (another process may have measured some while this one
    waited for the lock: those are read instead)."""
    from mka_edge.exporters.gguf import intermediate_type, write_float_gguf
    from mka_edge.exporters.llama_quantize import quantize
    from mka_edge.exporters.quant_types import quant_type

    from ..validate.jobs import AccuracyJob
    from ..validate.reference import compact_reference
    from ..validate.runner import run_child
    from ..validate.workers import GGUF_WORKER as WORKER

    for todo in (missing, speed_missing):
        for m, path in list(todo):
            if path.is_file():
                results[m.label] = {**results.get(m.label, {}), **json.loads(path.read_text())}
                todo.remove((m, path))
    if missing or speed_missing:
        ref_path, _ = compact_reference(lm, chunks, progress=progress)
        with tempfile.TemporaryDirectory(prefix="mka-edge-cache-probe-") as tmp:
            if q8_file is not None:
                art = q8_file()
            else:
                float_type = intermediate_type(lm.model.config, PROBE_QUANT)
                base = Path(tmp) / f"base-{float_type.lower()}.gguf"
                write_float_gguf(lm, base, float_type)
                art = Path(tmp) / f"{PROBE_QUANT}.gguf"
                quantize(base, art, quant_type(PROBE_QUANT).ftype, threads)
                base.unlink()
            for m, path in tqdm(missing, desc="measuring cache modes", disable=not progress, leave=False):
                acc = run_child(
                    WORKER,
                    AccuracyJob(str(art), threads, reference=str(ref_path), cache_mode=m.label),
                    3600,
                    f"probe of the {m.label} cache",
                )
                res = {
                    "kl": acc["kl"],
                    "top1": acc["top1"],
                    "ppl": acc["ppl"],
                    "attention": m.attention,
                    "measured_on": f"{PROBE_QUANT} file, {chunks} x 512 held-out tokens",
                }
                atomic_write_text(path, json.dumps(res))
                results[m.label] = {**results.get(m.label, {}), **res}
            if speed_missing:
                import numpy as np

                from ..validate.jobs import LatencyJob

                ids = np.load(ref_path)["ids"].reshape(-1).tolist()
                n_prompt = max(16, context - SPEED_GEN_TOKENS - 16)
                prompt = (ids * (n_prompt // len(ids) + 1))[:n_prompt]
                for m, spath in tqdm(speed_missing, desc="timing cache modes", disable=not progress, leave=False):
                    lat = run_child(
                        WORKER,
                        LatencyJob(
                            str(art),
                            threads,
                            context=context,
                            prompt_ids=prompt,
                            gen_tokens=SPEED_GEN_TOKENS,
                            repeats=1,
                            cache_mode=m.label,
                        ),
                        3600,
                        f"timing of the {m.label} cache",
                    )
                    sres = {"gen_tps": lat["gen_tps"]["median"], "speed_context": context}
                    atomic_write_text(spath, json.dumps(sres))
                    results[m.label] = {**results.get(m.label, {}), **sres}
