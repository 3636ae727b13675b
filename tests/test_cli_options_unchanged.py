"""Issue 24 item 5: the settings redesign changes nothing users type.

``tests/data/cli_options_before_settings.json`` was dumped from the CLI as it
stood before the redesign (commit 8464f5f, the hand-written 1,161-line
``cli.py``) with the same ``dump`` as below. Every option of every command must
still be there with the same flags, default, type, choices and required-ness;
the only change allowed is the options listed in ``ADDED``, which the redesign
gave to more commands on purpose (model settings are one record now).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mka_edge.cli import cli

BEFORE = Path(__file__).parent / "data" / "cli_options_before_settings.json"

# Options the settings records gave to commands that lacked them before.
ADDED = {
    "analyze": {"--batch-size", "--loss-samples"},
    "build": {"--batch-size", "--loss-samples"},
    "merge": {"--batch-size"},
    "plan": {"--batch-size", "--loss-samples"},
}
# New levers since, each named here when it lands (issue 25: mixed plans).
for _cmd in ("build", "plan"):
    ADDED[_cmd] = ADDED[_cmd] | {"--mixed/--no-mixed", "--mixed-types"}


def _default(p: click.Option):
    if p.required:
        return None
    d = p.default
    # click >= 8.2 keeps an unset flag's default as a sentinel that resolves to False.
    if str(d) == "Sentinel.UNSET" or (p.is_flag and d is None):
        return False if p.is_flag else None
    try:
        json.dumps(d)
    except TypeError:
        return str(d)
    return d


def dump(group: click.Group) -> dict:
    """Every command's parameters, keyed by their flags, as users see them."""
    out = {}
    for name, cmd in sorted(group.commands.items()):
        params = {}
        for p in cmd.params:
            key = "/".join(sorted(p.opts + p.secondary_opts))
            if not isinstance(p, click.Option):
                params[key] = {"argument": True}
                continue
            params[key] = {
                "default": _default(p),
                "required": p.required,
                "type": p.type.name,
                "multiple": p.multiple,
                "is_flag": p.is_flag,
                "choices": list(getattr(p.type, "choices", None) or []),
            }
        out[name] = params
    return json.loads(json.dumps(out))


def test_every_command_keeps_its_options_flags_and_defaults():
    before = json.loads(BEFORE.read_text())
    now = dump(cli)
    assert sorted(now) == sorted(before), "a command was added or removed"
    for command, options in before.items():
        for flags, attrs in options.items():
            assert flags in now[command], f"{command} lost {flags}"
            assert now[command][flags] == attrs, f"{command} {flags}: {attrs} became {now[command][flags]}"
        added = set(now[command]) - set(options)
        assert added == ADDED.get(command, set()), f"{command} gained {sorted(added)}"


def test_the_dump_sees_a_changed_default(monkeypatch):
    """The comparison above can fail: a default moved under it is caught."""
    before = json.loads(BEFORE.read_text())
    opt = next(p for p in cli.commands["plan"].params if "--seq-len" in p.opts)
    monkeypatch.setattr(opt, "default", 12345)
    assert dump(cli)["plan"]["--seq-len"] != before["plan"]["--seq-len"]
