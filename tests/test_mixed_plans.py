"""Issue 25: mixed plans as a plan lever.  The pure part (which tensors an edit set keeps, the
renumbering a merge needs, removal as the zero-bit end, the budget the memory model leaves) on
made-up costs; the whole lever on SmolLM2 (plan, build from plan.json, llama.cpp, bytes exact)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mka_edge.targets  # noqa: F401  (registers the targets' cost models)
from mka_edge.records import CacheCost, EditSet
from mka_edge.solver.memory import Shape
from mka_edge.solver.mixed_plans import MIXED, kept_tensors, mixed_candidates, planned_bytes, renumbered
from mka_edge.solver.tensor_sensitivity import Sensitivity, TensorCost

N_LAYERS = 4
KINDS = ("attn_q", "ffn_down")


def _sens() -> Sensitivity:
    """4 layers x 2 kinds + the embedding; Q8_0 at 8 MiB a tensor, Q5_0 at 5 MiB with 0.01 nats
    more (Q5_0: llama.cpp keeps no repacked copy of it, so file and resident bytes agree)."""
    mib = 2**20
    table = {}
    for layer in range(N_LAYERS):
        for kind in KINDS:
            n = f"blk.{layer}.{kind}.weight"
            table[n] = TensorCost(n, kind, layer, rows=64)
    table["token_embd.weight"] = TensorCost("token_embd.weight", "token_embd", None, rows=1000)
    for r in table.values():
        r.actual = {"Q8_0": "Q8_0", "Q5_0": "Q5_0"}
        r.bytes = {"Q8_0": 8 * mib, "Q5_0": 5 * mib}
        r.err = {"Q8_0": 0.0, "Q5_0": 1.0}
    scales = {n: 0.01 for n in table}
    # 1000 bytes of norms per layer, 300 of them the attention norm
    return Sensitivity(table, scales, ("Q8_0", 0.001), "Q5_0", (1000,) * N_LAYERS, 2000, (300,) * N_LAYERS)


def _shape() -> Shape:
    return Shape(N_LAYERS, 64, 4, 4, 16, 128, 1000, tied_embeddings=True)


PLAN = dict(
    context=256,
    bandwidth_gbps=10.0,
    efficiency=0.5,
    min_tps=0.0,
    max_kl=1.0,
    overhead_mb=10.0,
)


def test_an_edit_set_keeps_its_layers_tensors_and_renumbers_them():
    sens = _sens()
    e = EditSet("sleb", 1, (0, 1, 3), attn_removed=(3,))
    kept = kept_tensors(sens, e)
    assert "blk.2.attn_q.weight" not in kept and "blk.2.ffn_down.weight" not in kept  # removed layer
    assert "blk.3.attn_q.weight" not in kept and "blk.3.ffn_down.weight" in kept  # attention removed
    assert "token_embd.weight" in kept
    types = {n: "Q5_0" for n in kept}
    new = renumbered(types, list(e.kept))
    assert "blk.2.ffn_down.weight" in new and "blk.3.ffn_down.weight" not in new  # block 3 is block 2 now
    assert new["token_embd.weight"] == "Q5_0"
    # bytes: 6 kept weights at 5 MiB (2 + 2 + ffn_down of 3 + the embedding), the norms of the kept layers, the outside
    assert planned_bytes(sens, types, [0, 1, 3]) == 6 * 5 * 2**20 + 3 * 1000 + 2000
    # layer 3 kept without attention: a deci file drops its attention norm too
    assert planned_bytes(sens, types, [0, 1, 3], e.attn_removed) == 6 * 5 * 2**20 + 3 * 1000 - 300 + 2000


def test_removal_is_the_zero_bit_end_of_the_same_budget():
    """At a budget where the unmerged model must take Q4_0 in places, removing a layer frees its
    bytes for the rest: the K=1 allocation holds more Q8_0 tensors than the K=0 one."""
    sens = _sens()
    edits = [EditSet("sleb", 0, (0, 1, 2, 3)), EditSet("sleb", 1, (0, 1, 3), kl=0.001)]
    cands = mixed_candidates(
        sens, _shape(), edits, [CacheCost("f16")], target="gguf", incumbent_kl=1.0, budget_mb=65.0, **PLAN
    )
    by_k = {c.k: c for c in cands}
    assert set(by_k) == {0, 1} and all(c.quant == MIXED for c in cands)
    q8 = {k: sum(t == "Q8_0" for t in c.tensor_types.values()) for k, c in by_k.items()}
    assert 0 < q8[0] < 9  # the unmerged model cannot keep every tensor at Q8_0 here
    assert q8[1] > q8[0]
    assert all(c.fits_memory and c.memory_mb <= 65.0 for c in cands)
    assert "blk.2.attn_q.weight" not in by_k[1].tensor_types
    # each candidate's quant KL is the floor plus the scaled error of its Q5_0 tensors
    for c in cands:
        low = sum(t == "Q5_0" for t in c.tensor_types.values())
        assert c.kl_terms["quant"] == pytest.approx(0.001 + 0.01 * low)


def test_an_edit_set_that_cannot_beat_the_incumbent_is_not_allocated():
    sens = _sens()
    edits = [EditSet("sleb", 0, (0, 1, 2, 3)), EditSet("sleb", 1, (0, 1, 3), kl=0.5)]
    cands = mixed_candidates(
        sens, _shape(), edits, [CacheCost("f16")], target="gguf", incumbent_kl=0.3, budget_mb=65.0, **PLAN
    )
    assert [c.k for c in cands] == [0]


def test_sensitivity_survives_its_cache_form():
    sens = _sens()
    back = Sensitivity.from_json(json.loads(json.dumps(sens.to_json())))
    assert back.to_json() == sens.to_json()
    assert back.predict({"blk.0.attn_q.weight": "Q5_0"}) == pytest.approx(0.011)


def test_a_repacked_type_is_priced_with_its_copy():
    """llama.cpp keeps a repacked copy of a Q4_0 tensor with rows in eights: the memory model
    counts it, so the allocation budgets it too."""
    from mka_edge.solver.allocate import Allocation
    from mka_edge.solver.mixed_plans import mixed_cost

    sens = _sens()
    r = sens.table["blk.1.ffn_down.weight"]
    r.actual["Q4_0"], r.bytes["Q4_0"], r.err["Q4_0"] = "Q4_0", 4 * 2**20, 2.0
    types = {n: "Q8_0" for n in sens.table} | {r.name: "Q4_0"}
    cost = mixed_cost(sens, Allocation(types, 0, 0.0), "gguf", 0.0)
    assert cost.repack_per_layer[1] == 4 * 2**20 and sum(cost.repack_per_layer) == 4 * 2**20
    assert cost.per_layer[1] == 8 * 2**20 + 4 * 2**20 + 1000


def test_mixed_is_refused_where_it_cannot_run(tmp_path):
    env = dict(os.environ, MKA_EDGE_CACHE=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "mka_edge.cli", "plan"]
    r = subprocess.run([*cli, "--profile", "phone-4gb", "--mixed"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "--mixed needs per-tensor types" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cli, "--profile", "laptop-8gb", "--quants", "MIXED"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "per-tensor types are --mixed" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*cli, "--profile", "laptop-8gb", "--mixed", "--mixed-types", "Q5_0,Q4_0"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0 and "must include Q8_0" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
def test_smollm2_mixed_plan_builds_byte_exact_with_its_provenance(tmp_path):
    """A budget where Q8_0 does not fit and Q4_K_M does: the mixed plan wins, is built from the
    saved plan.json, runs in llama.cpp, carries its allocation and has the planned bytes."""
    import gguf

    from tests.test_build import _laptop_without_speed_bar, _offline

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    prof = _laptop_without_speed_bar(tmp_path)
    # test_build's small calibration; one cache type (f16, with and without flash attention)
    plan_args = ["--method", "shortgpt", "--samples", "8", "--seq-len", "128", "--max-merge", "2"]
    plan_args += ["--quants", "Q8_0,Q4_K_M", "--context", "1024", "--kv-type", "f16"]
    # Q8_0 does not fit 215 MB at context 1024, Q4_K_M does with room to spare
    levers = ["--budget-mb", "215", "--mixed", "--mixed-types", "Q8_0,Q5_0,Q4_0"]
    cli = [sys.executable, "-m", "mka_edge.cli"]
    r = subprocess.run(
        _offline([*cli, "plan", "--profile", prof, *plan_args, *levers, "--out", str(tmp_path / "p")]),
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed: " in r.stdout and "tensors at" in r.stdout
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["choice"]["quant"] == MIXED and plan["choice"]["tensor_types"]
    assert len(set(plan["choice"]["tensor_types"].values())) > 1  # mixed, not one type
    r = subprocess.run(
        _offline(
            [
                *cli,
                "build",
                "--profile",
                prof,
                "--plan",
                str(tmp_path / "p" / "plan.json"),
                "--mmlu-per-subject",
                "0",
                "--out",
                str(tmp_path / "pkg"),
            ]
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    pkg = tmp_path / "pkg"
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["plan"]["quant"] == MIXED
    art = pkg / m["artifact"]
    reader = gguf.GGUFReader(str(art))
    # the planned bytes exactly, and every tensor at the type the plan wrote down
    assert sum(int(t.n_bytes) for t in reader.tensors) == plan["quant_costs"][MIXED]["planned_bytes"]
    written = {t.name: t.tensor_type.name for t in reader.tensors if t.name in plan["choice"]["tensor_types"]}
    assert written == plan["choice"]["tensor_types"]
    field = reader.fields["mka_edge.tensor_types"]
    assert json.loads(bytes(field.parts[field.data[0]]).decode()) == plan["choice"]["tensor_types"]
    # llama.cpp ran it: the validation measured it, within the bar
    val = json.loads((pkg / "validation.json").read_text())
    assert val["accuracy"]["kl"] <= plan["budget"]["max_quality_loss"]
    assert (pkg / "allocation.png").is_file() and "Per-tensor types (mixed plan)" in (pkg / "report.md").read_text()
    assert (pkg / "RUN.md").is_file() and (pkg / "Modelfile").is_file()
    assert Path(m["artifact"]).suffix == ".gguf"
