import pytest
import torch
from conftest import tiny_context

from mka_edge.mka.fusion import keep_only
from mka_edge.mka.methods import AUTO_POOL
from mka_edge.mka.trajectory import trajectory


@pytest.fixture(scope="module")
def ctx(tiny_dir):
    return tiny_context(tiny_dir)


@pytest.mark.parametrize(
    "method", ["mka", "mka-oneshot", "mka-guided", "drop-last", "shortgpt", "angular", "sleb", "sleb-fast"]
)
def test_every_method_walks_k_steps_down_the_stack(ctx, method):
    tr = trajectory(ctx, method, 3, "calibrated", use_cache=False, progress=False)
    assert [s["k"] for s in tr["steps"]] == [1, 2, 3]
    for s in tr["steps"]:
        assert len(s["composition"]) == ctx.n_original - s["k"]
        for c in s["composition"]:
            assert abs(sum(c.values()) - 1) < 1e-9
        assert s["calib_kl"] >= 0
    assert len(ctx.current_layers()) == ctx.n_original  # the working model is restored


def test_drop_last_removes_the_last_layers(ctx):
    tr = trajectory(ctx, "drop-last", 2, use_cache=False, progress=False)
    assert tr["steps"][1]["composition"] == keep_only(ctx.n_original, [4, 5])


def test_calibrated_fusion_is_never_worse_than_removing_one_layer_of_the_pair(ctx):
    tr = trajectory(ctx, "mka", 1, "calibrated", use_cache=False, progress=False)
    step = tr["steps"][0]
    pos = step["position"]
    ctx.reset()
    layers = ctx.current_layers()
    drop_second = ctx.engine.loss_from(pos, [layers[pos]] + layers[pos + 2 :])
    drop_first = ctx.engine.loss_from(pos, layers[pos + 1 :])
    assert step["calib_kl"] <= min(drop_first, drop_second) + 1e-9


def test_paper_alpha_is_the_pair_similarity(ctx):
    tr = trajectory(ctx, "mka", 2, "paper", use_cache=False, progress=False)
    for s in tr["steps"]:
        assert s["alpha"] == pytest.approx(s["similarity"], abs=1e-6)
        assert 0 < s["alpha"] <= 1


def test_guided_never_fuses_the_first_or_last_layer(ctx):
    tr = trajectory(ctx, "mka-guided", 3, "calibrated", use_cache=False, progress=False)
    for s in tr["steps"]:
        assert 0 not in s["pair_sources"][0] and ctx.n_original - 1 not in s["pair_sources"][1]


def test_auto_takes_the_least_calibration_loss_per_k_and_the_cache_replays_it(ctx):
    tr = trajectory(ctx, "auto", 3, "calibrated", progress=False)
    for s in tr["steps"]:
        assert set(s["chosen_from"]) == set(AUTO_POOL)
        assert s["calib_kl"] == pytest.approx(min(s["chosen_from"].values()), abs=1e-6)
    again = trajectory(ctx, "auto", 2, "calibrated", progress=False)
    assert again["cached"] is True
    assert [s["composition"] for s in again["steps"]] == [s["composition"] for s in tr["steps"][:2]]


def test_sleb_fast_screens_the_shortlist_and_confirms_the_best_on_sleb_s_loss(ctx, monkeypatch):
    """sleb-fast screens the least block-influence layers on the first quarter of every calibration
    sequence, confirms the best CONFIRM of them on sleb's full loss and takes the least."""
    from mka_edge.mka import methods

    monkeypatch.setattr(methods, "shortlist_size", lambda n: 4)
    monkeypatch.setattr(methods, "CONFIRM", 2)
    ctx.reset()
    layers = ctx.current_layers()
    bi = methods.block_influence(ctx.engine.inputs)
    full = [ctx.engine.loss_from(p, layers[p + 1 :]) for p in range(len(layers))]
    short = sorted(range(len(layers)), key=lambda p: bi[p])[:4]
    step = trajectory(ctx, "sleb-fast", 1, use_cache=False, progress=False)["steps"][0]
    assert sorted(map(int, step["shortlist"])) == sorted(short)
    screened = sorted(short, key=lambda p: step["shortlist"][str(p)])[:2]
    assert sorted(map(int, step["confirmed"])) == sorted(screened)
    seq = ctx.engine.batches[0].shape[1]
    for p in short:  # the screen is the KL on the first quarter of the positions
        t, c = ctx.engine.kl_sum(p, layers[p + 1 :], prefix=seq // methods.SCREEN_FRACTION)
        assert c == sum(len(b) for b in ctx.engine.batches) * (seq // 4)
        assert step["shortlist"][str(p)] == pytest.approx(t / c, abs=1e-6)
    for p in screened:  # the confirmed losses are sleb's
        assert step["confirmed"][str(p)] == pytest.approx(full[p], abs=1e-6)
    assert step["removed"] == [min(screened, key=lambda p: full[p])]


@pytest.mark.parametrize("pos", [0, 2, 5])
def test_partial_refresh_equals_a_full_one(ctx, pos):
    """After a layer is removed, recomputing the cached hidden states from its position on gives the
    states a full forward pass gives (the ones before it are reused)."""
    from mka_edge.mka.fusion import identity, remove

    ctx.reset()
    ctx.apply(remove(identity(ctx.n_original), pos), refresh=False)
    ctx.engine.refresh_from(pos)
    partial = [list(b) for b in ctx.engine.inputs]
    ctx.engine.refresh()
    assert len(partial[0]) == len(ctx.engine.inputs[0]) == ctx.n_original
    for got, want in zip(partial, ctx.engine.inputs):
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-5)
    ctx.reset()
