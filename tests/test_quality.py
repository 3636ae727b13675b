import torch

from mka_edge.calibration import heldout_chunks
from mka_edge.models.loading import load_model
from mka_edge.quality import Reference, compare, mmlu, mmlu_questions, wilson


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tiny_dir):
    lm = load_model(str(tiny_dir))
    chunks = heldout_chunks(lm.tokenizer, 2)
    q = compare(lm.model, Reference(lm.model, chunks, torch.device("cpu")))
    assert abs(q.kl) < 1e-6 and q.top1 == 1.0 and abs(q.ppl_change_pct) < 1e-6
    other = load_model(str(tiny_dir))
    with torch.no_grad():
        other.model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    q2 = compare(other.model, Reference(lm.model, chunks, torch.device("cpu")))
    assert q2.kl > 1e-4 and q2.top1 < 1.0


def test_wilson_interval_and_mmlu_subset():
    lo, hi = wilson(25, 100)
    assert 0.17 < lo < 0.25 < hi < 0.35
    qs = mmlu_questions(2)
    assert len(qs) == 2 * 57 and len({q["subject"] for q in qs}) == 57
    assert all(q["answer"] in range(4) and len(q["choices"]) == 4 for q in qs)


def test_mmlu_runs_and_reports_chance(tiny_dir):
    lm = load_model(str(tiny_dir))
    res = mmlu(lm.model, lm.tokenizer, torch.device("cpu"), per_subject=1)
    for name in ("mmlu", "mmlu_cloze"):
        assert res[name]["n"] == 57 and res[name]["chance"] == 0.25
        lo, hi = res[name]["ci95"]
        assert lo <= res[name]["accuracy"] <= hi


def test_reference_is_fixed_when_the_model_object_changes_afterwards(tiny_dir):
    lm = load_model(str(tiny_dir))
    chunks = heldout_chunks(lm.tokenizer, 1)
    ref = Reference(lm.model, chunks, torch.device("cpu"))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(4.0)
    assert compare(lm.model, ref).kl > 1e-4
