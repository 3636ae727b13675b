"""What needs no heavy work is checked first: an impossible budget or a bad input is one line within
seconds, before any model load, trajectory, curve or probe; the plan's curve stops where it can no
longer change the choice; a hub id loads from the Hugging Face cache offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import hub_cache, tiny_context

HEAVY = ("trajectories", "curves", "quant_probe", "onnx_probe", "models")


def run(*args, cache: Path, env: dict | None = None, cwd: Path | None = None):
    e = {**os.environ, "MKA_EDGE_CACHE": str(cache), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=e, timeout=600, cwd=cwd
    )


def one_line(res) -> str:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_impossible_budget_is_refused_before_any_model_work(tmp_path):
    """SmolLM2 on an empty cache: the refusal comes from llama.cpp's own tensor types (a dry run of
    its quantizer) and no trajectory, curve, probe or even the dequantized model is made.  Q5_K_M
    gives some layers more bits, so which layers a merge removes matters and the figure is a bound
    ("at least"); with Q8_0 alone every layer is the same size and the figure is exact.  (Q5_K_M,
    not Q4_K_M: llama.cpp keeps a repacked copy of Q4_K_M's Q4_K tensors on an x86 CPU.)"""
    cache = tmp_path / "cache"
    for cmd in (
        ["plan", "--profile", "laptop-8gb", "--budget-mb", "150"],
        ["build", "--profile", "laptop-8gb", "--budget-mb", "150", "--out", str(tmp_path / "pkg")],
    ):
        line = one_line(run(*cmd, cache=cache))
        assert "no plan fits the 150 MB budget" in line and "smallest footprint reachable is at least 187 MB" in line, (
            line
        )
        assert "(K=8 Q5_K_M q4_0/q4_0+fa, 19 MB of it KV cache at context 4096)" in line and "at least 188" in line, (
            line
        )
    line = one_line(run("plan", "--profile", "laptop-8gb", "--budget-mb", "150", "--quants", "Q8_0", cache=cache))
    assert "smallest footprint reachable is 211 MB (K=8 Q8_0 q4_0/q4_0+fa," in line, line
    # a budget only a forbidden lever reaches: the same line, naming what is forbidden
    line = one_line(run("plan", "--profile", "laptop-8gb", "--budget-mb", "250", "--flash-attn", "off", cache=cache))
    assert "smallest footprint reachable is at least 309 MB" in line and "flash attention forbidden" in line, line
    assert not [d for d in HEAVY if (cache / d).exists()], sorted(p.name for p in cache.iterdir())
    assert not (tmp_path / "pkg").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]


def test_a_bar_no_plan_can_meet_is_refused_before_the_model_loads(tmp_path):
    """With the types' KL from priors (--quality-prior, as above 3B parameters), a build whose best
    plan misses the bar even with every merge free is refused before any weight loads: one line
    with the best plan's figures and what would pass.  `plan` still shows the plan."""
    cache = tmp_path / "cache"
    args = ["--profile", "laptop-8gb", "--quants", "Q4_K_M,Q4_0", "--quality-prior", "--max-quality-loss", "0.001"]
    args += ["--max-merge", "0"]  # keeps the `plan` below to a load and a solve
    line = one_line(run("build", *args, "--out", str(tmp_path / "pkg"), cache=cache))
    assert "no plan that fits laptop-8gb can meet the quality bar of 0.001: even with every merge free" in line, line
    assert "the best (Q4_K_M+imatrix) is predicted to lose at least 0.0" in line, line
    assert "--max-quality-loss 0." in line and "--build-anyway" in line and "heal" not in line, line
    assert not [d for d in HEAVY if (cache / d).exists()] and not (tmp_path / "pkg").exists()
    res = run("plan", *args, cache=cache)  # a plan is shown, not refused
    assert res.returncode == 0 and "Q4_K_M" in res.stdout, res.stderr[-2000:]


def test_bad_input_is_refused_before_any_model_work(tmp_path):
    cache = tmp_path / "cache"
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    cases = [
        (["plan", "--profile", "laptop-8gb", "--context", "9000"], "beyond the model's 8192 positions"),
        (
            ["build", "--profile", "laptop-8gb", "--context", "9000", "--out", str(tmp_path / "o")],
            "beyond the model's 8192 positions",
        ),
        (
            ["build", "--profile", "laptop-8gb", "--context", "600", "--out", str(tmp_path / "o")],
            "too small for the validation run",
        ),
        (["plan", "--profile", "laptop-8gb", "--max-merge", "30"], "--max-merge 30 must be between 0 and 29"),
        (
            ["build", "--profile", "laptop-8gb", "--max-merge", "31", "--out", str(tmp_path / "o")],
            "the model has 30 layers",
        ),
        (["build", "--profile", "laptop-8gb", "--out", str(a_file / "pkg")], "is a file, not a folder"),
        (["plan", "--profile", "laptop-8gb", "--out", str(a_file / "plan")], "is a file, not a folder"),
        (
            ["plan", "--profile", "laptop-8gb", "--method", "slebb"],
            "unknown merge method 'slebb'; known: auto, mka-guided, sleb,",
        ),
        (
            ["build", "--profile", "laptop-8gb", "--method", "SLEB", "--out", str(tmp_path / "o")],
            "unknown merge method 'SLEB'",
        ),
        (["plan", "--profile", "laptop-8gb", "--quants", "Q8_0,Q9_9"], "unknown quant type 'Q9_9'; valid: F32, F16"),
        (
            ["build", "--profile", "phone-4gb", "--quants", "int3", "--out", str(tmp_path / "o")],
            "unknown ONNX quant type 'int3'; choose one of fp32",
        ),
        (["export", "--format", "tflite", "--out", str(tmp_path / "o")], "'tflite' is not one of 'gguf', 'onnx'"),
        (["export", "--format", "onnx", "--threads", "2", "--out", str(tmp_path / "o")], "--threads applies to GGUF"),
        (["plan", "--profile", "laptop-8gb", "--context", "0"], "--budget-mb and --context must be positive"),
        (["plan", "--profile", "laptop-8gb", "--budget-mb", "-5"], "--budget-mb and --context must be positive"),
        (
            ["build", "--profile", "laptop-8gb", "--plan", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")],
            "none.json does not exist",
        ),
        (
            ["build", "--profile", "laptop-8gb", "--plan", str(a_file), "--out", str(tmp_path / "o")],
            "is not readable JSON",
        ),
    ]
    for args, needle in cases:
        line = one_line(run(*args, cache=cache))
        assert needle in line, (args, line)
    assert not [d for d in HEAVY if (cache / d).exists()]
    assert a_file.read_text() == "mine" and not (tmp_path / "o").exists()


def test_dry_run_sizes_are_the_quantized_files_sizes(tiny_dir, tmp_path):
    """The early check's bytes per layer / outside the layers / repacked, from llama.cpp's dry run
    on a data-less file, equal what the real quantized files hold (64-wide rows: llama.cpp's
    fallbacks from K-quants to legacy types are exercised too)."""
    from mka_edge.exporters.gguf import write_float_gguf
    from mka_edge.exporters.llama_quantize import quantize
    from mka_edge.exporters.quant_types import quant_type
    from mka_edge.models.loading import load_model
    from mka_edge.solver.feasibility import gguf_type_sizes, read_shape
    from mka_edge.solver.quant_probe import tensor_bytes_split
    from mka_edge.targets.gguf import PLAN_QUANTS as GGUF_QUANTS

    ms = read_shape(str(tiny_dir))
    assert ms.n_layers == 6 and ms.max_positions == 512 and all(p.is_meta for p in ms.model.parameters())
    sizes = gguf_type_sizes(ms, list(GGUF_QUANTS))
    lm = load_model(str(tiny_dir))
    base = tmp_path / "f32.gguf"
    write_float_gguf(lm, base, "F32", pre_tokenizer="gpt-2")
    for q in GGUF_QUANTS:
        art = tmp_path / f"{q}.gguf"
        if q == "F16":
            write_float_gguf(lm, art, "F16", pre_tokenizer="gpt-2")
        else:
            quantize(base, art, quant_type(q).ftype, 2)
        real = tensor_bytes_split(art)
        for key in ("per_layer", "repack_per_layer", "other"):
            assert real[key] == sizes[q][key], (q, key, real[key], sizes[q][key])


def test_needed_merge_kl_rule():
    from mka_edge.solver.quality import needed_merge_kl
    from mka_edge.solver.search import Candidate

    def c(k, q, kl):
        return Candidate(k, q, 10 - k, 100.0, {}, kl, 10.0, True, True, True)

    # the best type already fits unmerged: no merge can win, nothing to compute
    assert (
        needed_merge_kl([c(0, "Q8_0", 0.004), c(0, "Q4_K_M", 0.06)], [c(8, "Q8_0", 0.004), c(8, "Q4_K_M", 0.06)]) == 0
    )
    # F16 fits only once merged: merges are worth scoring while their KL is below 0.004 - 0.0001
    assert needed_merge_kl([c(0, "Q8_0", 0.004)], [c(8, "F16", 0.0001), c(8, "Q8_0", 0.004)]) == pytest.approx(0.0039)
    assert needed_merge_kl([], [c(8, "Q8_0", 0.004)]) is None  # nothing fits unmerged: the whole curve


def test_curve_stops_where_it_can_no_longer_change_the_choice(tiny_dir, monkeypatch):
    """merge_curve(useful_below=T) stops the trajectory after the first K whose held-out KL is at
    least T and keeps the values a full curve has; asked for more later, it goes on."""
    from mka_edge.solver.quality import merge_curve

    ctx = tiny_context(tiny_dir)
    with tempfile.TemporaryDirectory() as full_cache:
        monkeypatch.setenv("MKA_EDGE_CACHE", full_cache)
        full = merge_curve(ctx, "sleb", 4, progress=False)
    assert full["complete"] and len(full["kl"]) == 5
    threshold = full["kl"][2]
    expect = next(k for k in range(1, 5) if full["kl"][k] >= threshold)
    with tempfile.TemporaryDirectory() as cache:
        monkeypatch.setenv("MKA_EDGE_CACHE", cache)
        assert merge_curve(ctx, "sleb", 4, progress=False, useful_below=0.0)["kl"] == [0.0]
        assert not (Path(cache) / "trajectories").exists()  # no K scored at all
        part = merge_curve(ctx, "sleb", 4, progress=False, useful_below=threshold)
        assert not part["complete"] and len(part["kl"]) == expect + 1
        assert part["kl"] == pytest.approx(full["kl"][: expect + 1], abs=1e-6)
        again = merge_curve(ctx, "sleb", 4, progress=False, useful_below=threshold)
        assert again["cached"] and again["kl"] == part["kl"]
        whole = merge_curve(ctx, "sleb", 4, progress=False)  # a tighter budget later
        assert whole["complete"] and whole["kl"] == pytest.approx(full["kl"], abs=1e-6)
        assert whole["kept"] == full["kept"]


def test_loose_budget_computes_no_merge_curve(tiny_dir, tmp_path, monkeypatch):
    """When the best type fits unmerged, no merge can win: the plan makes no trajectory and says so."""
    from mka_edge.cache import cache_root
    from mka_edge.planning import plan_with_context

    monkeypatch.setenv("MKA_EDGE_CACHE", str(tmp_path / "cache"))  # its own: other tests leave trajectories

    opts = dict(samples=4, seq_len=64, positions=96, repeats=2, loss_samples=2, device="cpu")
    plan, _ = plan_with_context(
        "laptop-8gb",
        str(tiny_dir),
        method="sleb",
        k_max=2,
        quants=["F16", "Q8_0"],
        context=512,
        merge_opts=opts,
        quality_prior=True,
        progress=False,
        log=lambda m: None,
    )
    assert (plan.choice.k, plan.choice.quant) == (0, "F16")
    assert plan.curve["kl"] == [0.0] and not plan.curve["complete"]
    assert "no merge was scored" in plan.reason
    assert not (cache_root() / "trajectories").exists() and not (cache_root() / "curves").exists()


def test_hub_id_loads_offline_from_the_hub_cache(tiny_dir, tmp_path):
    """A hub id (and a recipe naming it) loads from a cache in huggingface_hub's own layout with the
    hub switched off.  In child processes: huggingface_hub reads HF_HOME when it is imported."""
    hub_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_dir)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "name: tiny\ndescription: tiny llama from the hub cache\n"
        "source:\n  kind: hub\n  hub_id: tiny-org/tiny-llama\narchitecture: llama\nnum_layers: 6\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "MKA_EDGE_CACHE": str(tmp_path / "c")}
    check = f"""
import json, torch
from mka_edge.models.loading import load_config, load_model
lm = load_model("tiny-org/tiny-llama")
ids = lm.tokenizer("The river", return_tensors="pt").input_ids
with torch.no_grad():
    finite = bool(torch.isfinite(lm.model(ids).logits).all())
by_recipe = load_model({str(recipe)!r})
print(json.dumps({{"kind": lm.source["kind"], "layers": lm.num_layers, "arch": lm.arch.name, "finite": finite,
                  "config_layers": load_config("tiny-org/tiny-llama").num_hidden_layers,
                  "recipe_hub_id": by_recipe.source["hub_id"], "same": by_recipe.fingerprint == lm.fingerprint}}))
"""
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "kind": "hub",
        "layers": 6,
        "arch": "llama",
        "finite": True,
        "config_layers": 6,
        "recipe_hub_id": "tiny-org/tiny-llama",
        "same": True,
    }
    # and a command on the recipe, through the CLI
    res = run(
        "eval",
        "--model",
        str(recipe),
        "--heldout-chunks",
        "1",
        "--mmlu-per-subject",
        "0",
        cache=tmp_path / "c",
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    # the same id with an empty cache is one line, not a traceback
    res = run(
        "eval",
        "--model",
        "tiny-org/tiny-llama",
        cache=tmp_path / "c",
        env={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
    )
    assert "local cache" in one_line(res)


# Llama-3-70B's config: what a build host needs for it is far beyond any test machine
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def test_a_host_too_small_for_the_load_is_refused_before_any_weight_loads(tmp_path):
    """A hub model whose load cannot fit this host's RAM (Llama-3-70B's config, no weights in the
    snapshot: nothing is read but config.json) is one line naming the need and --max-memory; with
    a cap the check passes and the load goes on (to the missing weights' own line)."""
    from mka_edge.host_need import GIB, host_need

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    hub_cache(tmp_path / "hf", "big-org/llama-70b", folder)
    profile = tmp_path / "server.yaml"
    profile.write_text(
        "name: server\nmemory_mb: 400000\nreserve_mb: 1000\nbandwidth_gbps: 400\nruntime: llama.cpp\n"
        "context_length: 1024\nkv_cache_type: f16\nflash_attention: false\nthreads: 2\nmin_tokens_per_s: 0\n"
        "max_quality_loss: 5\n"
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["--profile", str(profile), "--model", "big-org/llama-70b", "--device", "cpu"]
    line = one_line(run("build", *args, "--out", str(tmp_path / "pkg"), cache=tmp_path / "c", env=env))
    need = host_need(70.55e9, stored_bytes=2, device="cpu", dtype_bytes=2).ram / GIB  # the least: as stored
    assert "GiB of RAM available and loading the model (70.55B parameters) needs about" in line, line
    assert f"needs about {need:.1f}" in line and "--max-memory cpu=<GB>" in line, line
    line = one_line(run("plan", *args, "--max-memory", "cpu=8GB", cache=tmp_path / "c", env=env))
    assert "holds no .safetensors weights" in line, line
    assert not (tmp_path / "pkg").exists()


def test_a_hub_model_is_its_snapshot_folder_and_never_reads_the_current_directory(tiny_dir, tmp_path):
    """A hub id's folder is its snapshot in the cache (issue 23): the GGUF export takes the tokenizer
    from there, and a decoy tokenizer.json where the user stands changes nothing."""
    import gguf

    hub_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_dir)
    here = tmp_path / "here"
    here.mkdir()
    decoy = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab = decoy["model"]["vocab"]
    renamed = next(t for t, i in vocab.items() if i == 100)
    vocab["DECOY"] = vocab.pop(renamed)
    (here / "tokenizer.json").write_text(json.dumps(decoy))
    (here / "config.json").write_text("{}")
    out = tmp_path / "m.gguf"
    res = run(
        "export",
        "--model",
        "tiny-org/tiny-llama",
        "--quant",
        "F16",
        "--pre-tokenizer",
        "gpt-2",
        "--out",
        str(out),
        cache=tmp_path / "c",
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
        cwd=here,
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    reader = gguf.GGUFReader(str(out))

    def field(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode() for i in f.data]

    tokens = field("tokenizer.ggml.tokens")
    assert "DECOY" not in tokens and tokens[100] == renamed
    assert field("mka_edge.source") == ["tiny-org/tiny-llama@0123456789abcdef0123456789abcdef01234567"]
