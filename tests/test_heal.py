"""Healing: distillation of a merged tiny model from its original (fast), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny, predicted_memory_mb, tiny_build_inputs, tiny_context


@pytest.fixture(scope="module")
def merged_tiny(tmp_path_factory):
    from mka_edge.merging import merge

    root = tmp_path_factory.mktemp("heal")
    from transformers import AutoModelForCausalLM

    src = make_tiny(root / "src", "llama", layers=6, seed=21)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():  # layers that move the residual stream, so merging two of them costs something
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(6)
    model.save_pretrained(src, safe_serialization=True)
    out = root / "merged"
    merge(tiny_context(src), 2, "mka-guided", "0.5", out, heldout=0, progress=False)
    return out


def _cfg(**kw):
    from mka_edge.heal.distill import HealConfig

    base = dict(steps=24, lr=3e-4, batch=2, seq_len=64, checkpoint_every=4, heldout_chunks=1)
    return HealConfig(**{**base, **kw})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_heal_lowers_heldout_kl_and_writes_a_plain_model(tmp_path, merged_tiny):
    from mka_edge.heal.distill import heal
    from mka_edge.models.loading import load_model

    rec = heal(str(merged_tiny), tmp_path / "healed", _cfg(), progress=False, log=lambda m: None)
    b, a = rec["heldout_before"]["kl"], rec["heldout_after"]["kl"]
    assert a < 0.7 * b, (b, a)
    assert rec["losses"][-1] < rec["losses"][0]
    lm = load_model(str(tmp_path / "healed"))  # a plain Hugging Face folder
    assert lm.num_layers == 4
    log = json.loads((tmp_path / "healed" / "merge_log.json").read_text())
    assert log["merge_layers"] == 2 and log["heal"]["heldout_after"]["kl"] == pytest.approx(a)
    assert not list(tmp_path.glob(".healed*"))  # checkpoint removed


def test_interrupted_heal_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, merged_tiny):
    from mka_edge.heal.distill import heal

    class Stop(Exception):
        pass

    def stop_at_7(step, loss):
        if step == 7:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        heal(str(merged_tiny), out, _cfg(steps=10), progress=False, log=lambda m: None, on_step=stop_at_7)
    from mka_edge.cache import cache_root

    metas = (cache_root() / "heal-checkpoints").glob("*/meta.json")  # checkpoints live in the cache, by key
    assert not out.exists() and any(json.loads(m.read_text())["step"] == 4 for m in metas)
    rec = heal(str(merged_tiny), out, _cfg(steps=10), progress=False, log=lambda m: None)
    assert rec["resumed_from"] == 4 and rec["steps_run_here"] == 6 and len(rec["losses"]) == 10
    straight = heal(str(merged_tiny), tmp_path / "straight", _cfg(steps=10), progress=False, log=lambda m: None)
    assert straight["resumed_from"] == 0
    w1, w2 = _weights(out), _weights(tmp_path / "straight")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["changed", "lora"])
def test_partial_heals_train_what_they_say(tmp_path, merged_tiny, mode):
    from mka_edge.heal.distill import heal
    from mka_edge.heal.targets import changed_layers

    rec = heal(
        str(merged_tiny),
        tmp_path / mode,
        _cfg(train=mode, steps=24, lr=3e-4 if mode == "changed" else 2e-3),
        progress=False,
        log=lambda m: None,
    )
    assert rec["heldout_after"]["kl"] < rec["heldout_before"]["kl"]
    before, after = _weights(merged_tiny), _weights(tmp_path / mode)
    assert set(before) == set(after)  # LoRA merged back: same tensors as before
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if mode == "changed":
        layer_map = json.loads((merged_tiny / "merge_log.json").read_text())["layer_map"]
        idx = changed_layers(layer_map, 4)
        assert changed and all(any(f"layers.{i}." in n for i in idx) for n in changed)
        assert any(f"layers.{i}." in n for i in range(4) if i not in idx for n in before)  # some layers frozen
    else:
        assert changed and all(n.endswith("proj.weight") for n in changed)  # only the adapted linears


def test_changed_layers_finds_fusions_and_gaps():
    from mka_edge.heal.targets import changed_layers

    lm = [
        {"sources": [0], "weights": [1.0]},
        {"sources": [1, 2], "weights": [0.5, 0.5]},
        {"sources": [3], "weights": [1.0]},
        {"sources": [5], "weights": [1.0]},
        {"sources": [6], "weights": [1.0]},
        {"sources": [7], "weights": [1.0]},
    ]
    assert changed_layers(lm, 6) == [0, 1, 2, 3]  # fusion at 1 (+ neighbours), gap between 3 and 5
    ends = [{"sources": [i], "weights": [1.0]} for i in (1, 2, 3)]  # layers 0 and 4 of 5 removed
    assert changed_layers(ends, 3, n_original=5) == [0, 2] and changed_layers(ends, 3) == [0]


def test_healed_model_exports_to_gguf(tmp_path, merged_tiny):
    from mka_edge.exporters.gguf import export_loaded
    from mka_edge.heal.distill import heal
    from mka_edge.models.loading import load_model

    heal(str(merged_tiny), tmp_path / "healed", _cfg(steps=4), progress=False, log=lambda m: None)
    s = export_loaded(
        load_model(str(tmp_path / "healed")), tmp_path / "healed.gguf", "F32", pre_tokenizer="gpt-2", progress=False
    )
    assert s["block_count"] == 4 and s["provenance"]["merge_layers"] == 2

    from llama_cpp import Llama

    llm = Llama(model_path=str(tmp_path / "healed.gguf"), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"hello there")) > 0


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=dict(os.environ), timeout=600
    )


def test_heal_refuses_bad_input(tmp_path, merged_tiny):
    from transformers import AutoConfig, AutoModelForCausalLM

    wide = tmp_path / "wide"
    make_tiny(wide, "llama", layers=2, seed=1)
    cfg = AutoConfig.from_pretrained(wide)
    cfg.hidden_size, cfg.intermediate_size = 32, 64
    AutoModelForCausalLM.from_config(cfg).save_pretrained(wide, safe_serialization=True)
    small = tmp_path / "small.txt"
    small.write_text("Only a few words of text here.")
    common = ["--model", str(merged_tiny), "--heal-seq-len", "64"]
    cases = [
        (["--steps", "-1"], "--steps must be 0 or more"),
        (["--steps", "3", "--reference", str(wide)], "hidden size"),
        (["--steps", "100000"], "distinct calibration windows"),
        (["--steps", "3", "--calibration", str(small)], "distinct calibration windows"),
        (["--steps", "3", "--device", "cuda"], "no CUDA GPU"),
    ]
    for extra, needle in cases:
        if "cuda" in extra and torch.cuda.is_available():
            continue
        r = _cli("heal", *common, *extra, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-800:])
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_footprint_on_paper_matches_llama3_8b_and_orders_the_choices():
    from mka_edge.heal.footprint import LLAMA3_8B, heal_footprint

    assert abs(LLAMA3_8B.params() - 8.03e9) < 0.01e9  # the published parameter count
    full, changed, lora = (heal_footprint(LLAMA3_8B, 8, m) for m in ("all", "changed", "lora"))
    assert lora["total"] < changed["total"] < full["total"]
    assert full["trained_params_B"] == round(LLAMA3_8B.params(24) / 1e9, 2)
    assert lora["trained_params_B"] < 0.01 * full["trained_params_B"]


def test_merge_with_heal_steps_writes_a_healed_merge(tmp_path):
    src = make_tiny(tmp_path / "src", "llama", layers=4, seed=22)
    out = tmp_path / "merged"
    r = _cli(
        "merge",
        "--model",
        str(src),
        "-k",
        "1",
        "--method",
        "drop-last",
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--positions",
        "96",
        "--repeats",
        "2",
        "--heldout-chunks",
        "0",
        "--heal-steps",
        "3",
        "--heal-seq-len",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "merge_log.json").read_text())
    assert log["merge_layers"] == 1 and log["heal"]["config"]["steps"] == 3 and log["heal"]["steps_run_here"] == 3
    assert (out / "heal_log.json").is_file() and "healed 3 steps" in r.stdout
    assert not list(tmp_path.glob(".merged*"))  # no unhealed or checkpoint folder left


def test_healed_quality_curve_is_below_the_merge_curve_and_cached(tmp_path, merged_tiny):
    from mka_edge.solver.quality import healed_curve, merge_curve

    src = merged_tiny.parent / "src"
    ctx = tiny_context(src)
    curve = merge_curve(ctx, "mka-guided", 2, "0.5", chunks=1, progress=False)
    healed = healed_curve(ctx, curve, "mka-guided", "0.5", _cfg(steps=16), progress=False)
    assert healed["kl"][0] == 0.0 and len(healed["kl"]) == 3 and healed["unhealed_kl"] == curve["kl"]
    assert all(h < u for h, u in zip(healed["kl"][1:], curve["kl"][1:])), (healed["kl"], curve["kl"])
    again = healed_curve(ctx, curve, "mka-guided", "0.5", _cfg(steps=16), progress=False)
    assert again["cached"] and again["kl"] == healed["kl"]


def test_heal_points_spread_up_to_k_max_and_interpolation_keeps_the_measured_points():
    from mka_edge.solver.quality import heal_points, interpolate_healed

    assert heal_points(8, 4) == [2, 4, 6, 8] and heal_points(3, 4) == [1, 2, 3] and heal_points(5, 0) == [1, 2, 3, 4, 5]
    assert heal_points(10, 1) == [10] and heal_points(9, 2) == [4, 9]
    unhealed = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6]
    healed = interpolate_healed(unhealed, {2: 0.1, 4: 0.6})  # ratios 0.5 at K=2 and 0.75 at K=4
    assert healed[0] == 0.0 and healed[2] == 0.1 and healed[4] == 0.6
    assert healed[1] == pytest.approx(0.05)  # below the first point: its ratio
    assert healed[3] == pytest.approx(0.4 * 0.625)  # between: the ratio interpolated
    assert healed[5] == pytest.approx(1.6 * 0.75)  # beyond the last: its ratio


def test_healed_curve_heals_only_its_points(tmp_path, merged_tiny):
    from mka_edge.solver.quality import healed_curve, merge_curve

    ctx = tiny_context(merged_tiny.parent / "src")
    curve = merge_curve(ctx, "mka-guided", 3, "0.5", chunks=1, progress=False)
    healed = healed_curve(ctx, curve, "mka-guided", "0.5", _cfg(steps=8), points=1, progress=False)
    assert healed["healed_at"] == [3] and healed["ppl"][1] is None and healed["ppl"][3] is not None
    ratio = healed["kl"][3] / curve["kl"][3]
    assert ratio < 1 and healed["kl"][1] == pytest.approx(curve["kl"][1] * ratio)
    # the source stays usable for merging after serving as the heal's teacher
    assert all(p.dtype == torch.float32 for p in ctx.lm.model.parameters())


def test_build_with_heal_steps_heals_the_chosen_merge(tmp_path):
    """`build --heal-steps` end to end on a tiny model: plan on the healed curve, heal, export,
    validate in llama.cpp, and a report that shows the heal."""
    src, recipe, profile = tiny_build_inputs(tmp_path, seed=23)
    env = dict(os.environ, MKA_EDGE_CACHE=str(tmp_path / "cache"))
    common = [
        "--profile",
        str(profile),
        "--model",
        str(recipe),
        "--method",
        "drop-last",
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--positions",
        "96",
        "--repeats",
        "2",
        "--max-merge",
        "2",
        "--quants",
        "Q8_0",
        "--device",
        "cpu",
    ]

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=env, timeout=1200
        )

    r = cli("plan", *common, "--out", str(tmp_path / "plan"))
    assert r.returncode == 0, r.stderr[-3000:]
    mem = {c["k"]: c["memory_mb"] for c in json.loads((tmp_path / "plan" / "plan.json").read_text())["candidates"]}
    assert set(mem) == {0}  # Q8_0 fits unmerged and is the only type: no merge can win, none is scored
    mem[1] = predicted_memory_mb(src, "Q8_0", k=1, context=1024)
    assert mem[1] < mem[0]
    budget = (mem[0] + mem[1]) / 2  # K=0 does not fit: the build has to merge
    out = tmp_path / "pkg"
    r = cli(
        "build",
        *common,
        "--budget-mb",
        f"{budget:.4f}",
        "--mmlu-per-subject",
        "0",
        "--heal-steps",
        "4",
        "--heal-seq-len",
        "64",
        "--heal-curve-points",
        "1",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["heal"]["steps"] == 4 and plan["curve"]["healed_at"] == [2]
    assert plan["curve"]["kl"][2] < plan["curve"]["unhealed_kl"][2]
    m = json.loads((out / "manifest.json").read_text())
    h = m["attempts"][-1]["heal"]
    assert m["plan"]["k"] >= 1 and h["steps"] == 4 and h["heldout_kl_after"] < h["heldout_kl_before"]
    assert "## Healing (4 distillation steps, all)" in (out / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]


def test_a_recipe_sets_heal_defaults_and_the_command_line_wins(tmp_path):
    src = make_tiny(tmp_path / "src", "llama", layers=4, seed=24)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nsource:\n  kind: hf-dir\n  path: {src}\narchitecture: llama\n"
        "heal:\n  steps: 3\n  train: changed\n  lr: 0.0001\n"
    )
    base = [
        "merge",
        "--model",
        str(recipe),
        "-k",
        "1",
        "--method",
        "drop-last",
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--positions",
        "96",
        "--repeats",
        "2",
        "--heldout-chunks",
        "0",
        "--heal-seq-len",
        "64",
        "--device",
        "cpu",
    ]
    r = _cli(*base, "--out", str(tmp_path / "a"))  # no --heal-steps: the recipe's 3 steps, changed layers
    assert r.returncode == 0, r.stderr[-2000:]
    heal = json.loads((tmp_path / "a" / "merge_log.json").read_text())["heal"]
    assert heal["config"]["steps"] == 3 and heal["config"]["train"] == "changed" and heal["config"]["lr"] == 1e-4
    r = _cli(*base, "--train", "all", "--heal-steps", "2", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-2000:]
    heal = json.loads((tmp_path / "b" / "merge_log.json").read_text())["heal"]
    assert heal["config"]["steps"] == 2 and heal["config"]["train"] == "all" and heal["config"]["lr"] == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("train: changed", "train: everything"))
    r = _cli(*base[:2], str(bad), *base[3:], "--out", str(tmp_path / "c"))
    assert (
        r.returncode == 2
        and "field 'heal.train' must be all, changed, lora or qlora" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert not (tmp_path / "c").exists()


def test_a_lora_heal_in_a_16_bit_build_stays_16_bit_and_uses_the_loaded_teacher(tmp_path, merged_tiny, monkeypatch):
    """Issue 23 item 3: the build's loaded source (here bf16) is the teacher as it is (no second
    copy), a LoRA student loads in the same 16 bits with float32 adapters, heals (held-out KL
    falls) and is merged back into bf16 weights; a full-parameter heal keeps a float32 student
    (AdamW's steps vanish in bf16) against the same 16-bit teacher."""
    from mka_edge.evaluation import default_reference
    from mka_edge.heal.distill import heal, student_dtype, teacher_from
    from mka_edge.models.loading import load_model

    teacher = load_model(default_reference(str(merged_tiny)), "cpu", torch.bfloat16)
    assert teacher_from(teacher) is teacher
    assert student_dtype(_cfg(train="lora"), teacher) == torch.bfloat16
    assert student_dtype(_cfg(train="all"), teacher) == torch.float32
    assert (
        student_dtype(_cfg(train="lora"), None) == torch.float32
    )  # on a CPU the CLI's heal loads its own float32 teacher

    import mka_edge.heal.distill as distill

    loads = []
    real_load = distill.load_model
    monkeypatch.setattr(
        distill, "load_model", lambda spec, *a, **k: loads.append(str(spec)) or real_load(spec, *a, **k)
    )
    rec = heal(
        str(merged_tiny),
        tmp_path / "healed",
        _cfg(train="lora", lr=2e-3),
        progress=False,
        log=lambda m: None,
        reference_model=teacher_from(teacher),
        device="cpu",
    )
    assert rec["dtype"] == "bfloat16" and rec["trained"][0].startswith("LoRA rank 16")
    assert rec["heldout_after"]["kl"] < rec["heldout_before"]["kl"], rec
    weights = _weights(tmp_path / "healed")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # merged back into 16 bits
    assert not any("lora" in name for name in weights)
    assert all(p.dtype == torch.bfloat16 for p in teacher.model.parameters())  # the teacher untouched
    assert loads == [str(merged_tiny)]  # the student only: no second teacher

    # a full-parameter heal: a float32 student, saved in the teacher's 16 bits (the build reloads it mapped)
    rec = heal(
        str(merged_tiny),
        tmp_path / "healed-all",
        _cfg(train="all", steps=4),
        progress=False,
        log=lambda m: None,
        reference_model=teacher,
        device="cpu",
    )
    assert rec["dtype"] == "float32"
    assert {t.dtype for t in _weights(tmp_path / "healed-all").values()} == {torch.bfloat16}


def test_a_qlora_heal_trains_on_an_nf4_base_against_cached_targets_and_merges_into_the_original_weights(
    tmp_path, merged_tiny, monkeypatch
):
    """Issue 23 item 4: ``--train qlora`` quantizes the student's block linears to NF4 with
    bitsandbytes (on the CPU here), trains LoRA adapters against the teacher's top-k log-probs
    from the cache (the teacher is gone before the student loads), and merges the adapters into
    the merged folder's own weights: each healed linear differs from its unhealed weight by a
    rank <= 16 update (merged into the NF4 copy, the difference would be full rank)."""
    pytest.importorskip("bitsandbytes", reason="--train qlora needs bitsandbytes")
    import gc
    import weakref

    import mka_edge.heal.distill as distill

    alive, nf4 = [], []
    real_load = distill.load_model

    def nf4_alive() -> int:
        gc.collect()
        return sum(type(o).__name__ == "Params4bit" for o in gc.get_objects())

    def load(spec, *a, **k):
        held = [r() is not None for _, _, r, _ in alive]
        nf4.append(nf4_alive())
        lm = real_load(spec, *a, **k)
        alive.append((str(spec), held, weakref.ref(lm.model), lm.model.dtype))
        return lm

    monkeypatch.setattr(distill, "load_model", load)
    rec = distill.heal(
        str(merged_tiny), tmp_path / "healed", _cfg(train="qlora", lr=2e-3), progress=False, log=lambda m: None
    )
    assert "NF4 base" in rec["trained"][0] and rec["teacher"]["form"] == "top-k cache", rec
    assert rec["heldout_after"]["kl"] < 0.9 * rec["heldout_before"]["kl"], rec
    assert rec["losses"][-1] < rec["losses"][0]
    # teacher, student (teacher already freed), the 16-bit base for the merge (student freed)
    assert [a[0] for a in alive][1:] == [str(merged_tiny)] * 2 and alive[1][1] == [False], alive
    assert alive[2][1] == [False, False], alive
    assert nf4 == [0, 0, 0], nf4  # no 4-bit weight outlives the training (the reload starts clean)
    before, after = _weights(merged_tiny), _weights(tmp_path / "healed")
    assert not any("lora" in n for n in after)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    delta = (after["model.layers.1.mlp.up_proj.weight"] - before["model.layers.1.mlp.up_proj.weight"]).double()
    rank = int(torch.linalg.matrix_rank(delta, rtol=1e-6))
    assert 0 < rank <= 16 < min(delta.shape), rank


def test_the_qlora_footprint_fits_an_8b_heal_on_24_gb_and_counts_what_bitsandbytes_holds(merged_tiny):
    """heal/footprint.py: a rank-16 LoRA heal of Llama-3-8B holds a 16-bit teacher beside the
    student (over 24 GB); QLoRA holds neither (its peak is the 16-bit student alone, for the
    before/after measure and the merge), and its NF4 term is what bitsandbytes really allocates."""
    pytest.importorskip("bitsandbytes", reason="--train qlora needs bitsandbytes")
    from mka_edge.heal.footprint import LLAMA3_8B, NF4_BITS, ModelShape, heal_footprint
    from mka_edge.heal.nf4 import nf4_bytes, quantize_linears
    from mka_edge.models.loading import load_model

    lora, qlora = heal_footprint(LLAMA3_8B, 0, "lora"), heal_footprint(LLAMA3_8B, 0, "qlora")
    assert lora["total"] > 24 > qlora["total"] and qlora["teacher_weights"] == 0, (lora, qlora)
    assert qlora["student_weights"] < 0.4 * lora["student_weights"]

    lm = load_model(str(merged_tiny), "cpu", torch.bfloat16)
    c = lm.model.config
    shape = ModelShape(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        kv_dim=c.num_key_value_heads * (c.hidden_size // c.num_attention_heads),
        vocab=c.vocab_size,
        tied=bool(c.tie_word_embeddings),
    )
    n = quantize_linears(lm.model, list(lm.arch.lora_targets), [], torch.bfloat16)
    held = [m.weight for m in lm.model.modules() if type(m).__name__ == "Linear4bit"]
    assert n == shape.layers * shape.linear_params and len(held) == 7 * shape.layers
    assert sum(nf4_bytes(w) for w in held) == pytest.approx(n * NF4_BITS / 8, rel=0.02)


def test_a_qlora_heal_with_a_16_bit_teacher_handed_in_stays_16_bit_and_trains_past_an_eval(tmp_path, merged_tiny):
    """A build's bf16 source as teacher: the QLoRA student computes in bf16 and is saved in bf16;
    a held-out measure every 2 steps (eval mode, where bitsandbytes would repack its CPU weights
    for inference) leaves the later steps training."""
    pytest.importorskip("bitsandbytes", reason="--train qlora needs bitsandbytes")
    from mka_edge.evaluation import default_reference
    from mka_edge.heal.distill import heal
    from mka_edge.models.loading import load_model

    teacher = load_model(default_reference(str(merged_tiny)), "cpu", torch.bfloat16)
    rec = heal(
        str(merged_tiny),
        tmp_path / "healed",
        _cfg(train="qlora", lr=2e-3, steps=8, eval_every=2),
        progress=False,
        log=lambda m: None,
        reference_model=teacher,
        device="cpu",
    )
    assert rec["dtype"] == "bfloat16" and [c["step"] for c in rec["curve"]] == [0, 2, 4, 6, 8]
    assert rec["curve"][-1]["kl"] < rec["curve"][1]["kl"] < rec["curve"][0]["kl"], rec["curve"]
    assert {t.dtype for t in _weights(tmp_path / "healed").values()} == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in teacher.model.parameters())
