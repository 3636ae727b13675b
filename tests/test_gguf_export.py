"""GGUF export on tiny random models of each architecture, checked in llama.cpp itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, make_tiny
from gguf_helpers import kl_top1, llama_logprobs, torch_logprobs


def _variant(tmp_path: Path, kind: str) -> Path:
    """Tiny models covering what the exporter must get right per architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind in ("llama", "qwen2", "mistral"):
        return make_tiny(tmp_path / kind, model_type=kind, layers=3, seed=2)
    path = make_tiny(tmp_path / kind, model_type="llama", layers=3, seed=3)
    cfg = AutoConfig.from_pretrained(path)
    if kind == "llama3-rope":  # Llama 3 rope scaling: llama.cpp needs the rope_freqs tensor
        cfg.rope_parameters = dict(LLAMA3_ROPE)
    elif kind == "llama-bias":  # llama with attention biases: q/k biases need the rope permutation too
        cfg.attention_bias = True
    model = AutoModelForCausalLM.from_config(cfg).eval()
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25)  # sharp attention, so positions (and so rope) matter to the output
    model.save_pretrained(path, safe_serialization=True)
    return path


def _export(src: Path, out: Path, quant: str = "F32") -> dict:
    from mka_edge.exporters.gguf import export_loaded
    from mka_edge.models.loading import load_model

    return export_loaded(load_model(str(src)), out, quant, pre_tokenizer="gpt-2", progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama3-rope", "llama-bias"])
def test_f32_export_matches_pytorch_in_llama_cpp(tmp_path, kind):
    from mka_edge.models.loading import load_model

    src = _variant(tmp_path, kind)
    s = _export(src, tmp_path / f"{kind}.gguf")
    assert set(s["tensor_types"]) == {"F32"}
    assert s["architecture"] == ("qwen2" if kind == "qwen2" else "llama") and s["block_count"] == 3
    if kind == "llama3-rope":
        import gguf

        names = [t.name for t in gguf.GGUFReader(str(tmp_path / f"{kind}.gguf")).tensors]
        assert "rope_freqs.weight" in names
    lm = load_model(str(src))
    ids = torch.randint(3, lm.model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    kl, top1 = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / f"{kind}.gguf", ids))
    assert kl < 1e-5 and top1 > 0.99, (kind, kl, top1)


def test_rope_scaling_is_not_a_no_op(tmp_path):
    """Without the rope_freqs tensor the llama3-scaled model would disagree: the check above has teeth."""
    from mka_edge.exporters import gguf as exp
    from mka_edge.models.loading import load_model

    src = _variant(tmp_path, "llama3-rope")
    lm = load_model(str(src))
    ids = torch.randint(3, lm.model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    real = exp._llama3_rope_factors
    exp._llama3_rope_factors = lambda *a: np.ones_like(real(*a))
    try:
        exp.export_loaded(lm, tmp_path / "wrong.gguf", "F32", pre_tokenizer="gpt-2", progress=False)
    finally:
        exp._llama3_rope_factors = real
    assert lm.model.config.rope_parameters["rope_type"] == "llama3"
    kl, _ = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / "wrong.gguf", ids))
    assert kl > 1e-4, kl


def test_tokenizer_round_trip_and_provenance(tmp_path, tiny_dir):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from mka_edge.exporters.gguf_inspect import inspect_gguf

    _export(tiny_dir, tmp_path / "t.gguf", "F16")
    info = inspect_gguf(tmp_path / "t.gguf")
    assert info["tensor_types"].get("F16") and info["n_vocab"] == 400
    assert info["provenance"]["version"] and info["provenance"]["method"] == "none"
    assert [m["sources"] for m in info["provenance"]["layer_map"]] == [[i] for i in range(6)]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    llm = Llama(model_path=str(tmp_path / "t.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    text = "The history of Anarchism, in 1840 and 1871: it's a 'movement'."
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)["input_ids"]
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id


def test_llama_cpp_quantizer_types_are_read_back(tmp_path, tiny_dir):
    s = _export(tiny_dir, tmp_path / "q8.gguf", "Q8_0")
    assert "Q8_0" in s["tensor_types"] and s["bits_per_weight"] < 16
    from mka_edge.models.loading import load_model

    lm = load_model(str(tiny_dir))
    ids = list(range(3, 99))
    kl, _ = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / "q8.gguf", ids))
    assert kl < 5e-3


def test_unknown_quant_and_bad_out_are_one_line_errors(tmp_path, tiny_dir):
    env = dict(os.environ)
    for args, needle in (
        (["--quant", "Q9_X"], "unknown quant type 'Q9_X'; valid: F32"),
        (["--quant", "F16", "--out", str(tmp_path / "x.bin")], "must end in .gguf"),
        (["--quant", "F16", "--out", "/proc/nope/x.gguf"], "cannot"),
    ):
        argv = ["export", "--model", str(tiny_dir), *args]
        if "--out" not in args:
            argv += ["--out", str(tmp_path / "x.gguf")]
        r = subprocess.run([sys.executable, "-m", "mka_edge.cli", *argv], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    r = subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", "export", "--quant", "help"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and "Q4_K_M" in r.stdout and "IQ2_XS" in r.stdout and "importance matrix" in r.stdout


def test_failed_export_leaves_nothing(tmp_path, tiny_dir, monkeypatch):
    from mka_edge.errors import UserError

    def boom(*a, **k):
        raise UserError("quantizer failed")

    monkeypatch.setattr("mka_edge.exporters.gguf.quantize", boom)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(UserError):
        _export(tiny_dir, out, "Q4_0")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_truncated_gguf_is_refused_before_llama_cpp(tmp_path, tiny_dir):
    from mka_edge.errors import UserError
    from mka_edge.exporters.gguf_inspect import inspect_gguf

    _export(tiny_dir, tmp_path / "t.gguf", "F16")
    data = (tmp_path / "t.gguf").read_bytes()
    for cut in (len(data) // 2, 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated|not a readable GGUF"):
            inspect_gguf(tmp_path / "cut.gguf")
    r = subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", "validate", str(tmp_path / "cut.gguf"), "--reference", str(tiny_dir)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_validate_reports_and_fails_on_missed_threshold(tmp_path, tiny_dir):
    _export(tiny_dir, tmp_path / "t.gguf", "Q8_0")
    out = tmp_path / "val"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mka_edge.cli",
            "validate",
            str(tmp_path / "t.gguf"),
            "--reference",
            str(tiny_dir),
            "--chunks",
            "1",
            "--repeats",
            "2",
            "--mmlu-per-subject",
            "0",
            "--max-kld",
            "1e-9",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 1, r.stderr
    assert "validation failed" in r.stderr and "mean KL" in r.stderr
    res = json.loads((out / "validation.json").read_text())
    assert res["passed"] is False and res["checks"][0]["passed"] is False
    assert 0 < res["accuracy"]["kl"] < 0.05 and res["accuracy"]["top1"] > 0.8
    lat = res["latency"]
    assert lat["prompt_tokens"] == 512 and len(lat["runs"]) == 2 and lat["gen_tps"]["median"] > 0
    assert lat["gen_tps"]["min"] <= lat["gen_tps"]["median"] <= lat["gen_tps"]["max"]
    assert 0 < lat["peak_rss_mb"] < 1000  # the child's own peak, not the parent's (torch) one
    assert "host figures" in (out / "validation.md").read_text()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mka_edge.cli",
            "validate",
            str(tmp_path / "t.gguf"),
            "--reference",
            str(tiny_dir),
            "--chunks",
            "1",
            "--repeats",
            "1",
            "--mmlu-per-subject",
            "0",
            "--max-kld",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 0 and json.loads((out / "validation.json").read_text())["passed"] is True


def test_importance_matrix_types_export(tmp_path, tiny_dir, monkeypatch):
    """IQ2_XS needs an importance matrix: one is computed from calibration text and handed to llama.cpp."""
    import mka_edge.exporters.imatrix as im

    seen = {}
    real = im._imatrix_arrays

    def spy(lm, batch, progress):
        arrays = real(lm, batch, progress)
        seen.update({k: v.size for k, v in arrays.items()})
        return arrays

    monkeypatch.setattr(im, "_imatrix_arrays", spy)
    monkeypatch.setenv("MKA_EDGE_CACHE", str(tmp_path / "cache"))  # computed here, not served from the cache
    s = _export(tiny_dir, tmp_path / "iq2.gguf", "IQ2_XS")
    assert "blk.0.attn_q.weight" in seen and "blk.0.ffn_down.weight" in seen and seen["blk.0.ffn_down.weight"] == 128
    assert s["bits_per_weight"] < 16 and (tmp_path / "iq2.gguf").is_file()


def test_intermediate_type_rule():
    """F32 only when asked, for F32 output, or for 32-bit weights whose F32 file is small."""
    from transformers import LlamaConfig

    from mka_edge.exporters.gguf import F32_INTERMEDIATE_MAX_BYTES, f32_bytes, intermediate_type

    one_b = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        dtype="float32",
    )
    assert abs(f32_bytes(one_b) / 4 - 1.2358e9) / 1.2358e9 < 0.01  # Llama-3.2-1B: 1.236 B parameters
    assert f32_bytes(one_b) > F32_INTERMEDIATE_MAX_BYTES
    assert intermediate_type(one_b, "Q4_K_M") == "BF16"
    assert intermediate_type(one_b, "Q4_K_M", "f32") == "F32"
    assert intermediate_type(one_b, "F32") == "F32"
    small = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, dtype="float32"
    )
    assert intermediate_type(small, "Q8_0") == "F32"
    small.dtype = "float16"
    assert intermediate_type(small, "Q8_0") == "F16"
    small.dtype = "bfloat16"
    assert intermediate_type(small, "Q8_0") == "BF16"


def test_large_model_export_writes_no_f32_intermediate(tmp_path, tiny_dir, monkeypatch):
    """Above F32_INTERMEDIATE_MAX_BYTES (2 GiB of F32 weights: every model from ~0.5 B parameters on)
    the quantizer gets a BF16 file, half the size; the artifact still matches PyTorch in llama.cpp."""
    import gguf

    from mka_edge.exporters import gguf as exp
    from mka_edge.models.loading import load_model

    monkeypatch.setattr(exp, "F32_INTERMEDIATE_MAX_BYTES", 1000)  # the tiny model counts as large
    seen = {}
    real = exp.quantize

    def spy(base, out, *a, **k):
        reader = gguf.GGUFReader(str(base))
        seen["types"] = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
        seen["bytes"] = Path(base).stat().st_size
        return real(base, out, *a, **k)

    monkeypatch.setattr(exp, "quantize", spy)
    s = exp.export_gguf(str(tiny_dir), tmp_path / "q8.gguf", "Q8_0", pre_tokenizer="gpt-2", progress=False)
    assert seen["types"] == {"BF16"} and s["intermediate"] == "BF16"
    f32 = exp.export_loaded(
        load_model(str(tiny_dir)), tmp_path / "f32.gguf", "F32", pre_tokenizer="gpt-2", progress=False
    )
    assert seen["bytes"] < 0.6 * Path(f32["path"]).stat().st_size
    lm = load_model(str(tiny_dir))
    ids = list(range(3, 99))
    kl, top1 = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / "q8.gguf", ids))
    assert kl < 5e-3 and top1 > 0.9


def test_bf16_float_file_matches_pytorch(tmp_path):
    """The streamed BF16 writer (raw 16-bit patterns, q/k permuted in torch) loads in llama.cpp and
    agrees with PyTorch; the llama3-rope variant also checks rope_freqs is written after the weights."""
    import gguf

    from mka_edge.exporters.gguf import write_float_gguf
    from mka_edge.models.loading import load_model

    src = _variant(tmp_path, "llama3-rope")
    lm = load_model(str(src))
    path = tmp_path / "bf16.gguf"
    write_float_gguf(lm, path, "BF16", pre_tokenizer="gpt-2")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "rope_freqs.weight" in types
    ids = torch.randint(3, lm.model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    kl, top1 = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(path, ids))
    assert kl < 1e-3 and top1 > 0.9, (kl, top1)


def test_bf16_checkpoint_loads_in_float32_as_transformers_would(tmp_path, tiny_dir):
    """16-bit weights are loaded as stored and widened (a lower peak): the same float32 tensors,
    buffers and config as transformers' own float32 load, the tied embedding still tied."""
    from transformers import AutoModelForCausalLM

    from mka_edge.models.loading import load_model

    src = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    src.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir / f).is_file():
            (tmp_path / "bf16" / f).write_bytes((tiny_dir / f).read_bytes())
    ours = load_model(str(tmp_path / "bf16")).model
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {n: t.dtype for n, t in ours.named_buffers()} == {n: t.dtype for n, t in theirs.named_buffers()}
    assert ours.get_input_embeddings().weight is ours.get_output_embeddings().weight
    assert str(ours.config.dtype) == str(theirs.config.dtype)
