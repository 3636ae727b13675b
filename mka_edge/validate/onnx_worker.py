"""Child-process side of ONNX validation: only numpy, onnxruntime and onnxruntime-genai are
imported here, so peak RSS is the runtime's and the model's, not PyTorch's.

Accuracy runs the decoder graph directly in an onnxruntime InferenceSession (CPU provider) on
whole sequences with an empty cache, which gives logits for every position.  Latency runs the
folder the way an application does, through onnxruntime-genai's generator (its KV buffer, its
sampling loop), with the thread count set through a config overlay.

    python -m mka_edge.validate.onnx_worker JOB.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from mka_edge.validate import metrics
from mka_edge.validate.jobs import job_from_json

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class Decoder:
    """The exported decoder as a function of a token sequence (empty past)."""

    def __init__(self, folder: str, threads: int):
        import onnxruntime as ort

        cfg = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(folder) / cfg["filename"]), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_heads, self.head = int(cfg["num_key_value_heads"]), int(cfg["head_size"])

    def feeds(self, ids: list[int]) -> dict:
        n = len(ids)
        f = {"input_ids": np.asarray([ids], dtype=_NP[self.inputs["input_ids"].type])}
        if "attention_mask" in self.inputs:
            f["attention_mask"] = np.ones((1, n), dtype=_NP[self.inputs["attention_mask"].type])
        if "position_ids" in self.inputs:
            f["position_ids"] = np.arange(n, dtype=_NP[self.inputs["position_ids"].type])[None]
        for name, inp in self.inputs.items():
            if name.startswith("past_key_values"):
                f[name] = np.zeros((1, self.kv_heads, 0, self.head), dtype=_NP[inp.type])
        return f

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.session.run(["logits"], self.feeds(ids))[0][0]


def accuracy(job: dict) -> dict:
    dec = Decoder(job.artifact, job.threads)
    return metrics.accuracy(dec.logits, job.reference, job.mmlu or [], job.letter_ids)


def _genai_model(folder: str, threads: int):
    import onnxruntime_genai as og

    cfg = og.Config(folder)
    cfg.overlay(
        json.dumps(
            {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}
        )
    )
    return og, og.Model(cfg)


def _generator(og, model, prompt: list[int], context: int):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    return gen


def latency(job: dict) -> dict:
    """Prompt and generation speed, time to first token, load time and peak RSS."""
    base_rss = metrics.status_mb("VmRSS")
    t0 = time.perf_counter()
    og, model = _genai_model(job.artifact, job.threads)
    load_s = time.perf_counter() - t0
    loaded_rss = metrics.status_mb("VmRSS")
    prompt, n_gen, context = job.prompt_ids, job.gen_tokens, job.context
    warm = _generator(og, model, prompt[:16], context)  # the first run after loading is not representative
    warm.generate_next_token()
    del warm
    runs = []
    for _ in range(job.repeats):
        t_start = time.perf_counter()
        gen = _generator(og, model, prompt, context)  # runs the prompt
        gen.generate_next_token()  # picks the first token from the prompt's logits
        t_first = time.perf_counter()
        for _ in range(n_gen):  # each call runs one decode step, then picks
            gen.generate_next_token()
        t_end = time.perf_counter()
        runs.append(
            {
                "ttft_s": t_first - t_start,
                "prompt_tps": len(prompt) / (t_first - t_start),
                "gen_tps": n_gen / (t_end - t_first),
            }
        )
        del gen
    return metrics.summarize_runs(
        runs,
        {
            "load_s": load_s,
            "baseline_rss_mb": base_rss,
            "loaded_rss_mb": loaded_rss,
            "peak_rss_mb": metrics.status_mb("VmHWM"),
        },
    )


def greedy(job: dict) -> dict:
    """Greedy continuations of each prompt, as onnxruntime-genai produces them (fidelity tests)."""
    og, model = _genai_model(job.artifact, job.threads)
    out = []
    for ids in job.prompts:
        gen = _generator(og, model, ids, len(ids) + job.new_tokens)
        toks = []
        while len(toks) < job.new_tokens and not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
        out.append(toks)
    return {"tokens": out}


def main(argv: list[str]) -> int:
    job = job_from_json(json.loads(open(argv[0]).read()))
    result = {"latency": latency, "accuracy": accuracy, "greedy": greedy}[job.task](job)
    with open(argv[1], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
