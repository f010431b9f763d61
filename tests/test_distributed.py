"""Multi-process training on CPU, launched the way README launches it (`accelerate launch --config_file ds_configs/...
-m treg train --config recipes/...`): 2 DDP processes (gloo) train the tiny recipe to the same losses and weights
as 1 process with the same global batch, and DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes match DDP; under ZeRO-3 the
token-reward pass, run through the partitioned engine, writes the very entry (name and values) of the 1-process pass;
pair packing (the default) under ZeRO-2/3 matches a padded, unpacked 1-process run.

Two-process CPU runs occasionally abort at interpreter exit after they finished (seen ~3 in 40). A run counts as
finished only when its final weights, its checkpoint's trainer_state.json and the "saved to" line exist; only then is
a nonzero exit code tolerated, and only one caused by a signal (SIGABRT/SIGSEGV) — anything else fails the test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treg.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/tiny/treg-dpo.yaml")
STEPS = 3
LEARNING_RATE = 1e-3
# Global batch 8 = 2 processes × 4 = 1 process × 8. Constant lr, no warmup: every step moves the weights.
TRAIN_FLAGS = [
    "--toy_num_pairs",
    "32",
    "--max_steps",
    str(STEPS),
    "--eval_strategy",
    "no",
    "--logging_steps",
    "1",
    "--save_strategy",
    "steps",
    "--save_steps",
    str(STEPS),
    "--warmup_steps",
    "0",
    "--lr_scheduler_type",
    "constant",
    "--learning_rate",
    str(LEARNING_RATE),
    "--disable_tqdm",
    "true",
]
SIGNAL_DEATH = ("Signal 6", "SIGABRT", "Signal 11", "SIGSEGV", "exitcode  : -6", "exitcode  : -11")


def finished(out_dir: Path, stdout: str) -> bool:
    return (
        (out_dir / "model.safetensors").is_file()
        and (out_dir / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()
        and f"saved to {out_dir}" in stdout
    )


def launch(
    config_file: str, out_dir: Path, port: int, per_device_batch: int = 4, timeout: int = 400, extra: tuple = ()
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / config_file),
        "--main_process_port",
        str(port),
        "-m",
        "treg",
        "train",
        "--config",
        RECIPE,
        "--output_dir",
        str(out_dir),
        "--per_device_train_batch_size",
        str(per_device_batch),
        *TRAIN_FLAGS,
        *extra,
    ]
    # TREG_CACHE_DIR (set by conftest) carries over, so the processes reuse the session's tiny model.
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    log = f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-8000:]}"
    assert finished(out_dir, out.stdout), f"{config_file}: the run did not finish\n{log}"
    if out.returncode != 0:
        assert any(s in out.stderr for s in SIGNAL_DEATH), f"{config_file}: finished, then failed otherwise\n{log}"
        print(f"{config_file}: finished, then died of a signal at exit (tolerated)")
    return result(out_dir)


def result(out_dir: Path) -> dict:
    state = json.loads((out_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    return {"losses": losses, "weights": load_file(str(out_dir / "model.safetensors"))}


def _common(a: dict, b: dict) -> list[str]:
    common = sorted(set(a) & set(b))  # DeepSpeed also saves the tied lm_head.weight; DDP saves it once as the embedding
    assert len(common) >= len(a) - 1 and len(common) >= len(b) - 1, (sorted(a), sorted(b))
    return common


def max_weight_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in _common(a, b))


def assert_same_training(run: dict, reference: dict, init: dict) -> None:
    """``run`` trained like ``reference`` from ``init``, up to what legitimately differs between the two set-ups.

    DDP, ZeRO-2 and ZeRO-3 sum the same per-process gradients in different orders (all-reduce vs reduce-scatter, in
    buckets of different shapes), so fp32 gradients differ in their last bits. Adam divides by sqrt(v) + eps, which
    turns a last-bit difference into a visible one only for the few elements whose gradient is itself near zero,
    and never into more than a fraction of one step (|Δw| ≤ lr per step). So: (1) the update as a whole must agree,
    ‖Δrun − Δref‖ / ‖Δref‖ ≤ 1e-3 (rounding gives ~1e-6; a wrong gradient, a missed step or a different batch gives
    ≥ 0.1), and (2) no element may move differently by more than a tenth of one Adam step (0.1·lr; measured up to
    0.0125·lr under ZeRO-3, where a fixed 1e-5 bound failed at 1.25e-5).
    """
    keys = _common(run, reference)
    delta = torch.cat([(run[k].float() - reference[k].float()).flatten() for k in keys])
    update = torch.cat([(reference[k].float() - init[k].float()).flatten() for k in keys if k in init])
    assert update.norm() > 1e-2, "the reference run did not train, so the comparison means nothing"
    relative = (delta.norm() / update.norm()).item()
    worst = delta.abs().max().item()
    print(f"same training: relative update difference {relative:.2e}, max element difference {worst:.2e}")
    assert relative <= 1e-3, f"the updates differ: relative difference {relative:.2e} > 1e-3 (max element {worst:.2e})"
    assert worst <= 0.1 * LEARNING_RATE, f"an element differs by {worst:.2e} > 0.1·lr = {0.1 * LEARNING_RATE:.0e}"


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """1 process, batch 8, in-process (the same CLI entry point)."""
    out_dir = tmp_path_factory.mktemp("single") / "run"
    argv = [
        "train",
        "--config",
        RECIPE,
        "--output_dir",
        str(out_dir),
        "--per_device_train_batch_size",
        "8",
        *TRAIN_FLAGS,
    ]
    assert main(argv) == 0
    return result(out_dir) | {"init": load_file(str(Path(tiny[2]) / "model.safetensors"))}


@pytest.fixture(scope="module")
def ddp(tiny, tmp_path_factory):
    return launch("ds_configs/cpu_2proc_ddp.yaml", tmp_path_factory.mktemp("ddp") / "run", port=29521)


def test_two_ddp_processes_equal_one_process_with_the_same_global_batch(single, ddp):
    assert len(single["losses"]) == len(ddp["losses"]) == STEPS
    torch.testing.assert_close(ddp["losses"], single["losses"], atol=1e-5, rtol=0)
    moved = max_weight_diff(single["weights"], single["init"])
    assert moved > 1e-3  # the runs trained, so the comparison below means something
    assert_same_training(ddp["weights"], single["weights"], single["init"])


def test_deepspeed_zero2_on_two_cpu_processes_matches_ddp(single, ddp, tmp_path):
    # DeepSpeed JIT-compiles a CPU comm op on first use (~30 s), cached in $TORCH_EXTENSIONS_DIR (.ci/run sets it).
    zero2 = launch("ds_configs/cpu_2proc_zero2.yaml", tmp_path / "run", port=29522, timeout=600)
    assert len(zero2["losses"]) == STEPS
    torch.testing.assert_close(zero2["losses"], ddp["losses"], atol=1e-5, rtol=0)
    assert_same_training(zero2["weights"], ddp["weights"], single["init"])


def test_deepspeed_zero3_on_two_cpu_processes_matches_ddp_and_shares_the_pass_cache(single, ddp, tmp_path):
    """ZeRO-3 partitions the weights at load time: the pass runs through the engine (LockstepModel, unequal shards:
    process 1 has none) in a fresh cache, and must land in the 1-process entry, with the same values."""
    from datasets import load_from_disk

    cache = tmp_path / "cache"
    zero3 = launch(
        "ds_configs/cpu_2proc_zero3.yaml", tmp_path / "run", port=29523, timeout=600,
        extra=("--token_reward_cache_dir", str(cache)),
    )
    assert len(zero3["losses"]) == STEPS
    torch.testing.assert_close(zero3["losses"], ddp["losses"], atol=1e-5, rtol=0)
    assert_same_training(zero3["weights"], ddp["weights"], single["init"])
    entries = sorted(p.name for p in (cache / "token_rewards").iterdir() if p.name.startswith("pass-"))
    assert entries, "the ZeRO-3 run wrote no token-reward entry"
    for entry in entries:  # the train split (32 rows) and the recipe's eval split
        single_entry = Path(os.environ["TREG_CACHE_DIR"]) / "token_rewards" / entry
        assert single_entry.is_dir(), f"ZeRO-3 wrote {entry}, which the 1-process run did not: the keys differ"
        a, b = load_from_disk(str(cache / "token_rewards" / entry)), load_from_disk(str(single_entry))
        assert a.column_names == b.column_names and len(a) == len(b)
        for col in a.column_names:
            assert a[col] == b[col], (entry, col)


@pytest.fixture(scope="module")
def single_padded(tiny, tmp_path_factory):
    """1 process, batch 8, pairs not packed (``--pack_pairs false``: padded training forward and unpacked token-reward
    pass), in a cache of its own so its pass really runs unpacked."""
    root = tmp_path_factory.mktemp("single-padded")
    argv = ["train", "--config", RECIPE, "--output_dir", str(root / "run"), "--per_device_train_batch_size", "8",
            *TRAIN_FLAGS, "--pack_pairs", "false", "--token_reward_cache_dir", str(root / "cache")]
    assert main(argv) == 0
    return result(root / "run") | {"cache": root / "cache",
                                   "init": load_file(str(Path(tiny[2]) / "model.safetensors"))}


@pytest.mark.parametrize("zero", [2, 3])
def test_packed_pairs_under_deepspeed_match_the_padded_single_process(single_padded, tmp_path, zero):
    """Pair packing (the default) on 2 CPU processes under ZeRO-2/3: the training forward through the engine and the
    token-reward pass (under ZeRO-3 through the partitioned engine in lockstep) give the losses, the weights and the
    cache values (to float rounding; in an entry of their own) of the padded, unpacked 1-process run."""
    import numpy as np
    from datasets import load_from_disk

    cache = tmp_path / "cache"
    run = launch(f"ds_configs/cpu_2proc_zero{zero}.yaml", tmp_path / "run", port=29526 + zero, timeout=600,
                 extra=("--token_reward_cache_dir", str(cache)))
    assert len(run["losses"]) == STEPS
    torch.testing.assert_close(run["losses"], single_padded["losses"], atol=1e-5, rtol=0)
    assert_same_training(run["weights"], single_padded["weights"], single_padded["init"])
    def entries(root):
        return sorted((p for p in (root / "token_rewards").iterdir() if p.name.startswith("pass-")),
                      key=lambda p: p.stat().st_mtime)

    packed, padded = entries(cache), entries(single_padded["cache"])
    assert packed and len(packed) == len(padded), (packed, padded)
    for a_dir, b_dir in zip(packed, padded):
        # an entry holds one layout's values (they agree to rounding only), so the packed run keys its own
        assert a_dir.name != b_dir.name
        a, b = load_from_disk(str(a_dir)), load_from_disk(str(b_dir))
        assert a.column_names == b.column_names and len(a) == len(b)
        for col in a.column_names:
            for x, y in zip(a[col], b[col]):
                np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=f"{a_dir.name} {col}")


def test_rl_with_critic_rewards_on_two_ddp_processes(tiny, tmp_path):  # tiny: built once, before the processes
    """`treg rl` (GRPO + rule-critic dense rewards) on 2 processes: it finishes, and the critic counters printed by the
    main process are summed over both processes (2 steps × 2 processes × 32 completions = 128 samples)."""
    out_dir = tmp_path / "rl"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "ds_configs/cpu_2proc_ddp.yaml"), "--main_process_port", "29524",
        "-m", "treg", "rl", "--config", str(ROOT / "recipes/tiny/rl-relc.yaml"),
        "--output_dir", str(out_dir), "--max_steps", "2", "--disable_tqdm", "true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    log = f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-8000:]}"
    assert f"saved to {out_dir}" in out.stdout and (out_dir / "model.safetensors").is_file(), log
    if out.returncode != 0:
        assert any(s in out.stderr for s in SIGNAL_DEATH), f"finished, then failed otherwise\n{log}"
    critic_lines = [line for line in out.stdout.splitlines() if line.startswith("critic: ")]
    assert len(critic_lines) == 1, log  # printed once, by the main process
    assert "samples 128" in critic_lines[0] and "failures 0" in critic_lines[0], critic_lines


def test_eval_hooks_under_zero3_on_two_cpu_processes(tiny, tmp_path):
    """Under ZeRO-3 the main process cannot run the partitioned policy alone (it waited forever before): every process
    gathers the weights, the main one evaluates a whole copy, and the run finishes with the hook's metrics logged."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_eval_e2e import write_data_root

    data = write_data_root(str(tmp_path / "data"))
    out_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "ds_configs/cpu_2proc_zero3.yaml"), "--main_process_port", "29525",
        "-m", "treg", "train", "--config", str(ROOT / "recipes/tiny/treg-dpo-eval.yaml"),
        "--output_dir", str(out_dir), "--max_steps", "2", "--eval_hook_max_instances", "2",
        "--eval_hook_max_new_tokens", "8", "--disable_tqdm", "true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", TREG_EVAL_DATA=data)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    log = f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-8000:]}"
    assert f"saved to {out_dir}" in out.stdout, log
    if out.returncode != 0:
        assert any(s in out.stderr for s in SIGNAL_DEATH), f"finished, then failed otherwise\n{log}"
    assert "eval hooks at step 2" in out.stderr, log
    for bench in ("alpaca_eval", "arena_hard"):
        results = json.loads((out_dir / "eval_hooks" / bench / "step-2" / "results.json").read_text())
        assert results, bench
