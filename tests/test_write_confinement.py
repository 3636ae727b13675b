"""A recipe or a profile cannot make mka-edge write anywhere but --out, the cache and the temporary
folder.  Hostile files (fields naming other folders, names with ``../`` or ``/``) are refused in one
line before anything is written; the real commands (plan, merge, export, build) on good files, with
HOME, TMPDIR and MKA_EDGE_CACHE pointed into the test's folder, change nothing else in it (a
before/after snapshot of every path, with its mtime and size).  And a scan of the sources for the
classic ways a file runs code: ``torch.load`` without ``weights_only=True``, ``yaml.load`` without a
safe loader, pickles, ``trust_remote_code=True`` not from the user's flag."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_build_inputs

import mka_edge
from mka_edge.errors import UserError

SMALL = ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2"]
# environment variables that would move a library's own files out of HOME (and so out of sight)
MOVERS = ("XDG_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "MPLCONFIGDIR")


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """{relative path: (is a folder, mtime_ns, size)} of everything under ``root``, links not followed."""
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir() and not p.is_symlink(), st.st_mtime_ns, st.st_size)
    return out


def _outside(before: dict, after: dict, allowed: list[str]) -> list[str]:
    """Paths created, removed or (files) modified that are not under an allowed prefix.  A folder's
    own mtime changes when an entry is made in it (--out beside it), so folders count when created
    or removed only."""
    changed = {p for p in after.keys() - before.keys()} | {p for p in before.keys() - after.keys()}
    changed |= {p for p in after.keys() & before.keys() if not after[p][0] and after[p] != before[p]}
    return sorted(p for p in changed if not any(p == a or p.startswith(a + os.sep) for a in allowed))


def _sandbox(root: Path) -> dict[str, str]:
    """HOME, TMPDIR and the cache inside ``root``; nothing that points a library elsewhere."""
    for d in ("home", "tmp", "cache", "cwd", "outs"):
        (root / d).mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(MOVERS)}
    env |= {
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "MKA_EDGE_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(mka_edge.__file__).parents[1]),
    }
    return env


ALLOWED = ["outs", "cache", "tmp"]


def _hostile_inputs(root: Path) -> dict[str, Path]:
    """Good inputs and hostile variants of the recipe and the profile."""
    src, recipe, profile = tiny_build_inputs(root, seed=53)
    elsewhere = root / "elsewhere"
    good_r, good_p = recipe.read_text(), profile.read_text()
    files = {"recipe": recipe, "profile": profile}
    variants = {
        "recipe-out": good_r + f"out: {elsewhere}\ncache: {elsewhere}\noutput_dir: {elsewhere}\n",
        "recipe-name": good_r.replace("name: tiny", "name: ../../escape"),
        "recipe-slash": good_r.replace("name: tiny", f"name: {elsewhere}/x"),
        "profile-name": good_p.replace("name: laptop-test", "name: ../escape"),
        "profile-slash": good_p.replace("name: laptop-test", "name: a/../../b"),
        "profile-out": good_p + f"out: {elsewhere}\n",
    }
    for name, text in variants.items():
        files[name] = root / f"{name}.yaml"
        files[name].write_text(text)
    return files


def _cases(f: dict[str, Path], outs: Path) -> list[tuple[str, list[str], str]]:
    """(label, command line, what the one error line says) for each hostile input and command."""
    plan = ["plan", "--quality-prior", *SMALL]
    build = ["build", "--quants", "Q8_0", "--mmlu-per-subject", "0", *SMALL]
    cases = []
    for bad, says in (
        ("recipe-out", "unknown field(s) cache, out, output_dir"),
        ("recipe-name", "field 'name' must be a plain name"),
        ("recipe-slash", "field 'name' must be a plain name"),
    ):
        r = str(f[bad])
        cases += [
            (f"plan {bad}", [*plan, "--profile", str(f["profile"]), "--model", r, "--out", str(outs / "p")], says),
            (f"merge {bad}", ["merge", "-k", "1", *SMALL, "--model", r, "--out", str(outs / "m")], says),
            (f"export {bad}", ["export", "--quant", "Q8_0", "--model", r, "--out", str(outs / "x.gguf")], says),
            (f"build {bad}", [*build, "--profile", str(f["profile"]), "--model", r, "--out", str(outs / "b")], says),
        ]
    for bad, says in (
        ("profile-name", "field 'name' must be a plain name"),
        ("profile-slash", "field 'name' must be a plain name"),
        ("profile-out", "unknown field(s) out"),
    ):
        r, p = str(f["recipe"]), str(f[bad])
        cases += [
            (f"plan {bad}", [*plan, "--profile", p, "--model", r, "--out", str(outs / "p")], says),
            (f"build {bad}", [*build, "--profile", p, "--model", r, "--out", str(outs / "b")], says),
        ]
    return cases


def test_hostile_recipes_and_profiles_are_refused_in_one_line_and_write_nothing(tmp_path, monkeypatch):
    """Every command refuses each hostile file with one ``error:`` line naming the field (exit code
    2, no traceback), before it writes anything: not at --out, not in the cache, not elsewhere."""
    import mka_edge.build  # noqa: F401  (imported now: a first import's side effects are not a command's writes)
    from mka_edge.cli import cli

    files = _hostile_inputs(tmp_path)
    env = _sandbox(tmp_path)
    for k in ("HOME", "TMPDIR", "MKA_EDGE_CACHE"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])
    monkeypatch.chdir(tmp_path / "cwd")
    before = _snapshot(tmp_path)
    for label, args, says in _cases(files, tmp_path / "outs"):
        res = CliRunner().invoke(cli, args)
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert isinstance(res.exception, SystemExit) and res.exit_code == 2, (label, res.output[-2000:])
        assert "Traceback" not in res.output and len([x for x in lines if x.startswith("error:")]) == 1, (
            label,
            res.output[-2000:],
        )
        assert says in lines[-1] and lines[-1].startswith("error:"), (label, lines[-1])
    after = _snapshot(tmp_path)
    assert after == before, f"a refused command wrote {_outside(before, after, [])}"


def test_commands_write_only_to_out_the_cache_and_the_temporary_folder(tmp_path, monkeypatch):
    """build (its own process, so even a library's first-import files count), and meanwhile plan,
    merge and export (in this process, which saves three interpreter starts), on a recipe and a
    profile whose free-text fields hold paths (text only: never a place to write), one cache:
    outside --out, the cache and TMPDIR nothing under the test's folder is created, changed or
    removed, HOME and the working folder included (no library's font cache or config), nor the
    inputs themselves; and no mka-edge scratch is left in TMPDIR."""
    import mka_edge.build  # noqa: F401  (imported before the snapshot: see the refusal test)
    from mka_edge.cli import cli

    src, recipe, profile = tiny_build_inputs(tmp_path, seed=59)
    elsewhere = tmp_path / "elsewhere"
    recipe.write_text(recipe.read_text() + f"description: {elsewhere}/../../escape\n")
    profile.write_text(profile.read_text() + f"description: ../../{elsewhere}\n")
    env = _sandbox(tmp_path)
    outs = tmp_path / "outs"
    r, p = str(recipe), str(profile)
    # the host's speed calibration as a first plan leaves it (test_concurrency covers computing it)
    speed = {"efficiency": 0.5, "host_copy_gbps": 10.0, "measured_tps": 100.0, "bytes_per_token": 2e7}
    (tmp_path / "cache" / "speed_calibration.json").write_text(json.dumps(speed | {"host": "test", "time": 0}))
    before = _snapshot(tmp_path)

    build = ["build", "--profile", p, "--model", r, "--quants", "Q8_0", "--mmlu-per-subject", "0", *SMALL]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mka_edge.cli", *build, "--max-tries", "1", "--out", str(outs / "pkg")],
        cwd=tmp_path / "cwd",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for k in ("HOME", "TMPDIR", "MKA_EDGE_CACHE"):
            monkeypatch.setenv(k, env[k])
        monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])
        monkeypatch.chdir(tmp_path / "cwd")
        for args in (
            [
                "plan",
                "--profile",
                p,
                "--model",
                r,
                "--quality-prior",
                "--quants",
                "Q8_0",
                *SMALL,
                "--out",
                str(outs / "plan"),
            ],
            [
                "merge",
                "-k",
                "1",
                "--method",
                "sleb",
                "--model",
                r,
                *SMALL,
                "--loss-samples",
                "2",
                "--out",
                str(outs / "m"),
            ],
            ["export", "--quant", "Q8_0", "--model", r, "--out", str(outs / "x.gguf")],
        ):
            res = CliRunner().invoke(cli, args)
            assert res.exit_code == 0, (args[0], res.output[-2000:], res.exception)
        log = proc.communicate(timeout=900)[0]
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, log[-3000:]

    after = _snapshot(tmp_path)
    wrote = _outside(before, after, ALLOWED)
    assert not wrote, f"written outside --out, the cache and TMPDIR: {wrote}"
    assert (outs / "plan" / "plan.json").is_file() and (outs / "x.gguf").is_file()
    assert (outs / "m" / "merge_log.json").is_file() and (outs / "pkg" / "manifest.json").is_file()
    left = [x.name for x in (tmp_path / "tmp").iterdir() if x.name.startswith(("mka-edge", "tmp"))]
    assert not left, f"scratch left in TMPDIR: {left}"

    # a plan.json is a user file too: a build turns its method and quant type into folder and file
    # names (model-METHOD-kK, NAME-KK-QUANT.gguf, the trajectory's cache entry), so odd ones are refused
    from mka_edge.planning import load_plan

    assert load_plan(outs / "plan" / "plan.json").choice.quant == "Q8_0"  # a real plan passes the checks
    good = json.loads((outs / "plan" / "plan.json").read_text())
    hostile = {
        "method": lambda d: d["ranked"][0].update(method="../../../escape", k=1),
        "quant": lambda d: d["ranked"][0].update(quant="../../escape"),
        "choice": lambda d: d["choice"].update(method="../x") or d["ranked"][0].pop("method", None),
        "k": lambda d: d["ranked"][0].update(k="1/../.."),
        "no-k": lambda d: d["ranked"][0].pop("k"),
    }
    for name, spoil in hostile.items():
        d = json.loads(json.dumps(good))
        spoil(d)
        (tmp_path / f"plan-{name}.json").write_text(json.dumps(d))
    before = _snapshot(tmp_path)
    for name in hostile:
        args = ["build", "--profile", p, "--model", r, "--plan", str(tmp_path / f"plan-{name}.json")]
        res = CliRunner().invoke(cli, [*args, "--out", str(outs / f"pkg-{name}")])
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (name, res.output[-2000:])
        assert lines and lines[-1].startswith("error: --plan") and "plan again" in lines[-1], (name, lines)
        assert len([x for x in lines if x.startswith("error:")]) == 1, (name, lines)
    after = _snapshot(tmp_path)
    assert after == before, f"a refused --plan wrote {_outside(before, after, [])}"


@pytest.mark.parametrize("name", ["../../escape", "a/b", "/abs", "..", ".", "", "x\\y", "a\nb", "n" * 200])
def test_a_name_that_could_leave_its_folder_is_refused(tmp_path, name):
    """A recipe's or a profile's ``name`` is one plain file-name component or the file is refused:
    wherever a name becomes part of a file name, it cannot point outside that file's folder."""
    import yaml

    from mka_edge.models.recipes import load_recipe_file
    from mka_edge.profiles import load_profile

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": name, "source": {"kind": "hf-dir", "path": str(tmp_path)}}))
    with pytest.raises(UserError, match="field 'name' must be a plain name"):
        load_recipe_file(r)
    good = dict(memory_mb=8192, reserve_mb=4096, bandwidth_gbps=51.2, runtime="llama.cpp")
    good |= dict(context_length=1024, threads=2, min_tokens_per_s=0, max_quality_loss=1)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": name, **good}))
    with pytest.raises(UserError, match="field 'name' must be a plain name"):
        load_profile(str(p))


def test_plain_names_still_load(tmp_path):
    import yaml

    from mka_edge.models.recipes import load_recipe_file
    from mka_edge.profiles import load_profile

    for name in ("tiny", "my model v2.1", "ünïcode-✓", "a..b"):
        r = tmp_path / "r.yaml"
        r.write_text(yaml.safe_dump({"name": name, "source": {"kind": "hf-dir", "path": str(tmp_path)}}))
        assert load_recipe_file(r)["name"] == name
        p = tmp_path / "p.yaml"
        good = dict(memory_mb=8192, reserve_mb=4096, bandwidth_gbps=51.2, runtime="llama.cpp")
        p.write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    **good,
                    "context_length": 1024,
                    "threads": 2,
                    "min_tokens_per_s": 0,
                    "max_quality_loss": 1,
                }
            )
        )
        assert load_profile(str(p)).name == name


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = (
                f"{f.value.id}.{f.attr}"
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f.id
                if isinstance(f, ast.Name)
                else ""
            )
            yield node, dotted


def _kw(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def _is_true(v) -> bool:
    return isinstance(v, ast.Constant) and v.value is True


def test_sources_never_unpickle_run_yaml_tags_or_trust_remote_code_on_their_own():
    """A scan of mka_edge/: ``torch.load`` only with ``weights_only=True``; YAML only through
    ``yaml.safe_load`` (or ``yaml.load`` with a SafeLoader); no pickle, no ``allow_pickle=True``,
    no ``eval``/``exec``; ``trust_remote_code`` never set to True in code (only the user's
    --trust-remote-code flag turns it on)."""
    root = Path(mka_edge.__file__).parent
    problems = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = lambda node: f"{path.relative_to(root.parent)}:{node.lineno}"  # noqa: E731
        for node, name in _calls(tree):
            if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
                problems.append(f"{where(node)}: torch.load without weights_only=True can run a pickle's code")
            if name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    problems.append(f"{where(node)}: {name} without a SafeLoader can run YAML tags; use yaml.safe_load")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                problems.append(f"{where(node)}: {name} can build arbitrary objects; use yaml.safe_load")
            if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.")) and name.endswith(("load", "loads")):
                problems.append(f"{where(node)}: {name} runs code from the file; read safetensors, JSON or .npz")
            if _is_true(_kw(node, "allow_pickle")):
                problems.append(f"{where(node)}: allow_pickle=True lets a .npy/.npz file run code")
            if name in ("eval", "exec"):
                problems.append(f"{where(node)}: {name}() of a string")
            if _is_true(_kw(node, "trust_remote_code")):
                problems.append(f"{where(node)}: trust_remote_code=True in code; pass the user's flag through")
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                named = [*node.posonlyargs, *node.args][-len(node.defaults) :] if node.defaults else []
                pairs = list(zip(named, node.defaults)) + list(zip(node.kwonlyargs, node.kw_defaults))
                for arg, default in pairs:
                    if arg.arg == "trust_remote_code" and _is_true(default):
                        problems.append(f"{where(arg)}: trust_remote_code defaults to True")
    assert not problems, "unsafe loading in the sources:\n" + "\n".join(problems)
