"""The target registry and plans as data: a third target flows through solve and the report by
registering one class; `build --plan` executes a saved plan to the same bytes as an inline build,
and refuses a plan made for another model, profile or version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny, predicted_memory_mb, tiny_build_inputs

from mka_edge.errors import UserError
from mka_edge.records import ArtifactSummary, MeasuredCosts, Plan, QuantCost
from mka_edge.solver.memory import MIB, MemoryPrediction, Shape
from mka_edge.targets import TARGETS, ReportMemory, Target, get_target, register, target_for_artifact, unregister
from mka_edge.validate.result import ValidationResult

SHAPE = Shape(n_layers=8, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_ff=128, n_vocab=400)


def test_registry_lists_both_targets_and_finds_them_by_runtime_and_artifact(tmp_path):
    assert {"gguf", "onnx"} <= set(TARGETS)
    assert get_target("gguf").runtime == "llama.cpp" and get_target("onnx").runtime == "onnxruntime"
    assert target_for_artifact(tmp_path / "x.gguf").name == "gguf"
    assert target_for_artifact(tmp_path).name == "onnx"  # a folder is an ONNX export
    with pytest.raises(UserError, match="unknown target format 'tflite'; known: gguf, onnx"):
        get_target("tflite")
    with pytest.raises(UserError, match="does not exist"):
        target_for_artifact(tmp_path / "model.bin")


class FakeTarget(Target):
    """A made-up runtime: weights + a flat 10 MB, no KV cache at all."""

    name = "fake"
    runtime = "fake-rt"
    runtime_label = "fake runtime"
    artifact_kind = "a .fake file"
    default_quants = ("w8", "w4")
    default_export_quant = "w8"
    sizes_are_exact = True
    memory_model = "weights + 10 MB"
    speed_calibration_file = "speed_calibration-fake.json"

    def check_quants(self, quants):
        return list(quants or self.default_quants)

    def type_sizes(self, ms, quants, measure):
        return {q: QuantCost(q, self.name, (1.0 * MIB,) * 8, 2.0 * MIB) for q in quants}

    def quant_costs(self, lm, ms, sizes, quants, *, measure, progress, calibrate_speed, log):
        return MeasuredCosts({q: c.with_kl({"w8": 0.01, "w4": 0.2}[q]) for q, c in sizes.items()}, "made up")

    def kv_bytes(self, shape, context, quant, kv_type):
        return 0.0

    def predict_memory(self, shape, cost, weight_bytes, repack_bytes, context, kv_type, overhead_mb):
        scale = 1.0 if cost.quant == "w8" else 0.5
        return MemoryPrediction(scale * weight_bytes / MIB, 0.0, 0.0, 0.0, 10.0)

    def artifact_name(self, tag):
        return f"{tag}.fake"

    def export(self, lm, out, quant, *, context, progress):
        raise NotImplementedError

    def export_spec(self, model, out, quant, options):
        raise NotImplementedError

    def summary(self, info):
        return ArtifactSummary(self.name, info["path"], info["quant"], 7, 5 * MIB, 4 * MIB, 4.0, {"W": 7}, info)

    def claims(self, artifact):
        return artifact.suffix == ".fake"

    @property
    def validation(self):
        raise NotImplementedError

    def report_memory(self, folder, artifact, quant, summary, plan, latency, shape, kv_type):
        m = MemoryPrediction(summary.weight_bytes / MIB, 0.0, 0.0, 0.0, 10.0)
        return ReportMemory(m, m, plan.budget.context, "a fake run", summary.weight_bytes, 0.0)

    def artifact_line(self, artifact, quant, summary, layers):
        return f"`{artifact}` — fake, {summary.block_count} of {layers} layers"

    def card_facts(self, summary):
        return {"how": "faked", "format": "FAKE", "size": "5 MiB", "provenance": "none"}

    def write_run_files(self, folder, artifact, context, threads):
        (Path(folder) / "RUN.md").write_text(f"fake-run {artifact} -c {context}\n")


@pytest.fixture
def fake_target():
    register(FakeTarget)
    yield TARGETS["fake"]
    unregister("fake")


def test_a_third_target_flows_through_solve_and_the_report(tmp_path, fake_target):
    """One class and one register call: the profile loader, the solver and the report take it."""
    from mka_edge.planning import resolve_settings
    from mka_edge.report import _model_card, _report
    from mka_edge.solver.solve import CheapFacts, Facts, solve

    prof = tmp_path / "fake.yaml"
    prof.write_text(
        "name: fake-device\nmemory_mb: 100\nreserve_mb: 81\nbandwidth_gbps: 10\nruntime: fake-rt\n"
        "context_length: 512\nthreads: 2\nmin_tokens_per_s: 0\nmax_quality_loss: 5\n"
    )
    s = resolve_settings(str(prof), "some-model", method="sleb")
    assert s.target is fake_target and s.quants == ("w8", "w4")
    sizes = fake_target.type_sizes(None, list(s.quants), True)
    costs, source, _ = fake_target.quant_costs(
        None, None, sizes, list(s.quants), measure=True, progress=False, calibrate_speed=False, log=print
    )
    curve = {"kl": [0.0, 0.05, 0.1], "kept": [list(range(8)), list(range(7)), list(range(6))], "complete": True}
    cheap = CheapFacts(SimpleNamespace(n_layers=8), sizes, True, True, 2)
    plan = solve(Facts(cheap, "fp", SHAPE, costs, source, 0.5, "default", curve, None), s)
    # 19 MB budget: w8 needs 10 + 10 MB unmerged (no), w4 5 + 10 (KL 0.2), w8 at K=1 9 + 10 (KL 0.05 + 0.01)
    assert plan.format == "fake" and (plan.choice.k, plan.choice.quant) == (1, "w8")
    assert plan.models["memory"] == "weights + 10 MB" and plan.budget.kv_cache_type == plan.choice.cache == "f16/f16"
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan  # plan.json round-trips
    summary = fake_target.summary({"path": "m.fake", "quant": "w8"})
    chosen = {"k": 2, "quant": "w8", "artifact": "m.fake"}
    lat = {"gen_tps": {"median": 3.0}, "prompt_tokens": 8, "gen_tokens": 8, "peak_rss_mb": 20.0}
    acc = {"kl": 0.07, "ppl_change_pct": 1.0, "ppl": 10.0, "ref_ppl": 9.9, "top1": 0.9}
    val = ValidationResult("0", "fake", {}, {}, {}, {}, acc, lat, None, {}, ())
    mem = {
        "runtime": "fake runtime",
        "predicted_device_mb": 15.0,
        "measured_host_rss_mb": 20.0,
        "host_run": "x",
        "predicted_host_mb": 15.0,
    }
    report = _report(plan, fake_target, chosen, summary, val, [], mem, 9.0)
    assert "`m.fake` — fake, 7 of 8 layers" in report and "- memory: weights + 10 MB" in report
    assert "- Format: FAKE" in _model_card(plan, fake_target, chosen, summary, val)
    fake_target.write_run_files(tmp_path, "m.fake", 512, 2)
    assert (tmp_path / "RUN.md").read_text() == "fake-run m.fake -c 512\n"


def test_a_broken_plan_file_is_refused_in_one_line(tmp_path):
    from mka_edge.planning import load_plan

    bad = tmp_path / "plan.json"
    for text, what in (
        ("{not json", "not readable JSON"),
        ("[1, 2]", "not an mka-edge plan"),
        ('{"choice": {}}', "not an mka-edge plan"),
        ('{"schema": 99}', "plan schema 99"),
    ):
        bad.write_text(text)
        with pytest.raises(UserError, match=what):
            load_plan(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


@pytest.mark.integration
def test_build_plan_reproduces_the_inline_build_and_refuses_foreign_plans(tmp_path):
    """plan --out, then build --plan: the artifact's sha256 is the inline build's; a plan for other
    weights, another profile or another version is refused in one line with nothing at --out."""
    src, recipe, profile = tiny_build_inputs(tmp_path, seed=31)
    env = dict(os.environ, MKA_EDGE_CACHE=str(tmp_path / "cache"))
    # K=1 forced by a budget between the K=1 and K=0 footprints of Q8_0 (llama.cpp's dry run)
    mem = [predicted_memory_mb(src, "Q8_0", k=k, context=1024) for k in (0, 1)]
    common = [
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
        "--budget-mb",
        f"{(mem[0] + mem[1]) / 2:.4f}",
    ]

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=env, timeout=1200
        )

    r = cli("plan", "--profile", str(profile), *common, "--out", str(tmp_path / "plan"))
    assert r.returncode == 0, r.stderr[-3000:]
    plan_file = tmp_path / "plan" / "plan.json"
    assert json.loads(plan_file.read_text())["choice"]["k"] == 1
    r = cli(
        "build",
        "--profile",
        str(profile),
        "--plan",
        str(plan_file),
        "--mmlu-per-subject",
        "0",
        "--out",
        str(tmp_path / "from-plan"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("build", "--profile", str(profile), *common, "--mmlu-per-subject", "0", "--out", str(tmp_path / "inline"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("from-plan", "inline"))
    assert a["artifact"] == b["artifact"] and a["plan"]["k"] == 1
    assert a["files"][a["artifact"]]["sha256"] == b["files"][b["artifact"]]["sha256"]

    other = make_tiny(tmp_path / "other-model", "llama", layers=6, seed=32)
    other_profile = tmp_path / "laptop2.yaml"
    other_profile.write_text(profile.read_text().replace("reserve_mb: 4096", "reserve_mb: 4000"))
    stale = tmp_path / "stale.json"
    stale.write_text(plan_file.read_text().replace('"mka_edge": "', '"mka_edge": "0.0.0-', 1))
    for args, what in (
        (["--profile", str(profile), "--model", str(other)], "was made for model"),
        (["--profile", str(other_profile)], "is for profile 'laptop-test'"),
        (["--profile", str(profile), "--budget-mb", "100"], "--budget-mb cannot change it"),
    ):
        out = tmp_path / "refused"
        r = cli("build", *args, "--plan", str(plan_file), "--out", str(out))
        assert r.returncode != 0 and what in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = cli("build", "--profile", str(profile), "--plan", str(stale), "--out", str(tmp_path / "refused"))
    assert r.returncode != 0 and "was made by mka-edge 0.0.0-" in r.stderr and not (tmp_path / "refused").exists()
    # a plan predicted over its bar is refused before any merge or export, with what would pass
    strict = tmp_path / "strict.json"
    data = json.loads(plan_file.read_text())
    data["budget"]["max_quality_loss"] = 1e-9
    strict.write_text(json.dumps(data))
    r = cli("build", "--profile", str(profile), "--plan", str(strict), "--out", str(tmp_path / "refused"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    kl = data["choice"]["predicted"]["kl"]
    assert (
        "(K=1 Q8_0 f16/f16, " in r.stderr
        and f"predicted to lose {kl:.3f} nats, over the quality bar of 1e-09" in r.stderr
    )
    assert "--build-anyway" in r.stderr and "heal the merged model" in r.stderr and not (tmp_path / "refused").exists()


def test_no_module_outside_the_targets_branches_on_a_format_name():
    """Format knowledge lives in mka_edge/targets (and the exporters they call): elsewhere a format
    name may appear in user-facing text, never in a comparison.  models/ is left out: there "gguf"
    names a kind of input model (a .gguf file to dequantize), not a runtime target."""
    import re

    root = Path(__file__).resolve().parents[1] / "mka_edge"
    branch = re.compile(r"""(==|!=|\bin\b|\bis\b)\s*[\(\[{]?\s*["'](gguf|onnx)["']|["'](gguf|onnx)["']\s*(==|!=)""")
    found = [
        f"{path.relative_to(root)}:{i}: {line.strip()}"
        for path in root.rglob("*.py")
        if not {"targets", "exporters", "models"} & set(path.relative_to(root).parts)
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert not found, found
