"""Integration: merged SmolLM2 exported to ONNX (fp32, int8), run in onnxruntime and
onnxruntime-genai, checked against PyTorch and validated."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from gguf_helpers import kl_top1, torch_logprobs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exports(merged_smollm2, tmp_path_factory):
    from mka_edge.exporters.onnx import export_loaded_onnx
    from mka_edge.models.loading import load_model

    root = tmp_path_factory.mktemp("onnx")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mka_edge.cli",
            "export",
            "--format",
            "onnx",
            "--quant",
            "fp32",
            "--model",
            str(merged_smollm2),
            "--context",
            "2048",
            "--out",
            str(root / "fp32"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lm = load_model(str(merged_smollm2))
    export_loaded_onnx(lm, root / "int8", "int8", context=2048, progress=False)
    return {"fp32": root / "fp32", "int8": root / "int8", "lm": lm}


@pytest.fixture(scope="module")
def heldout_ids():
    from mka_edge.calibration import heldout_chunks
    from mka_edge.models.loading import load_model

    return heldout_chunks(load_model(None).tokenizer, 1)[0].tolist()


def test_merged_smollm2_onnx_matches_pytorch(exports, heldout_ids):
    from mka_edge.exporters.onnx_inspect import inspect_onnx
    from mka_edge.validate.jobs import GreedyJob
    from mka_edge.validate.metrics import log_softmax
    from mka_edge.validate.onnx_worker import Decoder
    from mka_edge.validate.runner import run_child

    lm = exports["lm"]
    ref = torch_logprobs(lm.model, heldout_ids)
    measured = {}
    for quant in ("fp32", "int8"):
        info = inspect_onnx(exports[quant])
        assert info["block_count"] == 27 and info["provenance"]["merge_layers"] == 3 and info["context"] == 2048
        assert info["provenance"]["source"] == "smollm2-135m"
        measured[quant] = kl_top1(ref, log_softmax(Decoder(str(exports[quant]), 2).logits(heldout_ids)))
    print("merged SmolLM2 ONNX vs PyTorch (KL nats, top-1):", measured)
    assert measured["fp32"][0] < 1e-3 and measured["fp32"][1] > 0.99  # the fidelity bound
    assert measured["fp32"][0] < measured["int8"][0] < 0.05 and measured["int8"][1] > 0.85
    # greedy generation in onnxruntime-genai = PyTorch's, token for token
    tok = lm.tokenizer
    prompts = ["The capital of France is", "In 1905, Albert Einstein published", "A recipe for bread needs"]
    ids = [tok(p)["input_ids"] for p in prompts]
    got = run_child(
        "mka_edge.validate.onnx_worker",
        GreedyJob(str(exports["fp32"]), 2, prompts=ids, new_tokens=16),
        600,
        "greedy",
    )["tokens"]
    for p, g in zip(ids, got):
        with torch.no_grad():
            want = lm.model.generate(
                torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id
            )[0, len(p) :].tolist()
        assert g == want[: len(g)] and len(g) >= min(len(want), 1), (tok.decode(g), tok.decode(want))


def test_validate_merged_onnx_exports(exports):
    from mka_edge.validate.checks import Thresholds
    from mka_edge.validate.core import validate_artifact

    res = {}
    for quant in ("fp32", "int8"):
        r = validate_artifact(
            exports[quant],
            None,
            context=2048,
            repeats=1,
            chunks=1,
            mmlu_per_subject=0,
            thresholds=Thresholds(max_kld=3.0),
            progress=False,
        )
        assert r["passed"] and r["reference"]["model"] == "smollm2-135m" and r["artifact"]["block_count"] == 27
        assert r["latency"]["gen_tps"]["median"] > 0 and r["latency"]["peak_rss_mb"] > r["latency"]["baseline_rss_mb"]
        res[quant] = r
    # against the unmerged original: the merge's loss, plus a little for int8
    kl32, kl8 = res["fp32"]["accuracy"]["kl"], res["int8"]["accuracy"]["kl"]
    assert 0.01 < kl32 < kl8 < kl32 + 0.1, (kl32, kl8)
    # int8 weights are a fraction of fp32's
    assert res["int8"]["artifact"]["weight_bytes"] < 0.6 * res["fp32"]["artifact"]["weight_bytes"]
