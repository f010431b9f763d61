"""Caches that survive corruption and concurrent jobs (issue 14, item 3): token-reward entries and shards and eval
answers are written with checksums and verified on read; a corrupt one is moved aside with a warning naming it and
computed again; entries from before checksums still load; two processes on one entry compute each shard once."""

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from datasets import Dataset

from treg import files
from treg.evaluation import runs
from treg.token_rewards import cache as token_cache

ROOT = Path(__file__).resolve().parents[1]
N_ROWS, SHARD = 10, 3  # shards 0-3, 3-6, 6-9, 9-10
MARK = 0.4924  # a value the bit-flip test finds in the entry's bytes


def rows(start, stop):
    return {"row": list(range(start, stop)), "values": [[MARK + r] * (r % 3 + 1) for r in range(start, stop)]}


class Recorder:
    """A compute function that records the shards it computes."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, start, stop):
        self.calls.append(start)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed")
        return rows(start, stop)


def killed():
    raise KeyboardInterrupt("killed")


def run(tmp_path, compute, **kw):
    return token_cache.sharded_load_or_compute(
        compute, N_ROWS, cache_dir=str(tmp_path), entry="e", what="test pass", shard_size=SHARD, **kw
    )


def folder(tmp_path):
    return tmp_path / "token_rewards"


def listing(tmp_path):
    return sorted(os.listdir(folder(tmp_path)))


def corrupt_copies(tmp_path, prefix="e"):
    return [n for n in listing(tmp_path) if n.startswith(prefix + ".corrupt-")]


def assert_complete(ds):
    assert ds["row"] == list(range(N_ROWS)) and ds["values"] == rows(0, N_ROWS)["values"]


def warnings_naming(caplog, path):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and str(path) in r.getMessage()]


# -------------------------------------------------------------------------------------------- two jobs at once
WORKER = textwrap.dedent("""
    import json, os, sys, time
    from treg.token_rewards import cache

    log, cache_dir, go, out = sys.argv[1:5]

    def compute(start, stop):
        with open(log, "a") as f:  # O_APPEND: one line per write, whole
            f.write(f"{start} {stop} {os.getpid()}\\n")
        time.sleep(0.25)
        return {"row": list(range(start, stop)), "values": [[start + 0.5] * 3 for _ in range(start, stop)]}

    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    ds = cache.sharded_load_or_compute(compute, 20, cache_dir=cache_dir, entry="e", what="t", shard_size=2,
                                       show_progress=False)
    with open(out, "w") as f:
        json.dump(ds.to_dict(), f)
""")


def test_two_processes_on_one_entry_compute_each_shard_once(tmp_path):
    script, log, go = tmp_path / "worker.py", tmp_path / "calls.log", tmp_path / "go"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(log), str(tmp_path / "c"), str(go), str(tmp_path / f"{i}")],
                         env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
    go.touch()  # both start at the same moment
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"{i}").read_text()) for i in range(2)]
    assert results[0] == results[1]
    assert results[0]["row"] == list(range(20))
    calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert sorted((a, b) for a, b, _ in calls) == [(a, a + 2) for a in range(0, 20, 2)], calls  # each shard once
    # nothing left behind: no shards folder, no lock, no temporary folder
    assert sorted(os.listdir(tmp_path / "c" / "token_rewards")) == ["e"]


def test_a_shard_left_unfinished_by_a_killed_job_is_computed_by_the_waiting_one(tmp_path):
    """Another job holds shard 0's lock and is killed mid-shard: this job sets shard 0 aside, computes the others,
    then waits for the lock (the kernel frees it), finds the shard unfinished and computes it."""
    shard0 = token_cache.shard_path(str(folder(tmp_path) / "e.shards"), 0, SHARD)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom treg.files import file_lock\n"
         "with file_lock(sys.argv[1], remove=True):\n    print('held', flush=True)\n    time.sleep(600)\n", shard0],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        compute = Recorder()

        def kill_the_other_job(start, stop):
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            return compute(start, stop)

        out = run(tmp_path, kill_the_other_job)
    finally:
        holder.kill()
        holder.wait()
    assert compute.calls == [3, 6, 9, 0]  # shard 0 last: set aside, then computed once its holder was gone
    assert_complete(out)
    assert listing(tmp_path) == ["e"]


def test_in_a_multi_process_job_an_unfinished_shard_gets_another_round_after_finish(tmp_path):
    """With gather_object (a multi-process job, here process 0 of 2 with process 1's shards already written), a shard
    that a killed job left unfinished is computed in a second round, never after ``finish`` of the same round (under
    ZeRO-3 the other processes only answer forwards until then)."""
    with pytest.raises(KeyboardInterrupt):  # process 1 of 2 writes shards 1 and 3, then "waits" at the barrier
        run(tmp_path, rows, process_index=1, num_processes=2, wait_for_everyone=killed)
    shard0 = token_cache.shard_path(str(folder(tmp_path) / "e.shards"), 0, SHARD)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom treg.files import file_lock\n"
         "with file_lock(sys.argv[1], remove=True):\n    print('held', flush=True)\n    time.sleep(600)\n", shard0],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    events = []
    try:
        assert holder.stdout.readline().strip() == "held"

        def compute(start, stop):
            events.append(start)
            holder.kill()
            holder.wait()
            return rows(start, stop)

        out = run(tmp_path, compute, process_index=0, num_processes=2, gather_object=lambda mine: list(mine),
                  finish=lambda: events.append("finish"))
    finally:
        holder.kill()
        holder.wait()
    assert events == [6, "finish", 0, "finish"]
    assert_complete(out)


# ------------------------------------------------------------------------------------------------ corrupt entries
def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", ["truncate the arrow file", "delete state.json", "truncate, legacy entry"])
def test_a_damaged_entry_is_moved_aside_and_recomputed(tmp_path, caplog, damage):
    assert_complete(run(tmp_path, Recorder()))
    entry = folder(tmp_path) / "e"
    assert (entry / files.CHECKSUMS).is_file()
    if damage == "delete state.json":
        (entry / "state.json").unlink()
    else:
        (arrow,) = entry.glob("*.arrow")
        truncate(arrow)
        if "legacy" in damage:
            (entry / files.CHECKSUMS).unlink()
    compute = Recorder()
    with caplog.at_level(logging.WARNING):
        out = run(tmp_path, compute)
    assert compute.calls == [0, 3, 6, 9]
    assert_complete(out)
    (warning,) = warnings_naming(caplog, entry)
    assert "corrupt" in warning and "moved aside" in warning
    (copy,) = corrupt_copies(tmp_path)
    assert copy in warning and (folder(tmp_path) / copy).is_dir()  # kept, not deleted
    assert_complete(run(tmp_path, Recorder(fail_at=1)))  # the recomputed entry is good


def test_a_same_size_change_of_a_cached_value_is_caught_by_the_checksum(tmp_path, caplog):
    run(tmp_path, Recorder())
    (arrow,) = (folder(tmp_path) / "e").glob("*.arrow")
    data = arrow.read_bytes()
    old, new = struct.pack("<d", MARK + 3), struct.pack("<d", MARK + 3 - 0.0603)  # row 3 holds one value
    assert data.count(old) == 1
    arrow.write_bytes(data.replace(old, new))  # same size, still a valid arrow file
    assert Dataset.load_from_disk(str(folder(tmp_path) / "e"))["values"][3] == [MARK + 3 - 0.0603]
    compute = Recorder()
    with caplog.at_level(logging.WARNING):
        out = run(tmp_path, compute)
    assert compute.calls == [0, 3, 6, 9]
    assert_complete(out)
    (warning,) = warnings_naming(caplog, folder(tmp_path) / "e")
    assert "does not match its sha256" in warning and arrow.name in warning


def test_a_legacy_entry_without_checksums_still_loads(tmp_path, caplog):
    """Entries written before checksums (no checksums.json) load as they are: no recompute, no warning, nothing
    written (a read-only cache keeps working)."""
    entry = folder(tmp_path) / "e"
    Dataset.from_dict(rows(0, N_ROWS)).save_to_disk(str(entry))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with caplog.at_level(logging.WARNING):
        out = run(tmp_path, Recorder(fail_at=1))
    assert_complete(out)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


# ------------------------------------------------------------------------------------------------- corrupt shards
@pytest.mark.parametrize("damage", ["truncate", "same-size change", "truncate, legacy shard"])
def test_a_damaged_finished_shard_is_recomputed_on_resume_not_reused(tmp_path, caplog, damage):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, Recorder(fail_at=3))  # shards 0 and 1 finished, killed during shard 2
    shard = Path(token_cache.shard_path(str(folder(tmp_path) / "e.shards"), 0, SHARD))
    assert Path(str(shard) + files.SIDECAR).is_file()
    if damage == "same-size change":
        data = shard.read_bytes()
        old = struct.pack("<d", MARK + 1)
        assert data.count(old) >= 1
        shard.write_bytes(data.replace(old, struct.pack("<d", MARK + 1.5)))
    else:
        truncate(shard)
        if "legacy" in damage:
            Path(str(shard) + files.SIDECAR).unlink()
    compute = Recorder()
    with caplog.at_level(logging.WARNING):
        out = run(tmp_path, compute)
    assert compute.calls == [0, 6, 9]  # shard 1 (rows 3-6) reused, shard 0 recomputed
    assert_complete(out)
    (warning,) = warnings_naming(caplog, shard)
    assert "corrupt" in warning and "moved aside" in warning
    copies = [n for n in listing(tmp_path) if n.startswith(f"e.shards-{shard.name}.corrupt-")]
    (copy,) = [n for n in copies if not n.endswith(files.SIDECAR)]
    assert copy in warning  # kept beside the entry, not removed with the shards folder
    assert sorted(set(listing(tmp_path)) - {copy} - {copy + files.SIDECAR}) == ["e"]


def test_a_legacy_shard_without_checksum_is_reused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, Recorder(fail_at=2))
    shard = token_cache.shard_path(str(folder(tmp_path) / "e.shards"), 0, SHARD)
    os.remove(shard + files.SIDECAR)
    compute = Recorder()
    assert_complete(run(tmp_path, compute))
    assert compute.calls == [3, 6, 9]


# --------------------------------------------------------------------------------------------- leftovers, locks
def test_temporaries_of_killed_writers_are_removed_before_a_pass(tmp_path):
    """F2c: the temporary folder of a gather killed mid-write (and an old-style ``.tmp-XXXXXXXX``) is removed; a
    recent one from another machine is kept (it may be being written)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = folder(tmp_path)
    ours_dead = root / f".e.tmp-{dead.pid}-0123abcd-{files._HOST_TAG}"
    old_style = root / ".tmp-k2j4h5g6"
    other_host = root / f".e.tmp-{os.getpid()}-0123abcd-ffffff"
    for d in (ours_dead, old_style, other_host):
        d.mkdir(parents=True)
        (d / "data-00000-of-00001.arrow").write_bytes(b"partial")
    hours_ago = time.time() - 7200
    os.utime(old_style / "data-00000-of-00001.arrow", (hours_ago, hours_ago))
    os.utime(old_style, (hours_ago, hours_ago))
    assert_complete(run(tmp_path, Recorder()))
    assert listing(tmp_path) == sorted(["e", other_host.name])


def test_file_lock_without_waiting_and_removed_after_use(tmp_path):
    target = str(tmp_path / "x")
    with files.file_lock(target, remove=True) as held:
        assert held and "pid" in Path(target + ".lock").read_text()
        holder = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom treg.files import file_lock\n"
             "with file_lock(sys.argv[1], blocking=False) as held:\n    print(held)\n", target],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
        assert holder.stdout.strip() == "False", holder.stderr[-2000:]
    assert not os.path.exists(target + ".lock")


# -------------------------------------------------------------------------------------------------- eval answers
@pytest.fixture()
def answers_cache(tmp_path, monkeypatch):
    generated = []

    def generate(model, tokenizer, instructions, show_progress=True, **gen):
        generated.append(len(instructions))
        return [f"answer to {q}" for q in instructions]

    monkeypatch.setattr(runs, "_model_hash", lambda model: "weights")
    monkeypatch.setattr(runs, "generate_answers", generate)

    def answer(instructions=("q1", "q2", "q3")):
        return runs.cached_answers(None, None, list(instructions), str(tmp_path), {"max_new_tokens": 8}, False)

    return answer, generated, tmp_path


@pytest.mark.parametrize("damage", ["truncate", "same-size change", "truncate, legacy file"])
def test_a_damaged_eval_answers_file_is_regenerated_with_a_warning(answers_cache, caplog, damage):
    answer, generated, out = answers_cache
    expected = ["answer to q1", "answer to q2", "answer to q3"]
    assert answer() == expected and generated == [3]
    (path,) = out.glob(".answers-*.json")
    assert Path(str(path) + files.SIDECAR).is_file()
    if damage == "same-size change":
        path.write_text(path.read_text().replace("q2", "q9"))  # still valid JSON, same size
    else:
        truncate(path)
        if "legacy" in damage:
            Path(str(path) + files.SIDECAR).unlink()
    with caplog.at_level(logging.WARNING):
        assert answer() == expected
    assert generated == [3, 3]
    (warning,) = warnings_naming(caplog, path)
    assert "eval answers cache" in warning and "moved aside" in warning
    assert len(list(out.glob(".answers-*.json.corrupt-*"))) >= 1
    assert answer() == expected and generated == [3, 3]  # the regenerated file verifies


def test_a_legacy_eval_answers_file_still_loads(answers_cache):
    answer, generated, out = answers_cache
    answer()
    (path,) = out.glob(".answers-*.json")
    os.remove(str(path) + files.SIDECAR)
    assert answer() == ["answer to q1", "answer to q2", "answer to q3"] and generated == [3]
    assert sorted(p.name for p in out.iterdir()) == [path.name]  # no lock file left, nothing moved aside


def test_a_damaged_tiny_model_is_moved_aside_and_rebuilt(tmp_path, caplog):
    """F3e: a truncated model.safetensors in the cached tiny model was a raw SafetensorError on every run. The
    folder now carries checksums: the damaged copy is moved aside with a warning naming it, and the model rebuilt."""
    import logging

    from treg.synthetic import TinyModelRecipe, load_tiny_model

    recipe = TinyModelRecipe(pretrain_steps=2, sft_steps=2, batch_size=2)  # a cheap build; the path is what matters
    _, _, path = load_tiny_model(recipe, cache_dir=str(tmp_path), show_progress=False)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with caplog.at_level(logging.WARNING):
        model, _, again = load_tiny_model(recipe, cache_dir=str(tmp_path), show_progress=False)
    assert again == path and os.path.getsize(weights) > 0
    assert any("tiny model" in r.getMessage() and path in r.getMessage() for r in caplog.records), caplog.text
    moved = [p for p in os.listdir(os.path.dirname(path)) if ".corrupt-" in p]
    assert len(moved) == 1, moved
    assert sum(p.numel() for p in model.parameters()) > 0
