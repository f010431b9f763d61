"""Atomic file writes: the content goes to a temporary file beside the target, which is then renamed into place, so a
crash never leaves a half-written file (readers see the old file or the new one). Datasets (folders) are written
atomically by :func:`treg.token_rewards.cache.save_atomic`, other folders (converted models) by
:func:`write_dir_atomic`; :func:`file_lock` lets concurrent processes build a cache entry once."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any


class UserError(ValueError):
    """An error in the user's input or environment (recipe, flags, data file, model spec, cache, judge, evaluation
    file), not a bug: the message says what is wrong, where (file, line, row, field or key) and what to do. Every such
    error treg raises is one of these (RecipeError, PreferenceDataError, TokenRewardError, JudgeError, ...); the
    ``treg`` command prints it as one line and exits 2, the traceback only with ``--debug`` or ``TREG_DEBUG=1``.
    Anything else is a bug and keeps its traceback."""


def default_cache_dir() -> str:
    """treg's cache root: ``$TREG_CACHE_DIR``, else ``~/.cache/treg``."""
    return os.environ.get("TREG_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "treg"))


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (same extension, so writers that go by it still
    work), then move it into place. On any failure the temporary file is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the usual permissions from the umask.
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, data: Any, **dumps_kwargs) -> None:
    """``json.dumps(data, **dumps_kwargs)`` written to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, **dumps_kwargs))


@contextlib.contextmanager
def file_lock(path: str):
    """Hold an exclusive cross-process lock named after ``path`` for the ``with`` block.

    The lock is ``fcntl.flock`` on ``path + ".lock"`` (created with its parent folder if needed); a second process
    asking for the same ``path`` waits until the first leaves the block. Typical use: several processes (accelerate
    launch, bench workers, parallel test sessions) want the same cache entry built; each takes the lock, checks
    whether the entry exists, and only the first builds it. flock locks belong to the open file, so the kernel
    releases them when their process exits or is killed: a crashed builder never leaves a stale lock behind (the empty
    ``.lock`` file may stay; it is harmless and reused). POSIX only; on a network file system whose flock is not
    shared between machines, it only excludes processes of the same machine.
    """
    import fcntl

    lock_path = path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_dir_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_dir)`` on a new temporary folder beside ``path``, then rename it to ``path``, so readers see
    no folder or the whole folder. ``path`` must not exist yet (take :func:`file_lock` around the check and the
    write when several processes may build it). On any failure the temporary folder is removed."""
    import shutil

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Not mkdtemp: its folders are private (0700); this one gets the usual permissions from the umask.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        write(tmp)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
