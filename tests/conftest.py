"""Shared fixtures: a tiny random llama (with a real trained tokenizer) saved as a HF directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mka_edge.calibration import load_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(load_texts()[:10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny(path: Path, model_type: str = "llama", layers: int = 6, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = _tiny_tokenizer()
    extra = {"attention_bias": False} if model_type == "llama" else {}
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # init leaves norms at 1 and biases at 0: make every weight distinct per layer
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


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
