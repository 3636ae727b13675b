"""Content-addressed cache under the user cache directory.

Why: dequantizing a GGUF, gathering activations and running a merge trajectory are slow and
deterministic given their inputs, so a second command with the same inputs should skip them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    base = os.environ.get("MKA_EDGE_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mka-edge"


def stable_hash(obj: Any) -> str:
    """Hash of JSON-able data with sorted keys: the cache key of a computation's inputs."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_fingerprint(path: Path, full_limit: int = 2 << 30) -> str:
    """sha256 of a file; above ``full_limit`` bytes, of its size plus head and tail (fast for 16 GB shards)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= full_limit:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            h.update(fh.read(1 << 24))
            fh.seek(-(1 << 24), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling_prefix(final: Path) -> str:
    """The prefix of a temporary sibling of ``final``: its name and this process's id, so a later
    run can tell a killed run's leftovers (``clean_stale``) from a live run's."""
    return f".{Path(final).name}.{os.getpid()}."


def clean_stale(final: Path) -> None:
    """Remove temporary siblings of ``final`` left by runs that were killed (their process is gone):
    SIGKILL leaves no chance to clean up, so the next run does."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}.*"):
        pid = p.name[len(final.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``final`` only if the block succeeds.

    An interrupted or failed write leaves nothing at ``final``; an existing ``final`` is replaced.
    A killed run's temporary folder is removed by the next run (``clean_stale``).
    """
    from .killpoints import killpoint

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=temp_sibling_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is for users to share
    try:
        yield tmp
        killpoint(f"before-rename:{final.name}")
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        killpoint(f"after-rename:{final.name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def entry_lock(path: Path, what: str, log=None) -> Iterator[None]:
    """Hold the lock of one cache entry while it is computed.  Why: two commands with the same
    inputs (two builds started together) share the cache; without a lock both compute the same
    trajectory, probe or dequantized model.  The second waits, says so on stderr, and then finds
    the entry the first wrote (callers check for it again after acquiring).  The lock file sits
    beside the entry (``.NAME.lock``); a killed holder's lock is released by the kernel."""
    import sys

    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(f".{path.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        msg = f"waiting for another mka-edge process computing {what} ({path.name})"
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def runtime_slot() -> Iterator[None]:
    """Hold the one runtime-measurement slot of this cache (normally one per user and host) while a
    llama.cpp or onnxruntime child runs.  Why: each run uses every core, so two at once (two builds
    started together) oversubscribe them, and llama.cpp's spinning threads then make both far slower
    (two accuracy runs of a tiny model on 2 cores: 0.3 s alone, 3.7 s each side by side, over a
    minute with other load) and every tokens/s they measure wrong.  The slot is taken only around
    the child, never while waiting for anything else, so it cannot deadlock with the entry locks."""
    with entry_lock(cache_root() / "runtime-measurement", "a runtime measurement (one at a time)"):
        yield


NAME_MAX_CHARS = 128


def check_plain_name(name: str, where: str) -> None:
    """Refuse a ``name`` field (a recipe's, a profile's) that is not one plain file-name component:
    empty, ``.`` or ``..``, a path separator, a control character, or over NAME_MAX_CHARS.  Why: names
    end up in reports, model cards and, where a caller builds one from them, file names; a name like
    ``../../x`` must never be able to point a write outside its folder, so it is refused where the
    file is read, in one line, before anything runs."""
    bad = (
        not name
        or name in (".", "..")
        or len(name) > NAME_MAX_CHARS
        or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        from .errors import UserError

        raise UserError(
            f"{where}: field 'name' must be a plain name (1 to {NAME_MAX_CHARS} characters, no '/', '\\', "
            f"control characters, '.' or '..'; got {name[:60]!r})"
        )


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_sibling_prefix(path), dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
