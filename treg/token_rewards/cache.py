"""On-disk cache for expensive per-token passes: keyed by a hash of everything the values depend on, written
atomically (a temporary directory renamed into place), so an interrupted pass never leaves a half-written entry.

:func:`sharded_load_or_compute` spreads a pass over the processes of a distributed run. Rows are cut into shards of
a fixed size (independent of the number of processes); process ``i`` computes shards ``i, i + N, i + 2N, ...`` and
writes each one atomically as ``<entry>.shards/rows-<start>-<stop>.parquet``; shards already there are skipped, so a
pass interrupted after some shards resumes where it stopped (with any number of processes). The main process then
gathers the shards into the one cache entry ``<entry>`` and every process loads it. The entry's key never depends
on the number of processes: the same entry serves a 1-process and an N-process run.

Layout (``cache_dir/token_rewards/``)::

    pass-v1-3f2a...                      the complete entry (a datasets folder), what every run loads
    pass-v1-3f2a....shards/              while the pass runs: one parquet file per finished shard
        rows-00000000-00000512.parquet
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from treg.files import default_cache_dir

logger = logging.getLogger(__name__)


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


def save_atomic(columns: dict[str, list] | Dataset, path: str) -> Dataset:
    """Write ``columns`` (a dict of columns or a Dataset) to ``path`` via a temporary sibling directory and an atomic
    rename."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        data = columns if isinstance(columns, Dataset) else Dataset.from_dict(columns)
        data.save_to_disk(tmp)
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


# ------------------------------------------------------------------------------------------------ sharded passes
class ShardError(RuntimeError):
    """A shard of a distributed pass that is missing or malformed; the message names the file and what to do."""


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(0, s), (s, 2s), ...]`` covering ``n_rows`` rows; the last shard may be shorter."""
    if shard_size < 1:
        raise ValueError(f"shard size must be ≥ 1, got {shard_size}.")
    return [(a, min(a + shard_size, n_rows)) for a in range(0, n_rows, shard_size)]


def shard_path(shards_dir: str, start: int, stop: int) -> str:
    return os.path.join(shards_dir, f"rows-{start:08d}-{stop:08d}.parquet")


def _write_shard(columns: dict[str, list], path: str, start: int, stop: int) -> None:
    for name, values in columns.items():
        if len(values) != stop - start:
            raise ShardError(
                f"shard rows {start}-{stop}: column {name!r} has {len(values)} rows, expected {stop - start}."
            )
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, path)  # atomic: a shard file is complete or absent
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_shards(shards_dir: str, ranges: list[tuple[int, int]]) -> Dataset:
    missing = [shard_path(shards_dir, a, b) for a, b in ranges if not os.path.isfile(shard_path(shards_dir, a, b))]
    if missing:
        raise ShardError(
            f"{len(missing)} of {len(ranges)} shards are missing after every process finished, first {missing[0]!r}. "
            "In a multi-node run the token-reward cache must be on a filesystem all nodes share: set "
            "token_reward_cache_dir (or $TREG_CACHE_DIR) to such a path."
        )
    tables = [pq.read_table(shard_path(shards_dir, a, b)) for a, b in ranges]
    return concatenate_datasets([Dataset(t) for t in tables]) if len(tables) > 1 else Dataset(tables[0])


def sharded_load_or_compute(
    compute_rows: Callable[[int, int], dict[str, list]],
    n_rows: int,
    *,
    cache_dir: str | None,
    entry: str,
    what: str,
    shard_size: int = 512,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
    gather_object: Callable[[list], list] | None = None,
    prepare: Callable[[], None] | None = None,
    finish: Callable[[], None] | None = None,
    show_progress: bool = True,
) -> Dataset:
    """The cached columns of ``entry``, computed shard by shard across processes when absent (see the module doc).

    Args:
        compute_rows: ``compute_rows(start, stop)`` returns the columns (dict of lists) of rows ``start..stop-1``.
        n_rows: rows in the dataset. cache_dir, entry, what: as in :func:`load_or_compute` (``"none"`` disables the
            cache: each process computes its shards and they are exchanged with ``gather_object``).
        shard_size: rows per shard; part of the shard file names, not of the entry's key.
        process_index, num_processes, wait_for_everyone, gather_object: the distributed state (accelerate's
            ``process_index``, ``num_processes``, ``wait_for_everyone`` and ``accelerate.utils.gather_object``).
        prepare: called on every process before the first shard when the entry is absent (e.g. build the scoring
            engine; under ZeRO-3 that is a collective, so it must run everywhere or nowhere).
        finish: called on every process after its last shard, before the first barrier (e.g. ``LockstepModel.finish``).
    """
    ranges = shard_ranges(n_rows, shard_size)
    if not ranges:
        return Dataset.from_dict({})
    mine = ranges[process_index::num_processes]
    disabled = cache_dir is not None and str(cache_dir).lower() == "none"
    path = None if disabled else os.path.join(cache_dir or default_cache_dir(), "token_rewards", entry)
    if path is not None and (cached := load(path)) is not None:
        logger.info("%s loaded from cache %s", what, path)
        return cached
    if prepare is not None:
        prepare()
    disable_bar = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    bar = tqdm(total=sum(b - a for a, b in mine), desc=what, unit="row", disable=disable_bar)
    if disabled:  # no shared place to gather: exchange the shards between processes
        computed = []
        for a, b in mine:
            computed.append((a, b, compute_rows(a, b)))
            bar.update(b - a)
        bar.close()
        if finish is not None:
            finish()
        return _exchange_shards(computed, num_processes, gather_object)
    _write_missing_shards(compute_rows, mine, path + ".shards", bar, what=what, process_index=process_index)
    if finish is not None:
        finish()
    return _gather_entry(
        path, ranges, what=what, shard_size=shard_size, process_index=process_index, num_processes=num_processes,
        barrier=wait_for_everyone or (lambda: None),
    )


def _exchange_shards(
    computed: list[tuple[int, int, dict[str, list]]], num_processes: int, gather_object: Callable[[list], list] | None
) -> Dataset:
    """Without a cache: every process's ``(start, stop, columns)`` shards, exchanged and put in row order."""
    if num_processes > 1:
        if gather_object is None:
            raise ValueError("sharded_load_or_compute without a cache needs gather_object in a multi-process run.")
        computed = gather_object(computed)
    computed.sort(key=lambda t: t[0])
    return concatenate_datasets([Dataset.from_dict(cols) for _, _, cols in computed])


def _write_missing_shards(compute_rows, mine: list[tuple[int, int]], shards_dir: str, bar, *, what: str,
                          process_index: int) -> None:
    """Compute and write this process's shards, skipping those a previous (crashed) run already wrote."""
    os.makedirs(shards_dir, exist_ok=True)
    resumed = 0
    for a, b in mine:
        target = shard_path(shards_dir, a, b)
        if os.path.isfile(target):
            resumed += 1
        else:
            _write_shard(compute_rows(a, b), target, a, b)
        bar.update(b - a)
    bar.close()
    if resumed:
        logger.info("%s: process %d reused %d finished shards from %s", what, process_index, resumed, shards_dir)


def _gather_entry(path: str, ranges: list[tuple[int, int]], *, what: str, shard_size: int, process_index: int,
                  num_processes: int, barrier: Callable[[], None]) -> Dataset:
    """Once every process has written its shards, process 0 gathers them into the entry ``path``; every process
    then loads it."""
    barrier()
    if process_index == 0 and load(path) is None:
        save_atomic(_read_shards(path + ".shards", ranges), path)
        shutil.rmtree(path + ".shards", ignore_errors=True)
        logger.info(
            "%s cached at %s (%d shards of %d rows, %d processes)", what, path, len(ranges), shard_size, num_processes
        )
    barrier()
    columns = load(path)
    if columns is None:
        raise ShardError(
            f"{what}: the gathered entry {path!r} is not visible on process {process_index}; the cache "
            "must be on a filesystem every node shares (token_reward_cache_dir or $TREG_CACHE_DIR)."
        )
    return columns
