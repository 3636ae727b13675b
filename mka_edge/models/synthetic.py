"""Tiny random models with a real (small) tokenizer, saved as Hugging Face folders: for tests and
benchmarks that need a model of a given architecture without downloading one."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mka_edge.calibration import load_texts


def tiny_tokenizer():
    """A 400-token byte-level BPE trained on a few packaged Wikipedia articles: real merges, tiny vocabulary."""

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(load_texts()[:10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny(path: Path, model_type: str = "llama", layers: int = 6, seed: int = 0) -> Path:
    """A random model (hidden 64, 4 heads, 2 KV heads, tied embeddings) saved as a Hugging Face folder with
    its tokenizer; norms and biases randomised so that every layer differs (merges then differ too)."""

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
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
