"""Per-step cost of T-REG against plain DPO (same trainer) and TRL's DPOTrainer with a live reference model.

What is measured, per model size, on the same initial weights, the same preference pairs, batch size, max_length,
β and learning rate:

    treg     TRegTrainer, treg_alpha=0.5, base_loss="dpo"   (token rewards + per-token ref log-probs precomputed)
    dpo      TRegTrainer, treg_alpha=0.0                     (per-token ref log-probs precomputed, no regularizer)
    trl-dpo  trl.DPOTrainer, loss_type sigmoid, precompute_ref_log_probs=False, ref_model = a copy of the policy

How:

* The parent process first builds every trainer T-REG needs once, so the token-reward pass (r̂ and per-token
  reference log-probs) runs here and lands in the treg cache ($TREG_CACHE_DIR).
* Every measured run is a fresh child process (this script re-invoked with ``--child VARIANT``). The child rebuilds
  the same model and data, builds its trainer (T-REG only loads the cache; a child that had to run the pass is
  flagged) and trains ``warmup + steps`` optimizer steps. Runs are interleaved over repeats (treg, dpo, trl-dpo,
  treg, dpo, trl-dpo, ...) so that machine drift hits every variant alike.
* Step time: wall time between consecutive ``on_step_end`` callbacks, so a step is everything the trainer does for
  one optimizer step (collating the batch, forward(s), backward, optimizer, metric logging), never the init or the
  token-reward pass. The first ``warmup`` steps of every run are dropped; the median of the rest (pooled over
  repeats) is reported.
* Peak memory: the child's peak RSS from ``os.wait4`` (``ru_maxrss``, KiB on Linux), also shown above the child's
  RSS right after its imports. With CUDA, ``torch.cuda.max_memory_allocated`` in the child instead. TRL's peak
  includes its live reference model; T-REG's does not have one.

Targets (printed as PASS/MISS, never a failure): T-REG step ≤ 1.03x DPO and ≤ 1.00x TRL DPO.

    HF_HUB_OFFLINE=1 python bench/step_overhead.py [--models tiny,20m] [--steps N] [--warmup W]
        [--batch-size B] [--repeats R] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from treg.synthetic import TinyModelRecipe, corrupt, load_tiny_model, make_pairs, new_tiny_model, random_task  # noqa: E402
from treg.token_rewards.cache import default_cache_dir  # noqa: E402
from treg.trainer import TRegConfig, TRegTrainer  # noqa: E402

VARIANTS = ("treg", "dpo", "trl-dpo")
TARGETS = {"treg/dpo step": 1.03, "treg/trl-dpo step": 1.00}
BETA, LEARNING_RATE, TREG_ALPHA = 0.1, 5e-4, 0.5
RESULT_FILE_ENV = "STEP_OVERHEAD_RESULT"


@dataclass(frozen=True)
class ModelSpec:
    """A model size and the data it is measured on; steps/warmup/repeats are defaults that the CLI overrides."""

    recipe: TinyModelRecipe | None  # None: the cached tiny SFT model
    max_length: int
    digits: tuple[int, int] | None  # digits per task (None: make_pairs' toy lengths)
    batches_of_data: int  # distinct batches in the dataset (training cycles over them)
    steps: int
    warmup: int
    repeats: int


MODELS = {
    "tiny": ModelSpec(None, max_length=128, digits=None, batches_of_data=4, steps=20, warmup=3, repeats=3),
    # ~19.5M parameters, randomly initialised; prompt and responses of 56-64 digits: ~120-135 tokens per sequence
    "20m": ModelSpec(
        TinyModelRecipe(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1408),
        max_length=256, digits=(56, 64), batches_of_data=1, steps=3, warmup=1, repeats=1,
    ),
}


# ------------------------------------------------------------------------------------------------ model and data
def build_model(name: str):
    """(model, tokenizer): deterministic, so the parent and every child get the same weights (and cache keys)."""
    model, tokenizer, _ = load_tiny_model(show_progress=False)
    recipe = MODELS[name].recipe
    if recipe is not None:
        model = new_tiny_model(len(tokenizer), recipe, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def long_pairs(n: int, seed: int, digits: tuple[int, int]) -> Dataset:
    """Conversational pairs like ``make_pairs`` but with long digit strings; rejected has ~5% corrupted words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = random_task(rng, *digits)
        words, flags = corrupt(task.answer, rng, rng.randint(1, max(1, len(task.answer) // 20)))
        rows.append({
            "prompt": [{"role": "user", "content": task.prompt}],
            "chosen": [{"role": "assistant", "content": " ".join(task.answer)}],
            "rejected": [{"role": "assistant", "content": " ".join(words)}],
            "rejected_defects": flags,
        })
    return Dataset.from_list(rows)


def build_pairs(name: str, batch_size: int) -> Dataset:
    spec = MODELS[name]
    n = batch_size * spec.batches_of_data
    return make_pairs(n, seed=0) if spec.digits is None else long_pairs(n, seed=0, digits=spec.digits)


# ------------------------------------------------------------------------------------------------------ trainers
def common_args(name: str, args, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        beta=BETA,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=args.batch_size,
        max_length=MODELS[name].max_length,
        max_steps=args.warmup + args.steps,
        loss_type=["sigmoid"],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def build_trainer(variant: str, name: str, model, tokenizer, dataset, args, output_dir: str):
    kwargs = common_args(name, args, output_dir)
    if variant == "trl-dpo":
        config = DPOConfig(precompute_ref_log_probs=False, **kwargs)
        ref_model = copy.deepcopy(model)
        return DPOTrainer(model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer)
    alpha = TREG_ALPHA if variant == "treg" else 0.0
    config = TRegConfig(treg_alpha=alpha, base_loss="dpo", **kwargs)
    return TRegTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)


class StepTimer(TrainerCallback):
    """perf_counter() at the start of training and at every step end; step times are the differences."""

    def __init__(self):
        self.marks: list[float] = []

    def _mark(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def cache_entries() -> set[str]:
    root = os.path.join(default_cache_dir(), "token_rewards")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


# --------------------------------------------------------------------------------------------------------- child
def run_child(args) -> None:
    """One measured run of one variant; writes its numbers as JSON to $STEP_OVERHEAD_RESULT."""
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, tokenizer = build_model(args.child_model)
    dataset = build_pairs(args.child_model, args.batch_size)
    before = cache_entries()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(args.child, args.child_model, model, tokenizer, dataset, args, out)
        ran_token_pass = cache_entries() != before
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    result = {
        "step_s": timer.step_seconds(),
        "baseline_rss_kib": baseline_kib,
        "ran_token_reward_pass": ran_token_pass,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    with open(os.environ[RESULT_FILE_ENV], "w") as f:
        json.dump(result, f)


def spawn_child(variant: str, name: str, args) -> dict:
    """Re-invoke this script as ``--child variant``; its peak RSS comes from os.wait4's rusage."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path, log_path = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--child-model", name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, RESULT_FILE_ENV: result_path})
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not os.path.isfile(result_path):
            with open(log_path) as log:
                tail = log.read()[-4000:]
            raise RuntimeError(f"child {variant}/{name} exited with {proc.returncode}:\n{tail}")
        with open(result_path) as f:
            result = json.load(f)
    result["peak_rss_kib"] = usage.ru_maxrss
    return result


# -------------------------------------------------------------------------------------------------------- parent
def prepare(name: str, args) -> dict:
    """Count parameters and run (or load) the token-reward passes that the treg and dpo children will reuse."""
    info = {}
    for variant in ("treg", "dpo"):
        model, tokenizer = build_model(name)
        info["params"] = sum(p.numel() for p in model.parameters())
        dataset = build_pairs(name, args.batch_size)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            build_trainer(variant, name, model, tokenizer, dataset, args, out)
        info[f"{variant}_init_s"] = time.perf_counter() - start
    return info


def measure(name: str, args) -> dict:
    spec = MODELS[name]
    run_args = argparse.Namespace(**vars(args))
    for key in ("steps", "warmup", "repeats"):
        if getattr(run_args, key) is None:
            setattr(run_args, key, getattr(spec, key))
    info = prepare(name, run_args)
    print(f"[{name}] {info['params'] / 1e6:.2f}M parameters; trainer init with token-reward pass/cache: "
          f"treg {info['treg_init_s']:.1f} s, dpo {info['dpo_init_s']:.1f} s", flush=True)
    runs = {v: [] for v in VARIANTS}
    for repeat in range(run_args.repeats):
        for variant in VARIANTS:
            result = spawn_child(variant, name, run_args)
            runs[variant].append(result)
            times = result["step_s"][run_args.warmup:]
            print(f"[{name}] repeat {repeat + 1}/{run_args.repeats} {variant:8s} median step "
                  f"{1e3 * statistics.median(times):8.1f} ms, peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB"
                  + ("  (ran the token-reward pass itself!)" if result["ran_token_reward_pass"] else ""), flush=True)
    return summarize(name, info, runs, run_args)


def peak_mib(result: dict) -> tuple[float, float]:
    """(peak, peak above the child's post-import RSS) in MiB; CUDA's max allocated when a GPU is in use."""
    if result["cuda_max_allocated_bytes"] is not None:
        peak = result["cuda_max_allocated_bytes"] / 2**20
        return peak, peak
    return result["peak_rss_kib"] / 1024, (result["peak_rss_kib"] - result["baseline_rss_kib"]) / 1024


def summarize(name: str, info: dict, runs: dict, args) -> dict:
    variants = {}
    for variant, results in runs.items():
        steps = [t for r in results for t in r["step_s"][args.warmup:]]
        peaks = [peak_mib(r) for r in results]
        variants[variant] = {
            "median_step_s": statistics.median(steps),
            "peak_mib": statistics.median(p for p, _ in peaks),
            "peak_above_imports_mib": statistics.median(d for _, d in peaks),
            "runs": results,
        }
    treg, dpo, trl = (variants[v] for v in VARIANTS)
    ratios = {
        "treg/dpo step": treg["median_step_s"] / dpo["median_step_s"],
        "treg/trl-dpo step": treg["median_step_s"] / trl["median_step_s"],
        "treg/trl-dpo peak": treg["peak_mib"] / trl["peak_mib"],
        "treg/trl-dpo peak above imports": treg["peak_above_imports_mib"] / trl["peak_above_imports_mib"],
    }
    settings = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "batch_size": args.batch_size,
                "max_length": MODELS[name].max_length, "threads": args.threads}
    return {"model": name, **info, "settings": settings, "variants": variants, "ratios": ratios}


def verdict(ratio: float, key: str) -> str:
    target = TARGETS[key]
    return f"{ratio:.2f}x (target ≤{target:.2f}x {'PASS' if ratio <= target else 'MISS'})"


def print_report(summaries: list[dict]) -> None:
    memory = "CUDA max allocated" if torch.cuda.is_available() else "peak RSS"
    print()
    print(f"{'model':6s} {'params':>7s}  {'variant':8s} {'steps':>5s} {'step ms (median)':>17s} "
          f"{memory + ' MiB':>16s} {'above imports':>14s}")
    for s in summaries:
        for variant, v in s["variants"].items():
            n = sum(len(r["step_s"]) - s["settings"]["warmup"] for r in v["runs"])
            print(f"{s['model']:6s} {s['params'] / 1e6:6.2f}M  {variant:8s} {n:5d} {1e3 * v['median_step_s']:17.1f} "
                  f"{v['peak_mib']:16.0f} {v['peak_above_imports_mib']:14.0f}")
    print()
    for s in summaries:
        r = s["ratios"]
        print(f"ratios: {s['model']:5s} T-REG/DPO step {verdict(r['treg/dpo step'], 'treg/dpo step')}  "
              f"T-REG/TRL-DPO step {verdict(r['treg/trl-dpo step'], 'treg/trl-dpo step')}  "
              f"T-REG/TRL-DPO {memory} {r['treg/trl-dpo peak']:.2f}x "
              f"(above imports {r['treg/trl-dpo peak above imports']:.2f}x)")
    print(f"\nnote: TRL-DPO's {memory} includes its live reference model; T-REG's and DPO's exclude it (per-token "
          "reference log-probs and token rewards were precomputed and loaded from the treg cache). Step = "
          "on_step_end to on_step_end (collate + forward(s) + backward + optimizer + metrics).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,20m", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per model, tiny 20, 20m 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: tiny 3, 20m 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved runs per variant (default: tiny 3, 20m 1)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--json", default=None, help="write every raw number here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-model", choices=list(MODELS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    if args.child:
        run_child(args)
        return
    start = time.perf_counter()
    summaries = [measure(name, args) for name in args.models]
    print_report(summaries)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": TARGETS, "models": summaries}, f, indent=2)
        print(f"raw numbers written to {args.json}")


if __name__ == "__main__":
    main()
