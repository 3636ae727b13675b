"""`mka-edge eval`: quality of a model against its reference, in the one definition we use."""

from __future__ import annotations

from .calibration import heldout_chunks
from .device import resolve_device
from .errors import UserError
from .merge_log import read_merge_log
from .models.loading import load_model
from .quality import Reference, compare, mmlu


def default_reference(model_spec: str | None) -> str | None:
    """The source recorded in a merged directory's merge_log.json, if any."""
    log = read_merge_log(model_spec)
    return log.source_spec() if log is not None else None


def evaluate(model_spec, reference_spec, n_chunks: int, mmlu_per_subject: int, device: str) -> dict:
    dev = resolve_device(device)
    ref_spec = reference_spec or default_reference(model_spec) or model_spec
    lm = load_model(model_spec, dev)
    ref = lm if ref_spec == model_spec else load_model(ref_spec, dev)
    if lm.model.config.vocab_size != ref.model.config.vocab_size or len(lm.tokenizer) != len(ref.tokenizer):
        raise UserError(
            f"model and reference have different vocabularies ({len(lm.tokenizer)} vs {len(ref.tokenizer)} tokens); pick the reference it was made from"
        )
    if n_chunks < 1:
        raise UserError("--heldout-chunks must be at least 1")
    chunks = heldout_chunks(lm.tokenizer, n_chunks)
    res = {
        "model": model_spec or "smollm2-135m",
        "reference": ref_spec or "smollm2-135m",
        "layers": lm.num_layers,
        "reference_layers": ref.num_layers,
        "heldout": compare(lm.model, Reference(ref.model, chunks, dev), progress=True).as_dict(),
    }
    if mmlu_per_subject > 0:
        res.update(mmlu(lm.model, lm.tokenizer, dev, mmlu_per_subject, progress=True))
    return res
