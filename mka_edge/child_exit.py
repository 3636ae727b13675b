"""The one explanation of a runtime child killed by a signal.

Why: llama.cpp and onnxruntime run in child processes, and a child that dies by a signal says
nothing itself.  "killed by signal 4" told the user of issue 22 nothing; SIGILL almost always means
llama-cpp-python was compiled for another CPU (a native build on a VM that advertises AMX and
refuses it), and the fix is a reinstall.  Every place that turns a child's exit into an error
(``validate/runner.run_child``, ``exporters/llama_quantize``, ``validate/llama_buffers``,
``runtime_check``) asks this function, so the message is written once.
"""

from __future__ import annotations

import signal

from .cpu import cpu_flags, fitting_reinstall, flag_summary


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def explain_exit(returncode: int, what: str, detail: str = "", llama_cpp: bool = True) -> str | None:
    """One line for a child that ``subprocess`` reports killed by a signal (``returncode`` < 0), or
    None for one that exited by itself (the caller has its own words for its exit codes).

    ``what`` names what was running; ``detail`` is the child's last words on stderr, if any;
    ``llama_cpp``: the child ran llama.cpp, so a SIGILL is answered with the reinstall that fits
    this CPU."""
    if returncode >= 0:
        return None
    signum = -returncode
    if signum == signal.SIGILL:
        flags = cpu_flags()
        runtime = "llama.cpp" if llama_cpp else "the runtime"
        line = (
            f"{what} was killed by SIGILL: {runtime} ran an instruction this CPU refuses "
            f"(CPU flags: {flag_summary(flags)})"
        )
        if llama_cpp:
            how, command = fitting_reinstall(flags)
            line += f"; llama-cpp-python was compiled for another CPU: {how}: {command}"
        return line
    tail = f" ({detail.strip()[:200]})" if detail.strip() else ""
    return f"{what} was killed by {signal_name(signum)}{tail}"
