"""MMLU in validation reads the last position's logits only, several questions a pass in PyTorch and
a context without all-position logits in llama.cpp: the answers must be the ones a full forward
per question gives."""

from __future__ import annotations

import numpy as np
import torch


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ragged, unsorted, more rows than one pass holds, two of equal length, one of a single token
LENGTHS = [37, 5, 90, 12, 12, 64, 1, 23, 71, 8, 44]


def test_batched_last_position_logits_match_one_forward_per_prompt(tiny_dir):
    from mka_edge.models.loading import load_model
    from mka_edge.validate.reference import MMLU_BATCH, last_position_logits

    assert len(LENGTHS) > MMLU_BATCH
    lm = load_model(str(tiny_dir))
    rows = _prompts(lm.model.config.vocab_size, LENGTHS)
    got = last_position_logits(lm.model, lm.input_device, rows)
    with torch.no_grad():
        for row, last in zip(rows, got):
            want = lm.model(input_ids=torch.tensor([row]), use_cache=False).logits[0, -1].float()
            assert last.shape == want.shape
            torch.testing.assert_close(last, want, atol=2e-4, rtol=1e-4)


def test_llama_cpp_mmlu_on_last_logits_matches_all_position_logits(tmp_path, tiny_dir):
    from llama_cpp import Llama

    from mka_edge.exporters.gguf import export_loaded
    from mka_edge.models.loading import load_model
    from mka_edge.validate import metrics
    from mka_edge.validate.gguf_worker import _last_logits

    lm = load_model(str(tiny_dir))
    path = tmp_path / "tiny.gguf"
    export_loaded(lm, path, "F32", pre_tokenizer="gpt-2", progress=False)
    rows = _prompts(lm.model.config.vocab_size, LENGTHS)
    letters = [11, 12, 13, 14]
    n_ctx = max(LENGTHS)
    full = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    last = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=False, verbose=False, n_threads=2)
    wants, gots = [], []
    for row in rows:
        full.reset()
        full.eval(row)
        wants.append(np.asarray(full.scores[len(row) - 1]).copy())
        last.reset()
        last.eval(row)
        gots.append(_last_logits(last).copy())
        np.testing.assert_allclose(gots[-1], wants[-1], atol=1e-3, rtol=1e-3)
    # the answer key: each question's "right" letter is the one the full logits pick, but one
    # question's key is wrong, so the count can only be len - 1 when both paths agree
    jobs = [{"ids": row, "answer": int(np.argmax(w[letters]))} for row, w in zip(rows, wants)]
    jobs[3]["answer"] = (jobs[3]["answer"] + 1) % 4
    it = iter(gots)
    res: dict = {}
    metrics.add_mmlu_letters(res, lambda ids: next(it), jobs, letters)
    assert res["mmlu_n"] == len(rows) and res["mmlu_correct"] == len(rows) - 1
