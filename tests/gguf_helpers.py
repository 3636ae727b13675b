"""Helpers for GGUF tests: llama.cpp's next-token distributions vs PyTorch's on the same ids."""

from __future__ import annotations

import numpy as np
import torch


def llama_logprobs(path, ids: list[int], kv_f32: bool = True) -> np.ndarray:
    from llama_cpp import Llama

    kv = 0 if kv_f32 else 1
    llm = Llama(
        model_path=str(path),
        n_ctx=max(64, len(ids)),
        n_batch=512,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=kv,
        type_v=kv,
    )
    llm.eval(ids)
    lg = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    lg -= lg.max(-1, keepdims=True)
    return lg - np.log(np.exp(lg).sum(-1, keepdims=True))


@torch.no_grad()
def torch_logprobs(model, ids: list[int]) -> np.ndarray:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()


def kl_top1(ref: np.ndarray, art: np.ndarray) -> tuple[float, float]:
    kl = float((np.exp(ref) * (ref - art)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == art.argmax(-1)).mean())
