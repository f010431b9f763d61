"""On-disk cache for expensive per-token passes: keyed by a hash of everything the values depend on, written
atomically (a temporary directory renamed into place), so an interrupted pass never leaves a half-written entry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
from datasets import Dataset

logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.environ.get("TREG_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "treg"))


def fingerprint(settings: dict, id_lists: Iterable[Sequence[Sequence[int]]] = ()) -> str:
    """sha256 over JSON-encoded settings and any number of columns of token-id lists."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for column in id_lists:
        for ids in column:
            arr = np.asarray(ids, dtype=np.int64)
            h.update(len(arr).to_bytes(8, "little"))
            h.update(arr.tobytes())
        h.update(b"|")
    return h.hexdigest()


def load(path: str) -> Dataset | None:
    """The cached columns at ``path``, or None when there is no complete entry."""
    if not os.path.isdir(path):
        return None
    return Dataset.load_from_disk(path)


def save_atomic(columns: dict[str, list], path: str) -> Dataset:
    """Write ``columns`` as a dataset to ``path`` via a temporary sibling directory and an atomic rename."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        Dataset.from_dict(columns).save_to_disk(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first; keep theirs
            if not os.path.isdir(path):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return Dataset.load_from_disk(path)


def load_or_compute(compute, *, cache_dir: str | None, entry: str, what: str, main_process_first=None) -> Dataset:
    """The cached columns of ``entry`` under ``<cache_dir>/token_rewards/``, computed by ``compute()`` and saved
    atomically when absent. ``cache_dir="none"`` disables the cache; ``main_process_first`` (a context-manager
    factory such as ``accelerator.main_process_first``) lets one process compute while the others wait and read.
    ``what`` names the values in the log lines."""
    if cache_dir is not None and str(cache_dir).lower() == "none":
        return Dataset.from_dict(compute())
    path = os.path.join(cache_dir or default_cache_dir(), "token_rewards", entry)
    guard = main_process_first() if main_process_first is not None else contextlib.nullcontext()
    with guard:
        columns = load(path)
        if columns is None:
            columns = save_atomic(compute(), path)
            logger.info("%s cached at %s", what, path)
        else:
            logger.info("%s loaded from cache %s", what, path)
    return columns
