"""What the parent asks a runtime worker (validate/*_worker.py) to do: one record per task, written
to the child as JSON (``to_json``) and read back there (``job_from_json``).  The records are the
schema of the process boundary: a worker reads no key they do not define."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from ..kv_cache import BASELINE_CACHE


@dataclass(frozen=True)
class _Job:
    task: ClassVar[str]
    artifact: str
    threads: int

    def to_json(self) -> dict:
        return {"task": self.task, **asdict(self)}


@dataclass(frozen=True)
class AccuracyJob(_Job):
    """Logits on the reference's held-out ids (KL, perplexity, top-1) and the MMLU questions."""

    task: ClassVar[str] = "accuracy"
    reference: str = ""
    cache_mode: str = BASELINE_CACHE  # kv_cache.CacheMode label: K type / V type, +fa with flash attention
    mmlu: list = field(default_factory=list)
    letter_ids: list | None = None


@dataclass(frozen=True)
class LatencyJob(_Job):
    """Prompt and generation speed, time to first token, load time and peak RSS."""

    task: ClassVar[str] = "latency"
    context: int = 2048
    prompt_ids: list = field(default_factory=list)
    gen_tokens: int = 128
    repeats: int = 3
    cache_mode: str = BASELINE_CACHE


@dataclass(frozen=True)
class GreedyJob(_Job):
    """Greedy continuations of token prompts (onnxruntime-genai's generator; a check of the export)."""

    task: ClassVar[str] = "greedy"
    prompts: list = field(default_factory=list)
    new_tokens: int = 16


JOBS = {cls.task: cls for cls in (AccuracyJob, LatencyJob, GreedyJob)}


def job_from_json(d: dict) -> _Job:
    cls = JOBS[d["task"]]
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
