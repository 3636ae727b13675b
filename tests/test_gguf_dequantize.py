"""A GGUF source is dequantized tensor by tensor into safetensors shards: the same weights, bit for
bit, as transformers' own GGUF load (which holds every tensor, the model and a saved copy at
once), in float32, or rounded to bfloat16 where a float32 copy would not fit the host."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny


def _gguf(tmp_path, kind: str, quant: str):
    from mka_edge.exporters.gguf import export_loaded
    from mka_edge.models.loading import load_model

    seed = {"llama": 3, "qwen2": 4}[kind]
    src = make_tiny(tmp_path / kind, model_type=kind, layers=3, seed=seed)
    path = tmp_path / f"{kind}-{quant}.gguf"
    export_loaded(load_model(str(src)), path, quant, pre_tokenizer="gpt-2", progress=False)
    return path


@pytest.mark.parametrize(("kind", "quant"), [("llama", "Q8_0"), ("qwen2", "Q4_0")])
def test_streamed_dequantization_is_transformers_own_weights(tmp_path, kind, quant):
    from transformers import AutoModelForCausalLM

    from mka_edge.models import loading

    path = _gguf(tmp_path, kind, quant)
    want = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want_sd = want.state_dict()
    out = tmp_path / "out"
    out.mkdir()
    loading._dequantize_gguf_to_dir(path, out, "float32")
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got_sd = got.state_dict()
    assert set(got_sd) == set(want_sd)
    for name, w in want_sd.items():
        assert torch.equal(got_sd[name], w), name
    assert got.config.tie_word_embeddings == want.config.tie_word_embeddings
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()


def test_dequantization_writes_shards_one_at_a_time_and_bfloat16_rounds(tmp_path, monkeypatch):
    from safetensors import torch as st
    from transformers import AutoModelForCausalLM

    from mka_edge.models import loading

    path = _gguf(tmp_path, "llama", "Q8_0")
    want = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    limit = 40_000  # bytes a shard: the tiny model's tensors are a few kB to a few hundred, so many shards
    held = []
    real = st.save_file

    def save_file(d, *a, **k):
        held.append(sum(t.nbytes for t in d.values()))
        return real(d, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    out = tmp_path / "bf16"
    out.mkdir()
    loading._dequantize_gguf_to_dir(path, out, "bfloat16", shard_bytes=limit)
    biggest = max(p.numel() * 2 for p in want.parameters())
    assert len(held) > 2 and max(held) < limit + biggest  # never more than a shard and one tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(held)
    got = AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == torch.bfloat16
    got_sd = got.state_dict()
    for name, w in want.state_dict().items():
        assert torch.equal(got_sd[name], w.to(torch.bfloat16)), name


def test_a_gguf_too_large_for_float32_on_this_host_is_kept_in_bfloat16(tmp_path, monkeypatch):
    import psutil

    from mka_edge.models import loading

    path = _gguf(tmp_path, "llama", "Q8_0")
    assert loading.gguf_dequant_dtype(path) == "float32"
    small = psutil.virtual_memory()._replace(available=2**30)  # less than the 1.5 GiB allowance
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    assert loading.gguf_dequant_dtype(path) == "bfloat16"
    cfg = loading.load_config(str(path))
    assert cfg.dtype == torch.bfloat16  # what the host check reads before anything loads
    lm = loading.load_model(str(path), dtype=torch.bfloat16)
    assert lm.source["model_dir"].endswith("-bf16") and lm.model.dtype == torch.bfloat16
    monkeypatch.undo()
    f32 = loading.load_model(str(path))
    assert f32.fingerprint != lm.fingerprint and not f32.source["model_dir"].endswith("-bf16")
