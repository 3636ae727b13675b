"""The reference a hidden state wide (mka/engine.py): KL(p || q) = sum p log p - h . W^T p - b . p
+ logsumexp(W h + b) for a linear head, against the vocabulary-wide computation in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def _truth(head: nn.Linear, h_ref: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    w = head.weight.double()
    b = head.bias.double() if head.bias is not None else 0.0
    lp = torch.log_softmax(h_ref.double() @ w.T + b, -1)
    lq = torch.log_softmax(h.double() @ w.T + b, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize(
    "dtype,bias,scale", [(torch.float32, True, 1.0), (torch.bfloat16, False, 1.0), (torch.float32, False, 40.0)]
)
def test_the_identity_matches_the_full_kl(dtype, bias, scale):
    """A head with a bias, a bf16 head (its logits widened to float32), and logits so spread that
    most tokens' probability is 0 in float32 (0 log 0 must count 0, not NaN)."""
    from mka_edge.mka.engine import head_logits, kl_by_identity, reference_terms

    g = torch.Generator().manual_seed(0)
    head = nn.Linear(64, 3000, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3000, 64, generator=g) * 0.3 * scale)
    head = head.to(dtype)
    h_ref = torch.randn(50, 64, generator=g).to(dtype)
    h = (h_ref.float() + 0.3 * torch.randn(50, 64, generator=g)).to(dtype)
    negent, u, pb = reference_terms(head, torch.log_softmax(head_logits(head, h_ref), -1))
    got = kl_by_identity(head, h, negent, u, pb)
    want = _truth(head, h_ref, h)
    assert torch.isfinite(got).all()
    assert float(got.mean()) == pytest.approx(float(want.mean()), rel=2e-4, abs=1e-5), (got.mean(), want.mean())


def test_a_model_with_its_own_head_is_scored_like_the_reference_itself(tiny_dir):
    """``quality.compare``: the same model object takes the identity, a copy (its head another
    tensor, as a healed student's) the log-probs rebuilt from the stored hidden states; both give
    the same figures, and KL 0 against itself."""
    from mka_edge.calibration import heldout_chunks
    from mka_edge.models.loading import load_model
    from mka_edge.quality import Reference, compare

    lm = load_model(str(tiny_dir))
    chunks = heldout_chunks(lm.tokenizer, 1)[:, :128]
    ref = Reference(lm.model, chunks, torch.device("cpu"))
    assert ref.by_identity
    same = compare(lm.model, ref).as_dict()
    other = copy.deepcopy(lm.model)
    assert not ref.same_head(other.get_output_embeddings())
    copied = compare(other, ref).as_dict()
    assert same["kl"] == pytest.approx(0.0, abs=1e-5) and copied["kl"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    changed = compare(other, ref).as_dict()
    assert changed["kl"] > 1e-4 and changed["ppl"] != same["ppl"] and changed["ref_ppl"] == same["ref_ppl"]
