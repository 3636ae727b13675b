"""Attention-only removal (sleb-attn): the trajectory, the engine's evaluation of layers without
attention against the zero-o_proj model, the merged folder, the merge log, healing and the curve.

The model: a tiny random llama whose layer 3 attention is nearly harmless (o_proj scaled 1e-4) and
whose layer 1 adds little (o_proj x 0.05, down_proj x 1e-3), the other layers' residual writes
scaled up so that removing them costs something."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny, tiny_context

L = 6
HIDDEN, KV_DIM, INTER = 64, 32, 128  # make_tiny: hidden 64, 2 of 4 heads of 16 for K and V, MLP 128
ATTN_W = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_DIM + HIDDEN  # q, o; k, v; input_layernorm
REST_W = 3 * HIDDEN * INTER + HIDDEN  # gate, up, down; post_attention_layernorm


def attn_bytes(ctx_len: int = 4096) -> int:
    return 2 * ATTN_W + 2 * 2 * KV_DIM * ctx_len  # F16 weights + f16 K and V per token


REST_BYTES = 2 * REST_W


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path_factory.mktemp("attn") / "src", "llama", layers=L, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(4)
        layers = model.model.layers
        layers[3].self_attn.o_proj.weight.mul_(1e-4)
        layers[1].self_attn.o_proj.weight.mul_(0.05)
        layers[1].mlp.down_proj.weight.mul_(1e-3)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def ctx(src):
    return tiny_context(src)


@pytest.fixture(scope="module")
def traj(ctx):
    from mka_edge.mka.trajectory import trajectory

    return trajectory(ctx, "sleb-attn", 4, progress=False)


@pytest.fixture(scope="module")
def merged(ctx, traj, tmp_path_factory):
    """The model at K=2: layer 3's attention removed and layer 1 removed whole (so 3 becomes 2)."""
    from mka_edge.merging import merge

    out = tmp_path_factory.mktemp("attn-merged") / "k2"
    log = merge(ctx, 2, "sleb-attn", "calibrated", out, heldout=1, progress=False)
    return out, log


def test_sleb_attn_takes_a_harmless_attention_before_whole_layers_and_counts_reference_bytes(ctx, traj):
    from mka_edge.mka.attention import has_attention, single_source

    steps = traj["steps"]
    assert [s["k"] for s in steps] == [1, 2, 3, 4]
    assert (steps[0]["unit"], steps[0]["layer"], steps[0]["action"]) == ("attention", 3, "remove-attention")
    assert (steps[1]["unit"], steps[1]["layer"], steps[1]["action"]) == ("layer", 1, "remove")
    assert steps[0]["attn_removed"] == [3] and steps[0]["removed"] == []
    assert steps[1]["attn_removed"] == [3] and steps[1]["removed"] == [1]
    assert steps[0]["bytes_saved"] == attn_bytes()
    assert steps[1]["bytes_saved"] == 2 * attn_bytes() + REST_BYTES
    saved = 0
    for s in steps:
        comp = s["composition"]
        assert 0 not in s["attn_removed"] and not (s["unit"] == "attention" and s["layer"] == 0)
        assert "attention 0" not in s["shortlist"]
        assert single_source(comp[0]) not in s["attn_removed"]  # the first layer always keeps attention
        assert set(s["attn_removed"]) <= {single_source(c) for c in comp}  # never a layer removed whole
        full = s["unit"] == "layer" and s["layer"] not in (steps[s["k"] - 2]["attn_removed"] if s["k"] > 1 else [])
        saved += attn_bytes() if s["unit"] == "attention" else REST_BYTES + (attn_bytes() if full else 0)
        assert s["bytes_saved"] == saved and s["ref_context"] == 4096
        assert len(s["confirmed"]) == 3 and any(abs(v - s["calib_kl"]) < 1e-6 for v in s["confirmed"].values())
    assert len(ctx.current_layers()) == L and all(has_attention(x) for x in ctx.current_layers())  # restored
    assert not ctx.attn_removed


def test_reference_context_sets_the_bytes_and_keys_only_sleb_attn(ctx):
    from mka_edge.mka.attention import unit_bytes
    from mka_edge.mka.trajectory import _key

    assert unit_bytes(ctx.originals[2], ctx.arch, ctx.model.config, 1024) == (attn_bytes(1024), REST_BYTES)
    before = {m: _key(ctx, m, "calibrated") for m in ("sleb-attn", "sleb-fast")}
    saved = ctx.settings
    try:
        ctx.settings = replace(saved, ref_context=1024)
        assert _key(ctx, "sleb-attn", "calibrated") != before["sleb-attn"]
        assert _key(ctx, "sleb-fast", "calibrated") == before["sleb-fast"]  # other methods' caches stay
    finally:
        ctx.settings = saved


def test_the_engine_without_attention_computes_what_a_zero_o_proj_model_computes(ctx):
    """The engine's view (attention skipped) and the saved representation (o_proj zero, attention
    still run by transformers) give the same logits, and the engine's loss is that model's KL."""
    import copy

    from mka_edge.mka.engine import kl_from_logits
    from mka_edge.mka.fusion import identity
    from mka_edge.mka.layers import temporary_stack

    ctx.reset()
    ids = ctx.engine.batches[0]
    with torch.no_grad():  # the reference: the original model's log-probabilities
        ref_logp = torch.log_softmax(ctx.model(input_ids=ids, use_cache=False).logits.float(), -1)
    with temporary_stack(ctx.model, ctx.arch, ctx.stack(identity(L), {2, 4})), torch.no_grad():
        viewed = ctx.model(input_ids=ids, use_cache=False).logits
    zeroed = copy.deepcopy(ctx.model)
    with torch.no_grad():
        for i in (2, 4):
            zeroed.model.layers[i].self_attn.o_proj.weight.zero_()
        plain = zeroed(input_ids=ids, use_cache=False).logits
        assert torch.equal(viewed, plain)
        ctx.apply(identity(L), attn_removed={2, 4})
        want = float(kl_from_logits(ref_logp, plain).mean())
        assert ctx.engine.current_loss() == pytest.approx(want, rel=1e-5)
    ctx.reset()
    assert float(ctx.originals[2].self_attn.o_proj.weight.abs().sum()) > 0


def test_merged_folder_loads_in_plain_transformers_and_matches_the_engine(ctx, traj, merged):
    from transformers import AutoModelForCausalLM

    from mka_edge.mka.engine import kl_from_logits
    from mka_edge.mka.layers import temporary_stack
    from mka_edge.models.attention_removal import attention_removed

    out, log = merged
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    assert model.config.num_hidden_layers == L - 1
    assert attention_removed(model.config) == [2] and log["attention_removed"] == [2]
    for i, layer in enumerate(model.model.layers):
        zero = not layer.self_attn.o_proj.weight.any()
        assert zero == (i == 2)
    assert ctx.originals[3].self_attn.o_proj.weight.any()  # the working model's weights untouched
    step = traj["steps"][1]
    ids = ctx.engine.batches[0]
    ctx.reset()
    with torch.no_grad():
        ref_logp = torch.log_softmax(ctx.model(input_ids=ids, use_cache=False).logits.float(), -1)
        got = model(input_ids=ids, use_cache=False).logits
        with temporary_stack(ctx.model, ctx.arch, ctx.stack(step["composition"], step["attn_removed"])):
            want = ctx.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)
    kl = float(kl_from_logits(ref_logp, got).mean())
    assert kl == pytest.approx(step["calib_kl"], rel=1e-4, abs=1e-7)
    assert log["steps"][0]["heldout"]["kl"] >= 0 and log["layers_after"] == L - 1


def test_merge_log_lists_the_layers_without_attention_and_round_trips(merged):
    from mka_edge.merge_log import MergeLog, read_merge_log

    out, _ = merged
    data = json.loads((out / "merge_log.json").read_text())
    log = read_merge_log(out)
    assert log.attention_removed == (2,) and log.to_json() == data
    s1, s2 = log.steps
    assert (s1.unit, s1.layer, s1.attn_removed, s1.bytes_saved) == ("attention", 3, (3,), attn_bytes())
    assert (s2.unit, s2.layer, s2.removed) == ("layer", 1, (1,))
    assert s1.describe() == "remove attention [3]" and s2.describe() == "remove [1]"
    assert "unit" not in s1.extra and "attn_removed" not in s1.extra
    old = {k: v for k, v in data.items() if k != "attention_removed"}  # a log from before the field
    again = MergeLog.from_json(old)
    assert again.attention_removed == () and again.to_json() == old
    with pytest.raises(ValueError):
        MergeLog.from_json(data | {"attention_removed": ["2"]})


def test_lora_skips_the_removed_attention_and_heals_keep_it_zero(merged, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mka_edge.heal.distill import HealConfig, heal
    from mka_edge.heal.targets import select
    from mka_edge.merge_log import read_merge_log
    from mka_edge.models.attention_removal import attention_removed

    out, _ = merged
    wrapped, what = select(AutoModelForCausalLM.from_pretrained(out), "lora", None, 4)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wrapped.named_modules() if n.endswith(".lora_A")}
    assert not [n for n in adapted if ".layers.2.self_attn." in n]
    assert [n for n in adapted if ".layers.2.mlp." in n] and [n for n in adapted if ".layers.1.self_attn." in n]
    assert "attention of layers [2] stays removed" in what[0]

    before = load_file(str(out / "model.safetensors"))
    cfg = dict(steps=2, lr=1e-2, batch=2, seq_len=64, heldout_chunks=1, lora_rank=4)
    for train in ("lora", "all"):
        healed = tmp_path / train
        heal(str(out), healed, HealConfig(train=train, **cfg), progress=False, log=lambda m: None)
        after = load_file(str(healed / "model.safetensors"))
        assert not after["model.layers.2.self_attn.o_proj.weight"].any()
        for name in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.2.self_attn.{name}.weight"
            assert torch.equal(after[key], before[key])
        assert not torch.equal(
            after["model.layers.1.self_attn.q_proj.weight"], before["model.layers.1.self_attn.q_proj.weight"]
        )
        assert attention_removed(AutoModelForCausalLM.from_pretrained(healed).config) == [2]
        log = read_merge_log(healed)
        assert log.attention_removed == (2,) and log.heal["config"]["train"] == train


def test_changed_mode_trains_the_layer_around_a_removed_attention_but_not_the_attention(merged):
    from transformers import AutoModelForCausalLM

    from mka_edge.heal.targets import changed_layers, select
    from mka_edge.merge_log import read_merge_log

    out, _ = merged
    log = read_merge_log(out)
    model, _ = select(AutoModelForCausalLM.from_pretrained(out), "changed", list(log.layer_map), 4, L)
    layer = model.model.layers[2]
    assert not any(p.requires_grad for p in layer.self_attn.parameters())
    assert not layer.input_layernorm.weight.requires_grad
    assert all(p.requires_grad for p in layer.mlp.parameters())
    ident = [{"layer": i, "sources": [i], "weights": [1.0]} for i in range(5)]
    assert changed_layers(ident, 5, 5, [3]) == [2, 3, 4]


def test_merge_curve_reports_attention_removed_kept_and_bytes(ctx, traj):
    from mka_edge.solver.quality import merge_curve

    curve = merge_curve(ctx, "sleb-attn", 2, chunks=1, progress=False)
    assert len(curve["kl"]) == 3 and curve["kl"][0] == 0.0 and all(x >= 0 for x in curve["kl"])
    assert curve["attn_removed"] == [[], [3], [3]]
    assert curve["kept"] == [list(range(L)), list(range(L)), [0, 2, 3, 4, 5]]
    assert curve["bytes_saved"] == [0, attn_bytes(), 2 * attn_bytes() + REST_BYTES]
    other = merge_curve(ctx, "drop-last", 2, chunks=1, progress=False)
    assert other["attn_removed"] == [[], [], []]
    assert other["bytes_saved"] == [0, attn_bytes() + REST_BYTES, 2 * (attn_bytes() + REST_BYTES)]


def test_k_counts_units_for_sleb_attn():
    from mka_edge.errors import UserError
    from mka_edge.merging import check_k
    from mka_edge.mka.method_table import ALL_METHODS, AUTO_POOL

    assert "sleb-attn" in ALL_METHODS and "sleb-attn" not in AUTO_POOL
    check_k(2 * L - 2, L, "sleb-attn")
    with pytest.raises(UserError):
        check_k(2 * L - 1, L, "sleb-attn")
    with pytest.raises(UserError):
        check_k(L, L, "sleb-fast")


def test_offloaded_model_takes_the_same_units_and_saves_the_same_folder(src, tmp_path, monkeypatch):
    """With blocks on disk (--max-memory) the trajectory is the same, and the saved model too: the
    zero o_proj of an offloaded block is a real tensor, not read back from the disk."""
    from safetensors.torch import load_file

    import mka_edge.mka.engine as engine
    from mka_edge.mka.context import build_context
    from mka_edge.mka.output import build_model, save_merged
    from mka_edge.mka.trajectory import trajectory

    # both on the vocabulary-wide reference (the capped model's head is placed by accelerate): exact
    monkeypatch.setattr(engine, "linear_head", lambda model, head: False)
    small = dict(samples=2, seq_len=32, positions=32, repeats=1, loss_samples=2)
    plain = build_context(model=str(src), device="cpu", **small)
    capped = build_context(model=str(src), device="cpu", max_memory="cpu=600KB", **small)
    assert capped.lm.device_map["model.layers.3"] == "disk"
    a = trajectory(plain, "sleb-attn", 1, use_cache=False, progress=False)["steps"]
    b = trajectory(capped, "sleb-attn", 1, use_cache=False, progress=False)["steps"]
    assert [(s["unit"], s["layer"]) for s in a] == [(s["unit"], s["layer"]) for s in b] == [("attention", 3)]
    assert [s["calib_kl"] for s in a] == pytest.approx([s["calib_kl"] for s in b], rel=1e-6, abs=1e-9)
    step = a[-1]
    tensors = {}
    for ctx, name in ((plain, "plain"), (capped, "capped")):
        model = build_model(ctx, step["composition"], step["attn_removed"])
        save_merged(model, ctx.lm.tokenizer, {}, tmp_path / name)
        tensors[name] = {}
        for f in sorted((tmp_path / name).glob("*.safetensors")):
            tensors[name] |= load_file(f)
    x, y = tensors["plain"], tensors["capped"]
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert not y["model.layers.3.self_attn.o_proj.weight"].any()  # on disk in the capped model
    assert json.loads((tmp_path / "capped" / "config.json").read_text())["mka_edge_attention_removed"] == [3]
