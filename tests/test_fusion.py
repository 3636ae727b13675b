import json

import pytest
import torch
from conftest import tiny_context
from transformers import AutoModelForCausalLM

from mka_edge.merging import merge
from mka_edge.mka import fusion
from mka_edge.mka.layers import get_layers


def test_fused_layer_is_the_alpha_mix_and_differs_from_both_parents(tiny_dir):
    ctx = tiny_context(tiny_dir)
    comp = fusion.fuse(fusion.identity(ctx.n_original), 2, 0.3)
    fused = fusion.realize_layer(ctx.originals, comp[2], ctx.names)
    a, b = dict(ctx.originals[2].named_parameters()), dict(ctx.originals[3].named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, 0.3 * a[name] + 0.7 * b[name])
        assert not torch.allclose(p, a[name]) and not torch.allclose(p, b[name]), name
    # the originals are untouched
    assert not torch.allclose(
        dict(ctx.originals[2].named_parameters())[ctx.names[0]], dict(fused.named_parameters())[ctx.names[0]]
    )


def test_compositions_stay_convex_and_record_sources():
    comp = fusion.identity(5)
    comp = fusion.fuse(comp, 1, 0.25)  # layers 1,2
    comp = fusion.fuse(comp, 0, 0.5)  # layer 0 with (1,2)
    assert len(comp) == 3
    assert comp[0] == {0: 0.5, 1: 0.125, 2: 0.375}
    assert abs(sum(comp[0].values()) - 1) < 1e-12
    assert fusion.remove(comp, 1) == [comp[0], comp[2]]


def test_every_block_weight_is_listed_by_the_architecture_table(tiny_dir, tiny_qwen_dir):
    for d in (tiny_dir, tiny_qwen_dir):
        ctx = tiny_context(d)
        have = {n for n, _ in ctx.originals[0].named_parameters()}
        assert have == set(ctx.names)
    assert any(n.endswith("q_proj.bias") for n in tiny_context(tiny_qwen_dir).names)


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_qwen_dir"])
def test_merged_directory_loads_generates_and_holds_the_fused_weights(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    ctx = tiny_context(src)
    out = tmp_path / "merged"
    log = merge(ctx, 2, "mka", "0.3", out, heldout=0, progress=False)
    assert log["layers_after"] == ctx.n_original - 2
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == ctx.n_original - 2
    saved = json.loads((out / "merge_log.json").read_text())
    assert [s["alpha"] for s in saved["steps"]] == [0.3, 0.3]
    # each saved layer equals the recorded mix of original layers
    orig = {i: dict(l.named_parameters()) for i, l in enumerate(ctx.originals)}
    for entry, layer in zip(saved["layer_map"], get_layers(model, ctx.arch)):
        for name, p in layer.named_parameters():
            want = sum(w * orig[i][name] for i, w in zip(entry["sources"], entry["weights"]))
            torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
    assert any(len(e["sources"]) > 1 for e in saved["layer_map"])
    ids = ctx.lm.tokenizer("The history of", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
