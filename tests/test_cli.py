"""Bad input gives one clear line, a non-zero exit, no traceback, and nothing in --out."""

import json
import os
import subprocess
import sys

import pytest
import torch


def run(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=e, timeout=600
    )


def one_line_error(res, *needles):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_explains_every_option():
    res = run("merge", "--help")
    assert res.returncode == 0
    for opt in (
        "--merge-layers",
        "--method",
        "--alpha",
        "--calibration",
        "--samples",
        "--seq-len",
        "--device",
        "--out",
    ):
        assert opt in res.stdout


def test_unknown_recipe_lists_the_known_ones(tmp_path):
    res = run("analyze", "--model", "no-such-model", "--out", str(tmp_path / "o"))
    one_line_error(res, "no-such-model", "smollm2-135m", "llama3-8b")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(d)
    res = run("analyze", "--model", str(d), "--out", str(tmp_path / "o"))
    one_line_error(res, "gpt2", "llama", "mistral", "qwen2")


@pytest.mark.parametrize("k,needle", [("6", "at most 5"), ("0", "at least 1"), ("-2", "at least 1")])
def test_bad_merge_counts(tiny_dir, tmp_path, k, needle):
    out = tmp_path / "m"
    res = run("merge", "--model", str(tiny_dir), "-k", k, "--out", str(out), "--samples", "4", "--seq-len", "32")
    one_line_error(res, needle)
    assert not out.exists()


def test_empty_calibration_file(tiny_dir, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    out = tmp_path / "m"
    res = run("merge", "--model", str(tiny_dir), "-k", "1", "--calibration", str(f), "--out", str(out))
    one_line_error(res, "empty")
    assert not out.exists()
    res = run(
        "merge", "--model", str(tiny_dir), "-k", "1", "--calibration", str(tmp_path / "missing.txt"), "--out", str(out)
    )
    one_line_error(res, "cannot read calibration file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(tiny_dir, tmp_path):
    res = run("analyze", "--model", str(tiny_dir), "--device", "cuda", "--out", str(tmp_path / "o"))
    one_line_error(res, "no CUDA GPU")


def test_uncached_hub_id_offline(tmp_path):
    res = run(
        "analyze",
        "--model",
        "someone/not-a-cached-model",
        "--out",
        str(tmp_path / "o"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    one_line_error(res, "someone/not-a-cached-model", "local cache")


def test_bad_alpha(tiny_dir, tmp_path):
    res = run("merge", "--model", str(tiny_dir), "-k", "1", "--alpha", "1.5", "--out", str(tmp_path / "m"))
    one_line_error(res, "outside [0, 1]")


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 20)
    res = run("analyze", "--model", str(f), "--out", str(tmp_path / "o"))
    one_line_error(res, "not a readable GGUF")


def test_merge_and_eval_through_the_cli(tiny_dir, tmp_path):
    out = tmp_path / "m"
    res = run(
        "merge",
        "--model",
        str(tiny_dir),
        "-k",
        "2",
        "--method",
        "shortgpt",
        "--out",
        str(out),
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--positions",
        "64",
        "--heldout-chunks",
        "1",
    )
    assert res.returncode == 0, res.stderr
    log = json.loads((out / "merge_log.json").read_text())
    assert log["layers_after"] == 4 and log["steps"][-1]["heldout"]["kl"] > 0
    res = run(
        "eval",
        "--model",
        str(out),
        "--heldout-chunks",
        "1",
        "--mmlu-per-subject",
        "0",
        "--out",
        str(tmp_path / "e.json"),
    )
    assert res.returncode == 0, res.stderr
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["reference"] == str(tiny_dir) and ev["layers"] == 4 and ev["reference_layers"] == 6
    assert ev["heldout"]["kl"] == pytest.approx(log["steps"][-1]["heldout"]["kl"], rel=1e-3)


def test_merge_refuses_to_replace_a_folder_that_is_not_its_own(tiny_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = run("merge", "--model", str(tiny_dir), "-k", "1", "--out", str(out), "--samples", "4", "--seq-len", "32")
    one_line_error(res, "not an earlier merge output")
    assert (out / "notes.txt").read_text() == "keep me"


def test_unwritable_output_folder(tiny_dir, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/mka-edge-cannot-write-here"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "out")
    res = run(
        "merge",
        "--model",
        str(tiny_dir),
        "-k",
        "1",
        "--method",
        "drop-last",
        "--out",
        target,
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--heldout-chunks",
        "0",
    )
    one_line_error(res)
