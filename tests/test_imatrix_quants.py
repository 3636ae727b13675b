"""Importance-matrix quantization as a lever of the planner, on a tiny random llama: the matrix is
computed once per model stack and calibration and then served from the cache, llama.cpp's quantizer
records its provenance as llama-quantize does, the IQ types a plan may now pick export, and the
probe keeps the better of plain and imatrix quantization per type."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from gguf_helpers import kl_top1, llama_logprobs, torch_logprobs

# small calibration for speed; the default (16 x 256) is what exports and probes use
SMALL = dict(samples=4, seq_len=64)


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, tiny_dir) -> Path:
    """The tiny llama as a recipe: the target's export and the probe take the pre-tokenizer from it."""
    recipe = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nsource:\n  kind: hf-dir\n  path: {tiny_dir}\narchitecture: llama\n"
        "llama_cpp:\n  pre_tokenizer: gpt-2\n"
    )
    return recipe


def _forward_counter(lm) -> list[int]:
    calls = [0]
    lm.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _quantize_keys(path: Path) -> dict:
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return {k: (f.types[0].name, f.contents()) for k, f in fields.items() if k.startswith("quantize.")}


def test_imatrix_is_computed_once_then_served_from_the_cache(tiny_dir):
    import mka_edge.exporters.imatrix as im
    from mka_edge.models.loading import load_model

    lm = load_model(str(tiny_dir))
    calls = _forward_counter(lm)
    first = im.imatrix_for(lm, **SMALL, progress=False)
    assert calls[0] == SMALL["samples"] and first.is_file() and first.parent.name == "imatrix"
    mtime = first.stat().st_mtime_ns
    again = im.imatrix_for(lm, **SMALL, progress=False)
    assert again == first and calls[0] == SMALL["samples"] and first.stat().st_mtime_ns == mtime
    arrays, meta = im.read_imatrix(first)
    assert arrays["blk.0.ffn_down.weight"].shape == (128,) and "output.weight" not in arrays  # tied head
    assert meta["chunks"] == 4 and meta["dataset"].startswith("packaged:") and meta["entries"] == len(arrays)
    # no temp file left (the entry's lock file stays: the kernel holds the lock, not the file)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    # other sample settings are another entry
    assert im.imatrix_for(lm, samples=2, seq_len=64, progress=False) != first and calls[0] == 6


def test_a_merged_stack_does_not_reuse_the_unmerged_matrix(tiny_dir):
    """The planner merges in place (same LoadedModel, same fingerprint): the key follows the stack."""
    import copy

    from mka_edge.exporters.imatrix import imatrix_key, stack_signature
    from mka_edge.mka.layers import set_layers
    from mka_edge.models.loading import load_model

    lm = load_model(str(tiny_dir))
    base, base_sig = imatrix_key(lm, **SMALL)[0], stack_signature(lm)
    layers = list(lm.arch.layers(lm.model))
    set_layers(lm.model, lm.arch, layers[:-1])  # a layer merged away
    shorter = imatrix_key(lm, **SMALL)[0]
    fused = copy.deepcopy(layers[2])  # same count, one block replaced by a fused one
    with torch.no_grad():
        for p in fused.parameters():
            p.mul_(0.5)
    set_layers(lm.model, lm.arch, layers[:2] + [fused] + layers[3:])
    same_count = stack_signature(lm)
    set_layers(lm.model, lm.arch, layers)
    assert shorter != base and same_count != base_sig and len(same_count) == len(base_sig)
    assert stack_signature(lm) == base_sig  # back to the original stack: the original entry


def test_a_killed_write_leaves_no_entry(tiny_dir, monkeypatch):
    import mka_edge.exporters.imatrix as im
    from mka_edge.models.loading import load_model

    lm = load_model(str(tiny_dir))

    def killed(fh, **arrays):
        fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(im.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        im.imatrix_for(lm, samples=3, seq_len=64, progress=False)
    folder = im.cache_root() / "imatrix"
    assert not [
        p
        for p in folder.iterdir()
        if "imatrix" in p.name and im.imatrix_key(lm, samples=3, seq_len=64)[0] in p.name and p.suffix != ".lock"
    ]
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]


def test_imatrix_k_quant_loads_in_llama_cpp_with_provenance(tmp_path, tiny_dir):
    from mka_edge.exporters.gguf import export_loaded
    from mka_edge.models.loading import load_model

    lm = load_model(str(tiny_dir))
    plain = export_loaded(lm, tmp_path / "plain.gguf", "Q4_K_M", pre_tokenizer="gpt-2", progress=False)
    s = export_loaded(lm, tmp_path / "im.gguf", "Q4_K_M", pre_tokenizer="gpt-2", imatrix=True, progress=False)
    keys = _quantize_keys(tmp_path / "im.gguf")
    assert keys["quantize.imatrix.file"][0] == "STRING" and keys["quantize.imatrix.file"][1].endswith(".npz")
    assert "/" not in keys["quantize.imatrix.file"][1]  # a name, not a local path
    assert keys["quantize.imatrix.dataset"] == ("STRING", "packaged:wiki_calibration.jsonl.gz")
    assert keys["quantize.imatrix.entries_count"] == ("UINT32", 42)  # 6 blocks x 7 linear layers
    assert keys["quantize.imatrix.chunks_count"] == ("UINT32", 16)
    assert s["imatrix"]["entries_count"] == 42 and plain["imatrix"] is None
    assert _quantize_keys(tmp_path / "plain.gguf") == {}
    assert s["tensor_types"] == plain["tensor_types"]  # same types, other rounding
    assert (tmp_path / "im.gguf").read_bytes() != (tmp_path / "plain.gguf").read_bytes()
    ids = list(range(3, 99))
    kl, top1 = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / "im.gguf", ids))
    assert math.isfinite(kl) and kl < 0.05 and top1 > 0.7, (kl, top1)
    # a type that ignores the matrix gets none (and no provenance that would claim one)
    q8 = export_loaded(lm, tmp_path / "q8.gguf", "Q8_0", pre_tokenizer="gpt-2", imatrix=True, progress=False)
    assert q8["imatrix"] is None and _quantize_keys(tmp_path / "q8.gguf") == {}


def test_iq_types_are_planned_and_export(tmp_path, tiny_recipe):
    from mka_edge.exporters.quant_types import quant_type
    from mka_edge.models.loading import load_model
    from mka_edge.solver.quant_prior import prior_entry
    from mka_edge.targets.gguf import PLAN_QUANTS, GgufTarget

    target = GgufTarget()
    assert {"IQ4_XS", "IQ3_M"} <= set(PLAN_QUANTS)
    assert target.check_quants(["iq4_xs", "IQ3_M", "IQ2_XS"]) == ["IQ4_XS", "IQ3_M", "IQ2_XS"]
    assert quant_type("IQ4_XS").imatrix_helps and not quant_type("Q8_0").imatrix_helps
    assert not quant_type("F16").imatrix_helps and quant_type("IQ2_XS").imatrix_helps
    e = prior_entry("IQ4_XS", [1000] * 4, 500)  # the published row exists with an imatrix only
    assert e["imatrix"] is True and e["kl"] == e["kl_imatrix"] and "kl_plain" not in e
    assert prior_entry("Q8_0", [1000], 5)["imatrix"] is False
    lm = load_model(str(tiny_recipe))
    s = target.export(lm, tmp_path / "iq4.gguf", "IQ4_XS", context=256, progress=False, imatrix=True)
    assert s.quant == "IQ4_XS" and s.bits_per_weight < 8 and s.raw["imatrix"]["entries_count"] == 42
    # 64-wide rows are not a multiple of 256: llama.cpp falls back per tensor, and the file loads
    assert "IQ4_XS" not in s.tensor_types and s.tensor_types.get("IQ4_NL")
    ids = list(range(3, 67))
    kl, _ = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / "iq4.gguf", ids))
    assert math.isfinite(kl) and kl < 0.1, kl


def test_probe_keeps_the_better_of_plain_and_imatrix(tiny_recipe):
    from mka_edge.models.loading import load_model
    from mka_edge.records import QuantCost
    from mka_edge.solver.quant_probe import probe

    lm = load_model(str(tiny_recipe))
    res = probe(lm, ["Q4_0", "Q8_0", "IQ2_XS"], chunks=1, threads=2, progress=False)
    q4, q8, iq2 = res["Q4_0"], res["Q8_0"], res["IQ2_XS"]
    assert q4["kl_plain"] > 0 and q4["kl_imatrix"] > 0 and q4["kl_plain"] != q4["kl_imatrix"]
    assert q4["imatrix"] == (q4["kl_imatrix"] < q4["kl_plain"])
    assert q4["kl"] == min(q4["kl_plain"], q4["kl_imatrix"])
    assert q8["imatrix"] is False and "kl_imatrix" not in q8 and q8["kl"] == q8["kl_plain"]
    assert iq2["imatrix"] is True and "kl_plain" not in iq2 and iq2["kl"] == iq2["kl_imatrix"]  # needs one
    cost = QuantCost.from_json("Q4_0", "gguf", q4)
    assert cost.extra["imatrix"] == q4["imatrix"] and cost.plan_json()["imatrix"] == q4["imatrix"]
    calls = _forward_counter(lm)
    assert probe(lm, ["Q4_0", "Q8_0", "IQ2_XS"], chunks=1, threads=2, progress=False) == res and calls[0] == 0
    # rule 5 of solver/scope.py (what a plan does without --measure-all): with a matrix only, where
    # one helps; a separate cache entry, the same figure as the two-way probe's imatrix run
    only = probe(lm, ["Q4_0", "Q8_0"], chunks=1, threads=2, progress=False, plain_too=False)
    assert "kl_plain" not in only["Q4_0"] and only["Q4_0"]["imatrix"] is True
    assert only["Q4_0"]["kl"] == pytest.approx(q4["kl_imatrix"], rel=1e-6) and only["Q8_0"] == q8


def test_a_kept_probe_file_is_the_export_byte_for_byte(tmp_path, tiny_recipe, monkeypatch):
    """A build whose plan merges nothing moves the probe's file instead of exporting again: that is
    right only if the probe wrote exactly what the export writes (same float base, quantizer and
    importance matrix), for a type with a matrix, one without, and the session's shared Q8_0 file.
    Its own cache: a measurement already cached (the test above probes Q4_0 and Q8_0 the same way)
    is read, not quantized again, so it leaves no file to keep."""
    import hashlib

    monkeypatch.setenv("MKA_EDGE_CACHE", str(tmp_path / "cache"))

    from mka_edge.exporters.gguf import adopt_quantized, export_loaded
    from mka_edge.models.loading import load_model
    from mka_edge.solver.quant_probe import ProbeSession

    lm = load_model(str(tiny_recipe))
    handed = tmp_path / "handed"
    handed.mkdir()
    with ProbeSession(lm, chunks=1, threads=2, progress=False, plain_too=False) as session:
        session.retain = True
        res = session.measure(["IQ2_XS", "Q4_0", "Q8_0"])
        assert set(session.kept) == {"IQ2_XS", "Q4_0", "Q8_0"}
        dropped = session.kept["Q4_0"][0]
        session.retain_only("IQ2_XS")  # the Q8_0 file stays for the cache probe; Q4_0's is gone
        assert set(session.kept) == {"IQ2_XS"} and not dropped.exists() and session.q8_0().is_file()
        moved = session.hand_over("IQ2_XS", handed)
        assert session.hand_over("Q4_0", handed) is None  # dropped: nothing to hand over
    assert res["IQ2_XS"]["imatrix"] is True and moved == handed / "IQ2_XS.gguf"
    from mka_edge.targets import get_target

    gguf_target = get_target("gguf")
    made = gguf_target.made_by_probe(handed, lm, "IQ2_XS", True)
    assert made is not None and gguf_target.made_by_probe(handed, lm, "IQ2_XS", False) is None
    adopted = adopt_quantized(made[0], tmp_path / "adopted.gguf", made[1])
    fresh = export_loaded(lm, tmp_path / "fresh.gguf", "IQ2_XS", imatrix=True, progress=False)

    def sha(p):
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    assert sha(adopted["path"]) == sha(fresh["path"]) and not moved.exists()
    for key in ("tensor_types", "imatrix", "intermediate", "quant", "tokenizer", "file_bytes"):
        assert adopted[key] == fresh[key], key
