"""The attention path and the KV cache type in the real runtime: `mka-edge validate --kv-type`
runs quantized caches (llama.cpp needs flash attention for a quantized V cache; the pinned
bindings' default is "disabled", so it is passed explicitly) and reports what ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny

from mka_edge.errors import UserError
from mka_edge.kv_cache import CacheMode


@pytest.fixture(scope="module")
def tiny32_q8(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama with 32-wide heads (llama.cpp's q8_0 / q4_0 caches need head_dim % 32 == 0)
    and room for a validation run, as a Q8_0 GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mka_edge.exporters.gguf import export_loaded
    from mka_edge.models.loading import load_model

    root = tmp_path_factory.mktemp("kv")
    src = make_tiny(root / "src", "llama", layers=3, seed=3)
    cfg = AutoConfig.from_pretrained(src)
    cfg.head_dim, cfg.max_position_embeddings = 32, 1024
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(src)
    art = root / "t.gguf"
    export_loaded(load_model(str(src)), art, "Q8_0", pre_tokenizer="gpt-2", progress=False)
    return src, art


def _validate(src: Path, art: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mka_edge.cli", "validate", str(art), "--reference", str(src)]
    cmd += ["--chunks", "1", "--repeats", "1", "--mmlu-per-subject", "0", "--context", "768", "--out", str(out)]
    return subprocess.run(cmd + list(extra), capture_output=True, text=True, env=dict(os.environ))


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_validate_runs_a_quantized_cache_and_reports_it(tiny32_q8, tmp_path, kv):
    src, art = tiny32_q8
    r = _validate(src, art, tmp_path / "val", "--kv-type", kv, "--max-kld", "10")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert res["runtime"]["kv_cache_type"] == f"{kv}/{kv}+fa" and res["runtime"]["attention"] == "flash"
    assert res["latency"]["type_v"] == kv and res["accuracy"]["attention"] == "flash"
    assert f"KV cache {kv}/{kv}+fa, flash attention" in (tmp_path / "val" / "validation.md").read_text()
    assert 0 <= res["accuracy"]["kl"] < 1.0


def test_validate_without_flash_attention_quantizes_only_k(tiny32_q8, tmp_path):
    src, art = tiny32_q8
    r = _validate(src, art, tmp_path / "val", "--kv-type", "q8_0/f16", "--flash-attn", "off", "--max-kld", "10")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert res["runtime"]["kv_cache_type"] == "q8_0/f16" and res["runtime"]["attention"] == "standard"


def test_quantized_v_cache_without_flash_attention_is_one_line(tiny32_q8, tmp_path):
    src, art = tiny32_q8
    r = _validate(src, art, tmp_path / "val", "--kv-type", "q4_0", "--flash-attn", "off")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "needs flash attention" in r.stderr
    assert not (tmp_path / "val").exists()
    r = _validate(src, art, tmp_path / "val", "--kv-type", "q5_1")
    assert r.returncode == 2 and "unknown KV cache type 'q5_1'" in r.stderr and "Traceback" not in r.stderr


def test_cache_mode_labels_round_trip():
    for label in ("f16/f16", "q8_0/f16", "f16/f16+fa", "q8_0/q8_0+fa", "q4_0/q4_0+fa"):
        assert CacheMode.parse(label).label == label
    assert CacheMode.parse("q8_0").label == "q8_0/q8_0+fa"  # a bare quantized type runs with flash attention
    assert CacheMode.parse("f16").label == "f16/f16"
    with pytest.raises(UserError, match="needs flash attention"):
        CacheMode("f16", "q8_0", False)


def test_onnx_target_refuses_a_llama_cpp_cache(tmp_path):
    from mka_edge.planning import cheap_facts, resolve_settings

    with pytest.raises(UserError, match="onnxruntime-genai keeps the KV cache in the model's I/O type"):
        cheap_facts(resolve_settings("phone-4gb", None, kv_type="q8_0"))


def test_profile_forbidding_flash_attention_refuses_flash_attn_on(tmp_path):
    from mka_edge.planning import resolve_settings
    from mka_edge.profiles import load_profile

    text = Path(load_profile("laptop-8gb").path).read_text().replace("flash_attention: true", "flash_attention: false")
    (tmp_path / "nofa.yaml").write_text(text)
    with pytest.raises(UserError, match="forbids flash attention"):
        resolve_settings(str(tmp_path / "nofa.yaml"), None, flash_attn="on")
