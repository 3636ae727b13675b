"""Settings records make the command line (issue 24): every option comes from a record field, a
field given on the command line is told apart from its default, the `--plan` refusal list is a
query over the fields, and plan.json's model settings are checked when read back. No model runs."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mka_edge import settings
from mka_edge.cli import cli
from mka_edge.errors import UserError
from mka_edge.settings import HealSettings, ModelSettings, PlanOptions, options, parse, plan_deciding

CLI = Path(settings.__file__).with_name("cli.py")
RECORDS = [
    v
    for v in vars(settings).values()
    if isinstance(v, type) and issubclass(v, settings.Record) and v is not settings.Record
]


def test_the_cli_is_a_thin_shell():
    """At most 300 lines, no hand-written options (they come from the records), no precedence."""
    text = CLI.read_text()
    assert len(text.splitlines()) <= 300
    tree = ast.parse(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    names = {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in calls}
    assert "option" not in names and "get_parameter_source" not in names and "ParameterSource" not in text


def test_every_field_is_an_option_with_help_and_every_option_is_a_field():
    flags = {}
    for rec in RECORDS:
        for f, spec in rec.specs():
            assert spec.help and spec.help[-1] in ".)", (rec.__name__, f.name)
            assert spec.flags[0].startswith("-"), (rec.__name__, f.name)
            flags.setdefault(spec.dest, set()).add(rec.__name__)
    declared = set()
    for cmd in cli.commands.values():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                declared.add(p.name)
    # every command option is some record's field (--steps: heal's override of --heal-steps)
    assert declared - set(flags) <= {"steps"}, declared - set(flags)


def _probe(*records, overrides=None):
    """A click command over ``records`` that returns what parse makes of its arguments."""
    seen = {}

    @click.command()
    @options(*records, overrides=overrides)
    def cmd(**kw):
        for rec in records:
            seen[rec] = parse(rec, kw, overrides)

    def run(*args):
        r = CliRunner().invoke(cmd, list(args), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return seen

    return run


def test_a_value_given_at_its_default_is_given_and_an_absent_one_is_not():
    run = _probe(HealSettings, ModelSettings)
    got = run("--train", "all", "--seed", "3")
    heal, model = got[HealSettings], got[ModelSettings]
    assert heal.train == "all" and "train" in heal.given  # "all" is the default, but the user said it
    assert "lr" not in heal.given and heal.lr == 5e-5
    assert model.seed == 3 and model.given == {"seed"}
    # two records with a field of the same name (seq_len) stay apart: their flags differ
    got = run("--heal-seq-len", "64")
    assert got[HealSettings].seq_len == 64 and got[ModelSettings].seq_len is None
    assert "seq_len" not in got[ModelSettings].given


def test_an_override_changes_the_flag_not_the_field():
    over = {"heal_steps": dict(flags=("--steps",), required=True, help="Steps.")}
    run = _probe(HealSettings, overrides=over)
    heal = run("--steps", "7")[HealSettings]
    assert heal.steps == 7 and "steps" in heal.given
    r = CliRunner().invoke(click.command()(options(HealSettings, overrides=over)(lambda **kw: None)), [])
    assert r.exit_code != 0 and "--steps" in r.output


def test_the_recipe_s_heal_default_applies_only_where_the_user_gave_nothing(monkeypatch):
    from mka_edge.heal import distill

    monkeypatch.setattr(distill, "recipe_heal_defaults", lambda spec: {"steps": 40, "train": "qlora", "lr": 1e-4})
    cfg = HealSettings(train="all", given=frozenset({"train"})).config("some-recipe")
    assert (cfg.steps, cfg.train, cfg.lr) == (40, "all", 1e-4)
    cfg = HealSettings().config("some-recipe")
    assert (cfg.steps, cfg.train) == (40, "qlora")
    with pytest.raises(UserError, match="--heal-steps must be 0 or more"):
        HealSettings(steps=-1, given=frozenset({"steps"})).config(None)


def test_build_plan_refuses_exactly_the_fields_that_decide_a_plan():
    deciding = set(plan_deciding(PlanOptions, ModelSettings, HealSettings))
    assert {"budget_mb", "context", "max_quality_loss", "method", "max_merge", "quants", "kv_type"} <= deciding
    assert {"heal_steps", "train", "lr", "lora_rank", "calibration", "samples", "seed", "dtype"} <= deciding
    # how a plan is executed or where it goes never decides it
    assert not deciding & {"out", "force", "device", "trust_remote_code", "checkpoint_every", "max_tries"}


def test_plan_json_model_settings_round_trip_and_untrusted_ones_are_refused():
    m = ModelSettings(model="x", device="cpu", samples=4, seed=2)
    back = ModelSettings.from_load_options(m.load_options(), "x")
    assert dataclasses.replace(back, given=frozenset()) == m
    assert "model" not in m.load_options() and "max_memory" not in m.load_options()
    with pytest.raises(UserError, match="unknown model setting"):
        ModelSettings.from_load_options({"device": "cpu", "exec": "rm -rf /"})
    with pytest.raises(UserError, match="wrong type"):
        ModelSettings.from_load_options({"samples": "4"})
    with pytest.raises(UserError, match="wrong type"):
        ModelSettings.from_load_options({"trust_remote_code": "yes"})


def test_build_with_plan_names_the_real_flag_it_refuses(tmp_path):
    """`--seed 0` equals the default but was given: refused, by its flag, before anything loads."""
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    r = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            "laptop-8gb",
            "--plan",
            str(plan),
            "--seed",
            "0",
            "--train",
            "lora",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2
    assert "--seed" in r.output and "--train" in r.output and "cannot change it" in r.output
    assert not (tmp_path / "o").exists()


def test_a_ranked_plan_is_typed_when_read_and_an_attempt_writes_the_manifest_s_fields():
    from mka_edge.records import Attempt, Ranked

    r = Ranked.from_json({"k": 2, "quant": "Q4_K_M", "cache": "q8_0/q8_0+fa", "kl": 0.1}, "sleb", "--plan p")
    assert r == Ranked("sleb", 2, "Q4_K_M", False, "q8_0/q8_0+fa", None, 0.1) and r.merge_key == ("sleb", 2)
    for bad, field in (({"k": True, "quant": "Q8_0"}, "k"), ({"k": -1, "quant": "Q8_0"}, "k"), ({"k": 1}, "quant")):
        with pytest.raises(UserError, match=rf"--plan p: field '{field}' must be .*; plan again"):
            Ranked.from_json(bad, "sleb", "--plan p")
    a = Attempt("sleb", 1, "Q8_0", False, "f16/f16", None, 0.05, 0.06, True)
    assert "heal" not in a.to_json() and a.to_json()["measured_kl"] == 0.06
    assert Attempt(*dataclasses.astuple(a)[:-1], heal={"steps": 3}).to_json()["heal"] == {"steps": 3}


def test_counts_must_be_positive_and_plan_json_model_settings_must_be_a_mapping():
    with pytest.raises(UserError, match="--batch-size must be at least 1 \\(got 0\\)"):
        ModelSettings(batch_size=0).check()
    with pytest.raises(UserError, match="--samples must be at least 1"):
        ModelSettings.from_load_options({"samples": -2})
    with pytest.raises(UserError, match="must be a mapping"):
        ModelSettings.from_load_options(["device", "cpu"])
    assert ModelSettings(samples=None).check().samples is None  # not given: the recipe's default later
