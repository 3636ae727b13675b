"""Shared fixtures: a tiny random llama (with a real trained tokenizer) saved as a HF directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mka_edge.targets  # noqa: E402, F401  (registers the targets' cost models and adapters, as every command does)
from mka_edge.models.synthetic import make_tiny, tiny_tokenizer  # noqa: F401 (tests import them from here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_build_inputs(root: Path, seed: int) -> tuple[Path, Path, Path]:
    """What a tiny end-to-end build needs: a 6-layer random llama with room for the validation's
    latency run, a recipe for it (llama.cpp's pre-tokenizer of the made-up tokenizer) and a laptop
    profile without a speed bar (a random tiny model's host speed calibration predicts little)."""
    import json

    src = make_tiny(root / "src", "llama", layers=6, seed=seed)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 1024}))
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nsource:\n  kind: hf-dir\n  path: {src}\narchitecture: llama\nllama_cpp:\n  pre_tokenizer: gpt-2\n"
    )
    profile = root / "laptop.yaml"
    profile.write_text(
        "name: laptop-test\nmemory_mb: 8192\nreserve_mb: 4096\nbandwidth_gbps: 51.2\nruntime: llama.cpp\n"
        "context_length: 1024\nkv_cache_type: f16\nflash_attention: false\nthreads: 2\nmin_tokens_per_s: 0\nmax_quality_loss: 50\n"
    )
    return src, recipe, profile


def predicted_memory_mb(model: Path, quant: str, k: int, context: int) -> float:
    """The plan's memory prediction for ``model`` with ``k`` layers merged (sizes from llama.cpp's dry run)."""
    from mka_edge.records import QuantCost
    from mka_edge.solver.feasibility import gguf_type_sizes, read_shape
    from mka_edge.solver.memory import predict

    ms = read_shape(str(model))
    wb, rb = QuantCost.from_json(quant, "gguf", gguf_type_sizes(ms, [quant])[quant]).weight_bytes(ms.n_layers - k)
    return predict(ms.shape.with_layers(ms.n_layers - k), wb, context, "f16", repack_bytes=rb).total_mb


def hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """``folder``'s files laid out as huggingface_hub caches a download (blobs linked from a
    snapshot named by its revision, refs/main naming it); returns the snapshot folder."""
    import hashlib
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    (base / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        blob = base / "blobs" / h.hexdigest()
        if not blob.exists():
            shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tinyq") / "qwen2", model_type="qwen2", layers=5, seed=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """A cache shared by the session (so the SmolLM2 dequantization happens once), never ~/.cache."""
    root = os.environ.get("MKA_EDGE_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("MKA_EDGE_CACHE", root)


# Llama 3 rope scaling on a tiny model (llama.cpp then needs the rope_freqs tensor)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

SMALL = dict(samples=4, seq_len=64, positions=96, loss_samples=2, repeats=2, batch_size=4)


def tiny_context(path: Path, **overrides):
    from mka_edge.mka.context import MergeContext, MergeSettings
    from mka_edge.models.loading import load_model

    lm = load_model(str(path), "cpu")
    return MergeContext(lm, MergeSettings(**{**SMALL, **overrides}), torch.device("cpu"))


@pytest.fixture(scope="session")
def merged_smollm2(tmp_path_factory) -> Path:
    """SmolLM2 with 3 layers merged away (shortgpt, small calibration), shared by the export tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smol") / "k3"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mka_edge.cli",
            "merge",
            "-k",
            "3",
            "--method",
            "shortgpt",
            "--samples",
            "8",
            "--seq-len",
            "128",
            "--positions",
            "128",
            "--repeats",
            "2",
            "--heldout-chunks",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out
