"""The token-reward pass sharded across processes: equal to the single-process pass, resumable after a crash, one
cache entry for any number of processes, and ZeRO-3-style collective forwards kept in step (real gloo processes)."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

import treg.token_rewards.contrastive
from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE, make_pairs
from treg.token_rewards import CHOSEN_REWARDS, PER_TOKEN_COLUMNS, REF_CHOSEN, REF_CHOSEN_SUM, precompute
from treg.token_rewards import cache as token_cache
from treg.trainer import TRegConfig, TRegTrainer

ROOT = Path(__file__).resolve().parents[1]
N_PAIRS = 40
SHARD = 8  # 5 shards: process 0 takes shards 0, 2, 4 and process 1 takes 1, 3 (unequal work on purpose)


def cache_root(tmp_path, tiny, name):
    """A fresh token-reward cache root that sees the session's tiny model (the CLI looks for the model under
    token_reward_cache_dir too; a link avoids rebuilding it)."""
    root = tmp_path / name
    root.mkdir()
    os.symlink(Path(tiny[2]).parent, root / "models")
    return str(root)


def pass_config(out, cache_dir, **kw):
    # the key-relevant settings of recipes/tiny/treg-dpo.yaml (max_length, α > 0, templates), so entries are shared
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        activation_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        treg_alpha=0.5,
        contrastive_positive_template=POSITIVE_TEMPLATE,  # the recipe's (the tiny model's wording)
        contrastive_negative_template=NEGATIVE_TEMPLATE,
        max_length=128,
        token_reward_cache_dir=cache_dir,
        token_reward_shard_size=SHARD,
    )
    base.update(kw)
    return TRegConfig(**base)


def run_pass(tiny, cache_dir, tmp_path, **kw):
    trainer = TRegTrainer(
        copy.deepcopy(tiny[0]),
        args=pass_config(tmp_path / "out", cache_dir, **kw),
        train_dataset=make_pairs(N_PAIRS, seed=0),
        processing_class=tiny[1],
    )
    return trainer.train_dataset


def entries(cache_dir):
    folder = Path(cache_dir) / "token_rewards"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_same_columns(a, b, columns=PER_TOKEN_COLUMNS, atol=0.0):
    for col in columns:
        for row, (x, y) in enumerate(zip(a[col], b[col])):
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=f"row {row}, column {col}")


# ------------------------------------------------------------------------------------------- the cache mechanics
def fake_rows(start, stop):
    return {"row": list(range(start, stop)), "values": [[float(r)] * (r % 3 + 1) for r in range(start, stop)]}


class Stop(Exception):
    pass


def with_checksums(*shards):
    """A shards folder's listing: each finished shard with its sidecar checksum."""
    return sorted(list(shards) + [s + ".sha256" for s in shards])


def test_shard_ranges():
    assert token_cache.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert token_cache.shard_ranges(0, 4) == []
    with pytest.raises(ValueError, match="≥ 1"):
        token_cache.shard_ranges(10, 0)


def test_two_simulated_processes_gather_into_the_single_process_entry(tmp_path):
    """Process 1 of 2 writes its shards and stops at the barrier; process 0 writes the others, gathers, cleans up.
    The gathered entry equals the one a single process computes, and its name does not depend on the process count."""
    kw = dict(what="test", shard_size=3)

    def barrier():
        raise Stop  # process 1 "waits" here forever, as far as this test is concerned

    with pytest.raises(Stop):
        token_cache.sharded_load_or_compute(
            fake_rows,
            10,
            cache_dir=str(tmp_path / "a"),
            entry="e",
            process_index=1,
            num_processes=2,
            wait_for_everyone=barrier,
            **kw,
        )
    shards = sorted(os.listdir(tmp_path / "a" / "token_rewards" / "e.shards"))
    assert shards == with_checksums("rows-00000003-00000006.parquet", "rows-00000009-00000010.parquet")  # 1, 3 of 4
    two = token_cache.sharded_load_or_compute(
        fake_rows, 10, cache_dir=str(tmp_path / "a"), entry="e", process_index=0, num_processes=2, **kw
    )
    one = token_cache.sharded_load_or_compute(fake_rows, 10, cache_dir=str(tmp_path / "b"), entry="e", **kw)
    assert two["row"] == one["row"] == list(range(10))
    assert two["values"] == one["values"] == fake_rows(0, 10)["values"]
    assert os.listdir(tmp_path / "a" / "token_rewards") == ["e"]  # shards folder removed after the gather


def test_resume_skips_finished_shards(tmp_path):
    calls = []

    def crashing(start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return fake_rows(start, stop)

    with pytest.raises(RuntimeError, match="killed"):
        token_cache.sharded_load_or_compute(crashing, 10, cache_dir=str(tmp_path), entry="e", what="t", shard_size=3)
    shards = sorted(os.listdir(tmp_path / "token_rewards" / "e.shards"))
    assert shards == with_checksums("rows-00000000-00000003.parquet", "rows-00000003-00000006.parquet")  # no 3rd
    calls.clear()
    out = token_cache.sharded_load_or_compute(crashing, 10, cache_dir=str(tmp_path), entry="e", what="t", shard_size=3)
    assert calls == [6, 9] and out["values"] == fake_rows(0, 10)["values"]


def test_shard_with_wrong_row_count_is_an_error_naming_it(tmp_path):
    with pytest.raises(token_cache.ShardError, match=r"rows 0-3: column 'row' has 2 rows, expected 3"):
        token_cache.sharded_load_or_compute(
            lambda a, b: {"row": [0, 1]}, 6, cache_dir=str(tmp_path), entry="e", what="t", shard_size=3
        )


def test_missing_shard_after_the_barrier_names_it_and_the_shared_filesystem(tmp_path):
    """What a multi-node run without a shared cache filesystem looks like to the main process."""
    with pytest.raises(token_cache.ShardError, match=r"rows-00000003-00000006\.parquet.*share"):
        token_cache.sharded_load_or_compute(
            fake_rows, 6, cache_dir=str(tmp_path), entry="e", what="t", shard_size=3, process_index=0, num_processes=2
        )


def test_without_a_cache_the_shards_are_exchanged(tmp_path):
    """cache_dir='none': each process computes its shards and gather_object exchanges them (faked here)."""
    other = [(a, b, fake_rows(a, b)) for a, b in token_cache.shard_ranges(10, 3)[1::2]]
    out = token_cache.sharded_load_or_compute(
        fake_rows,
        10,
        cache_dir="none",
        entry="e",
        what="t",
        shard_size=3,
        process_index=0,
        num_processes=2,
        gather_object=lambda mine: mine + other,
    )
    assert out["row"] == list(range(10))


# ------------------------------------------------------------------------------------------ the trainer's pass
def test_trainer_pass_resumes_after_a_crash_and_equals_the_uninterrupted_pass(tiny, tmp_path, monkeypatch):
    full = run_pass(tiny, cache_root(tmp_path, tiny, "full"), tmp_path)
    root = cache_root(tmp_path, tiny, "crash")
    real, calls, crashed = precompute.score_rows, [], []

    def crash_after_one_shard(rows, run):
        calls.append(len(rows))
        if len(calls) == 2 and not crashed:
            crashed.append(True)
            raise Stop("killed")  # the job dies while it scores the second shard
        return real(rows, run)

    monkeypatch.setattr(precompute, "score_rows", crash_after_one_shard)
    with pytest.raises(Stop):
        run_pass(tiny, root, tmp_path)
    (shards,) = [p for p in (Path(root) / "token_rewards").iterdir() if p.name.endswith(".shards")]
    assert sorted(p.name for p in shards.iterdir()) == with_checksums("rows-00000000-00000008.parquet")
    calls.clear()
    resumed = run_pass(tiny, root, tmp_path)
    assert calls == [SHARD] * (N_PAIRS // SHARD - 1)  # shard 0 was not recomputed
    assert_same_columns(resumed, full)
    assert not shards.exists()


def test_simpo_base_scores_two_contexts_not_three(tiny, tmp_path, monkeypatch):
    """A SimPO base needs no reference log-probs: the contrastive pass scores x⁺ and x⁻ only."""
    seen = []
    real = treg.token_rewards.contrastive.score_completions

    def counting(model, items, **kw):
        seen.append(len(items))
        return real(model, items, **kw)

    real_groups = treg.token_rewards.contrastive.score_groups

    def counting_groups(model, groups, **kw):  # the packed pass: a group's completions are its items
        seen.append(sum(len(completions) for _, completions in groups))
        return real_groups(model, groups, **kw)

    monkeypatch.setattr(treg.token_rewards.contrastive, "score_completions", counting)
    monkeypatch.setattr(treg.token_rewards.contrastive, "score_groups", counting_groups)
    ds = run_pass(tiny, "none", tmp_path, base_loss="simpo", beta=2.0, token_reward_shard_size=N_PAIRS)
    assert seen == [2 * 2 * N_PAIRS]  # 2 contexts × (chosen, rejected) × rows
    assert CHOSEN_REWARDS in ds.column_names and REF_CHOSEN not in ds.column_names


def test_two_process_pass_equals_single_process_and_its_entry_serves_one_process(tiny, tmp_path, monkeypatch):
    """`treg rewards` on 2 gloo processes (torchrun through accelerate) writes the same values as the in-process pass,
    into one cache entry that a 1-process trainer then loads without scoring anything."""
    two_root = cache_root(tmp_path, tiny, "two")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "ds_configs/cpu_2proc_ddp.yaml"),
        "--main_process_port",
        "29531",
        "-m",
        "treg",
        "rewards",
        "--config",
        str(ROOT / "recipes/tiny/treg-dpo.yaml"),
        "--output_dir",
        str(tmp_path / "two-out"),
        "--toy_num_pairs",
        str(N_PAIRS),
        "--token_reward_cache_dir",
        two_root,
        "--token_reward_shard_size",
        str(SHARD),
        "--disable_tqdm",
        "true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    saved = tmp_path / "two-out" / "token_rewards"
    finished = (saved / "dataset_info.json").is_file() and f"{N_PAIRS} rows with per-token columns" in out.stdout
    assert finished, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    if out.returncode != 0:  # tolerated only after the results were written (a known abort at interpreter exit)
        assert "Signal 6" in out.stderr or "SIGABRT" in out.stderr or "SIGSEGV" in out.stderr, out.stderr[-5000:]
    assert "5 shards of 8 rows, 2 processes" in out.stderr
    two = load_from_disk(str(saved))
    one = run_pass(tiny, cache_root(tmp_path, tiny, "one"), tmp_path)
    assert_same_columns(two, one, PER_TOKEN_COLUMNS + (REF_CHOSEN_SUM,))

    def no_scoring(*a, **k):
        raise AssertionError("the 2-process entry should have been loaded, not recomputed")

    monkeypatch.setattr(precompute, "score_rows", no_scoring)
    before = entries(two_root)  # the train entry and the eval split's (the recipe evaluates)
    reused = run_pass(tiny, two_root, tmp_path)
    assert_same_columns(reused, one)
    assert entries(two_root) == before and not any(e.endswith(".shards") for e in before)


# --------------------------------------------------------------------------- lockstep of collective forwards
LOCKSTEP_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from types import SimpleNamespace
    from treg.scoring import LockstepModel

    class CollectiveModel(torch.nn.Module):
        # stands in for a ZeRO-3 engine: every forward is an all-reduce (the weight gather) that all ranks must join
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.calls = 0

        def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
            gathered = self.w.detach().clone()
            dist.all_reduce(gathered)
            self.calls += 1
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], input_ids.shape[1], 3) + gathered)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = LockstepModel(CollectiveModel(), device=torch.device("cpu"))
    real = 5 if rank == 0 else 2  # unequal work, as with shards of different sizes
    for _ in range(real):
        out = model(input_ids=torch.ones(2, 4, dtype=torch.long), logits_to_keep=2)
        assert out.logits.shape == (2, 2, 3) and float(out.logits[0, 0, 0]) == 2.0
    dummies = model.finish()
    with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
        f.write(f"{real} {dummies} {model.model.calls}")
    dist.destroy_process_group()
""")


def test_lockstep_keeps_collective_forwards_paired_across_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(LOCKSTEP_WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(script),
        str(tmp_path),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    results = {r: (tmp_path / f"rank{r}.txt") for r in (0, 1)}
    assert all(p.is_file() for p in results.values()), f"exit {out.returncode}\n{out.stderr[-4000:]}"
    real0, dummies0, calls0 = map(int, results[0].read_text().split())
    real1, dummies1, calls1 = map(int, results[1].read_text().split())
    assert (real0, dummies0) == (5, 0) and (real1, dummies1) == (2, 3)  # rank 1 answered rank 0's last 3 forwards
    assert calls0 == calls1 == 5


def test_trainer_pass_uses_the_chosen_backend_and_releases_it(tiny, tmp_path, monkeypatch):
    """With the vLLM backend chosen, the pass builds one scorer from the reference weights' folder, scores every
    shard with it and closes it (the scorer here is a stand-in; vLLM itself cannot run on the CPU CI machine)."""
    from treg.scoring import VLLMScorer, score_completions

    events = []

    class StandIn(VLLMScorer):
        def __init__(self):
            super().__init__(llm=None, dtype="float32")

        def score_items(self, items, *, batch_size=8, desc="", show_progress=True):
            events.append("score")
            return score_completions(tiny[0], items, batch_size=batch_size, show_progress=False)

        def close(self):
            events.append("close")

    monkeypatch.setattr(precompute, "choose_backend", lambda requested, **kw: "vllm")
    monkeypatch.setattr(
        VLLMScorer, "from_pretrained", classmethod(lambda cls, path, **kw: events.append(path) or StandIn())
    )
    via_scorer = run_pass(tiny, "none", tmp_path, token_reward_backend="vllm")
    assert events[0] == tiny[2] and events[1:] == ["score"] * (N_PAIRS // SHARD) + ["close"]
    monkeypatch.undo()
    # against the unpacked HF pass, which runs the stand-in's very forwards (the packed one differs by rounding)
    assert_same_columns(via_scorer, run_pass(tiny, "none", tmp_path, pack_pairs=False), atol=1e-6)


def test_throughput_bench_runs_and_reports_its_ratios(tmp_path):
    """bench/token_reward_pass.py on a toy size: it runs, and reports the pass against the forwards it needs."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_pass", ROOT / "bench" / "token_reward_pass.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    argv = ["--rows", "2", "--hidden", "64", "--layers", "1", "--vocab", "128", "--repeats", "1", "--out", str(out)]
    results = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    forwards = [row["forwards_per_response"] for row in results["settings"].values()]
    assert forwards == [3, 2]
    for row in results["settings"].values():
        assert row["sequences"] == 2 * 2 * row["forwards_per_response"] and row["ratio_vs_forward"] > 0
