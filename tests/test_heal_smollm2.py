"""Integration: a short heal of a merged SmolLM2 lowers its held-out KL to the original."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_short_heal_of_merged_smollm2_lowers_heldout_kl(tmp_path, merged_smollm2):
    from mka_edge.heal.distill import HealConfig, heal

    rec = heal(
        str(merged_smollm2),
        tmp_path / "healed",
        HealConfig(steps=4, batch=2, seq_len=96, heldout_chunks=1),
        progress=False,
        log=lambda m: None,
    )
    b, a = rec["heldout_before"], rec["heldout_after"]
    print(
        "SmolLM2 shortgpt K=3, 4 heal steps:",
        b["kl"],
        "->",
        a["kl"],
        "ppl",
        b["ppl"],
        "->",
        a["ppl"],
        f"{rec['seconds_per_step']:.2f} s/step",
    )
    assert rec["resumed_from"] == 0 and rec["trainable_params"] > 1e8
    assert a["kl"] < b["kl"] and a["ppl"] < b["ppl"]
