"""Parent side: run one measurement in a child process and turn any failure into one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..cache import runtime_slot
from ..child_exit import explain_exit
from ..errors import UserError
from ..runtime_check import LLAMA_CPP_WORKERS, check_llama_cpp
from .jobs import _Job as Job


def run_with_progress(
    cmd: list[str], timeout_s: float | None, what: str, progress: bool
) -> subprocess.CompletedProcess:
    """subprocess.run, with a ticking elapsed-time line while it runs when ``progress``: a runtime
    measurement can take minutes and says nothing itself."""
    if not progress:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)

    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tqdm(desc=what, bar_format="{desc}: {elapsed}", leave=False) as bar,
    ):
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        t0 = time.monotonic()
        try:
            while proc.poll() is None:
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    proc.kill()
                    proc.wait()
                    raise subprocess.TimeoutExpired(cmd, timeout_s)
                time.sleep(0.5)
                bar.refresh()
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def run_child(module: str, job: Job, timeout_s: float, what: str, progress: bool = False) -> dict:
    """Run ``job`` in ``module`` (a worker) in a child process; its result, or one line saying why not.
    A llama.cpp worker is preceded by the runtime check (once per install and CPU), so a build for
    another CPU is named before minutes of work, not as a crash inside them."""
    llama_cpp = module in LLAMA_CPP_WORKERS
    if llama_cpp:
        check_llama_cpp()
    with tempfile.TemporaryDirectory(prefix="mka-edge-job-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job.to_json()))
        try:
            with runtime_slot():  # one measurement at a time: side by side they oversubscribe the cores
                proc = run_with_progress(
                    [sys.executable, "-m", module, str(job_path), str(out_path)], timeout_s, what, progress
                )
        except subprocess.TimeoutExpired:
            raise UserError(
                f"{what} did not finish within {timeout_s:.0f} s; use fewer --repeats/--chunks or a smaller model"
            ) from None
        if proc.returncode != 0 or not out_path.is_file():
            lines = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
            why = lines[-1].strip() if lines else ""
            killed = explain_exit(proc.returncode, what, why, llama_cpp=llama_cpp)
            raise UserError(killed or f"{what} failed in the runtime: {why[:200] or 'no message'}")
        return json.loads(out_path.read_text())
