"""Models larger than the device (--max-memory): accelerate places the weights over the devices
named and the disk, and every forward pass, merge and save gives what the uncapped model gives.

The tiny llama's blocks take 144.5 KiB each in float32 and its (tied) embedding 100 KiB; a CPU cap
of 600 KB keeps the embedding and blocks 0-1 in RAM and sends blocks 2-5 (and the final norm) to
disk, so both kinds of block are exercised."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mka_edge.device import current_max_memory, format_size, parse_max_memory, parse_size
from mka_edge.errors import UserError

CAP = "cpu=600KB"
SMALL = dict(samples=2, seq_len=32, positions=32, repeats=1, loss_samples=2)
CLI_SMALL = ["--samples", "2", "--seq-len", "32", "--positions", "32", "--repeats", "1", "--loss-samples", "2"]


@pytest.fixture(autouse=True)
def _one_reference_form(monkeypatch):
    """A model placed by accelerate keeps its calibration reference vocabulary-wide (its head's
    weights are not readable in place); the plain one would take the hidden-wide identity, equal
    only to float32 rounding.  Both on the full form here, so that these comparisons stay exact
    (the identity has its own test, tests/test_kl_identity.py)."""
    import mka_edge.mka.engine as engine

    monkeypatch.setattr(engine, "linear_head", lambda model, head: False)


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MKA_EDGE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def _contexts(path: Path):
    from mka_edge.mka.context import build_context

    plain = build_context(model=str(path), device="cpu", **SMALL)
    capped = build_context(model=str(path), device="cpu", max_memory=CAP, **SMALL)
    return plain, capped


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_parse_max_memory():
    assert parse_max_memory("cpu=16GiB") == {"cpu": 16 * 2**30}
    assert parse_max_memory(" cpu = 1.5GB ") == {"cpu": 1_500_000_000}
    assert parse_max_memory("CPU=500mb") == {"cpu": 500_000_000}
    assert parse_max_memory({"cpu": "2GiB"}) == {"cpu": 2 * 2**30}
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    assert parse_size("20GiB") == 20 * 2**30 and parse_size("64KiB") == 65536 and parse_size("7B") == 7
    assert (
        format_size(147968) == "145KiB"
        and format_size(15_000_000) == "14.4MiB"
        and format_size(20 * 2**30) == "20GiB"
        and format_size(999) == "999B"
    )
    assert parse_size(format_size(123_456_789)) >= 123_456_789  # what an error suggests is accepted, and enough
    bad = {
        "cpu": "is not DEVICE=SIZE",
        "cpu=16": "has no unit",
        "cpu=16XB": "unknown unit 'XB'",
        "cpu=lots": "is not a size",
        "gpu=1GB": "unknown device 'gpu'",
        "cpu=1GB,cpu=2GB": "names cpu twice",
        "cpu=0B": "needs room for at least one layer",
        "cuda:x=1GB": "is not a device",
    }
    if not torch.cuda.is_available():
        bad["cuda:3=1GB"] = "names cuda:3 but torch sees no CUDA GPU"
    for text, needle in bad.items():
        with pytest.raises(UserError) as err:
            parse_max_memory(text)
        msg = str(err.value)
        assert needle in msg and "\n" not in msg, (text, msg)


def test_offloaded_sleb_matches_uncapped(tiny_dir):
    """The sleb trajectory (candidate scoring runs sub-stacks from cached hidden states, removal reuses
    the offloaded blocks) is the same with blocks on disk."""
    from mka_edge.mka.trajectory import trajectory

    plain, capped = _contexts(tiny_dir)
    placed = capped.lm.device_map
    assert placed and "disk" in placed.values() and "cpu" in placed.values(), placed
    assert capped.lm.offloaded and not plain.lm.offloaded and capped.device == torch.device("cpu")
    a = trajectory(plain, "sleb", 3, use_cache=False, progress=False)["steps"]
    b = trajectory(capped, "sleb", 3, use_cache=False, progress=False)["steps"]
    assert [s["removed"] for s in a] == [s["removed"] for s in b]
    assert torch.allclose(torch.tensor([s["calib_kl"] for s in a]), torch.tensor([s["calib_kl"] for s in b]))


def test_offloaded_fusion_named_tensors_and_save(tiny_dir, tmp_path):
    """Fused blocks made from offloaded ones (disk, RAM, and one of each), named_tensors streaming real
    CPU tensors one module at a time, and a merged model saved from the offloaded one: all as uncapped."""
    from mka_edge.mka.fusion import fuse, identity
    from mka_edge.mka.output import build_model, save_merged

    plain, capped = _contexts(tiny_dir)
    # named_tensors: same names, same values, CPU tensors; offloaded weights go back to meta after each module
    ref = plain.lm.model.state_dict()
    stream = capped.lm.named_tensors()
    first = [next(stream) for _ in range(3)]
    assert capped.lm.model.model.layers[5].mlp.down_proj.weight.is_meta  # not all of it at once
    got = dict(first) | dict(stream)
    assert list(got) == list(ref)
    assert all(t.device.type == "cpu" and not t.is_meta and torch.equal(t, ref[k]) for k, t in got.items())
    assert capped.lm.model.model.layers[5].mlp.down_proj.weight.is_meta

    comps = {
        "disk": fuse(identity(6), 3, 0.5),  # blocks 3 and 4, both on disk
        "mixed": fuse(fuse(identity(6), 1, 0.25), 0, 0.5),  # block 1 (RAM) with 2 (disk), then with 0
    }
    for what, comp in comps.items():
        plain.apply(comp)
        capped.apply(comp)
        assert plain.engine.current_loss() == pytest.approx(capped.engine.current_loss(), rel=1e-6, abs=1e-9), what
        for ctx, name in ((plain, "plain"), (capped, "capped")):
            save_merged(build_model(ctx, comp), ctx.lm.tokenizer, {"what": what}, tmp_path / f"{what}-{name}")
        a, b = _tensors(tmp_path / f"{what}-plain"), _tensors(tmp_path / f"{what}-capped")
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), what
    plain.reset()
    capped.reset()


def test_merge_cli_with_max_memory_writes_the_same_model(tiny_dir, tmp_path):
    from mka_edge.cli import cli

    outs = {}
    for name, extra in (("plain", []), ("capped", ["--max-memory", CAP])):
        outs[name] = tmp_path / name
        args = ["merge", "--model", str(tiny_dir), "-k", "2", "--method", "sleb", "--device", "cpu"]
        args += [*CLI_SMALL, "--heldout-chunks", "0", "--no-cache", "--out", str(outs[name]), *extra]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert current_max_memory() is None  # the command's cap ends with it
    a, b = _tensors(outs["plain"]), _tensors(outs["capped"])
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the exported artifact too: llama.cpp's Q8_0 of the merged model, loaded capped and uncapped
    ggufs = {}
    for name, extra in (("plain", []), ("capped", ["--max-memory", CAP])):
        ggufs[name] = tmp_path / f"{name}.gguf"
        args = ["export", "--model", str(outs["plain"]), "--quant", "Q8_0", "--pre-tokenizer", "gpt-2"]
        res = CliRunner().invoke(cli, [*args, "--out", str(ggufs[name]), *extra])
        assert res.exit_code == 0, res.output
    assert ggufs["plain"].read_bytes() == ggufs["capped"].read_bytes()
    # healing trains in memory: a cap that leaves the merged model offloaded is refused in one line
    heal = ["heal", "--model", str(outs["capped"]), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "h")]
    res = CliRunner().invoke(cli, [*heal, "--max-memory", CAP])
    assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
    assert "leaves part of" in res.output and "healing trains its weights in memory" in res.output, res.output
    assert not (tmp_path / "h").exists()


def test_one_line_refusals(tiny_dir, tmp_path):
    """A cap below one block, a malformed cap, an absent GPU: one line each, before any model loads."""
    cache = tmp_path / "cache"
    merge = ["merge", "--model", str(tiny_dir), "-k", "1", "--out", str(tmp_path / "m"), *CLI_SMALL]
    line = _one_line(_run(*merge, "--max-memory", "cpu=64KiB", cache=cache))
    assert "--max-memory cpu=64KiB cannot hold one layer" in line and "give cpu at least 145KiB" in line, line
    line = _one_line(_run(*merge, "--max-memory", "cpu=16", cache=cache))
    assert "has no unit" in line, line
    if not torch.cuda.is_available():
        line = _one_line(_run(*merge, "--device", "cuda", "--max-memory", "cpu=1GB", cache=cache))
        assert "no CUDA GPU is visible" in line, line
        line = _one_line(
            _run("export", "--model", str(tiny_dir), "--out", "x.gguf", "--max-memory", "cuda:3=1GB", cache=cache)
        )
        assert "names cuda:3 but torch sees no CUDA GPU" in line, line
    assert not (tmp_path / "m").exists() and not (cache / "models").exists()


def test_fused_block_kept_in_ram_under_a_gpu(tiny_dir, monkeypatch):
    """Under a GPU, a block offloaded to CPU RAM gets its fused replacement in RAM too (accelerate's
    cpu_offload); without a GPU here, the disk blocks are taken for RAM ones to run that path."""
    from accelerate.utils import has_offloaded_params

    import mka_edge.models.offload as off
    from mka_edge.mka.fusion import fuse, identity

    real = off._home
    monkeypatch.setattr(off, "_home", lambda b: ("cpu", real(b)[1]) if real(b)[0] == "disk" else real(b))
    plain, capped = _contexts(tiny_dir)
    comp = fuse(identity(6), 3, 0.5)
    plain.apply(comp)
    capped.apply(comp)
    fused = capped.current_layers()[3]
    q = fused.self_attn.q_proj
    assert has_offloaded_params(q) and q.weight.is_meta and isinstance(q._hf_hook.weights_map.dataset, dict)
    assert plain.engine.current_loss() == pytest.approx(capped.engine.current_loss(), rel=1e-6, abs=1e-9)


def test_everything_on_disk(tiny_dir):
    """A cap that holds one block and no more: accelerate leaves the whole model on disk (its first
    parameter on meta), and the forward pass, named_tensors and a fused block still match."""
    from mka_edge.mka.context import MergeContext, MergeSettings
    from mka_edge.mka.fusion import fuse, identity
    from mka_edge.models.loading import load_model

    plain, capped = load_model(str(tiny_dir)), load_model(str(tiny_dir), max_memory="cpu=200KB")
    assert capped.device_map == {"": "disk"} and next(capped.model.parameters()).is_meta
    assert capped.input_device == torch.device("cpu")
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(
            plain.model(input_ids=ids).logits, capped.model(input_ids=ids.to(capped.input_device)).logits
        )
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(plain.named_tensors(), capped.named_tensors()))
    settings = MergeSettings(**SMALL)
    losses = []
    for lm in (plain, capped):
        ctx = MergeContext(lm, settings, lm.input_device)
        ctx.apply(fuse(identity(6), 2, 0.5))
        losses.append(ctx.engine.current_loss())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-9)
