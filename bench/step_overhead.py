"""Per-step cost of T-REG against plain DPO (same trainer) and TRL's DPOTrainer with a live reference model.

What is compared, per model size, on the same initial weights, the same preference pairs, batch size, max_length,
β and learning rate:

    treg     TRegTrainer, treg_alpha=0.5, base_loss="dpo"   (token rewards + per-token ref log-probs precomputed)
    dpo      TRegTrainer, treg_alpha=0.0                     (per-token ref log-probs precomputed, no regularizer)
    trl-dpo  trl.DPOTrainer, loss_type sigmoid, precompute_ref_log_probs=False, ref_model = a copy of the policy

How:

* This process imports no ML library; it only starts child processes (this script re-invoked with the hidden
  ``--child`` flag) and reports. On Linux a child started by a large parent inherits the parent's peak RSS in
  ``ru_maxrss``; a small parent keeps every child's peak its own.
* Step time, one ``time`` child per repeat: it builds the three trainers (T-REG's token-reward pass runs here, or
  loads the treg cache, and is not timed), then runs the three ``trainer.train()`` loops in threads that take turns
  one optimizer step at a time (treg, dpo, trl-dpo, treg, dpo, trl-dpo, ...), so machine drift hits every variant
  alike. A step is the wall time from a trainer getting its turn to its ``on_step_end`` callback: collating the
  batch, forward(s), backward, optimizer, metric logging. The first ``warmup`` steps of each are dropped; the
  median of the rest, pooled over repeats, is reported.
* Peak memory, one child per variant, after the ``time`` child filled the token-reward cache: it builds the same
  model and data (deterministic) and the variant's trainer, which only loads the cache (a child that had to run the
  pass itself is flagged), and trains two steps (the second is the first with gradients, Adam state and
  activations all alive). Its peak RSS comes from ``os.wait4`` (``ru_maxrss``, KiB on Linux) and is also shown
  above its RSS right after its imports. These children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed
  tensors go back to the OS and the peak is that of live memory, repeatable to the MiB (untimed, so it costs
  nothing in the step times). With CUDA, ``torch.cuda.max_memory_allocated`` instead. TRL's peak
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
import threading
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
MEMORY_STEPS = 2
# A fixed glibc mmap threshold in the memory children: every large tensor is mmap'ed and returned to the OS when
# freed, so peak RSS tracks the peak of live tensors instead of varying by ~100 MiB with heap fragmentation.
MEMORY_MMAP_THRESHOLD = "131072"
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
    "tiny": ModelSpec(None, max_length=128, digits=None, batches_of_data=4, steps=40, warmup=3, repeats=1),
    # ~19.5M parameters, randomly initialised; prompts and responses of 56-64 digits: ~120-135 tokens per sequence
    "20m": ModelSpec(
        dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1408),
        max_length=256, digits=(56, 64), batches_of_data=1, steps=6, warmup=1, repeats=1,
    ),
}


# ------------------------------------------------------------------------------- children: model, data, trainers
def build_model(name: str):
    """(model, tokenizer), deterministic: every child gets the same weights, hence the same token-reward cache key."""
    from treg.synthetic import TinyModelRecipe, load_tiny_model, new_tiny_model

    model, tokenizer, _ = load_tiny_model(show_progress=False)
    recipe = MODELS[name].recipe
    if recipe is not None:
        model = new_tiny_model(len(tokenizer), TinyModelRecipe(**recipe), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
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


def build_trainer(variant: str, name: str, model, tokenizer, dataset, args, max_steps: int, output_dir: str):
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
        max_steps=max_steps,
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
    from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE  # the tiny model's x⁺/x⁻ wording

    config = TRegConfig(treg_alpha=alpha, base_loss="dpo", contrastive_positive_template=POSITIVE_TEMPLATE,
                        contrastive_negative_template=NEGATIVE_TEMPLATE, **kwargs)
    return TRegTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)


# ------------------------------------------------------------------------------- children: step-level interleaving
class RoundRobin:
    """Trainers training in their own threads take turns, one optimizer step per turn, in a fixed order."""

    def __init__(self, order):
        self.order, self.turn, self.finished = list(order), order[0], set()
        self.cond = threading.Condition()

    def wait_turn(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def hand_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.finished.add(name)
            if self.turn == name:
                i = self.order.index(name)
                later = [self.order[(i + k) % len(self.order)] for k in range(1, len(self.order) + 1)]
                self.turn = next((n for n in later if n not in self.finished), None)
            self.cond.notify_all()


def turn_timer(name: str, rr: RoundRobin):
    """A TrainerCallback that takes its turn at train begin and after every step, timing each step from the turn."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class TurnTimer(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            rr.wait_turn(name)
            self.start = now()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(now() - self.start)
            rr.hand_on(name)
            rr.wait_turn(name)
            self.start = now()

    return TurnTimer()


def interleaved_train(trainers: dict) -> dict[str, list[float]]:
    """Run every ``trainer.train()`` in its own thread, one step at a time in turn; returns step times per name."""
    rr = RoundRobin(list(trainers))
    timers, errors = {}, {}

    def train(name, trainer):
        try:
            trainer.train()
        except Exception as e:  # re-raised in the main thread
            errors[name] = e
        finally:
            rr.hand_on(name, finished=True)

    threads = []
    for name, trainer in trainers.items():
        timers[name] = turn_timer(name, rr)
        trainer.add_callback(timers[name])
        threads.append(threading.Thread(target=train, args=(name, trainer), name=f"train-{name}"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, error = next(iter(errors.items()))
        raise RuntimeError(f"{name} failed during training") from error
    return {name: timer.step_s for name, timer in timers.items()}


# --------------------------------------------------------------------------------------- children: entry points
def cache_entries() -> set[str]:
    from treg.files import default_cache_dir

    root = os.path.join(default_cache_dir(), "token_rewards")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def proc_status_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child_time(args) -> dict:
    """Build the three trainers on copies of one model, then time their steps interleaved."""
    import copy

    name = args.models[0]
    model, tokenizer = build_model(name)
    dataset = build_pairs(name, args.batch_size)
    trainers, init_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            start = time.perf_counter()
            trainers[variant] = build_trainer(variant, name, copy.deepcopy(model), tokenizer, dataset, args,
                                              args.warmup + args.steps, os.path.join(tmp, variant))
            init_s[variant] = time.perf_counter() - start
        step_s = interleaved_train(trainers)
    return {"params": sum(p.numel() for p in model.parameters()), "init_s": init_s, "step_s": step_s}


def child_memory(args) -> dict:
    """Two steps of one variant on a fresh process, for its peak memory."""
    import torch

    import treg.trainer  # noqa: F401  (trl and transformers are imported before the RSS baseline is taken)

    baseline_kib = proc_status_kib("VmRSS")
    name = args.models[0]
    model, tokenizer = build_model(name)
    dataset = build_pairs(name, args.batch_size)
    before = cache_entries()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.child, name, model, tokenizer, dataset, args, MEMORY_STEPS, tmp)
        ran_token_pass = cache_entries() != before
        trainer.train()
    cuda = torch.cuda.is_available()
    return {
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
    result = child_time(args) if args.child == "time" else child_memory(args)
    with open(os.environ[RESULT_FILE_ENV], "w") as f:
        json.dump(result, f)


# -------------------------------------------------------------------------------------------------- orchestration
def spawn_child(role: str, name: str, settings) -> dict:
    """Re-invoke this script as ``--child role``; returns its JSON result plus its peak RSS from os.wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path, log_path = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--models", name,
               "--batch-size", str(settings.batch_size), "--threads", str(settings.threads),
               "--steps", str(settings.steps), "--warmup", str(settings.warmup)]
        env = {**os.environ, RESULT_FILE_ENV: result_path}
        if role != "time":
            env.setdefault("MALLOC_MMAP_THRESHOLD_", MEMORY_MMAP_THRESHOLD)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not os.path.isfile(result_path):
            with open(log_path) as log:
                tail = log.read()[-4000:]
            raise RuntimeError(f"child {role} for {name} exited with {proc.returncode}:\n{tail}")
        with open(result_path) as f:
            result = json.load(f)
    result["peak_rss_kib"] = usage.ru_maxrss
    return result


def run_settings(name: str, args) -> argparse.Namespace:
    """The CLI's values, with each unset one taken from the model's defaults."""
    settings = argparse.Namespace(**vars(args))
    for key in ("steps", "warmup", "repeats"):
        if getattr(settings, key) is None:
            setattr(settings, key, getattr(MODELS[name], key))
    return settings


def measure(name: str, args) -> dict:
    settings = run_settings(name, args)
    timings = []
    for repeat in range(settings.repeats):
        print(f"[{name}] timing repeat {repeat + 1}/{settings.repeats}: {', '.join(VARIANTS)} take turns, "
              f"{settings.warmup} + {settings.steps} steps each ...", flush=True)
        timings.append(spawn_child("time", name, settings))
        medians = {v: 1e3 * statistics.median(s[settings.warmup:]) for v, s in timings[-1]["step_s"].items()}
        print(f"[{name}] {timings[0]['params'] / 1e6:.2f}M parameters; median step ms: "
              + ", ".join(f"{v} {m:.1f}" for v, m in medians.items()), flush=True)
    memory = {}
    for variant in VARIANTS:
        memory[variant] = result = spawn_child(variant, name, settings)
        flag = "  (ran the token-reward pass itself: peak includes it)" if result["ran_token_reward_pass"] else ""
        print(f"[{name}] memory {variant:8s} peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB{flag}", flush=True)
    return summarize(name, timings, memory, settings)


def peak_mib(result: dict) -> tuple[float, float]:
    """(peak, peak above the child's RSS right after its imports) in MiB; on a GPU CUDA's max allocated, twice."""
    if result["cuda_max_allocated_bytes"] is not None:
        peak = result["cuda_max_allocated_bytes"] / 2**20
        return peak, peak
    return result["peak_rss_kib"] / 1024, (result["peak_rss_kib"] - result["rss_after_imports_kib"]) / 1024


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(name: str, timings: list[dict], memory: dict, settings) -> dict:
    variants = {}
    for variant in VARIANTS:
        steps = [t for run in timings for t in run["step_s"][variant][settings.warmup:]]
        peak, above = peak_mib(memory[variant])
        variants[variant] = {
            "timed_steps": len(steps),
            "median_step_s": statistics.median(steps),
            "step_s_per_repeat": [run["step_s"][variant] for run in timings],
            "init_s_per_repeat": [run["init_s"][variant] for run in timings],
            "peak_mib": peak,
            "peak_above_imports_mib": above,
            "memory_run": memory[variant],
        }
    treg, dpo, trl = (variants[v] for v in VARIANTS)
    ratios = {
        "treg/dpo step": ratio(treg["median_step_s"], dpo["median_step_s"]),
        "treg/trl-dpo step": ratio(treg["median_step_s"], trl["median_step_s"]),
        "treg/trl-dpo peak": ratio(treg["peak_mib"], trl["peak_mib"]),
        "treg/trl-dpo peak above imports": ratio(treg["peak_above_imports_mib"], trl["peak_above_imports_mib"]),
    }
    run = {k: getattr(settings, k) for k in ("steps", "warmup", "repeats", "batch_size", "threads")}
    run.update(max_length=MODELS[name].max_length, memory_steps=MEMORY_STEPS)
    return {"model": name, "params": timings[0]["params"], "settings": run, "variants": variants, "ratios": ratios}


def fmt_ratio(value: float | None, target_key: str | None = None) -> str:
    if value is None:
        return "n/a"
    if target_key is None:
        return f"{value:.2f}x"
    target = TARGETS[target_key]
    return f"{value:.2f}x (target ≤{target:.2f}x {'PASS' if value <= target else 'MISS'})"


def print_report(summaries: list[dict]) -> None:
    on_gpu = summaries[0]["variants"]["treg"]["memory_run"]["device"] == "cuda"
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
          "      step = from a trainer's turn to its on_step_end (collate + forward(s) + backward + optimizer + "
          "metrics), variants interleaved step by step; init and the token-reward pass are not timed.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,20m", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: tiny 40, 20m 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: tiny 3, 20m 1)")
    p.add_argument("--repeats", type=int, default=None, help="timing runs, each a fresh process (default: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument("--json", default=None, help="write every raw number to this file")
    p.add_argument("--child", choices=("time",) + VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    for key in ("steps", "repeats", "batch_size", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    start = time.perf_counter()
    summaries = [measure(name, args) for name in args.models]
    print_report(summaries)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total {time.perf_counter() - start:.0f} s (orchestrator peak RSS {own_peak:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": TARGETS, "models": summaries}, f, indent=2)
        print(f"raw numbers written to {args.json}")


if __name__ == "__main__":
    main()
