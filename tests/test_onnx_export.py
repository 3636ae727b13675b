"""ONNX export on tiny random models, run in onnxruntime and onnxruntime-genai (fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny


def _torch_logprobs(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy(), model


def _onnx_logprobs(folder, ids):
    from mka_edge.validate.metrics import log_softmax
    from mka_edge.validate.onnx_worker import Decoder

    return log_softmax(Decoder(str(folder), 2).logits(ids))


def _kl(p, q):
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def ids():
    return [int(i) for i in np.random.default_rng(0).integers(3, 400, size=96)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama3-rope", "llama-bias"])
def test_fp32_export_matches_pytorch(tmp_path, arch, ids):
    from test_gguf_export import _variant

    from mka_edge.exporters.onnx import export_onnx

    src = _variant(tmp_path, arch)
    out = tmp_path / f"{arch}-onnx"
    info = export_onnx(str(src), out, "fp32", progress=False)
    assert info["block_count"] == 3 and info["quant"] == "fp32" and not info["quantized_ops"]
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "mka_edge.json"} <= set(
        info["files"]
    )
    # a KV-cache decoder: past key/values in, present key/values out
    assert (
        any(n.startswith("past_key_values.") for n in json.dumps(info["inputs"]).split('"'))
        or json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["inputs"]["past_key_names"]
    )
    ref, _ = _torch_logprobs(src, ids)
    kl = _kl(ref, _onnx_logprobs(out, ids))
    assert kl < 1e-5, kl
    assert (ref.argmax(-1) == _onnx_logprobs(out, ids).argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_merged_models_export(tmp_path, arch, ids):
    """A fused (not just removed) layer exports: the ONNX model is the merged PyTorch model."""
    from conftest import tiny_context

    from mka_edge.exporters.onnx import export_onnx
    from mka_edge.merging import merge

    src = make_tiny(tmp_path / arch, arch, layers=5, seed=11)
    merged = tmp_path / "merged"
    log = merge(tiny_context(src), 2, "mka-guided", "0.5", merged, heldout=0, progress=False)
    assert any(len(m["sources"]) > 1 for m in log["layer_map"])  # a real fusion
    info = export_onnx(str(merged), tmp_path / "onnx", "fp32", progress=False)
    assert info["block_count"] == 3 and info["provenance"]["merge_layers"] == 2
    assert info["provenance"]["layer_map"] == log["layer_map"]
    ref, _ = _torch_logprobs(merged, ids)
    assert _kl(ref, _onnx_logprobs(tmp_path / "onnx", ids)) < 1e-5


def test_kv_cache_decoding_matches_full_sequence(tmp_path, ids):
    """Feeding the prompt, then one token at a time through past/present, gives the logits of one
    full pass: the exported cache plumbing is right."""
    from mka_edge.exporters.onnx import export_onnx
    from mka_edge.validate.onnx_worker import Decoder

    src = make_tiny(tmp_path / "llama", "llama", layers=3, seed=4)
    out = tmp_path / "onnx"
    export_onnx(str(src), out, "fp32", progress=False)
    dec = Decoder(str(out), 2)
    full = dec.logits(ids)
    feeds = dec.feeds(ids[:64])
    res = dec.session.run(None, feeds)
    names = [o.name for o in dec.session.get_outputs()]
    steps = [res[0][0, -1]]
    for t in range(64, len(ids)):
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, res) if n.startswith("present.")}
        f = {
            "input_ids": np.array([[ids[t]]], dtype=np.int64),
            "attention_mask": np.ones((1, t + 1), dtype=np.int64),
            **past,
        }
        res = dec.session.run(None, f)
        steps.append(res[0][0, -1])
    np.testing.assert_allclose(np.stack(steps), full[63:], atol=1e-4)


def test_genai_greedy_equals_pytorch_greedy(tmp_path):
    from mka_edge.exporters.onnx import export_onnx
    from mka_edge.validate.jobs import GreedyJob
    from mka_edge.validate.runner import run_child

    src = make_tiny(tmp_path / "llama", "llama", layers=3, seed=5)
    out = tmp_path / "onnx"
    export_onnx(str(src), out, "fp32", progress=False)
    prompts = [[1, 17, 42, 99, 7], [1, 250, 3, 3, 8, 120, 64]]
    got = run_child(
        "mka_edge.validate.onnx_worker",
        GreedyJob(str(out), 2, prompts=prompts, new_tokens=12),
        300,
        "greedy",
    )["tokens"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = model.generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(p) :].tolist()
        assert g == want[: len(g)] and len(g) >= 1, (g, want)


@pytest.mark.parametrize("quant,bits", [("int8", 8), ("int4", 4), ("fp16", None)])
def test_reduced_precision_exports_run_and_lose_a_little(tmp_path, quant, bits, ids):
    from mka_edge.exporters.onnx import export_onnx
    from mka_edge.validate.jobs import GreedyJob
    from mka_edge.validate.runner import run_child

    src = make_tiny(tmp_path / "llama", "llama", layers=3, seed=6)
    out = tmp_path / quant
    info = export_onnx(str(src), out, quant, progress=False)
    if bits:
        assert info["quantized_ops"].get(f"MatMulNBits {bits}-bit", 0) >= 3 * 4  # qkv, o, gate/up, down per layer
    else:
        assert not info["quantized_ops"] and "FLOAT16" in info["weight_bytes_by_dtype"]
    ref, _ = _torch_logprobs(src, ids)
    kl = _kl(ref, _onnx_logprobs(out, ids))
    assert 1e-12 < kl < (1e-3 if quant == "fp16" else 0.5), kl
    # and onnxruntime-genai runs it on the CPU (fp16's graph is built for GPUs, providers cleared)
    got = run_child(
        "mka_edge.validate.onnx_worker",
        GreedyJob(str(out), 2, prompts=[ids[:8]], new_tokens=4),
        300,
        "greedy",
    )["tokens"]
    assert len(got[0]) == 4


def test_single_file_embeds_weights_and_large_models_are_refused(tmp_path, ids):
    from mka_edge.errors import UserError
    from mka_edge.exporters.onnx import check_single_file, export_onnx, onnx_quant

    src = make_tiny(tmp_path / "llama", "llama", layers=2, seed=7)
    out = tmp_path / "one"
    info = export_onnx(str(src), out, "fp32", single_file=True, progress=False)
    assert "model.onnx.data" not in info["files"] and info["weight_bytes"] > 0
    assert _kl(_torch_logprobs(src, ids)[0], _onnx_logprobs(out, ids)) < 1e-6
    with pytest.raises(UserError, match="2 GB limit"):
        check_single_file(int(8e9), onnx_quant("fp32"))
    with pytest.raises(UserError, match="2 GB limit"):
        check_single_file(int(8e9), onnx_quant("int4"))  # ~4.2 GiB even at 4 bits
    check_single_file(int(1e9), onnx_quant("int8"))  # ~1 GiB fits


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from mka_edge.errors import UserError
    from mka_edge.exporters.onnx import export_loaded_onnx
    from mka_edge.models.loading import load_model

    src = make_tiny(tmp_path / "llama", "llama", layers=2, seed=8)
    lm = load_model(str(src))
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    lm.source["model_dir"] = str(broken)
    out = tmp_path / "dest" / "onnx"
    with pytest.raises(UserError, match="ONNX builder failed"):
        export_loaded_onnx(lm, out, "fp32", progress=False)
    assert not out.exists() and list((tmp_path / "dest").iterdir()) == []


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=dict(os.environ), timeout=600
    )


def test_export_and_validate_refuse_bad_input(tmp_path):
    src = make_tiny(tmp_path / "llama", "llama", layers=2, seed=9)
    good = tmp_path / "good"
    r = _cli("export", "--format", "onnx", "--model", str(src), "--quant", "fp32", "--out", str(good))
    assert r.returncode == 0, r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    with open(truncated / "model.onnx.data", "r+b") as fh:
        fh.truncate(1000)
    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    (garbage / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf" * 10)
    cases = [
        (
            ["export", "--format", "onnx", "--model", str(src), "--quant", "Q4_K_M", "--out", str(tmp_path / "x")],
            "unknown ONNX quant type 'Q4_K_M'",
        ),
        (
            ["export", "--format", "onnx", "--model", str(src), "--quant", "int8", "--out", str(busy)],
            "not an mka-edge ONNX export",
        ),
        (["export", "--format", "onnx", "--model", str(src), "--out", str(tmp_path / "m.onnx")], "must be a folder"),
        (["validate", str(truncated), "--reference", str(src)], "truncated"),
        (["validate", str(garbage), "--reference", str(src)], "fails to load as ONNX"),
        (["validate", str(tmp_path / "nowhere"), "--reference", str(src)], "does not exist"),
        (
            ["validate", str(good), "--reference", str(src), "--profile", "laptop-8gb"],
            "profile laptop-8gb runs llama.cpp",
        ),
    ]
    for args, needle in cases:
        r = _cli(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (busy / "mine.txt").read_text() == "keep" and not (tmp_path / "x").exists()


def test_validate_runs_an_onnx_export(tmp_path):
    from mka_edge.validate.checks import Thresholds
    from mka_edge.validate.core import validate_artifact

    src = make_tiny(tmp_path / "llama", "llama", layers=2, seed=10)
    out = tmp_path / "onnx"
    from mka_edge.exporters.onnx import export_onnx

    export_onnx(str(src), out, "int8", progress=False)
    from mka_edge.errors import UserError

    with pytest.raises(UserError, match="longer than the model's context length"):
        validate_artifact(out, None, context=1024, progress=False)
    r = validate_artifact(
        out,
        None,
        context=512,
        repeats=1,
        chunks=1,
        mmlu_per_subject=0,
        prompt_tokens=64,
        gen_tokens=8,
        thresholds=Thresholds(max_kld=1e-9),
        progress=False,
    )
    assert r["format"] == "onnx" and r["reference"]["model"] == str(src)  # reference read from provenance
    assert 0 < r["accuracy"]["kl"] and r["latency"]["gen_tps"]["median"] > 0 and r["latency"]["peak_rss_mb"] > 50
    assert not r["passed"] and r["checks"][0]["check"].startswith("mean KL")  # an impossible bar fails
    assert (out.parent / "onnx-validation" / "validation.md").read_text().startswith("# Validation of `onnx`")
