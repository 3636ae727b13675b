"""Child-process side of GGUF validation: only numpy and llama-cpp-python are imported here, so
peak RSS is the runtime's and the model's, not PyTorch's, and a crash inside llama.cpp cannot
take the caller down.

    python -m mka_edge.validate.gguf_worker JOB.json RESULT.json
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process image.  Not ru_maxrss: Linux carries that across exec, so a
    child of a big parent (PyTorch with a model loaded) would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


def _open(job: dict, logits_all: bool, n_ctx: int):
    from llama_cpp import Llama

    kv = KV_TYPES[job.get("kv_type", "f16")]
    return Llama(model_path=job["artifact"], n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=job["threads"],
                 n_threads_batch=job["threads"], logits_all=logits_all, type_k=kv, type_v=kv, verbose=False,
                 seed=0, n_gpu_layers=0)


def _last_logits(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)   # reading the logits waits for the decode to finish
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def latency(job: dict) -> dict:
    """Prompt and generation speed, time to first token, load time and peak RSS (no all-position logits)."""
    base_rss = _status_mb("VmRSS")
    t0 = time.perf_counter()
    llm = _open(job, logits_all=False, n_ctx=job["context"])
    load_s = time.perf_counter() - t0
    prompt = job["prompt_ids"]
    n_gen = job["gen_tokens"]
    llm.eval(prompt[:16])          # warm-up: llama.cpp's first evaluation after loading is not representative
    _last_logits(llm)
    llm.reset()
    runs = []
    for _ in range(job["repeats"]):
        llm.reset()
        t_start = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(_last_logits(llm)))
        t_first = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(_last_logits(llm)))
        t_end = time.perf_counter()
        runs.append({"ttft_s": t_first - t_start, "prompt_tps": len(prompt) / (t_first - t_start),
                     "gen_tps": n_gen / (t_end - t_first)})
    out = {"load_s": load_s, "baseline_rss_mb": base_rss, "peak_rss_mb": _status_mb("VmHWM"), "runs": runs}
    for key in ("prompt_tps", "gen_tps", "ttft_s"):
        vals = [r[key] for r in runs]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def accuracy(job: dict) -> dict:
    """KL to the reference (top-k + tail form), perplexity, top-1 agreement, MMLU letter accuracy."""
    ref = np.load(job["reference"])
    ids, top_idx, top_lp, tgt_lp = ref["ids"], ref["top_idx"], ref["top_logp"].astype(np.float64), ref["target_logp"]
    n_chunks, length = ids.shape
    mmlu = job.get("mmlu") or []
    llm = _open(job, logits_all=True, n_ctx=max([length] + [len(q["ids"]) for q in mmlu]))
    kl = agree = nll = ref_nll = 0.0
    n_pos = n_tok = 0
    for c in range(n_chunks):
        llm.reset()
        llm.eval(ids[c].tolist())
        lq = _log_softmax(np.asarray(llm.scores[:length]))
        p_top = np.exp(top_lp[c])
        q_top = np.exp(np.take_along_axis(lq, top_idx[c], axis=1))
        p_tail = np.clip(1.0 - p_top.sum(-1), 1e-12, None)
        q_tail = np.clip(1.0 - q_top.sum(-1), 1e-12, None)
        kl += float((p_top * (top_lp[c] - np.log(np.clip(q_top, 1e-300, None)))).sum()
                    + (p_tail * (np.log(p_tail) - np.log(q_tail))).sum())
        agree += float((lq.argmax(-1) == top_idx[c][:, 0]).sum())
        n_pos += length
        nll += float(-lq[np.arange(length - 1), ids[c][1:]].sum())
        ref_nll += float(-tgt_lp[c].astype(np.float64).sum())
        n_tok += length - 1
    res = {"kl": kl / n_pos, "top1": agree / n_pos, "ppl": float(np.exp(nll / n_tok)),
           "ref_ppl": float(np.exp(ref_nll / n_tok)), "tokens": n_pos}
    res["ppl_change_pct"] = 100 * (res["ppl"] / res["ref_ppl"] - 1)
    if mmlu:
        correct = 0
        letters = job["letter_ids"]
        for q in mmlu:
            q_ids = q["ids"]
            llm.reset()
            llm.eval(q_ids)
            last = np.asarray(llm.scores[len(q_ids) - 1])
            correct += int(int(np.argmax(last[letters])) == q["answer"])
        res["mmlu_correct"], res["mmlu_n"] = correct, len(mmlu)
    return res


def main(argv: list[str]) -> int:
    job = json.loads(open(argv[0]).read())
    result = {"latency": latency, "accuracy": accuracy}[job["task"]](job)
    with open(argv[1], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
