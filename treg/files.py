"""Atomic file writes: the content goes to a temporary file beside the target, which is then renamed into place, so a
crash never leaves a half-written file (readers see the old file or the new one). Datasets (folders) are written
atomically by :func:`treg.token_rewards.cache.save_atomic`."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any


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
