"""llama.cpp files for per-tensor types (issue 25): the whole model requested at one ggml type (the
sensitivity table's inputs), a mix of per-tensor types written in one quantize call, and the KL
of any such file against the probe's reference.

A request goes through llama.cpp's own quantizer as ``tt_overrides`` on the Q8_0 file type (no
``_M`` mix rules: every 2-D weight gets what the override asks, or llama.cpp's fallback where
its rows cannot take it, which the written file shows).  The importance matrix is passed
whenever there is one: llama.cpp uses it for the types that take one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from mka_edge.exporters.llama_quantize import quantize, tensor_pattern
from mka_edge.exporters.quant_types import quant_type

from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..validate.jobs import AccuracyJob
from ..validate.runner import run_child
from ..validate.workers import GGUF_WORKER as WORKER
from .quant_probe import tensor_bytes_split
from .tensor_sensitivity import Sensitivity, add_type, empty_table, tensor_scales

# the ggml types a tensor may take, most bits first: the K-quants (256-wide blocks; llama.cpp falls
# back on rows they cannot take) and the 32-wide ones every row takes
CANDIDATES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0", "Q3_K", "Q2_K")
CARRIER = "Q8_0"  # the file type the overrides ride on: no mix rules of its own
CALIBRATE = "Q4_0"  # the low type each tensor kind is calibrated at (every row takes it)
SENSITIVITY_VERSION = 2  # 2: the attention sub-block's fixed bytes per layer


def write_types(base: Path, art: Path, types: dict[str, str], matrix: Path | None, threads: int = 2) -> Path:
    """``base`` quantized with each named tensor at its type (tensor -> ggml type) in one call."""
    overrides = {tensor_pattern(name): t for name, t in types.items()}
    quantize(base, art, quant_type(CARRIER).ftype, threads, matrix, overrides=overrides)
    return art


def write_request(base: Path, art: Path, ggml_type: str, matrix: Path | None, threads: int = 2) -> Path:
    """``base`` with every weight requested at ``ggml_type``."""
    quantize(base, art, quant_type(CARRIER).ftype, threads, matrix, overrides={r"\.weight$": ggml_type})
    return art


def measure_file(art: Path, ref_path: Path, threads: int = 2) -> dict:
    """KL, top-1 and perplexity of ``art`` against the reference, and its tensor bytes."""
    acc = run_child(WORKER, AccuracyJob(str(art), threads, reference=str(ref_path)), 3600, f"KL of {art.name}")
    split = tensor_bytes_split(art)
    return {
        "kl": acc["kl"],
        "top1": acc["top1"],
        "ppl": acc["ppl"],
        "tensor_bytes": sum(split["per_layer"]) + split["other"],
    }


# the ggml types a mixed plan may give a tensor: quantized, at most Q8_0's bits (Q8_0 is the floor
# every prediction starts from), and ones llama.cpp's quantizer writes for any weight (with the
# importance matrix, which a mixed plan always passes)
ALLOWED = (*CANDIDATES, "Q5_1", "Q4_1", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS")


def bits(t: str) -> float:
    """Nominal bits per weight of a ggml type (gguf-py's block sizes)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    return 8.0 * size / block


def check_types(types: tuple[str, ...]) -> tuple[str, ...]:
    """The candidate types of a mixed plan, checked and sorted most bits first: known types, the
    carrier among them (the floor) and at least one lower."""
    from ..errors import UserError

    out = tuple(dict.fromkeys(t.strip().upper() for t in types if t.strip()))
    bad = [t for t in out if t not in ALLOWED]
    if bad:
        raise UserError(f"--mixed-types: {', '.join(bad)} not allowed; choose from {', '.join(ALLOWED)}")
    if CARRIER not in out or len(out) < 2:
        raise UserError(
            f"--mixed-types must include {CARRIER} (the floor) and at least one lower type (got {','.join(out)})"
        )
    return tuple(sorted(out, key=lambda t: (-bits(t), ALLOWED.index(t))))


def sensitivity(session, types: tuple[str, ...] = CANDIDATES, *, progress: bool = True, log=print) -> Sensitivity:
    """The per-tensor costs of the session's unmerged model at ``types`` (issue 25), cached by
    model fingerprint, importance matrix, reference and types: one quantize-and-read per type
    (every weight requested at it), the all-``CARRIER`` file's KL, and one KL per tensor kind at
    the calibration type (``tensor_sensitivity.tensor_scales``).  About 2 min on SmolLM2 with
    three types, 7 with the nine ``CANDIDATES``."""
    from mka_edge.exporters.imatrix import read_imatrix

    types = check_types(types)
    low = CALIBRATE if CALIBRATE in types else types[-1]  # else the fewest bits (check_types sorts)
    matrix = session.matrix()
    key = stable_hash(
        {
            "model": session.lm.fingerprint,
            "types": list(types),
            "calibrate": low,
            "imatrix": matrix.name,
            "chunks": session.chunks,
            "v": SENSITIVITY_VERSION,
        }
    )
    path = cache_root() / "tensor_sensitivity" / f"{key[:24]}.json"
    if path.is_file():
        return Sensitivity.from_json(json.loads(path.read_text()))
    with entry_lock(path, "the per-tensor sensitivity of this model"):
        if path.is_file():  # measured while this process waited
            return Sensitivity.from_json(json.loads(path.read_text()))
        log(f"measuring per-tensor sensitivity ({len(types)} types; cached after the first plan)")
        base, _, ref = session.base()
        importance = read_imatrix(matrix)[0]
        table = empty_table(base)
        kinds = sorted({r.kind for r in table.values()})
        bar = tqdm(total=len(types) + len(kinds) + 1, desc="per-tensor sensitivity", disable=not progress, leave=False)
        with tempfile.TemporaryDirectory(prefix="mka-edge-sensitivity-") as tmp:
            tmp = Path(tmp)
            floor_kl, fixed = None, None
            for q in types:
                art = write_request(base, tmp / f"req-{q}.gguf", q, matrix, session.threads)
                add_type(table, base, q, art, importance)
                if q == CARRIER:  # the floor: its KL, and the bytes no allocation changes
                    m = measure_file(art, ref, session.threads)
                    floor_kl = m["kl"]
                    fixed = _fixed_bytes(art, table)
                    bar.update(1)
                art.unlink()
                bar.update(1)
            isolated = {}
            for kind in kinds:
                mix = {n: (low if r.kind == kind else CARRIER) for n, r in table.items()}
                art = write_types(base, tmp / f"cal-{kind}.gguf", mix, matrix, session.threads)
                isolated[kind] = (low, measure_file(art, ref, session.threads)["kl"])
                art.unlink()
                bar.update(1)
        bar.close()
        floor = (CARRIER, float(floor_kl))
        sens = Sensitivity(table, tensor_scales(table, isolated, floor), floor, low, *fixed)
        atomic_write_text(path, json.dumps(sens.to_json()))
    return sens


def _fixed_bytes(art: Path, table) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Bytes of the tensors outside the allocation (1-D norms, biases) per layer and outside the
    layers: the file's split minus the 2-D weights at the carrier type; and per layer the part of
    them in its attention sub-block (``attn_norm``, q/k/v biases), which a layer kept without
    attention does not hold (``exporters/gguf_deci.drops_tensor``)."""
    import gguf

    from .tensor_sensitivity import kind_of

    split = tensor_bytes_split(art)
    per = [int(b) for b in split["per_layer"]]
    other = int(split["other"])
    for r in table.values():
        if r.layer is None:
            other -= r.bytes[CARRIER]
        else:
            per[r.layer] -= r.bytes[CARRIER]
    attn = [0] * len(per)
    for t in gguf.GGUFReader(str(art)).tensors:
        if t.name in table:
            continue
        kind, layer = kind_of(t.name.replace(".bias", ".weight"))
        if layer is not None and kind.startswith("attn_"):
            attn[layer] += int(t.n_bytes)
    return tuple(per), other, tuple(attn)
