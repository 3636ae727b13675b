"""The user's own command at a tiny width and the real vocabulary (issue 23 item 6): a random model
with Llama-3-8B's config but narrow layers, a Llama-3-style byte-level BPE of 128,256 tokens,
bf16 safetensors in the Hugging Face cache layout, reached offline by hub id through a recipe,
built end to end (plan, merge, BF16 intermediate, quantize, validate in llama.cpp, package), once
with nothing merged and once with a merge the budget forces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hub_cache, predicted_memory_mb

from mka_edge.models.synthetic import LLAMA3_8B_CONFIG, llama3_style_tokenizer, make_llama3_shaped

HUB_ID = "mka-test/llama3-shaped-tiny"
LAYERS = 6


@pytest.fixture(scope="module")
def llama3_hub(tmp_path_factory) -> dict:
    """The model in a hub cache, a recipe naming it by hub id and a profile without a speed bar."""
    root = tmp_path_factory.mktemp("llama3")
    src = make_llama3_shaped(
        root / "src",
        num_hidden_layers=LAYERS,
        hidden_size=128,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=2,
        seed=5,
    )
    snap = hub_cache(root / "hf", HUB_ID, src)
    recipe = root / "llama3-tiny.yaml"
    recipe.write_text(
        f"name: llama3-tiny\nsource:\n  kind: hub\n  hub_id: {HUB_ID}\narchitecture: llama\n"
        "llama_cpp:\n  pre_tokenizer: llama-bpe\n"
    )
    profile = root / "laptop.yaml"
    profile.write_text(
        "name: laptop-test\nmemory_mb: 8192\nreserve_mb: 4096\nbandwidth_gbps: 51.2\nruntime: llama.cpp\n"
        "context_length: 1024\nkv_cache_type: f16\nflash_attention: false\nthreads: 2\nmin_tokens_per_s: 0\n"
        "max_quality_loss: 50\n"
    )
    return {"root": root, "src": src, "snap": snap, "recipe": recipe, "profile": profile}


def test_the_llama3_style_tokenizer_has_the_real_size_and_specials():
    tok = llama3_style_tokenizer()
    assert len(tok) == LLAMA3_8B_CONFIG["vocab_size"] == 128_256
    assert tok.convert_tokens_to_ids("<|begin_of_text|>") == 128_000
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128_009
    ids = tok("The river flows 1234 times.").input_ids
    assert ids[0] == 128_000 and all(i < 128_000 for i in ids[1:])
    assert tok.decode(ids[1:]) == "The river flows 1234 times."
    # Llama 3's split: digits in groups of at most three, so "1234" is never one token
    pieces = tok.convert_ids_to_tokens(ids[1:])
    assert "1234" not in pieces and "Ġ1234" not in pieces


def _build(hub: dict, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MKA_EDGE_CACHE=str(cache), HF_HOME=str(hub["root"] / "hf"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "mka_edge.cli", "build", "--profile", str(hub["profile"])]
    cmd += ["--model", str(hub["recipe"]), "--out", str(out), "--quants", "Q8_0", "--kv-type", "f16"]
    cmd += ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--mmlu-per-subject", "0"]
    cmd += ["--no-attention-removal", "--no-imatrix", "--max-tries", "1", "--method", "sleb-fast", *extra]
    # from a folder that is not the model's: nothing may be read from where the user stands
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=hub["root"])


def _gguf_facts(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def text(name):
        f = reader.fields[name]
        return bytes(f.parts[f.data[0]]).decode()

    tokens = reader.fields["tokenizer.ggml.tokens"]
    names = {t.name for t in reader.tensors}
    return {
        "n_vocab": len(tokens.data),
        "pre": text("tokenizer.ggml.pre"),
        "blocks": int(reader.fields["llama.block_count"].parts[-1][0]),
        "rope_freqs": "rope_freqs.weight" in names,
        "output": "output.weight" in names,
        "source": text("mka_edge.source"),
    }


@pytest.mark.parametrize("merged", [False, True], ids=["K0", "K1"])
def test_llama3_shape_builds_offline_by_hub_id(llama3_hub, tmp_path, merged):
    """K=0 (a loose budget) and K=1 (a budget between the K=1 and K=0 footprints): the package's
    GGUF has the real 128,256-token vocabulary with llama.cpp's llama-bpe pre-tokenizer, Llama 3's
    rope factors and an untied head, names the hub snapshot as its source, and was validated in
    llama.cpp (the build's own validation loads and runs it)."""
    mem = [predicted_memory_mb(llama3_hub["src"], "Q8_0", k=k, context=1024) for k in (0, 1)]
    budget = (mem[0] + mem[1]) / 2 if merged else mem[0] * 1.5
    out = tmp_path / "pkg"
    res = _build(llama3_hub, out, tmp_path / "cache", "--max-merge", "1", "--budget-mb", f"{budget:.4f}")
    assert res.returncode == 0 and "Traceback" not in res.stderr, (res.stdout[-3000:], res.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["k"] == (1 if merged else 0), manifest["plan"]
    art = out / manifest["artifact"]
    facts = _gguf_facts(art)
    assert facts == {
        "n_vocab": 128_256,
        "pre": "llama-bpe",
        "blocks": LAYERS - (1 if merged else 0),
        "rope_freqs": True,
        "output": True,
        "source": f"{HUB_ID}@{llama3_hub['snap'].name}",
    }
    val = manifest["host_figures"]["accuracy"]
    assert val["kl"] >= 0 and val.get("tokens", 1) > 0
