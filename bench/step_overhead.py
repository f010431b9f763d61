"""Per-step cost of T-REG against plain DPO (same trainer) and TRL's DPOTrainer with a live reference model.

What is measured, per model size, on the same initial weights, the same preference pairs, batch size, max_length,
β and learning rate:

    treg     TRegTrainer, treg_alpha=0.5, base_loss="dpo"   (token rewards + per-token ref log-probs precomputed)
    dpo      TRegTrainer, treg_alpha=0.0                     (per-token ref log-probs precomputed, no regularizer)
    trl-dpo  trl.DPOTrainer, loss_type sigmoid, precompute_ref_log_probs=False, ref_model = a copy of the policy

How:

* This process imports no ML library and only orchestrates. All work happens in child processes (this script
  re-invoked with the hidden ``--child`` flag), so that each child's peak RSS is its own: on Linux a child started by
  a large parent inherits the parent's peak RSS in ``ru_maxrss``.
* A ``prepare`` child builds every TRegTrainer once, so the token-reward pass (r̂ and per-token reference log-probs)
  runs there and lands in the treg cache ($TREG_CACHE_DIR). Measured children then only load the cache (a child
  that had to run the pass itself is flagged).
* Each measured run is one child: it rebuilds the same model and data (deterministic), builds its trainer and trains
  ``warmup + steps`` optimizer steps. Runs are interleaved over repeats (treg, dpo, trl-dpo, treg, dpo, trl-dpo, ...)
  so that machine drift hits every variant alike.
* Step time: wall time between consecutive ``on_step_end`` callbacks, so a step is everything the trainer does for
  one optimizer step (collating the batch, forward(s), backward, optimizer, metric logging) and never the init or
  the token-reward pass. The first ``warmup`` steps of every run are dropped; the median of the rest, pooled over
  repeats, is reported.
* Peak memory: the child's peak RSS from ``os.wait4`` (``ru_maxrss``, KiB on Linux), also shown above the child's
  RSS right after its imports. With CUDA, ``torch.cuda.max_memory_allocated`` in the child instead. TRL's peak
  includes its live reference model; T-REG has none.

Targets (printed as PASS/MISS, never a failure): T-REG step ≤ 1.03x DPO and ≤ 1.00x TRL DPO.

    python bench/step_overhead.py [--models tiny,20m] [--steps N] [--warmup W] [--batch-size B] [--repeats R]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
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
# Idle OpenMP threads sleep instead of spinning: on a shared CPU the default spin-wait makes steps up to 100x slower
# whenever another process competes for the cores. Same setting for every variant; export it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VARIANTS = ("treg", "dpo", "trl-dpo")
TARGETS = {"treg/dpo step": 1.03, "treg/trl-dpo step": 1.00}
BETA, LEARNING_RATE, TREG_ALPHA = 0.1, 5e-4, 0.5
RESULT_FILE_ENV = "STEP_OVERHEAD_RESULT"


@dataclass(frozen=True)
class ModelSpec:
    """A model size and the data it is measured on; steps/warmup/repeats are defaults that the CLI overrides."""

    recipe: dict | None  # TinyModelRecipe fields of a random model; None: the cached tiny SFT model
    max_length: int
    digits: tuple[int, int] | None  # digits per task (None: make_pairs' toy lengths)
    batches_of_data: int  # distinct batches in the dataset (training cycles over them)
    steps: int
    warmup: int
    repeats: int


MODELS = {
    "tiny": ModelSpec(None, max_length=128, digits=None, batches_of_data=4, steps=30, warmup=3, repeats=2),
    # ~19.5M parameters, randomly initialised; prompts and responses of 56-64 digits: ~120-135 tokens per sequence
    "20m": ModelSpec(
        dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1408),
        max_length=256, digits=(56, 64), batches_of_data=1, steps=3, warmup=1, repeats=1,
    ),
}


# ---------------------------------------------------------------------------------- child side: model and data
def build_model(name: str):
    """(model, tokenizer), deterministic: the prepare child and every measured child get the same weights (and so
    the same token-reward cache key)."""
    from treg.synthetic import TinyModelRecipe, load_tiny_model, new_tiny_model

    model, tokenizer, _ = load_tiny_model(show_progress=False)
    recipe = MODELS[name].recipe
    if recipe is not None:
        model = new_tiny_model(len(tokenizer), TinyModelRecipe(**recipe), pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def long_pairs(n: int, seed: int, digits: tuple[int, int]):
    """Conversational pairs like ``make_pairs`` but with long digit strings; rejected has ~5% corrupted words."""
    import random

    from datasets import Dataset

    from treg.synthetic import corrupt, random_task

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


def build_pairs(name: str, batch_size: int):
    from treg.synthetic import make_pairs

    spec = MODELS[name]
    n = batch_size * spec.batches_of_data
    return make_pairs(n, seed=0) if spec.digits is None else long_pairs(n, seed=0, digits=spec.digits)


# -------------------------------------------------------------------------------------- child side: trainers
def build_trainer(variant: str, name: str, model, tokenizer, dataset, args, output_dir: str):
    import copy

    import torch
    from trl import DPOConfig, DPOTrainer

    from treg.trainer import TRegConfig, TRegTrainer

    kwargs = dict(
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
    if variant == "trl-dpo":
        config = DPOConfig(precompute_ref_log_probs=False, **kwargs)
        ref_model = copy.deepcopy(model)
        return DPOTrainer(model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer)
    alpha = TREG_ALPHA if variant == "treg" else 0.0
    config = TRegConfig(treg_alpha=alpha, base_loss="dpo", **kwargs)
    return TRegTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)


def step_timer():
    """A TrainerCallback recording perf_counter() at train begin and at every step end."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
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

    return StepTimer()


def cache_entries() -> set[str]:
    from treg.token_rewards.cache import default_cache_dir

    root = os.path.join(default_cache_dir(), "token_rewards")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def proc_status_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# ------------------------------------------------------------------------------------------- child entry points
def child_prepare(args) -> dict:
    """Parameter counts, and the token-reward passes (run or loaded) that the treg and dpo children will reuse."""
    out = {}
    for name in args.models:
        info, settings = {}, run_settings(name, args)
        for variant in ("treg", "dpo"):
            model, tokenizer = build_model(name)
            info["params"] = sum(p.numel() for p in model.parameters())
            dataset = build_pairs(name, args.batch_size)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                build_trainer(variant, name, model, tokenizer, dataset, settings, tmp)
            info[f"{variant}_init_s"] = time.perf_counter() - start
        out[name] = info
    return out


def child_measure(args) -> dict:
    """One measured run of one variant."""
    import torch

    import treg.trainer  # noqa: F401  (imports trl and transformers before the RSS baseline is taken)

    baseline_kib = proc_status_kib("VmRSS")
    name = args.models[0]
    model, tokenizer = build_model(name)
    dataset = build_pairs(name, args.batch_size)
    before = cache_entries()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.child, name, model, tokenizer, dataset, args, tmp)
        ran_token_pass = cache_entries() != before
        timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
    cuda = torch.cuda.is_available()
    return {
        "step_s": timer.step_seconds(),
        "rss_after_imports_kib": baseline_kib,
        "vmhwm_kib": proc_status_kib("VmHWM"),
        "ran_token_reward_pass": ran_token_pass,
        "device": "cuda" if cuda else "cpu",
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def run_child(args) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    result = child_prepare(args) if args.child == "prepare" else child_measure(args)
    with open(os.environ[RESULT_FILE_ENV], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------- orchestration
def spawn_child(role: str, models: list[str], args) -> dict:
    """Re-invoke this script as ``--child role``; returns its JSON result plus its peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path, log_path = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--models", ",".join(models),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        if role != "prepare":
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, RESULT_FILE_ENV: result_path})
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not os.path.isfile(result_path):
            with open(log_path) as log:
                tail = log.read()[-4000:]
            raise RuntimeError(f"child {role} {models} exited with {proc.returncode}:\n{tail}")
        with open(result_path) as f:
            result = json.load(f)
    if role != "prepare":
        result["peak_rss_kib"] = usage.ru_maxrss
    return result


def run_settings(name: str, args) -> argparse.Namespace:
    """The CLI's values, with each unset one taken from the model's defaults."""
    settings = argparse.Namespace(**vars(args))
    for key in ("steps", "warmup", "repeats"):
        if getattr(settings, key) is None:
            setattr(settings, key, getattr(MODELS[name], key))
    return settings


def measure(name: str, info: dict, args) -> dict:
    settings = run_settings(name, args)
    runs = {v: [] for v in VARIANTS}
    for repeat in range(settings.repeats):
        for variant in VARIANTS:
            result = spawn_child(variant, [name], settings)
            runs[variant].append(result)
            times = result["step_s"][settings.warmup:]
            flag = "  (ran the token-reward pass itself: peak includes it)" if result["ran_token_reward_pass"] else ""
            print(f"[{name}] repeat {repeat + 1}/{settings.repeats} {variant:8s} median step "
                  f"{1e3 * statistics.median(times):8.1f} ms, peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB{flag}",
                  flush=True)
    return summarize(name, info, runs, settings)


def peak_mib(result: dict) -> tuple[float, float]:
    """(peak, peak above the child's RSS right after its imports) in MiB; on a GPU CUDA's max allocated, twice."""
    if result["cuda_max_allocated_bytes"] is not None:
        peak = result["cuda_max_allocated_bytes"] / 2**20
        return peak, peak
    return result["peak_rss_kib"] / 1024, (result["peak_rss_kib"] - result["rss_after_imports_kib"]) / 1024


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(name: str, info: dict, runs: dict, settings) -> dict:
    variants = {}
    for variant, results in runs.items():
        steps = [t for r in results for t in r["step_s"][settings.warmup:]]
        peaks = [peak_mib(r) for r in results]
        variants[variant] = {
            "timed_steps": len(steps),
            "median_step_s": statistics.median(steps),
            "peak_mib": statistics.median(p for p, _ in peaks),
            "peak_above_imports_mib": statistics.median(d for _, d in peaks),
            "runs": results,
        }
    treg, dpo, trl = (variants[v] for v in VARIANTS)
    ratios = {
        "treg/dpo step": ratio(treg["median_step_s"], dpo["median_step_s"]),
        "treg/trl-dpo step": ratio(treg["median_step_s"], trl["median_step_s"]),
        "treg/trl-dpo peak": ratio(treg["peak_mib"], trl["peak_mib"]),
        "treg/trl-dpo peak above imports": ratio(treg["peak_above_imports_mib"], trl["peak_above_imports_mib"]),
    }
    run = {k: getattr(settings, k) for k in ("steps", "warmup", "repeats", "batch_size", "threads")}
    run["max_length"] = MODELS[name].max_length
    return {"model": name, **info, "settings": run, "variants": variants, "ratios": ratios}


def fmt_ratio(value: float | None, target_key: str | None = None) -> str:
    if value is None:
        return "n/a"
    if target_key is None:
        return f"{value:.2f}x"
    target = TARGETS[target_key]
    return f"{value:.2f}x (target ≤{target:.2f}x {'PASS' if value <= target else 'MISS'})"


def print_report(summaries: list[dict]) -> None:
    on_gpu = summaries[0]["variants"]["treg"]["runs"][0]["device"] == "cuda"
    memory = "CUDA max alloc" if on_gpu else "peak RSS"
    print(f"\n{'model':6s} {'params':>7s}  {'variant':8s} {'steps':>5s} {'step ms (median)':>17s} "
          f"{memory + ' MiB':>15s} {'above imports':>14s}")
    for s in summaries:
        for variant, v in s["variants"].items():
            print(f"{s['model']:6s} {s['params'] / 1e6:6.2f}M  {variant:8s} {v['timed_steps']:5d} "
                  f"{1e3 * v['median_step_s']:17.1f} {v['peak_mib']:15.0f} {v['peak_above_imports_mib']:14.0f}")
    print()
    for s in summaries:
        r = s["ratios"]
        print(f"ratios: {s['model']:5s} T-REG/DPO step {fmt_ratio(r['treg/dpo step'], 'treg/dpo step')}  "
              f"T-REG/TRL-DPO step {fmt_ratio(r['treg/trl-dpo step'], 'treg/trl-dpo step')}  "
              f"T-REG/TRL-DPO {memory} {fmt_ratio(r['treg/trl-dpo peak'])} "
              f"(above imports {fmt_ratio(r['treg/trl-dpo peak above imports'])})")
    print(f"\nnote: TRL-DPO's {memory} includes its live reference model; T-REG's and DPO's exclude it (per-token "
          "reference log-probs and token rewards are precomputed and loaded from the treg cache).\n"
          "      step = on_step_end to on_step_end (collate + forward(s) + backward + optimizer + metrics); "
          "init and the token-reward pass are not timed.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,20m", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default per model: tiny 30, 20m 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps per run (default: tiny 3, 20m 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved runs per variant (default: tiny 2, 20m 1)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument("--json", default=None, help="write every raw number to this file")
    p.add_argument("--child", choices=("prepare",) + VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    start = time.perf_counter()
    print(f"preparing {', '.join(args.models)}: models, data, token-reward caches ...", flush=True)
    prepared = spawn_child("prepare", args.models, args)
    for name, info in prepared.items():
        print(f"[{name}] {info['params'] / 1e6:.2f}M parameters; trainer init incl. token-reward pass or cache load: "
              f"treg {info['treg_init_s']:.1f} s, dpo {info['dpo_init_s']:.1f} s", flush=True)
    summaries = [measure(name, prepared[name], args) for name in args.models]
    print_report(summaries)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total {time.perf_counter() - start:.0f} s (orchestrator peak RSS {own_peak:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": TARGETS, "models": summaries}, f, indent=2)
        print(f"raw numbers written to {args.json}")


if __name__ == "__main__":
    main()
