"""The README's set-up commands are what CI runs: its first command's build is .ci/run's MAIN_JOB
word for word, and its test command is the one .ci/run uses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_main_job_is_what_ci_runs():
    first = _readme_commands()[0]
    build = first[first.index("mka-edge build") :]
    ci = (ROOT / ".ci" / "run").read_text()
    main_job = shlex.split(re.search(r"^MAIN_JOB=(.*)$", ci, re.M).group(1))[0]
    assert build == main_job, (build, main_job)
    assert 'bash -c "$MAIN_JOB"' in ci and 'MKA_EDGE_CACHE="$(mktemp -d)"' in ci  # run as written, empty cache
    out = shlex.split(build)[shlex.split(build).index("--out") + 1]
    assert f"rm -rf {out}" in ci  # a rerun on the same clone starts clean


def test_readme_test_command_is_what_ci_runs():
    second = _readme_commands()[1]
    assert second.endswith("python -m pytest -q")
    assert "\npython -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


def test_readme_install_matches_ci():
    first = _readme_commands()[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0" -e ".[test]"' in first and 'pip install "torch==2.13.0" -e ".[test]"' in ci


def _cmake_args(text: str, where: str) -> str:
    found = re.findall(r'CMAKE_ARGS="([^"$]*)"', text)
    assert len(found) == 1, f'{where}: expected one CMAKE_ARGS="...", found {found}'
    return found[0]


def test_readme_ci_and_code_build_llama_cpp_the_same_way():
    """The portable llama.cpp build (issue 22) has one home, ``cpu.PORTABLE_CMAKE_ARGS``: the README
    installs with it, CI with the same fixed value (not overridable), and error messages name it."""
    from mka_edge.cpu import PORTABLE_CMAKE_ARGS

    readme = _cmake_args(_readme_commands()[0], "README's first command")
    ci = _cmake_args((ROOT / ".ci" / "run").read_text(), ".ci/run")
    assert readme == ci == PORTABLE_CMAKE_ARGS, (readme, ci, PORTABLE_CMAKE_ARGS)
    assert "-DGGML_NATIVE=OFF" in PORTABLE_CMAKE_ARGS
