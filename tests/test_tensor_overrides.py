"""Per-tensor types through llama.cpp's own quantizer (issue 25, item 3's groundwork): the
``tt_overrides`` of llama_model_quantize_params, as ``llama-quantize --tensor-type`` passes them.
The written file has the overridden types, and the dry run with the same overrides predicts every
tensor's type (so its bytes) exactly."""

from __future__ import annotations

import gguf

from mka_edge.exporters.llama_quantize import dry_run_types, quantize, tensor_pattern
from mka_edge.exporters.quant_types import quant_type


def test_overrides_set_each_named_tensor_s_type_and_the_dry_run_predicts_them(tiny_dir, tmp_path):
    from mka_edge.exporters.gguf import write_float_gguf
    from mka_edge.models.loading import load_model

    base = tmp_path / "f32.gguf"
    write_float_gguf(load_model(str(tiny_dir)), base, "F32", pre_tokenizer="gpt-2")
    overrides = {
        tensor_pattern("blk.0.ffn_down.weight"): "Q4_0",  # one tensor by name
        r"attn_v\.weight$": "F16",  # a kind of tensor in every layer
        tensor_pattern("blk.1.ffn_up.weight"): "Q5_0",
    }
    ftype = quant_type("Q8_0").ftype
    plain, mixed = tmp_path / "q8.gguf", tmp_path / "mixed.gguf"
    quantize(base, plain, ftype, 2)
    quantize(base, mixed, ftype, 2, overrides=overrides)

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    before, after = types(plain), types(mixed)
    assert before["blk.0.ffn_down.weight"] == "Q8_0" and after["blk.0.ffn_down.weight"] == "Q4_0"
    assert after["blk.1.ffn_up.weight"] == "Q5_0" and after["blk.0.ffn_up.weight"] == "Q8_0"
    v = [n for n in after if n.endswith("attn_v.weight")]
    assert len(v) == 6 and all(after[n] == "F16" for n in v)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"blk.0.ffn_down.weight", "blk.1.ffn_up.weight", *v}  # nothing else moved
    predicted = dry_run_types(base, [ftype], overrides)[ftype]
    assert {n: t.upper() for n, t in predicted.items()} == {n: t.upper() for n, t in after.items()}


def test_a_bad_override_is_one_line_before_any_child_starts(tmp_path, monkeypatch):
    import subprocess

    import pytest

    from mka_edge.errors import UserError

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a child started"))
    with pytest.raises(UserError, match="unknown ggml type 'Q9_9'"):
        dry_run_types(tmp_path / "x.gguf", [7], {tensor_pattern("blk.0.attn_q.weight"): "Q9_9"})
    with pytest.raises(UserError, match="is not a regular expression"):
        dry_run_types(tmp_path / "x.gguf", [7], {"blk.(0": "Q8_0"})
