"""Parent side: run one measurement in a child process and turn any failure into one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError


def run_child(module: str, job: dict, timeout_s: float, what: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="mka-edge-job-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, "-m", module, str(job_path), str(out_path)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"{what} did not finish within {timeout_s:.0f} s; use fewer --repeats/--chunks or a smaller model") from None
        if proc.returncode != 0 or not out_path.is_file():
            lines = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
            why = lines[-1].strip() if lines else ""
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode}" + (f" ({why})" if why else "")
            raise UserError(f"{what} failed in the runtime: {why[:200] or 'no message'}")
        return json.loads(out_path.read_text())
