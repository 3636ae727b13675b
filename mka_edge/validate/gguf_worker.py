"""Child-process side of GGUF validation: only numpy and llama-cpp-python are imported here, so
peak RSS is the runtime's and the model's, not PyTorch's, and a crash inside llama.cpp cannot
take the caller down.

    python -m mka_edge.validate.gguf_worker JOB.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from mka_edge.kv_cache import CacheMode
from mka_edge.validate import metrics
from mka_edge.validate.jobs import job_from_json


def _open(job: dict, logits_all: bool, n_ctx: int):
    from llama_cpp import Llama

    mode = CacheMode.parse(job.cache_mode)  # attention path passed explicitly: the bindings' default is "disabled"
    return Llama(
        model_path=job.artifact,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=job.threads,
        n_threads_batch=job.threads,
        logits_all=logits_all,
        **mode.llama_kwargs(),
        verbose=False,
        seed=0,
        n_gpu_layers=0,
    )


def _last_logits(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # reading the logits waits for the decode to finish
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def latency(job: dict) -> dict:
    """Prompt and generation speed, time to first token, load time and peak RSS (no all-position logits)."""
    base_rss = metrics.status_mb("VmRSS")
    t0 = time.perf_counter()
    llm = _open(job, logits_all=False, n_ctx=job.context)
    load_s = time.perf_counter() - t0
    prompt = job.prompt_ids
    n_gen = job.gen_tokens
    llm.eval(prompt[:16])  # warm-up: llama.cpp's first evaluation after loading is not representative
    _last_logits(llm)
    llm.reset()
    runs = []
    for _ in range(job.repeats):
        llm.reset()
        t_start = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(_last_logits(llm)))
        t_first = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(_last_logits(llm)))
        t_end = time.perf_counter()
        runs.append(
            {
                "ttft_s": t_first - t_start,
                "prompt_tps": len(prompt) / (t_first - t_start),
                "gen_tps": n_gen / (t_end - t_first),
            }
        )
    return metrics.summarize_runs(
        runs,
        {
            "load_s": load_s,
            "baseline_rss_mb": base_rss,
            "peak_rss_mb": metrics.status_mb("VmHWM"),
            **CacheMode.parse(job.cache_mode).runtime_json(),
        },
    )


def accuracy(job: dict) -> dict:
    """KL over the held-out chunks (logits at every position), then MMLU in a second context that
    computes the last position's logits only (the model file is mapped, so reopening costs little)."""
    mmlu = job.mmlu or []
    length = int(np.load(job.reference)["ids"].shape[1])
    llm = _open(job, logits_all=True, n_ctx=length)

    def logits_of(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])

    res = metrics.accuracy(logits_of, job.reference)
    llm.close()
    if mmlu:
        last = _open(job, logits_all=False, n_ctx=max(len(q["ids"]) for q in mmlu))

        def last_logits_of(ids: list[int]) -> np.ndarray:
            last.reset()
            last.eval(ids)
            return _last_logits(last)

        metrics.add_mmlu_letters(res, last_logits_of, mmlu, job.letter_ids)
        last.close()
    return res | CacheMode.parse(job.cache_mode).runtime_json()


def main(argv: list[str]) -> int:
    job = job_from_json(json.loads(open(argv[0]).read()))
    result = {"latency": latency, "accuracy": accuracy}[job.task](job)
    with open(argv[1], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
