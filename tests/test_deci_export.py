"""GGUF export of a model whose layers lost their attention sub-block: llama.cpp's ``deci``
architecture (per-layer head counts, no attention tensors where there is no attention), checked in
llama.cpp itself against PyTorch, and the memory model's KV cache against llama.cpp's own figure."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from conftest import LLAMA3_ROPE, make_tiny
from gguf_helpers import kl_top1, llama_logprobs, torch_logprobs

REMOVED = [1, 2]
GGML_KV = {"f16": 1, "q8_0": 8, "q4_0": 2}  # llama.cpp's ggml type ids (Llama(type_k=..., type_v=...))


def _attention_free(path: Path, removed=REMOVED, llama3_rope: bool = False) -> Path:
    """A 4-layer random llama whose layers ``removed`` lost their attention (zero o_proj, listed in
    the config), head size 32 (quantized caches with flash attention want head_dim % 32 == 0);
    ``llama3_rope``: Llama 3 rope scaling (the file then carries rope_freqs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mka_edge.models.attention_removal import set_attention_removed

    src = make_tiny(path, "llama", layers=4, seed=7)
    cfg = AutoConfig.from_pretrained(src)
    cfg.head_dim = 32  # 4 heads of 32 on a 64-wide model: the file carries key_length too
    if llama3_rope:
        cfg.rope_parameters = dict(LLAMA3_ROPE)
    torch.manual_seed(8)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25)  # sharp attention: positions and the kept layers' attention matter
        for i in removed:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
    set_attention_removed(model.config, removed)
    model.save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def deci_dir(tmp_path_factory) -> Path:
    return _attention_free(tmp_path_factory.mktemp("deci") / "llama")


def _export(lm, out: Path, quant: str = "F32") -> dict:
    from mka_edge.exporters.gguf import export_loaded

    return export_loaded(lm, out, quant, pre_tokenizer="gpt-2", progress=False)


@pytest.fixture(scope="module")
def deci_f32(deci_dir, tmp_path_factory) -> Path:
    from mka_edge.models.loading import load_model

    out = tmp_path_factory.mktemp("deci-f32") / "deci.gguf"
    _export(load_model(str(deci_dir)), out)
    return out


def test_f32_deci_export_has_no_removed_attention_and_matches_pytorch(deci_dir, deci_f32):
    from mka_edge.exporters.gguf_inspect import inspect_gguf
    from mka_edge.models.loading import load_model

    info = inspect_gguf(deci_f32)
    assert info["architecture"] == "deci" and info["block_count"] == 4 and set(info["tensor_types"]) == {"F32"}
    assert info["attention_removed"] == REMOVED and info["head_count"] == 4 and info["head_count_kv"] == 2
    reader = gguf.GGUFReader(str(deci_f32))
    names = {t.name for t in reader.tensors}
    for i in range(4):
        attn = {n for n in names if n.startswith(f"blk.{i}.attn_")}
        assert (not attn) if i in REMOVED else len(attn) == 5, (i, attn)  # norm, q, k, v, output
        assert f"blk.{i}.ffn_norm.weight" in names and f"blk.{i}.ffn_down.weight" in names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    arch_keys = [k for k in reader.fields if not k.startswith(("general.", "tokenizer.", "mka_edge.", "GGUF."))]
    assert arch_keys and all(k.startswith("deci.") for k in arch_keys), arch_keys
    assert reader.fields["deci.attention.head_count"].contents() == [4, 0, 0, 4]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [2, 0, 0, 2]
    assert reader.fields["deci.attention.key_length"].contents() == 32

    lm = load_model(str(deci_dir))
    ids = torch.randint(3, lm.model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    kl, top1 = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(deci_f32, ids))
    assert kl < 1e-5 and top1 > 0.99, (kl, top1)


def test_deci_with_llama3_rope_matches_pytorch(tmp_path):
    from mka_edge.models.loading import load_model

    src = _attention_free(tmp_path / "rope", removed=[2], llama3_rope=True)
    lm = load_model(str(src))
    s = _export(lm, tmp_path / "rope.gguf")
    assert s["architecture"] == "deci" and s["attention_removed"] == [2]
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(tmp_path / "rope.gguf")).tensors}
    ids = torch.randint(3, lm.model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    kl, top1 = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / "rope.gguf", ids))
    assert kl < 1e-5 and top1 > 0.99, (kl, top1)


@pytest.mark.parametrize("quant,max_kl", [("Q8_0", 5e-3), ("Q4_K_M", 2e-2)])
def test_llama_cpp_quantizer_handles_deci(tmp_path, deci_dir, quant, max_kl):
    from mka_edge.models.loading import load_model

    lm = load_model(str(deci_dir))
    s = _export(lm, tmp_path / f"{quant}.gguf", quant)
    assert s["architecture"] == "deci" and s["attention_removed"] == REMOVED
    assert s["bits_per_weight"] < 16 and {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} & set(s["tensor_types"])
    ids = list(range(3, 51))
    kl, _ = kl_top1(torch_logprobs(lm.model, ids), llama_logprobs(tmp_path / f"{quant}.gguf", ids))
    assert kl < max_kl, kl


def test_shape_file_dry_run_sizes_deci(tmp_path, deci_dir):
    """The planner's data-less shape file is a deci file too, and llama.cpp's quantizer sizes it."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from mka_edge.exporters.gguf import write_shape_gguf
    from mka_edge.exporters.llama_quantize import dry_run_types
    from mka_edge.exporters.quant_types import quant_type
    from mka_edge.models.architectures import arch_for

    cfg = AutoConfig.from_pretrained(deci_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = write_shape_gguf(SimpleNamespace(model=model, arch=arch_for("llama")), tmp_path / "shape.gguf")
    assert not [n for n in shapes if n.startswith(("blk.1.attn_", "blk.2.attn_"))]
    ftype = quant_type("Q8_0").ftype
    types = dry_run_types(tmp_path / "shape.gguf", [ftype])[ftype]
    assert set(types) == set(shapes) and types["blk.1.ffn_down.weight"] == "q8_0"


@pytest.mark.parametrize(
    "type_k,type_v,flash_attn",
    [
        ("f16", "f16", False),
        ("f16", "f16", True),
        ("q8_0", "f16", False),
        ("q8_0", "q8_0", True),
        ("q4_0", "q4_0", True),
    ],
)
def test_kv_bytes_matches_llama_cpp_kv_buffer(tmp_path, deci_dir, deci_f32, type_k, type_v, flash_attn):
    """memory.kv_bytes = llama.cpp's "KV buffer size" to 0.01 MiB for a plain llama file and a deci
    file: K only where there is attention; V too with flash attention, every layer at full width
    without it; the context rounded up to a multiple of 256 (1000 -> 1024 cells)."""
    from transformers import AutoConfig

    from mka_edge.models.attention_removal import set_attention_removed
    from mka_edge.models.loading import load_model
    from mka_edge.solver.memory import MIB, Shape, kv_bytes
    from mka_edge.validate.llama_buffers import reported_buffers

    lm = load_model(str(deci_dir))
    set_attention_removed(lm.model.config, [])  # the same weights as a plain llama file
    plain = tmp_path / "plain.gguf"
    _export(lm, plain)
    cfg = AutoConfig.from_pretrained(deci_dir)
    shape = Shape.from_config(cfg)
    assert shape.kv_layers == 2 and shape.with_layers(4).kv_layers == 4
    for path, sh in ((deci_f32, shape), (plain, shape.with_layers(4))):
        for context in (1000, 4096):
            got = reported_buffers(
                str(path), context, kv_type=GGML_KV[type_k], type_v=GGML_KV[type_v], flash_attn=flash_attn
            )
            want = kv_bytes(sh, context, type_k, type_v=type_v, flash_attn=flash_attn) / MIB
            assert abs(got["kv_mb"] - want) <= 0.01, (path.name, context, got["kv_mb"], want)


def test_kv_bytes_keeps_its_old_form():
    from mka_edge.solver.memory import MIB, Shape, kv_bytes

    smol = Shape(30, 576, 9, 3, 64, 1536, 49152)
    assert kv_bytes(smol, 4096) / MIB == pytest.approx(90.0)
    assert kv_bytes(smol, 4096, "f16", flash_attn=True) == kv_bytes(smol, 4096)  # every layer has attention
    cut = smol.with_layers(30, attn_layers=20)
    assert kv_bytes(cut, 4096, flash_attn=True) / MIB == pytest.approx(60.0)  # K and V of 20 layers
    assert kv_bytes(cut, 4096) / MIB == pytest.approx(75.0)  # K of 20, V of all 30 (padded)
    assert kv_bytes(smol, 300) == kv_bytes(smol, 512) and kv_bytes(smol, 300, padded=False) < kv_bytes(smol, 512)


def test_unwritable_attention_removal_is_a_one_line_error(tmp_path, deci_dir, tiny_qwen_dir):
    from mka_edge.errors import UserError
    from mka_edge.models.attention_removal import set_attention_removed
    from mka_edge.models.loading import load_model

    lm = load_model(str(deci_dir))
    set_attention_removed(lm.model.config, [0, 2])
    with pytest.raises(UserError, match="layer 0") as e:
        _export(lm, tmp_path / "l0.gguf")
    assert "\n" not in str(e.value)
    qwen = load_model(str(tiny_qwen_dir))
    set_attention_removed(qwen.model.config, [1])
    with pytest.raises(UserError, match="qwen2") as e:
        _export(qwen, tmp_path / "qwen.gguf")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())
