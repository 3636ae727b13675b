"""Issue 25: the per-tensor error table from llama.cpp's own files, and an allocation written by
llama.cpp's quantizer with exactly the planned bytes, loading in llama.cpp (tiny llama model)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mka_edge.solver import tensor_sensitivity as ts
from mka_edge.solver.allocate import allocate
from mka_edge.solver.tensor_probe import write_request, write_types


@pytest.fixture(scope="module")
def tiny_files(tiny_dir, tmp_path_factory):
    from mka_edge.exporters.gguf import write_float_gguf
    from mka_edge.models.loading import load_model

    tmp = tmp_path_factory.mktemp("sens")
    base = tmp / "f32.gguf"
    write_float_gguf(load_model(str(tiny_dir)), base, "F32", pre_tokenizer="gpt-2")
    files = {q: write_request(base, tmp / f"{q}.gguf", q, None) for q in ("Q8_0", "Q4_0", "Q2_K")}
    rng = np.random.default_rng(0)
    ref = {t.name: t for t in gguf.GGUFReader(str(base)).tensors if len(t.shape) == 2}
    importance = {n: rng.uniform(0.1, 2.0, int(t.shape[0])).astype(np.float32) for n, t in ref.items()}
    importance.pop("token_embd.weight")  # no entry: weighted uniformly, as llama.cpp's imatrix has none
    return tmp, base, files, importance


def test_the_table_is_the_quantizer_s_own_error_bytes_and_fallbacks(tiny_files):
    tmp, base, files, importance = tiny_files
    table = ts.tensor_table(base, files, importance)
    ref = {t.name: t for t in gguf.GGUFReader(str(base)).tensors if len(t.shape) == 2}
    assert set(table) == set(ref) and table["blk.2.ffn_down.weight"].kind == "ffn_down"
    assert (table["blk.2.ffn_down.weight"].layer, table["token_embd.weight"].layer) == (2, None)
    for name, row in table.items():
        assert row.err["Q8_0"] < row.err["Q4_0"]  # fewer bits, more error, for every tensor
        # the tiny model's 64-wide rows cannot take Q2_K's 256-blocks: llama.cpp falls back to Q4_0
        assert row.actual["Q2_K"] == "Q4_0" and row.bytes["Q2_K"] == row.bytes["Q4_0"]
        # Q8_0's error is gguf-py's own Q8_0 round trip, weighted by the importance columns
        w = np.asarray(ref[name].data, dtype=np.float32).reshape(int(ref[name].shape[1]), -1)
        q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
        deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        assert row.err["Q8_0"] == pytest.approx(ts.weighted_error(w, deq, importance.get(name)), rel=1e-6)
    by_file = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(files["Q4_0"])).tensors}
    assert all(row.bytes["Q4_0"] == by_file[n] for n, row in table.items())
    # the same written type is one option, whatever was requested
    opts = ts.options(table, dict.fromkeys(table, 1.0))
    assert all(sorted(o.type for o in v) == ["Q4_0", "Q8_0"] for v in opts.values())


def test_an_allocation_is_written_with_exactly_the_planned_bytes_and_runs_in_llama_cpp(tiny_files):
    from gguf_helpers import llama_logprobs

    tmp, base, files, importance = tiny_files
    table = ts.tensor_table(base, files, importance)
    scales = {n: (50.0 if r.kind == "ffn_down" else 1.0) for n, r in table.items()}  # a sensitive kind
    opts = ts.options(table, scales)
    lo = sum(min(o.bytes for o in v) for v in opts.values())
    hi = sum(max(o.bytes for o in v) for v in opts.values())
    alloc = allocate(opts, lo + 0.3 * (hi - lo))
    assert lo < alloc.bytes <= lo + 0.3 * (hi - lo) and len(alloc.counts()) == 2
    assert all(alloc.types[n] == "Q8_0" for n in table if table[n].kind == "ffn_down")
    floor = ts.predict(table, scales, {n: "Q8_0" for n in table}, ("Q8_0", 0.01))
    assert floor == pytest.approx(0.01)  # the all-Q8_0 file predicts its own measured KL
    assert ts.predict(table, scales, alloc.types, ("Q8_0", 0.0)) == pytest.approx(
        alloc.kl - sum(scales[n] * table[n].err["Q8_0"] for n in table)
    )
    art = write_types(base, tmp / "mixed.gguf", alloc.types, None)
    written = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(str(art)).tensors}
    assert {n: written[n][0] for n in table} == {n: table[n].actual[q] for n, q in alloc.types.items()}
    assert sum(written[n][1] for n in table) == alloc.bytes  # the plan's bytes, exactly
    lp = llama_logprobs(art, [1, 5, 9, 3])
    assert np.isfinite(lp).all() and np.allclose(np.exp(lp).sum(-1), 1.0, atol=1e-4)


def test_each_layer_of_a_kind_takes_an_equal_share_of_the_kind_s_measured_kl(tiny_files):
    tmp, base, files, importance = tiny_files
    table = ts.tensor_table(base, files, importance)
    kinds = {r.kind for r in table.values()}
    isolated = {k: ("Q4_0", 0.01 + (0.06 if k == "ffn_down" else 0.0)) for k in kinds}
    scales = ts.tensor_scales(table, isolated, ("Q8_0", 0.01))
    down = [n for n, r in table.items() if r.kind == "ffn_down"]
    # ffn_down alone at Q4_0 predicts its measured KL, each of its 6 layers a sixth of the 0.06 added
    only_down = {n: ("Q4_0" if n in down else "Q8_0") for n in table}
    assert ts.predict(table, scales, only_down, ("Q8_0", 0.01)) == pytest.approx(0.07)
    one = {n: ("Q4_0" if n == down[0] else "Q8_0") for n in table}
    assert ts.predict(table, scales, one, ("Q8_0", 0.01)) == pytest.approx(0.01 + 0.01)
    assert ts.predict(table, scales, dict.fromkeys(table, "Q8_0"), ("Q8_0", 0.01)) == pytest.approx(0.01)
