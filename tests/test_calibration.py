import gzip
import json
from importlib import resources

import pytest
import torch

from mka_edge.calibration import calibration_batch, heldout_chunks, load_texts
from mka_edge.errors import UserError
from mka_edge.mka.activations import sample_positions


def _titles(name):
    path = resources.files("mka_edge.data") / name
    return [json.loads(l)["title"] for l in gzip.open(str(path), "rt")]


def test_default_calibration_and_heldout_are_disjoint_prose():
    cal, held = _titles("wiki_calibration.jsonl.gz"), _titles("wiki_heldout.jsonl.gz")
    assert len(cal) > 50 and len(held) >= 10
    assert not set(cal) & set(held)
    texts = load_texts()
    assert all("[[" not in t and "{{" not in t and "<ref" not in t for t in texts)
    held_text = " ".join(load_texts(default="wiki_heldout.jsonl.gz"))
    probes = [t[200:260] for t in texts[:20] if len(t) > 300]
    assert probes and not any(p in held_text for p in probes)


def test_batches_are_seeded_and_deterministic(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    a, _ = calibration_batch(tok, None, 4, 32, seed=0)
    b, _ = calibration_batch(tok, None, 4, 32, seed=0)
    c, _ = calibration_batch(tok, None, 4, 32, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    h1, h2 = heldout_chunks(tok, 2), heldout_chunks(tok, 2)
    assert h1.shape == (2, 512) and torch.equal(h1, h2)


def test_position_zero_is_never_sampled():
    pos = sample_positions(8, 16, 100, seed=3)
    assert len(set(pos.tolist())) == 100
    assert not any(p % 16 == 0 for p in pos.tolist())


def test_user_files_text_and_jsonl(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(json.dumps({"text": "word " * 300}) for _ in range(3)))
    batch, spec = calibration_batch(tok, j, 2, 64, 0)
    assert batch.shape == (2, 64) and spec.source == str(j)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(UserError, match="empty"):
        load_texts(empty)
    with pytest.raises(UserError, match="enough for"):
        calibration_batch(tok, j, 500, 64, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nottext": 1}\n')
    with pytest.raises(UserError, match="'text'"):
        load_texts(bad)
