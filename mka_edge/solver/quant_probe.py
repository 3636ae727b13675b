"""What each quant type costs on the model at hand: bytes (per block and outside the blocks, from
the tensor types llama.cpp actually writes) and quality loss (KL to the reference), measured by
quantizing the unmerged model once per type with llama.cpp and running it (plain and with an
importance matrix, for the types llama.cpp quantizes better with one).  Cached by content hash, so
a second plan or build skips it.

Measuring beats any published table on small models: on SmolLM2 llama.cpp swaps most K-quant
tensors for legacy types (576-wide rows), so nominal bits per weight are off by a third.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from mka_edge.exporters.gguf import intermediate_type, write_float_gguf
from mka_edge.exporters.gguf_inspect import inspect_gguf
from mka_edge.exporters.imatrix import imatrix_provenance
from mka_edge.exporters.llama_quantize import quantize
from mka_edge.exporters.quant_types import quant_type

from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..merge_log import read_merge_log
from ..validate.jobs import AccuracyJob, LatencyJob
from ..validate.reference import compact_reference
from ..validate.runner import run_child
from ..validate.workers import GGUF_WORKER as WORKER
from .memory import repacked
from .speed import Efficiency, calibrate, calibrated, efficiency

PROBE_VERSION = 4  # 3: each type measured plain and with an importance matrix; 4: Q4_K counted as repacked
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def split_by_block(tensors) -> dict:
    """Bytes inside transformer blocks (per layer) and outside them (embeddings, output, norms),
    and the part of each layer llama.cpp repacks, from (name, type name, rows, bytes) rows, where
    rows is a 2-D weight's ne[1] and None for any other tensor."""
    per_layer: dict[int, int] = defaultdict(int)
    repack: dict[int, int] = defaultdict(int)
    other = 0
    for name, type_name, rows, n_bytes in tensors:
        m = _BLOCK.match(name)
        if m:
            per_layer[int(m.group(1))] += int(n_bytes)
            if rows is not None and repacked(type_name, rows):
                repack[int(m.group(1))] += int(n_bytes)
        else:
            other += int(n_bytes)
    layers = sorted(per_layer)
    return {
        "per_layer": [per_layer[i] for i in layers],
        "repack_per_layer": [repack[i] for i in layers],
        "other": other,
    }


def tensor_bytes_split(path: Path) -> dict:
    """split_by_block of a written GGUF file."""

    reader = gguf.GGUFReader(str(path))
    return split_by_block(
        [
            (t.name, t.tensor_type.name, int(t.shape[1]) if len(t.shape) == 2 else None, t.n_bytes)
            for t in reader.tensors
        ]
    )


def cached_entries(folder: Path, prefix: str, keys: dict[str, str]) -> tuple[dict[str, dict], list[str]]:
    """Probe results already in the cache, and the quant types still to measure."""
    results, missing = {}, []
    for q, key in keys.items():
        path = folder / f"{prefix}{q}-{key[:20]}.json"
        if path.is_file():
            results[q] = json.loads(path.read_text())
        else:
            missing.append(q)
    return results, missing


def _calibrate_speed(art: Path, entry: dict, ref_path: Path, threads: int, model: str) -> Efficiency:
    """Host decode speed of the Q8_0 probe file: the efficiency the speed model starts from."""

    prompt = np.load(ref_path)["ids"].reshape(-1)[:64].tolist()
    lat = run_child(
        WORKER,
        LatencyJob(str(art), threads, context=512, prompt_ids=prompt, gen_tokens=64, repeats=3),
        600,
        "speed calibration",
    )
    # as the speed model counts them: an untied embedding (the file has its own output matrix) is
    # only gathered per token, not read
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(art)).tensors}
    gathered = tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0
    return calibrate(lat["gen_tps"]["median"], sum(entry["per_layer"]) + entry["other"] - gathered, "gguf", model)


def _measure(lm, base: Path, art: Path, q: str, float_type: str, ref_path: Path, threads: int, matrix) -> dict:
    """Write ``q`` (with the importance matrix ``matrix``, or plain when None) to ``art`` and measure
    it against the reference: bytes, KL, top-1, perplexity, tensor types."""
    qt = quant_type(q)
    if q in ("F16", "F32") and q != float_type:
        write_float_gguf(lm, art, q)
    elif art != base and not (matrix is None and art.is_file()):  # a plain file made earlier is reused
        quantize(base, art, qt.ftype, threads, matrix)
    acc = run_child(WORKER, AccuracyJob(str(art), threads, reference=str(ref_path)), 3600, f"probe of {q}")
    return {
        **tensor_bytes_split(art),
        "kl": acc["kl"],
        "top1": acc["top1"],
        "ppl": acc["ppl"],
        "tensor_types": inspect_gguf(art)["tensor_types"],
    }


class ProbeSession:
    """One plan's quant probe: the float base GGUF and the reference are made once, on the first
    type that is not in the cache, and serve every type measured after it (the plan measures one
    type at a time, best first, and stops when the rest cannot change the choice)."""

    def __init__(
        self,
        lm,
        chunks: int = 2,
        threads: int = 2,
        progress: bool = True,
        imatrix: bool = True,
        calibration=None,
        plain_too: bool = True,
    ):
        self.lm, self.chunks, self.threads, self.progress = lm, chunks, threads, progress
        self.imatrix, self.calibration = imatrix, calibration
        # False: a type an importance matrix helps is measured with one only (solver/scope.py rule 5)
        self.plain_too = plain_too
        self.folder = cache_root() / "quant_probe"
        self._tmp = None
        self._keyed = None
        self.runs = 0  # quantize-and-run measurements made (a type with and without a matrix: 2)
        # retain: keep each measured type's file (the variant its entry describes) until
        # ``retain_only`` drops it, so that a build whose plan merges nothing exports by moving
        # the file the probe already wrote (``hand_over``) instead of quantizing the model again
        self.retain = False
        self.kept: dict[str, tuple[Path, dict]] = {}

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _helps(self, q: str) -> bool:
        qt = quant_type(q)
        return qt.needs_imatrix or (self.imatrix and qt.imatrix_helps)

    def _key(self, q: str) -> str:
        from mka_edge.exporters.imatrix import imatrix_key

        if self._helps(q) and self._keyed is None:
            self._keyed = imatrix_key(self.lm, self.calibration)
        im_key = self._keyed[0] if self._helps(q) and self._keyed is not None else None
        only = {"imatrix_only": True} if self._helps(q) and not self.plain_too else {}
        return stable_hash(
            {"model": self.lm.fingerprint, "quant": q, "chunks": self.chunks, "imatrix": im_key, "v": PROBE_VERSION}
            | only
        )

    def base(self) -> tuple[Path, str, Path]:
        """(float base GGUF, its type, reference file), made on first use."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mka-edge-probe-")
            ref_path, _ = compact_reference(self.lm, self.chunks, progress=self.progress)
            float_type = intermediate_type(self.lm.model.config, "Q8_0")  # F32 for the small models probed
            base = Path(self._tmp.name) / f"base-{float_type.lower()}.gguf"
            # with the source's merge log, as export_loaded writes it: a kept file is the export's bytes
            self._tokenizer = write_float_gguf(
                self.lm, base, float_type, read_merge_log(self.lm.source.get("model_dir"))
            )
            self._made = (base, float_type, ref_path)
        return self._made

    def matrix(self) -> Path:
        """The unmerged model's importance matrix (cached by ``imatrix_for``'s key), made on first use."""
        from mka_edge.exporters.imatrix import ensure_imatrix, imatrix_key

        if self._keyed is None:
            self._keyed = imatrix_key(self.lm, self.calibration)
        return ensure_imatrix(self.lm, self._keyed, self.progress)

    def q8_0(self) -> Path:
        """The unmerged model as Q8_0, quantized once for this plan: the speed calibration, the
        cache-mode probe and the Q8_0 probe all run this one file."""
        base, _, _ = self.base()
        art = Path(self._tmp.name) / "Q8_0.gguf"
        if not art.is_file():
            quantize(base, art, quant_type("Q8_0").ftype, self.threads, None)
        return art

    def calibrate(self) -> Efficiency:
        """Host decode speed of a Q8_0 file (the speed model's efficiency), without measuring its KL.
        Once per host and model: a process that waited for another's calibration (or a later plan)
        is handed the one recorded."""
        with entry_lock(self.folder / "speed-calibration", "the host's speed calibration"):
            if calibrated("gguf", self.lm.fingerprint):
                return efficiency("gguf", self.lm.fingerprint)
            _, _, ref_path = self.base()
            art = self.q8_0()
            return _calibrate_speed(art, tensor_bytes_split(art), ref_path, self.threads, self.lm.fingerprint)

    def measure(self, quants: list[str]) -> dict[str, dict]:
        """The entries of ``quants`` (see ``probe``), from the cache or measured now."""
        keys = {q: self._key(q) for q in quants}
        results, missing = cached_entries(self.folder, "", keys)
        if not missing:
            return results
        lm = self.lm
        with entry_lock(self.folder / f"probe-{lm.fingerprint[:20]}", "the quant probe of this model"):
            results, missing = cached_entries(self.folder, "", keys)  # measured while this process waited?
            if not missing:
                return results
            from mka_edge.exporters.imatrix import ensure_imatrix

            base, float_type, ref_path = self.base()
            tmp = Path(self._tmp.name)
            matrix = ensure_imatrix(lm, self._keyed, self.progress) if any(self._helps(q) for q in missing) else None
            for q in tqdm(missing, desc="measuring quant types", disable=not self.progress, leave=False):
                qt = quant_type(q)
                plain = imat = None
                art = base if q == float_type else (self.q8_0() if q == "Q8_0" else tmp / f"{q}.gguf")
                if not qt.needs_imatrix and (self.plain_too or not self._helps(q)):
                    plain = _measure(lm, base, art, q, float_type, ref_path, self.threads, None)
                    self.runs += 1
                if self._helps(q):
                    art = tmp / f"{q}-imatrix.gguf"
                    imat = _measure(lm, base, art, q, float_type, ref_path, self.threads, matrix)
                    self.runs += 1
                use_imatrix = imat is not None and (plain is None or imat["kl"] < plain["kl"])
                res = {**(imat if use_imatrix else plain), "imatrix": use_imatrix}
                if plain is not None:  # absent: a type that needs a matrix has no plain figure
                    res["kl_plain"] = plain["kl"]
                if imat is not None:  # absent: a type that ignores one was measured plainly only
                    res["kl_imatrix"] = imat["kl"]
                res["measured_on"] = f"{self.chunks} x 512 held-out tokens"
                atomic_write_text(self.folder / f"{q}-{keys[q][:20]}.json", json.dumps(res))
                results[q] = res
                chosen = art if use_imatrix else (self.q8_0() if q == "Q8_0" else tmp / f"{q}.gguf")
                if self.retain and not qt.direct and chosen.is_file():
                    facts = {
                        "quant": qt.name,
                        "tokenizer": self._tokenizer,
                        "intermediate": float_type,
                        "imatrix": imatrix_provenance(matrix) if use_imatrix else None,
                        "model": lm.fingerprint,
                    }
                    self.kept[q] = (chosen, facts)
                kept = self.kept[q][0] if q in self.kept else None
                for f in (tmp / f"{q}.gguf", tmp / f"{q}-imatrix.gguf"):
                    if f not in (base, kept) and q != "Q8_0":  # the Q8_0 file stays for the session's other uses
                        f.unlink(missing_ok=True)
        return results

    def retain_only(self, quant: str | None) -> None:
        """Drop every kept file but ``quant``'s (the type of the best plan so far that merges
        nothing): at most one measured file waits beside the one being measured."""
        for q in [q for q in self.kept if q != quant]:
            path, _ = self.kept.pop(q)
            if q != "Q8_0":
                path.unlink(missing_ok=True)

    def hand_over(self, quant: str, folder: Path) -> Path | None:
        """Move ``quant``'s kept file to ``folder`` (``<quant>.gguf``, its making in ``<quant>.json``)
        for the build's export (exporters.gguf.adopt_quantized); None when it was not measured
        here (a cached entry has no file)."""
        if quant not in self.kept:
            return None
        path, facts = self.kept.pop(quant)
        folder = Path(folder)
        folder.mkdir(mode=0o700, exist_ok=True)  # the build names it; the first hand-over makes it
        dest = folder / f"{quant}.gguf"
        shutil.move(str(path), dest)
        atomic_write_text(folder / f"{quant}.json", json.dumps(facts))
        return dest


def probe(
    lm,
    quants: list[str],
    chunks: int = 2,
    threads: int = 2,
    progress: bool = True,
    imatrix: bool = True,
    calibration: str | None = None,
    plain_too: bool = True,
) -> dict[str, dict]:
    """{quant: {'per_layer': [...], 'other': B, 'kl': nats, 'top1': .., 'tensor_types': {...},
    'imatrix': bool, 'kl_plain': .., 'kl_imatrix': ..}}.

    A type llama.cpp quantizes better with an importance matrix (``QuantType.imatrix_helps``) is
    measured both ways (``imatrix``; the matrix from ``calibration``, cached by ``imatrix_for``):
    ``kl_plain`` and ``kl_imatrix`` are both kept, and the entry (bytes, kl, top1, ppl, types) is
    the better one, ``imatrix`` saying which (what a build quantizes with).  A type that needs a
    matrix is measured with it only (no ``kl_plain``); one that ignores it plainly only (no
    ``kl_imatrix``).  ``plain_too`` False: a type a matrix helps is measured with it only."""
    with ProbeSession(lm, chunks, threads, progress, imatrix, calibration, plain_too) as session:
        return session.measure(quants)
