"""Tiny random models with a real (small) tokenizer, saved as Hugging Face folders: for tests and
benchmarks that need a model of a given architecture without downloading one."""

from __future__ import annotations

import json
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


# Llama 3's pre-tokenizer split (tokenizer.json of meta-llama/Meta-Llama-3-8B), which llama.cpp's
# "llama-bpe" pre-tokenizer reproduces; the byte-level step after it runs without its own regex.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_REGULAR = 128_000  # BPE tokens; 256 special tokens follow (<|begin_of_text|> = 128000)
LLAMA3_SPECIAL = 256


def llama3_style_tokenizer(regular: int = LLAMA3_REGULAR, special: int = LLAMA3_SPECIAL):
    """A byte-level BPE of Llama 3's size and layout: Llama 3's split regex, ``regular`` tokens (real
    merges trained on the packaged Wikipedia text, then extended by concatenating trained tokens
    until the size is reached: valid merges, never seen in text), then ``special`` control tokens
    with Llama 3's names and ids, and <|begin_of_text|> prepended as Llama 3's template does.

    Why synthetic: Llama 3's own tokenizer is gated; what a test at the real shape needs is the
    real sizes (a 128,256-row embedding and logits, a 128k-entry GGUF vocabulary with 280k merges'
    worth of strings) and llama.cpp's llama-bpe pre-tokenizer, not Meta's exact merges."""
    from tokenizers import Regex, processors

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=min(regular, 4000), show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    base.train_from_iterator(load_texts()[:40], trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    stems = sorted(vocab, key=vocab.get)[:1000]
    for a in stems:  # extend: every concatenation of two trained tokens is a valid merge of its halves
        if len(vocab) >= regular:
            break
        for b in stems:
            if len(vocab) >= regular:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    if len(vocab) < regular:
        raise ValueError(f"could not extend the trained vocabulary to {regular} tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    names += ["<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>"]
    names += ["<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + special - len(names))]
    tok.add_special_tokens(names[:special])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[(names[0], regular)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names[0],
        eos_token=names[1],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )


# Meta-Llama-3-8B's config.json (the fields transformers reads) with Llama 3.1's rope scaling and
# context (131,072 positions from 8,192); llama3_config overrides its fields.
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def llama3_config(**fields):
    """LLAMA3_8B_CONFIG as a transformers config with ``fields`` (config.json names, e.g.
    ``num_hidden_layers``, ``hidden_size``) overriding it, bf16 as the hub stores it."""
    cfg = AutoConfig.for_model(**{k: v for k, v in {**LLAMA3_8B_CONFIG, **fields}.items() if k != "architectures"})
    cfg.architectures = list(LLAMA3_8B_CONFIG["architectures"])
    cfg.dtype = torch.bfloat16
    return cfg


SHARD_BYTES = 5 * 10**9  # the hub's usual shard size for Llama checkpoints


def make_llama3_shaped(path: Path, *, seed: int = 0, tokenizer=None, **fields) -> Path:
    """A random Llama 3 (its config with ``fields`` overriding it, rope scaling, untied
    128,256-row embedding and head, a Llama-3-style tokenizer of that size) saved as bf16
    safetensors shards with their index, as the hub stores it.  With no fields, Llama-3-8B's shape
    (16 GB); tests pass tiny widths and keep the real vocabulary.

    The tensors are drawn and written one at a time into each shard (the header first, from the
    meta-device model's shapes), so making the 8B shape holds one tensor, not 16 GB.  Norms are
    drawn in [0.5, 1.5) and everything else from N(0, 0.02), so that every layer differs."""
    import struct

    path.mkdir(parents=True, exist_ok=True)
    cfg = llama3_config(**fields)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    held = 0
    for name, t in meta.state_dict().items():
        if shards[-1] and held + 2 * t.numel() > SHARD_BYTES:
            shards.append([])
            held = 0
        shards[-1].append((name, t.shape))
        held += 2 * t.numel()
    gen = torch.Generator().manual_seed(seed)
    index: dict = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * shape.numel()]}
            off += 2 * shape.numel()
            index["weight_map"][name] = fname
        index["metadata"]["total_size"] += off
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = path / f".{fname}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                t = torch.rand(shape, generator=gen) + 0.5 if "norm" in name else torch.randn(shape, generator=gen) * 0.02
                fh.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        tmp.replace(path / fname)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg.save_pretrained(path)
    (tokenizer or llama3_style_tokenizer()).save_pretrained(path)
    return path
