"""The bad-input battery: every command against malformed and hostile files, impossible numbers,
unknown choices and unwritable paths.  Each must exit non-zero with one clear line (at most three
lines on stderr, never a traceback) and leave nothing at --out.  Cases run two at a time (each
is a fresh process, as a user's would be); all of them fail before any model work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


def _files(root: Path, tiny: Path) -> dict[str, Path]:
    """The hostile inputs, written once."""
    f = {}

    def w(name: str, data: str | bytes) -> Path:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        f[name] = p
        return p

    good = (root.parent / "good.yaml").read_text()
    w("p-syntax.yaml", "memory_mb: [1, 2\n")
    w("p-binary.yaml", bytes(range(256)))
    w("p-list.yaml", "- a\n- b\n")
    w("p-missing.yaml", good.replace("threads: 2\n", ""))
    w("p-unknown.yaml", good + "turbo: true\n")
    w("p-negative.yaml", good.replace("memory_mb: 8192", "memory_mb: -8192"))
    w("p-string.yaml", good.replace("memory_mb: 8192", "memory_mb: 8GB"))
    w("p-reserve.yaml", good.replace("reserve_mb: 4096", "reserve_mb: 9000"))
    w("p-runtime.yaml", good.replace("runtime: llama.cpp", "runtime: tensorrt"))
    w("p-kv.yaml", good + "kv_cache_type: q5_1\n")
    w("p-fa.yaml", good + "flash_attention: sometimes\n")
    w("p-python.yaml", "!!python/object/apply:os.system ['touch pwned']\n")
    w("p-boolmem.yaml", good.replace("memory_mb: 8192", "memory_mb: true"))
    w("r-kind.yaml", "source:\n  kind: torrent\n")
    w("r-hub.yaml", "source:\n  kind: hub\n")
    w("r-heal.yaml", f"source:\n  kind: hf-dir\n  path: {tiny}\nheal:\n  steps: many\n")
    w("r-list.yaml", "[1, 2, 3]\n")
    w("garbage/config.json", (tiny / "config.json").read_text())
    w("garbage/model.safetensors", os.urandom(2000))
    w("noconfig/model.safetensors", b"x")
    w("pickle/config.json", (tiny / "config.json").read_text())
    w("pickle/pytorch_model.bin", b"\x80\x04K\x01.")
    w("gpt2/config.json", json.dumps({"model_type": "gpt2"}))
    w("gpt2/model.safetensors", b"x")
    w("trunc.gguf", b"GGUF\x03\x00\x00\x00garbage")
    w("onnx/model.onnx", b"junk")
    w("onnx/genai_config.json", "{}")
    w("cal-empty.txt", "")
    w("cal-binary.txt", os.urandom(512))
    w("cal-latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    w("cal-notext.jsonl", '{"title": "a"}\n{"title": "b"}\n')
    w("cal-notjson.jsonl", "{not json\n")
    w("cal-trunc.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03+I-.")
    w("a-file", "I am a file")
    return f


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad") / "in"
    root.mkdir()
    (root.parent / "good.yaml").write_text(
        "name: good\nmemory_mb: 8192\nreserve_mb: 4096\nbandwidth_gbps: 51.2\nruntime: llama.cpp\n"
        "context_length: 4096\nthreads: 2\nmin_tokens_per_s: 0\nmax_quality_loss: 0.5\n"
    )
    return _files(root, tiny_dir)


def _cases(f: dict[str, Path], tiny: Path, out: Path) -> list[tuple[list[str], str]]:
    """(command line, what its one line must say).  ``out``: a fresh path every case may name."""
    merge = ["merge", "-k", "1", "--model", str(tiny), "--samples", "2", "--seq-len", "16", "--out", str(out)]
    plan = ["plan", "--profile", "laptop-8gb"]
    c: list[tuple[list[str], str]] = []
    for name, says in (
        ("p-syntax.yaml", "cannot read profile"),
        ("p-binary.yaml", "cannot read profile"),
        ("p-list.yaml", "is not a YAML mapping"),
        ("p-missing.yaml", "missing field 'threads'"),
        ("p-unknown.yaml", "unknown field(s) turbo"),
        ("p-negative.yaml", "'memory_mb' must be a positive integer"),
        ("p-string.yaml", "'memory_mb' must be a positive integer"),
        ("p-reserve.yaml", "leaves no memory"),
        ("p-runtime.yaml", "field 'runtime' must be one of"),
        ("p-kv.yaml", "field 'kv_cache_type' must be one of"),
        ("p-fa.yaml", "must be true or false"),
        ("p-python.yaml", "cannot read profile"),
        ("p-boolmem.yaml", "'memory_mb' must be a positive integer"),
    ):
        c.append((["plan", "--profile", str(f[name])], says))
    c += [
        (["plan", "--profile", str(f["a-file"].with_name("none.yaml"))], "does not exist"),
        (["plan", "--profile", "toaster"], "unknown profile 'toaster'"),
        ([*plan, "--model", str(f["r-kind.yaml"])], "field 'source.kind' must be one of"),
        ([*plan, "--model", str(f["r-hub.yaml"])], "needs the text field 'source.hub_id'"),
        ([*plan, "--model", str(f["r-heal.yaml"])], "field 'heal.steps' must be int"),
        ([*plan, "--model", str(f["r-list.yaml"])], "is not a YAML mapping"),
        (["merge", "-k", "1", "--model", str(f["garbage/config.json"].parent), "--out", str(out)], "cannot load"),
        (["merge", "-k", "1", "--model", str(f["noconfig/model.safetensors"].parent), "--out", str(out)], "no config"),
        (["merge", "-k", "1", "--model", str(f["pickle/config.json"].parent), "--out", str(out)], "pickled"),
        (["merge", "-k", "1", "--model", str(f["gpt2/config.json"].parent), "--out", str(out)], "unsupported arch"),
        (["export", "--quant", "Q8_0", "--model", str(f["trunc.gguf"]), "--out", f"{out}.gguf"], "not a readable GGUF"),
        (["validate", str(f["trunc.gguf"]), "--out", str(out)], "not a readable GGUF"),
        (["validate", str(f["onnx/model.onnx"].parent), "--out", str(out)], "genai_config.json is not a valid"),
        (["analyze", "--model", "someone/not-a-cached-model", "--out", str(out)], "cannot get 'someone/not-a"),
        ([*merge[:-2], "--calibration", str(f["cal-empty.txt"]), "--out", str(out)], "is empty"),
        ([*merge[:-2], "--calibration", str(f["cal-binary.txt"]), "--out", str(out)], "cannot read calibration"),
        ([*merge[:-2], "--calibration", str(f["cal-latin1.txt"]), "--out", str(out)], "cannot read calibration"),
        ([*merge[:-2], "--calibration", str(f["cal-notext.jsonl"]), "--out", str(out)], "has no 'text' string"),
        ([*merge[:-2], "--calibration", str(f["cal-notjson.jsonl"]), "--out", str(out)], "is not JSON"),
        ([*merge[:-2], "--calibration", str(f["cal-trunc.jsonl.gz"]), "--out", str(out)], "cannot read calibration"),
        ([*merge[:-2], "--calibration", str(f["a-file"].with_name("nope.txt")), "--out", str(out)], "cannot read"),
        ([*plan, "--context", "0"], "must be positive"),
        ([*plan, "--budget-mb", "-5"], "must be positive"),
        ([*plan, "--max-merge", "100"], "--max-merge 100 must be between 0 and 29"),
        ([*plan, "--context", "100000000"], "beyond the model's 8192 positions"),
        ([*plan, "--method", "nope"], "unknown merge method 'nope'"),
        (["build", "--profile", "laptop-8gb", "--method", "nope", "--out", str(out)], "unknown merge method 'nope'"),
        ([*plan, "--quants", "Q9_9"], "unknown quant type 'Q9_9'"),
        ([*plan, "--kv-type", "q9"], "unknown KV cache type 'q9'"),
        (["plan", "--profile", "phone-4gb", "--kv-type", "q8_0"], "keeps the KV cache in the model's I/O type"),
        ([*plan, "--flash-attn", "maybe"], "'maybe' is not one of"),
        (["export", "--format", "tflite", "--out", str(out)], "'tflite' is not one of"),
        (["merge", "-k", "0", "--out", str(out)], "--merge-layers must be at least 1"),
        (["heal", "--model", str(tiny), "--steps", "-1", "--out", str(out)], "--steps must be 0 or more"),
        (["build", "--profile", "laptop-8gb", "--max-tries", "0", "--out", str(out)], "--max-tries must be at least 1"),
        (["validate", str(f["trunc.gguf"]), "--repeats", "0", "--out", str(out)], "must be at least 1"),
        ([*merge[:-2], "--out", str(f["a-file"] / "sub")], "is a file, not a folder"),
        (["build", "--profile", "laptop-8gb", "--out", str(f["a-file"])], "is a file"),
        (["export", "--quant", "Q8_0", "--out", str(f["a-file"] / "x.gguf")], "cannot create"),
        ([*plan, "--out", str(f["a-file"] / "plan")], "is a file, not a folder"),
        ([*plan, "--max-memory", "cpu=lots"], "--max-memory"),
    ]
    return c


def _run(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MKA_EDGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_bad_input_battery(bad, tiny_dir, tmp_path):
    outs = [tmp_path / f"out-{i}" for i in range(100)]
    cases = [(args, says, out) for (args, says), out in zip(_cases(bad, tiny_dir, Path("@OUT@")), outs)]
    cases = [([a.replace("@OUT@", str(out)) for a in args], says, out) for args, says, out in cases]
    assert len(cases) >= 40
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _run(c[0], tmp_path / "cache", tmp_path), cases))
    failures = []
    for (args, says, out), r in zip(cases, results):
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        ok = r.returncode != 0 and "Traceback" not in r.stderr and 1 <= len(lines) <= 3 and says in r.stderr
        if not ok or out.exists() or Path(f"{out}.gguf").exists():
            failures.append(
                f"{' '.join(args[:4])}...: rc {r.returncode}, out left: {out.exists()}, {r.stderr[-400:]!r}"
            )
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "pwned").exists()
