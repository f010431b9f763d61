"""Atomic file writes, checksummed cache entries and locks shared by concurrent jobs.

Writes: the content goes to a temporary file (or folder) beside the target, which is then renamed into place, so a
crash never leaves a half-written file (readers see the old file or the new one). Datasets (folders) are written
atomically by :func:`treg.token_rewards.cache.save_atomic`, other folders (converted models) by
:func:`write_dir_atomic`. Temporary names carry the writer's pid and host (:func:`temp_path`), so that
:func:`remove_stale_temps` can clear what a killed writer left behind.

Checksums: a cache folder carries ``checksums.json`` (the sha256 and size of each of its files, written into the
temporary folder before the rename, so it is part of the atomic write); a single cached file carries a sidecar
``<file>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it), written before the file is renamed into
place. :func:`verify_checksums` and :func:`verify_file_checksum` raise :class:`CorruptCacheError` on a mismatch and
return False for a legacy entry that has no checksum (written before treg wrote them; callers then only check that
it opens). :func:`move_aside` renames a corrupt entry to ``<name>.corrupt-<timestamp>`` (never deletes it) with a
warning naming it.

Locks: :func:`file_lock` lets concurrent processes and jobs build a cache entry once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # a cache folder's manifest: {"sha256": {relative path: {"sha256": hex, "bytes": n}}}
SIDECAR = ".sha256"  # a cached file's checksum: "<hex>  <name>\n" beside it
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]  # which machine wrote a temporary name


class UserError(ValueError):
    """An error in the user's input or environment (recipe, flags, data file, model spec, cache, judge, evaluation
    file), not a bug: the message says what is wrong, where (file, line, row, field or key) and what to do. Every such
    error treg raises is one of these (RecipeError, PreferenceDataError, TokenRewardError, JudgeError, ...); the
    ``treg`` command prints it as one line and exits 2, the traceback only with ``--debug`` or ``TREG_DEBUG=1``.
    Anything else is a bug and keeps its traceback."""


class CorruptCacheError(Exception):
    """A cache entry or file that fails its checksum or cannot be read: ``path`` and ``reason``. Callers catch it,
    :func:`move_aside` the entry and recompute it; it never reaches the user."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def default_cache_dir() -> str:
    """treg's cache root: ``$TREG_CACHE_DIR``, else ``~/.cache/treg``."""
    return os.environ.get("TREG_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "treg"))


def temp_path(path: str, ext: str = "") -> str:
    """A temporary name beside ``path``: ``.<name>.tmp-<pid>-<random>-<host tag><ext>``, hidden, unique across
    processes and machines, and recognised (with its writer) by :func:`remove_stale_temps`."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{_HOST_TAG}{ext}")


def write_atomic(path: str, write: Callable[[str], None], *, checksum: bool = False) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (same extension, so writers that go by it still
    work), then move it into place. On any failure the temporary file is removed and ``path`` is untouched.
    ``checksum``: also write the sidecar ``path + ".sha256"`` (before the rename, so every file in place has one;
    a sidecar without its file means "not written yet")."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the usual permissions from the umask.
    tmp = temp_path(os.path.splitext(path)[0], os.path.splitext(path)[1])
    try:
        write(tmp)
        if checksum:
            write_file_checksum(path, sha256_file(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str, *, checksum: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (with its sidecar checksum when ``checksum``)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write, checksum=checksum)


def write_json_atomic(path: str, data: Any, *, checksum: bool = False, **dumps_kwargs) -> None:
    """``json.dumps(data, **dumps_kwargs)`` written to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, **dumps_kwargs), checksum=checksum)


# ---------------------------------------------------------------------------------------------------------- locks
def _same_file(f, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(f.fileno())
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _open_lock_file(lock_path: str):
    for attempt in range(100):
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        try:
            return open(lock_path, "a+")
        except FileNotFoundError:  # the folder was removed between the two calls (a finished cache entry's shards)
            if attempt == 99:
                raise


@contextlib.contextmanager
def file_lock(path: str, *, blocking: bool = True, remove: bool = False):
    """Hold an exclusive cross-process lock named after ``path`` for the ``with`` block; yields whether it is held.

    The lock is ``fcntl.flock`` on ``path + ".lock"`` (created with its parent folder if needed); a second process
    asking for the same ``path`` waits until the first leaves the block (logging who holds it: the lock file names
    the holder's pid, host and start time). ``blocking=False``: do not wait; the block runs with ``False`` when
    another process holds the lock. Typical use: several processes (accelerate launch, bench workers, a sweep of jobs)
    want the same cache entry built; each takes the lock, checks whether the entry exists, and only the first builds
    it.

    Stale locks: flock locks belong to the open file, so the kernel releases them when their process exits or is
    killed; a crashed builder never leaves a lock that blocks anyone (the empty ``.lock`` file may stay; it is
    harmless and reused). ``remove=True`` deletes the lock file on release (while still holding the lock); a waiter
    that then wakes on the deleted file sees that the path no longer names its file and locks the new one, so the
    lock stays exclusive. Across machines: on NFS (v3 with lockd, v4) Linux maps flock to byte-range locks the
    server arbitrates, and a dead client's locks expire with its lease; Lustre needs the ``flock`` mount option; on a
    file system that does not share locks between machines this only excludes processes of the same machine.
    POSIX only.
    """
    import fcntl

    lock_path = path + ".lock"
    while True:
        f = _open_lock_file(lock_path)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        if busy:
            if not blocking:
                f.close()
                yield False
                return
            f.seek(0)
            holder = f.read().strip() or "another process"
            logger.info("waiting for the lock on %s (held by %s)", path, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        if _same_file(f, lock_path):
            break
        f.close()  # the holder removed the lock file while we waited: lock the current one
    try:
        with contextlib.suppress(OSError):  # who holds it, for the waiters' log line (a read-only file: skip)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
        yield True
    finally:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_path)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def write_dir_atomic(path: str, write: Callable[[str], None], *, checksum: bool = False) -> None:
    """Call ``write(tmp_dir)`` on a new temporary folder beside ``path``, then rename it to ``path``, so readers see
    no folder or the whole folder. ``path`` must not exist yet (take :func:`file_lock` around the check and the
    write when several processes may build it). ``checksum``: write ``checksums.json`` into the folder before the
    rename (see :func:`verify_checksums`). On any failure the temporary folder is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Not mkdtemp: its folders are private (0700); this one gets the usual permissions from the umask.
    tmp = temp_path(path)
    os.mkdir(tmp)
    try:
        write(tmp)
        if checksum:
            write_checksums(tmp)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ checksums
def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _folder_files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative, sorted), but the manifest and lock files."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != CHECKSUMS and not name.endswith(".lock"):
                out.append(rel)
    return sorted(out)


def write_checksums(folder: str) -> None:
    """Write ``folder/checksums.json``: the sha256 and size of every file in ``folder`` (call it last, on the
    temporary folder, before the rename that publishes it)."""
    files = {
        rel: {"sha256": sha256_file(os.path.join(folder, rel)), "bytes": os.path.getsize(os.path.join(folder, rel))}
        for rel in _folder_files(folder)
    }
    write_json_atomic(os.path.join(folder, CHECKSUMS), {"sha256": files}, indent=1, sort_keys=True)


def verify_checksums(folder: str, required: tuple[str, ...] = ()) -> bool:
    """Check ``folder`` against its ``checksums.json``: True when every listed file is there with its size and
    sha256; False when there is no manifest (a legacy entry: the caller checks that it opens). Raises
    :class:`CorruptCacheError` naming the first file that is missing, truncated or changed, or a ``required`` file
    that is missing, or an unreadable manifest."""
    for name in required:
        if not os.path.isfile(os.path.join(folder, name)):
            raise CorruptCacheError(folder, f"{name} is missing")
    manifest_path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(manifest_path):
        return False
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["sha256"]
        items = [(rel, int(v["bytes"]), str(v["sha256"])) for rel, v in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCacheError(folder, f"{CHECKSUMS} is unreadable ({type(e).__name__}: {e})") from e
    for rel, size, digest in items:
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            raise CorruptCacheError(folder, f"{rel} is missing")
        actual = os.path.getsize(file)
        if actual != size:
            raise CorruptCacheError(folder, f"{rel} has {actual} bytes, {size} were written (truncated or changed)")
        if sha256_file(file) != digest:
            raise CorruptCacheError(folder, f"{rel} does not match its sha256 (changed since it was written)")
    return True


def usable_dir(path: str, *, what: str, required: tuple[str, ...] = ("config.json",), locked: bool = False) -> bool:
    """Whether the cached folder ``path`` (a built or converted model) is complete and unchanged: True when it verifies
    against its ``checksums.json``, or is a legacy folder (no manifest) holding the ``required`` files; False when it
    is absent. A corrupt folder is moved aside with a warning naming it (under :func:`file_lock`, unless the caller
    already holds it: ``locked``), and False returned, so the caller builds it again."""
    if not os.path.isdir(path):
        return False
    try:
        verify_checksums(path, required=required)
        return True
    except CorruptCacheError:
        pass
    with file_lock(path) if not locked else contextlib.nullcontext():
        try:  # again under the lock: another process may have rebuilt it meanwhile
            verify_checksums(path, required=required)
            return True
        except CorruptCacheError as e:
            if os.path.isdir(path):
                move_aside(path, e.reason, what=what)
    return False


def write_file_checksum(path: str, digest: str | None = None) -> None:
    """Write the sidecar ``path + ".sha256"`` (``sha256sum`` format) for ``path``'s bytes, or for ``digest``."""
    digest = digest or sha256_file(path)
    write_text_atomic(path + SIDECAR, f"{digest}  {os.path.basename(path)}\n")


def verify_file_checksum(path: str) -> bool:
    """Check ``path`` against its sidecar ``path + ".sha256"``: True when it matches, False when there is no sidecar
    (a legacy file: the caller checks that it parses). Raises :class:`CorruptCacheError` on a mismatch or an
    unreadable sidecar."""
    sidecar = path + SIDECAR
    if not os.path.isfile(sidecar):
        return False
    with open(sidecar, encoding="utf-8", errors="replace") as f:
        expected = f.read().split(maxsplit=1)[:1]
    if not expected or not re.fullmatch(r"[0-9a-f]{64}", expected[0]):
        raise CorruptCacheError(path, f"its checksum file {os.path.basename(sidecar)} is unreadable")
    if sha256_file(path) != expected[0]:
        raise CorruptCacheError(
            path, f"does not match its sha256 ({os.path.getsize(path)} bytes; truncated or changed since written)"
        )
    return True


def move_aside(path: str, reason: str, *, what: str = "cache entry", to: str | None = None) -> str:
    """Rename the corrupt ``path`` (a file with its sidecar checksum, or a folder) to ``<to or path>.corrupt-<time>``
    and warn, naming both; returns the new path. Nothing is deleted: the copy stays for inspection (delete it when
    done). When it cannot be moved (a read-only cache) the error says so and what to do."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = f"{to or path}.corrupt-{stamp}"
    n = 1
    while os.path.lexists(target):
        n += 1
        target = f"{to or path}.corrupt-{stamp}-{n}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return target  # another process moved it aside first
    except OSError as e:
        raise UserError(
            f"the {what} {path} is corrupt ({reason}) and cannot be moved aside ({e.strerror}): delete it, or point "
            "treg at a writable cache folder (token_reward_cache_dir, $TREG_CACHE_DIR)."
        ) from e
    if os.path.isfile(path + SIDECAR):
        with contextlib.suppress(OSError):
            os.rename(path + SIDECAR, target + SIDECAR)
    logger.warning(
        "the %s %s is corrupt (%s): moved aside to %s; it will be computed again", what, path, reason, target
    )
    return target


# ------------------------------------------------------------------------------------------------ stale temporaries
_TEMP = re.compile(r"\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?:-(?P<host>[0-9a-f]{6}))?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _newest_mtime(path: str) -> float:
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _is_stale_temp(path: str, name: str, max_age_s: float) -> bool:
    match = _TEMP.search(name)
    if match and match["host"] == _HOST_TAG:  # written on this machine: stale once its writer is gone
        return not _pid_alive(int(match["pid"]))
    # another machine's (or an older treg's) temporary: stale once nothing in it changed for max_age_s
    return time.time() - _newest_mtime(path) > max_age_s


def remove_stale_temps(directory: str, max_age_s: float = 3600.0) -> list[str]:
    """Remove what killed writers left in ``directory``: temporary files and folders (``.<name>.tmp-…``, and the
    ``.tmp-XXXXXXXX`` folders of older versions) whose writer process on this machine is gone, or, when the writer is
    unknown or on another machine, in which nothing changed for ``max_age_s`` seconds; and ``*.lock`` files of that
    age that nobody holds. Returns the removed paths (each logged)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".lock") and time.time() - os.lstat(path).st_mtime > max_age_s:
                with file_lock(path[: -len(".lock")], blocking=False, remove=True) as held:
                    if held:
                        removed.append(path)
                continue
            if not (name.startswith(".") and ".tmp-" in name) or not _is_stale_temp(path, name, max_age_s):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
        except OSError as e:  # gone already, or not ours to remove
            logger.debug("could not remove %s: %s", path, e)
    for path in removed:
        logger.info("removed %s, left behind by an interrupted writer", path)
    return removed
