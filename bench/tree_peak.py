"""Peak RSS of a command and of every process below it, sampled every 50 ms: the peak of each
process and of their sum (``/usr/bin/time`` reports only the largest single process).

    python bench/tree_peak.py -- mka-edge merge -k 3 --out /tmp/m
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def main(argv: list[str]) -> int:
    argv = argv[1:] if argv[:1] == ["--"] else argv
    proc = subprocess.Popen(argv)
    root = psutil.Process(proc.pid)
    peaks: dict[tuple[int, str], int] = {}
    tree = 0
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                rss, name = p.memory_info().rss, " ".join(p.cmdline())[:90]
            except psutil.Error:
                continue
            total += rss
            peaks[(p.pid, name)] = max(peaks.get((p.pid, name), 0), rss)
        tree = max(tree, total)
        time.sleep(0.05)
    print(f"exit {proc.returncode}")
    for (pid, name), rss in sorted(peaks.items(), key=lambda kv: -kv[1])[:5]:
        print(f"{rss / 2**20:8.0f} MiB  {pid} {name}")
    print(f"tree peak {tree / 2**20:.0f} MiB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
