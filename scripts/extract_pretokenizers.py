"""Extract llama.cpp's pre-tokenizer table (hash of a probe text's token ids -> name) as data.

llama.cpp decides ``tokenizer.ggml.pre`` for byte-level BPE tokenizers by tokenizing a fixed
probe text and looking the sha256 of the id list up in a table generated into its converter.
That table is the only authority, so we read it (data only: the probe text and the hash/name
pairs) out of the llama-cpp-python source distribution we pin, rather than guess names.

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d dl
    python scripts/extract_pretokenizers.py dl/llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import ast
import gzip
import json
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mka_edge" / "data" / "llama_cpp_pretokenizers.json.gz"


def _table(source: str) -> tuple[str, list[dict]]:
    tree = ast.parse(source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_vocab_base_pre")
    probe = None
    rows: list[dict] = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chktxt":
            probe = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            left, right = node.test.left, node.test.comparators[0]
            if getattr(left, "id", None) == "chkhsh" and isinstance(right, ast.Constant):
                names = [
                    ast.literal_eval(s.value)
                    for s in node.body
                    if isinstance(s, ast.Assign) and getattr(s.targets[0], "id", None) == "res"
                ]
                if names:
                    rows.append({"chkhsh": right.value, "pre": names[0]})
    if probe is None or not rows:
        raise SystemExit("could not find the probe text or the table; has the converter changed shape?")
    return probe, rows


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/conversion/base.py"))
        source = tar.extractfile(member).read().decode()
    probe, rows = _table(source)
    data = {"from": Path(sdist).name, "licence": "MIT (llama.cpp)", "probe": probe, "table": rows}
    with gzip.open(OUT, "wt", encoding="utf-8") as fh:
        json.dump(data, fh)
    print(f"{len(rows)} pre-tokenizers -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
