"""A/B of validation's MMLU on one model and one artifact, same questions, same host, one process
at a time: the reference in PyTorch (a full forward per question, against MMLU_BATCH questions a
pass with the head at the last positions, and against the head at the last position alone) and
the artifact in llama.cpp (all-position logits against the last position's).  Prints and writes
JSON (seconds and how many of the answers agree).

    python bench/validation_mmlu_ab.py --model /tmp/mka-edge-build-at-scale/model-1.5b \\
        --artifact /tmp/mka-edge-build-at-scale/pkg-*/pkg/model-1-K0-Q3_K_M-imat.gguf \\
        --out docs/data/validation_mmlu_ab.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def torch_side(model_spec: str, res: dict) -> tuple[list[list[int]], list[int]]:
    from mka_edge.models.loading import load_model
    from mka_edge.validate.reference import last_position_logits, mmlu_jobs

    lm = load_model(model_spec)
    jobs, letters = mmlu_jobs(lm.tokenizer, 1)
    rows = [q["ids"] for q in jobs]

    def picks(logits):
        return [int(x[letters].argmax()) for x in logits]

    with torch.no_grad():
        t = time.perf_counter()
        full = picks([lm.model(input_ids=torch.tensor([r]), use_cache=False).logits[0, -1] for r in rows])
        res["torch_full_forward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        batched = picks(last_position_logits(lm.model, lm.input_device, rows))
        res["torch_batched_last_positions_s"] = time.perf_counter() - t
        t = time.perf_counter()
        keep1 = picks(
            [lm.model(input_ids=torch.tensor([r]), use_cache=False, logits_to_keep=1).logits[0, -1] for r in rows]
        )
        res["torch_last_position_only_s"] = time.perf_counter() - t
    res["torch_batched_same_answers"] = sum(a == b for a, b in zip(full, batched))
    res["torch_last_position_same_answers"] = sum(a == b for a, b in zip(full, keep1))
    res["questions"], res["tokens"] = len(rows), sum(map(len, rows))
    return rows, letters


def llama_side(artifact: str, rows: list[list[int]], letters: list[int], res: dict) -> None:
    from llama_cpp import Llama

    from mka_edge.validate.gguf_worker import _last_logits

    def run(logits_all: bool) -> tuple[float, list[int]]:
        llm = Llama(
            model_path=artifact,
            n_ctx=max(map(len, rows)),
            n_batch=512,
            n_ubatch=512,
            n_threads=2,
            n_threads_batch=2,
            logits_all=logits_all,
            verbose=False,
            seed=0,
        )
        out = []
        t = time.perf_counter()
        for r in rows:
            llm.reset()
            llm.eval(r)
            last = np.asarray(llm.scores[len(r) - 1]) if logits_all else _last_logits(llm)
            out.append(int(np.argmax(last[letters])))
        seconds = time.perf_counter() - t
        llm.close()
        return seconds, out

    res["llama_all_positions_s"], a = run(True)
    res["llama_last_position_s"], b = run(False)
    res["llama_same_answers"] = sum(x == y for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the reference model (folder, recipe, GGUF or hub id)")
    ap.add_argument("--artifact", required=True, help="a GGUF of it")
    ap.add_argument("--out", type=Path, default=Path("bench/results/validation_mmlu_ab.json"))
    args = ap.parse_args()
    res: dict = {"model": args.model, "artifact": args.artifact}
    rows, letters = torch_side(args.model, res)
    llama_side(args.artifact, rows, letters, res)
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
