"""On-disk cache for expensive per-token passes: keyed by a hash of everything the values depend on, written
atomically (a temporary directory renamed into place), so an interrupted pass never leaves a half-written entry.
Every entry carries ``checksums.json`` and every shard a ``.sha256`` sidecar (see :mod:`treg.files`); both are
verified on read, and a corrupt one (checksum mismatch, truncated or unreadable file, missing ``state.json``) is
moved aside as ``<name>.corrupt-<time>`` with a warning naming it, then computed again. Entries written before
checksums existed load as they are when they open (the key, and so the entry names, did not change).

:func:`sharded_load_or_compute` spreads a pass over the processes of a distributed run. Rows are cut into shards of
a fixed size (independent of the number of processes); process ``i`` computes shards ``i, i + N, i + 2N, ...`` and
writes each one atomically as ``<entry>.shards/rows-<start>-<stop>.parquet``; shards already there (and verified) are
skipped, so a pass interrupted after some shards resumes where it stopped (with any number of processes). The main
process then gathers the shards into the one cache entry ``<entry>`` and every process loads it. The entry's key
never depends on the number of processes: the same entry serves a 1-process and an N-process run.

Concurrent jobs (a sweep over α on one model and dataset, two benchmark workers) share entries and their shards
through file locks (:func:`treg.files.file_lock`): each shard is computed once, whichever job gets to it first, and
the entry is gathered once. Two kinds of cooperation meet here: the processes of one job (collectives: barriers,
all-gathers, and under ZeRO-3 every forward) and independent jobs on one cache (file locks only). The rule that
keeps them from deadlocking each other: a process never blocks on a file lock while its own job may need it for a
collective, and never holds a lock while it waits for anything but its own job's collectives.

1. Entry check: the main process loads and verifies the entry (a corrupt one is moved aside under the entry
   lock) and tells the others (``gather_object``), so all of them skip or all of them run ``prepare``.
2. Claim (every process, its shards ``i::N``): for each shard, try its lock *without waiting*. Got it: reuse the
   shard if it is finished and verifies (a corrupt one is moved aside), else compute and write it, then release.
   Busy: another job is computing it; set it aside. Holding a shard lock, a process only computes, and the
   computation's collectives involve only its own job, whose other processes are claiming or in ``finish``,
   never waiting on a lock.
3. ``finish()``; then wait (blocking) for the shard locks set aside: each is held by a process of another job
   that is computing that shard, which waits on nothing of ours. After the wait the shard is finished, or its
   job died: such shards are agreed on (``gather_object``) and the job runs another round of 2-3 for them
   (with one process, or without ``gather_object``, they are computed right away instead).
4. Gather: the main process takes the entry lock; if another job has gathered the entry meanwhile, it is used
   (and the shards folder removed); else the shards are verified, gathered, saved with checksums and the shards
   folder removed. Every process then loads the entry.

Each shard is thus computed by one process of one job, and the entry gathered once. A job that finds the entry
finished at any step stops computing. Waits are bounded by one shard's computation (step 3) and one gather
(step 4); the other processes of the job wait meanwhile in a collective, so a shard must take less than the
process group's timeout (the trainer's ``ddp_timeout``, 30 minutes by default; keep ``token_reward_shard_size``
moderate for big models). Stale temporary folders of killed gathers and stale lock files are removed before a pass
starts. Locks and shared shards need a file system every job (and node) shares, with working locks: see
:func:`treg.files.file_lock`.

Layout (``cache_dir/token_rewards/``)::

    pass-v1-3f2a...                      the complete entry (a datasets folder + checksums.json), what every run loads
    pass-v1-3f2a....lock                 while a process gathers or checks the entry (removed after)
    pass-v1-3f2a....shards/              while the pass runs: one parquet file per finished shard
        rows-00000000-00000512.parquet
        rows-00000000-00000512.parquet.sha256
        rows-00000512-00001024.parquet.lock   while a process computes that shard (removed after)
    pass-v1-3f2a....corrupt-20261201-101500   an entry that failed its checksum, kept for inspection
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from treg.files import (
    CorruptCacheError,
    default_cache_dir,
    file_lock,
    move_aside,
    remove_stale_temps,
    temp_path,
    verify_checksums,
    verify_file_checksum,
    write_atomic,
    write_checksums,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"  # what Dataset.load_from_disk needs first; an entry without it is corrupt


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


def _open_entry(path: str, verify: bool) -> Dataset:
    """The entry at ``path``, checked against its checksums first when ``verify`` (an entry without them, written by
    an older treg, only has to open). Raises CorruptCacheError."""
    if verify:
        verify_checksums(path, required=(STATE_FILE,))
    try:
        return Dataset.load_from_disk(path)
    except PermissionError:
        raise
    except Exception as e:  # truncated arrow file, bad JSON in state.json, missing data file, ...
        raise CorruptCacheError(path, f"it does not open ({type(e).__name__}: {e})") from e


def load(path: str, *, verify: bool = True, locked: bool = False, what: str = "token-reward cache entry"):
    """The cached columns at ``path``, or None when there is no complete entry.

    A corrupt entry is moved aside (see the module doc) and None returned, so the caller computes it again. The move
    happens under the entry's lock, after checking again that the entry is still the corrupt one (another job may
    have replaced it meanwhile); ``locked=True`` says the caller holds that lock already. ``verify=False`` skips the
    checksums (for a process whose main process has just verified the entry)."""
    if not os.path.isdir(path):
        return None
    try:
        return _open_entry(path, verify)
    except CorruptCacheError:
        pass
    with file_lock(path, remove=True) if not locked else contextlib.nullcontext():
        if not os.path.isdir(path):
            return None
        try:
            return _open_entry(path, True)  # replaced by a good entry meanwhile
        except CorruptCacheError as e:
            move_aside(path, e.reason, what=what)
    return None


def save_atomic(columns: dict[str, list] | Dataset, path: str) -> Dataset:
    """Write ``columns`` (a dict of columns or a Dataset) and its ``checksums.json`` to ``path`` via a temporary
    sibling directory and an atomic rename. If another process finished the same entry first, theirs is kept."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        os.mkdir(tmp)
        data = columns if isinstance(columns, Dataset) else Dataset.from_dict(columns)
        data.save_to_disk(tmp)
        write_checksums(tmp)
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
    Another job computing the same entry holds its lock; this one waits and loads it. ``what`` names the values in
    the log lines."""
    if cache_dir is not None and str(cache_dir).lower() == "none":
        return Dataset.from_dict(compute())
    path = os.path.join(cache_dir or default_cache_dir(), "token_rewards", entry)
    guard = main_process_first() if main_process_first is not None else contextlib.nullcontext()
    with guard:
        columns = load(path)
        if columns is not None:
            logger.info("%s loaded from cache %s", what, path)
            return columns
        with file_lock(path, remove=True):
            columns = load(path, locked=True)
            if columns is None:
                remove_stale_temps(os.path.dirname(path))
                columns = save_atomic(compute(), path)
                logger.info("%s cached at %s", what, path)
            else:
                logger.info("%s loaded from cache %s (computed by another job meanwhile)", what, path)
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
    # atomic, with its sidecar checksum: a shard file is complete (and verifiable) or absent
    write_atomic(path, lambda tmp: pq.write_table(pa.table(columns), tmp), checksum=True)


def _check_shard(path: str, rows: int) -> None:
    """Raise CorruptCacheError unless the shard at ``path`` matches its checksum (a shard without one, from an older
    treg, only has to open) and holds ``rows`` rows."""
    verify_file_checksum(path)
    try:
        n = pq.read_metadata(path).num_rows
    except PermissionError:
        raise
    except Exception as e:  # truncated: no parquet footer
        raise CorruptCacheError(path, f"it is not a readable parquet file ({type(e).__name__}: {e})") from e
    if n != rows:
        raise CorruptCacheError(path, f"it holds {n} rows, expected {rows}")


def _shard_finished(path: str, rows: int, entry: str) -> bool:
    """Whether the shard at ``path`` is there and verifies; a corrupt one is moved aside (next to the entry, so the
    gather's removal of the shards folder keeps it) and counts as absent. Call it holding the shard's lock."""
    if not os.path.isfile(path):
        return False
    try:
        _check_shard(path, rows)
        return True
    except CorruptCacheError as e:
        move_aside(path, e.reason, what="token-reward shard", to=f"{entry}.shards-{os.path.basename(path)}")
        return False


def _read_shards(shards_dir: str, ranges: list[tuple[int, int]], entry: str) -> Dataset:
    missing = [shard_path(shards_dir, a, b) for a, b in ranges if not os.path.isfile(shard_path(shards_dir, a, b))]
    if missing:
        raise ShardError(
            f"{len(missing)} of {len(ranges)} shards are missing after every process finished, first {missing[0]!r}. "
            "In a multi-node run the token-reward cache must be on a filesystem all nodes share: set "
            "token_reward_cache_dir (or $TREG_CACHE_DIR) to such a path."
        )
    tables = []
    for a, b in ranges:
        path = shard_path(shards_dir, a, b)
        try:
            _check_shard(path, b - a)
            tables.append(pq.read_table(path))
        except (CorruptCacheError, pa.ArrowException) as e:
            reason = e.reason if isinstance(e, CorruptCacheError) else f"{type(e).__name__}: {e}"
            move_aside(path, reason, what="token-reward shard", to=f"{entry}.shards-{os.path.basename(path)}")
            raise ShardError(
                f"the finished shard {path} turned out corrupt when it was gathered ({reason}); it was moved aside. "
                "Rerun: only that shard is computed again."
            ) from e
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
            A multi-process run needs ``gather_object`` whenever ``compute_rows`` is a collective (ZeRO-3).
        prepare: called on every process before the first shard when the entry is absent (e.g. build the scoring
            engine; under ZeRO-3 that is a collective, so it must run everywhere or nowhere: the processes agree on
            "absent" through ``gather_object``).
        finish: called on every process after its last shard of a round, before it waits for anything (e.g.
            ``LockstepModel.finish``); there is more than one round only when a shard another job was computing was
            left unfinished (that job was killed).
        See the module doc for how concurrent jobs share the entry and why that cannot deadlock.
    """
    ranges = shard_ranges(n_rows, shard_size)
    if not ranges:
        return Dataset.from_dict({})
    mine = ranges[process_index::num_processes]
    disabled = cache_dir is not None and str(cache_dir).lower() == "none"
    agree = num_processes > 1 and gather_object is not None
    path = None if disabled else os.path.join(cache_dir or default_cache_dir(), "token_rewards", entry)
    if path is not None:
        cached = _agreed_entry(path, process_index, gather_object if agree else None)
        if cached is not None:
            logger.info("%s loaded from cache %s", what, path)
            return cached
        if process_index == 0:
            remove_stale_temps(os.path.dirname(path))
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
    _compute_rounds(compute_rows, mine, path, bar, finish=finish, what=what, process_index=process_index,
                    num_processes=num_processes, gather_object=gather_object if agree else None)
    return _gather_entry(
        path, ranges, what=what, shard_size=shard_size, process_index=process_index, num_processes=num_processes,
        barrier=wait_for_everyone or (lambda: None), gather_object=gather_object if agree else None,
    )


def _agreed_entry(path: str, process_index: int, gather_object: Callable[[list], list] | None) -> Dataset | None:
    """The finished entry when the job agrees it is there (see step 1), else None."""
    if gather_object is None:
        return load(path)
    found = load(path) if process_index == 0 else None
    (there,) = gather_object([found is not None] if process_index == 0 else [])
    if not there:
        return None
    return found if found is not None else _load_gathered(path, process_index, "")


def _compute_rounds(compute_rows, mine, entry: str, bar, *, finish, what: str, process_index: int,
                    num_processes: int, gather_object: Callable[[list], list] | None) -> None:
    """Steps 2-3, repeated (with ``gather_object``) while a killed job left shards unfinished."""
    counts: Counter = Counter()
    pending = mine
    while True:
        unfinished = _claim_shards(compute_rows, pending, entry, bar, counts, finish=finish,
                                   compute_late=gather_object is None)
        if gather_object is None:
            break
        todo = sorted({tuple(r) for r in gather_object(unfinished)})
        if not todo:
            break
        logger.warning("%s: %d shards were left unfinished by another job that stopped; computing them", what,
                       len(todo))
        pending = todo[process_index::num_processes]
    bar.close()
    _log_counts(what, process_index, entry + ".shards", counts)


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


def _compute_shard(compute_rows, a: int, b: int, target: str, entry: str) -> bool:
    """Compute and write one shard (its lock held); False when another job finished the whole entry meanwhile (the
    shards folder is then gone, and the shard is not needed)."""
    columns = compute_rows(a, b)
    if os.path.isdir(entry):
        return False
    try:
        _write_shard(columns, target, a, b)
    except FileNotFoundError:
        if os.path.isdir(entry):
            return False
        raise
    return True


def _claim_shards(compute_rows, pending, entry: str, bar, counts: Counter, *, finish, compute_late: bool) -> list:
    """Steps 2-3 of :func:`sharded_load_or_compute` for this process's ``pending`` shards; returns those still
    unfinished after waiting (another job died computing them), computed here instead when ``compute_late``."""
    shards_dir = entry + ".shards"
    waiting, unfinished = [], []
    for a, b in pending:
        target = shard_path(shards_dir, a, b)
        with file_lock(target, blocking=False, remove=True) as held:
            if not held:
                waiting.append((a, b))  # another job is computing it: come back to it at the end
                continue
            if os.path.isdir(entry):
                break  # another job finished the entry
            if _shard_finished(target, b - a, entry):
                counts["reused"] += 1
            elif _compute_shard(compute_rows, a, b, target, entry):
                counts["computed"] += 1
        bar.update(b - a)
    if finish is not None and not compute_late:
        finish()
    for a, b in waiting:
        target = shard_path(shards_dir, a, b)
        with file_lock(target, remove=True):
            if os.path.isdir(entry):
                break
            if _shard_finished(target, b - a, entry):
                counts["from another job"] += 1
            elif not compute_late:
                unfinished.append((a, b))
            elif _compute_shard(compute_rows, a, b, target, entry):
                counts["computed"] += 1
        bar.update(b - a)
    if finish is not None and compute_late:
        finish()
    return unfinished


def _log_counts(what: str, process_index: int, shards_dir: str, counts: Counter) -> None:
    if counts:
        logger.info(
            "%s: process %d computed %d shards, reused %d finished shards and %d from another job, in %s", what,
            process_index, counts["computed"], counts["reused"], counts["from another job"], shards_dir,
        )


def _gather_entry(path: str, ranges: list[tuple[int, int]], *, what: str, shard_size: int, process_index: int,
                  num_processes: int, barrier: Callable[[], None],
                  gather_object: Callable[[list], list] | None = None) -> Dataset:
    """Once every process has written its shards, process 0 gathers them into the entry ``path`` (step 4); every
    process then loads it. With ``gather_object``, an error on process 0 is raised on every process."""
    barrier()
    columns, error = None, None
    if process_index == 0:
        try:
            columns = _main_gathers(path, ranges, what=what, shard_size=shard_size, num_processes=num_processes)
        except ShardError as e:
            if gather_object is None:
                raise
            error = str(e)
    if gather_object is not None:
        errors = [e for e in gather_object([error] if process_index == 0 else []) if e]
        if errors:
            raise ShardError(errors[0])
    else:
        barrier()
    return columns if columns is not None else _load_gathered(path, process_index, what)


def _main_gathers(path: str, ranges, *, what: str, shard_size: int, num_processes: int) -> Dataset:
    shards_dir = path + ".shards"
    with file_lock(path, remove=True):
        columns = load(path, locked=True)
        if columns is not None:
            logger.info("%s: the entry %s was gathered by another job; using it", what, path)
        else:
            columns = save_atomic(_read_shards(shards_dir, ranges, path), path)
            logger.info(
                "%s cached at %s (%d shards of %d rows, %d processes)", what, path, len(ranges), shard_size,
                num_processes,
            )
        shutil.rmtree(shards_dir, ignore_errors=True)
    return columns


def _load_gathered(path: str, process_index: int, what: str) -> Dataset:
    """The entry process 0 has just verified or written, on another process (no second verification)."""
    columns = load(path, verify=False)
    if columns is None:
        raise ShardError(
            f"{what}: the gathered entry {path!r} is not visible on process {process_index}; the cache "
            "must be on a filesystem every node shares (token_reward_cache_dir or $TREG_CACHE_DIR)."
        )
    return columns
