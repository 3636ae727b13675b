"""Attention-only removal on the real model: SmolLM2 through `mka-edge merge --method sleb-attn`
(small calibration), the folder loaded by plain transformers, exported as llama.cpp's `deci`
GGUF and run in llama.cpp against the merged model in PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gguf_helpers import kl_top1, llama_logprobs, torch_logprobs

pytestmark = pytest.mark.integration


def test_sleb_attn_on_smollm2_exports_as_deci_and_matches_pytorch(tmp_path):
    from transformers import AutoModelForCausalLM

    from mka_edge.exporters.gguf_inspect import inspect_gguf
    from mka_edge.models.attention_removal import attention_removed

    out = tmp_path / "attn"
    small = ["--samples", "8", "--seq-len", "128", "--positions", "128", "--repeats", "2", "--loss-samples", "2"]
    cmd = [sys.executable, "-m", "mka_edge.cli", "merge", "-k", "3", "--method", "sleb-attn", *small]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((out / "merge_log.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no remote code
    gone = attention_removed(model.config)
    assert log.get("attention_removed", []) == gone
    assert gone, "sleb-attn took no attention unit in 3 steps on SmolLM2 (it took attention first at full size)"
    for i in gone:
        assert not model.model.layers[i].self_attn.o_proj.weight.any()

    art = tmp_path / "attn-q8.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", "export", "--quant", "Q8_0", "--model", str(out), "--out", str(art)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = inspect_gguf(art)
    assert info["architecture"] == "deci" and info["attention_removed"] == gone
    assert info["block_count"] == model.config.num_hidden_layers
    ids = list(range(100, 164))
    kl, top1 = kl_top1(torch_logprobs(model, ids), llama_logprobs(art, ids))
    assert kl < 0.02 and top1 > 0.8, (kl, top1)  # Q8_0 noise on 64 arbitrary ids (0.0074, 0.89 measured)
