"""Per-step cost and peak memory of T-REG against DPO in the same trainer and TRL's DPOTrainer, with and without a
live reference model, and pair packing against the padded layout.

What is compared, per model, on the same initial weights, the same preference pairs and batches, batch size,
max_length, β and learning rate:

    treg         TRegTrainer, treg_alpha=0.5, base_loss="dpo", default layout (pair packing where treg has it)
    treg-padded  the same with TRegConfig(pack_pairs=False): every row padded to the longest in the batch
    dpo          TRegTrainer, treg_alpha=0.0 (per-token reference log-probs precomputed, no regularizer)
    trl-dpo      trl.DPOTrainer, loss_type sigmoid, precompute_ref_log_probs=False, ref_model = a copy of the policy
    trl-dpo-pre  trl.DPOTrainer, precompute_ref_log_probs=True (the fair anchor: TRL's reference pass runs in its
                 constructor, before timing, as a user who cares about speed would have it)

A treg without the ``pack_pairs`` field (packing not built yet) runs both treg variants padded and says so
(``"packing": false`` in the JSON).

Models:

    tiny     the cached tiny SFT model, toy pairs, max_length 128
    20m      a random 19.5M Llama (treg:tiny's tokenizer) on long digit-string pairs, ~120-135 tokens per sequence
    hh       a random 18.6M Llama (hidden 256, 8 layers, the same model as bench/token_reward_pass.py --data hh)
             with SmolLM2's tokenizer (vocab 49,152, tied head) on HH-RLHF harmless-base pairs
             (../shared/data): real lengths, long prompts (median ~115 tokens with SmolLM2's chat template) and short
             answers (~25-35). Pairs whose prompt + longer answer exceed max_length are left out.
    hh-smoke a 2-layer 3.2M version of hh, max_length 128, for the test suite
    smollm2  SmolLM2-135M-Instruct (treg:smollm2) on hh's pairs (GPU mode)
    1b       a random ~1.07B Llama (Llama-3.2-1B's shape, SmolLM2's tokenizer) on hh's pairs (GPU mode)

hh, hh-smoke, smollm2 and 1b need SmolLM2's tokenizer (treg:smollm2) and the HH file; without them the model is
skipped with the reason (``"skipped"`` in the JSON), never an error.

How:

* This process imports no ML library; it only starts child processes (this script re-invoked with the hidden
  ``--child`` flag) and reports.
* Step time, one ``time`` child per repeat: it builds every trainer (T-REG's token-reward pass and TRL's reference
  precompute run here and are not timed), then runs the ``trainer.train()`` loops in threads that take turns one
  optimizer step at a time (treg, treg-padded, dpo, trl-dpo, trl-dpo-pre, treg, ...: ABAB), so machine drift hits
  every variant alike. A step is the time from a trainer getting its turn to its ``on_step_end`` callback
  (collate, forward(s), backward, optimizer, metrics), read on this process's CPU clock on CPU
  (``time.process_time``: the other trainers sleep while one has its turn, idle OpenMP threads sleep too, and
  time-slicing by other processes on a busy machine does not count) and on the wall clock after
  ``torch.cuda.synchronize`` on CUDA (``--clock`` overrides; the wall times are kept in the JSON either way). The
  first ``warmup`` steps of each are dropped; the median of the rest, pooled over repeats, is reported. Every
  variant's training loss is recorded at each step; treg and treg-padded see the same batches in the same order
  from the same weights, and "packed max loss diff" is the largest |loss_packed − loss_padded| over every training
  step, warm-up included (after step 1 the weights may differ by float noise).
* Peak memory, one fresh child per variant (after the ``time`` child filled the token-reward cache): it builds the
  variant's trainer (TRL's precompute, treg's cache load), then resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and trains two steps (the second is the first with gradients, Adam
  state and activations all alive); the peak is ``VmHWM`` after training minus the RSS right after the child's
  imports (python + torch + trl, the same in every child): weights, reference model (trl-dpo), data, gradients,
  Adam state and activations. The children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go
  back to the OS and RSS tracks live memory, repeatable to the MiB. Where clear_refs cannot be written, the child's
  whole-life peak (``ru_maxrss``) is used instead and flagged. With CUDA: ``torch.cuda.reset_peak_memory_stats``
  before training and ``torch.cuda.max_memory_allocated`` after.
* GPU mode (``--bf16``; ``bench/gpu_speed.sh``): bf16 mixed precision, SDPA attention, and the T-REG step's model
  FLOPs utilisation: MFU = useful FLOPs per step / (median step time × peak bf16 FLOP/s), with useful FLOPs
  6·N per token + 12·L·d per attended (query, key) position (PaLM, Chowdhery et al. 2022, appendix B), counting
  each pair's prompt once and no padding (the tokens a pair really needs), N = the matmul parameters (the input
  embedding excluded, a tied head counted once).

Targets (printed as PASS/MISS, never a failure): T-REG step ≤ 0.60x trl-dpo-pre, ≤ 1.03x DPO, ≤ 1.00x trl-dpo; peak
≤ 1.00x trl-dpo-pre.

    python bench/step_overhead.py [--models tiny,20m,hh] [--steps N] [--warmup W] [--batch-size B] [--repeats R]
        [--variants treg,dpo,...] [--max-length L] [--bf16] [--json out.json]
    python bench/step_overhead.py --models hh --json hh.json   # ~12 CPU-min; 25 min wall on a busy 2-core machine
    python bench/step_overhead.py --smoke --json out.json      # the test suite's size (hh-smoke, 1 step)
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# Idle OpenMP threads sleep instead of spinning: on a shared CPU the default spin-wait makes steps up to 100x slower
# whenever another process competes for the cores. Same setting for every variant; export it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VARIANTS = ("treg", "treg-padded", "dpo", "trl-dpo", "trl-dpo-pre")
TARGETS = {"treg/trl-dpo-pre step": 0.60, "treg/dpo step": 1.03, "treg/trl-dpo step": 1.00,
           "treg/trl-dpo-pre peak": 1.00}  # fmt: skip
BETA, LEARNING_RATE, TREG_ALPHA = 0.1, 5e-4, 0.5
MEMORY_STEPS = 2
# A fixed glibc mmap threshold in the memory children: every large tensor is mmap'ed and returned to the OS when
# freed, so peak RSS tracks the peak of live tensors instead of varying by ~100 MiB with heap fragmentation.
MEMORY_MMAP_THRESHOLD = "131072"
RESULT_FILE_ENV = "STEP_OVERHEAD_RESULT"
# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets), for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


@dataclass(frozen=True)
class ModelSpec:
    """A model and the data it is measured on; steps/warmup/repeats/max_length are defaults the CLI overrides."""

    shape: dict | None  # a random Llama's shape; None: the pretrained model of ``tokenizer``
    tokenizer: str  # "tiny" (treg:tiny's) or "smollm2"
    data: str  # "toy" (make_pairs), "digits" (long digit strings) or "hh" (HH-RLHF harmless-base)
    max_length: int
    batches_of_data: int  # distinct batches in the dataset (training cycles over them)
    steps: int
    warmup: int
    repeats: int
    digits: tuple[int, int] | None = None  # digits per task for data="digits"


def _llama(hidden, layers, heads, intermediate, kv_heads=None):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or heads, intermediate_size=intermediate)  # fmt: skip


MODELS = {
    "tiny": ModelSpec(None, "tiny", "toy", max_length=128, batches_of_data=4, steps=40, warmup=3, repeats=1),
    "20m": ModelSpec(_llama(512, 6, 8, 1408), "tiny", "digits", max_length=256, batches_of_data=1, steps=6,
                     warmup=1, repeats=1, digits=(56, 64)),
    "hh": ModelSpec(_llama(256, 8, 4, 640), "smollm2", "hh", max_length=512, batches_of_data=2, steps=4, warmup=1,
                    repeats=1),
    "hh-smoke": ModelSpec(_llama(64, 2, 2, 128), "smollm2", "hh", max_length=128, batches_of_data=1, steps=1,
                          warmup=0, repeats=1),
    "smollm2": ModelSpec(None, "smollm2", "hh", max_length=1024, batches_of_data=4, steps=20, warmup=3, repeats=1),
    "1b": ModelSpec(_llama(2048, 16, 32, 8192, kv_heads=8), "smollm2", "hh", max_length=1024, batches_of_data=4,
                    steps=20, warmup=3, repeats=1),
}  # fmt: skip


# ------------------------------------------------------------------------------- children: model, data, trainers
def unavailable(name: str) -> str | None:
    """Why ``name`` cannot be measured here (SmolLM2's tokenizer or the HH file missing), or None."""
    spec = MODELS[name]
    if spec.data == "hh":
        from treg.evaluation.data import DataNotFound, hh_rlhf_test

        try:
            hh_rlhf_test()
        except DataNotFound as e:
            return str(e)
    if spec.tokenizer == "smollm2":
        from treg.models import ModelSpecError, resolve_model_spec

        try:
            resolve_model_spec("treg:smollm2", show_progress=False)
        except ModelSpecError as e:
            return f"treg:smollm2 cannot be loaded: {str(e).splitlines()[0]}"
    return None


def random_llama(vocab: int, shape: dict, tokenizer, attn: str):
    """A randomly initialised Llama (seed 0: every child gets the same weights, hence the same cache keys)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                         attn_implementation=attn, **shape)  # fmt: skip
    return LlamaForCausalLM(config)


def build_model(name: str, attn: str = "sdpa"):
    """(model, tokenizer), deterministic, float32 (GPU mode trains in bf16 autocast, as TRL's ``bf16=True`` does)."""
    spec = MODELS[name]
    if spec.tokenizer == "tiny":
        from treg.synthetic import load_tiny_model

        model, tokenizer, _ = load_tiny_model(show_progress=False)
    elif spec.shape is None:
        import torch

        from treg.models import load_causal_lm

        return load_causal_lm("treg:smollm2", dtype=torch.float32, show_progress=False, attn_implementation=attn)
    else:
        from transformers import AutoTokenizer

        from treg.models import resolve_model_spec

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_spec("treg:smollm2", show_progress=False))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    if spec.shape is not None:
        model = random_llama(len(tokenizer), spec.shape, tokenizer, attn)
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


def hh_pairs(n: int, tokenizer, max_length: int):
    """The first ``n`` valid HH-RLHF harmless-base test pairs (file order) whose chat-rendered prompt plus longer
    answer fit ``max_length`` (4 tokens to spare for the answer's end-of-turn tokens)."""
    from treg.data import load_preference_dataset
    from treg.evaluation.data import hh_rlhf_test

    rows = load_preference_dataset(hh_rlhf_test(), drop_invalid=True)
    keep = []
    for i, row in enumerate(rows):
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        answer = max(len(tokenizer(row[s][0]["content"], add_special_tokens=False)["input_ids"])
                     for s in ("chosen", "rejected"))  # fmt: skip
        if prompt + answer + 4 <= max_length:
            keep.append(i)
        if len(keep) == n:
            break
    if len(keep) < n:
        raise RuntimeError(f"only {len(keep)} HH pairs fit max_length {max_length}; {n} needed")
    return rows.select(keep)


def build_pairs(name: str, batch_size: int, tokenizer, max_length: int):
    from treg.synthetic import make_pairs

    spec = MODELS[name]
    n = batch_size * spec.batches_of_data
    if spec.data == "hh":
        return hh_pairs(n, tokenizer, max_length)
    return make_pairs(n, seed=0) if spec.data == "toy" else long_pairs(n, seed=0, digits=spec.digits)


def packing_available() -> bool:
    from treg.trainer import TRegConfig

    return "pack_pairs" in TRegConfig.__dataclass_fields__


def build_trainer(variant: str, name: str, model, tokenizer, dataset, args, max_steps: int, output_dir: str):
    import copy

    import torch
    from trl import DPOConfig, DPOTrainer

    from treg.trainer import TRegConfig, TRegTrainer

    kwargs = dict(
        output_dir=output_dir, beta=BETA, learning_rate=LEARNING_RATE, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, max_steps=max_steps, loss_type=["sigmoid"], use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16, activation_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    if variant in ("trl-dpo", "trl-dpo-pre"):
        precompute = variant == "trl-dpo-pre"
        config = DPOConfig(precompute_ref_log_probs=precompute, **kwargs)
        ref_model = None if precompute else copy.deepcopy(model)
        return DPOTrainer(model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer)
    if MODELS[name].tokenizer == "tiny":  # the tiny model's x⁺/x⁻ wording; real tokenizers get treg's defaults
        from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE

        kwargs.update(contrastive_positive_template=POSITIVE_TEMPLATE, contrastive_negative_template=NEGATIVE_TEMPLATE)
    if variant == "treg-padded" and packing_available():
        kwargs["pack_pairs"] = False
    alpha = 0.0 if variant == "dpo" else TREG_ALPHA
    config = TRegConfig(treg_alpha=alpha, base_loss="dpo", **kwargs)
    return TRegTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)


def record_losses(trainer) -> list:
    """Wrap ``trainer.compute_loss`` so that every training loss is kept (detached; read after training)."""
    losses, original = [], trainer.compute_loss

    def compute_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = compute_loss
    return losses


def flops_per_pair(model, dataset, max_length: int) -> dict:
    """Useful training FLOPs of one pair, averaged over ``dataset`` (tokenized): each prompt once, no padding;
    6·N per token and 12·L·d per attended (query, key) position, causal (rejected attends prompt + itself)."""
    from treg.token_rewards import kept_completion_length

    config = model.config
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    n_matmul = params if tied else params - embed.numel()
    tokens = attended = 0
    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        P = len(p)
        for y in (c, r):
            n = kept_completion_length(P, len(y), max_length)
            tokens += n
            attended += P * n + n * (n + 1) // 2
        tokens += P
        attended += P * (P + 1) // 2
    pairs = len(dataset["prompt_ids"])
    flops = 6 * n_matmul * tokens + 12 * config.num_hidden_layers * config.hidden_size * attended
    return {"flops": flops / pairs, "tokens": tokens / pairs, "matmul_params": n_matmul}


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

    def now() -> tuple[float, float]:
        """(wall, this process's CPU time): while one trainer has its turn the others sleep on a condition and idle
        OpenMP threads sleep too (OMP_WAIT_POLICY=PASSIVE), so the CPU time is the step's own work."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    class TurnTimer(TrainerCallback):
        def __init__(self):
            self.step_s: dict[str, list[float]] = {"wall": [], "cpu": []}
            self.start = (0.0, 0.0)

        def on_train_begin(self, args, state, control, **kwargs):
            rr.wait_turn(name)
            self.start = now()

        def on_step_end(self, args, state, control, **kwargs):
            end = now()
            self.step_s["wall"].append(end[0] - self.start[0])
            self.step_s["cpu"].append(end[1] - self.start[1])
            rr.hand_on(name)
            rr.wait_turn(name)
            self.start = now()

    return TurnTimer()


def interleaved_train(trainers: dict) -> dict[str, dict[str, list[float]]]:
    """Run every ``trainer.train()`` in its own thread, one step at a time in turn; returns per name the step times,
    ``{"wall": [...], "cpu": [...]}``."""
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
def proc_status_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS (Linux ≥ 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_time(args) -> dict:
    """Build the trainers on copies of one model, then time their steps interleaved and keep their losses."""
    import copy

    import torch

    name = args.models[0]
    model, tokenizer = build_model(name, args.attn)
    dataset = build_pairs(name, args.batch_size, tokenizer, args.max_length)
    trainers, init_s, losses = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            start = time.perf_counter()
            trainers[variant] = build_trainer(variant, name, copy.deepcopy(model), tokenizer, dataset, args,
                                              args.warmup + args.steps, os.path.join(tmp, variant))
            init_s[variant] = time.perf_counter() - start
            losses[variant] = record_losses(trainers[variant])
        clocks = interleaved_train(trainers)
    clock = "cpu" if args.clock == "cpu" or (args.clock == "auto" and not torch.cuda.is_available()) else "wall"
    tokenized = trainers[args.variants[0]].train_dataset
    return {
        "params": sum(p.numel() for p in model.parameters()), "init_s": init_s, "clock": clock,
        "step_s": {v: c[clock] for v, c in clocks.items()}, "step_wall_s": {v: c["wall"] for v, c in clocks.items()},
        "losses": {v: [float(x) for x in ls] for v, ls in losses.items()}, "packing": packing_available(),
        "pair_flops": flops_per_pair(model, tokenized, args.max_length), "device_name": device_name(),
    }  # fmt: skip


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def child_memory(args) -> dict:
    """Two training steps of one variant in a fresh process; the peak is taken over training only."""
    import torch

    import treg.trainer  # noqa: F401  (trl and transformers are imported before the RSS baseline is taken)

    baseline_kib = proc_status_kib("VmRSS")
    name = args.models[0]
    model, tokenizer = build_model(name, args.attn)
    dataset = build_pairs(name, args.batch_size, tokenizer, args.max_length)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.child, name, model, tokenizer, dataset, args, MEMORY_STEPS, tmp)
        before_train_kib = proc_status_kib("VmRSS")
        reset = reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    return {
        "rss_after_imports_kib": baseline_kib, "rss_before_train_kib": before_train_kib,
        "vmhwm_kib": proc_status_kib("VmHWM"), "peak_reset": reset, "device": "cuda" if cuda else "cpu",
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }  # fmt: skip


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
               "--steps", str(settings.steps), "--warmup", str(settings.warmup), "--max-length",
               str(settings.max_length), "--variants", ",".join(settings.variants), "--attn", settings.attn,
               "--clock", settings.clock]
        cmd += ["--bf16"] if settings.bf16 else []
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
    for key in ("steps", "warmup", "repeats", "max_length"):
        if getattr(settings, key) is None:
            setattr(settings, key, getattr(MODELS[name], key))
    return settings


def measure(name: str, args) -> dict:
    settings = run_settings(name, args)
    timings = []
    for repeat in range(settings.repeats):
        print(f"[{name}] timing repeat {repeat + 1}/{settings.repeats}: {', '.join(settings.variants)} take turns, "
              f"{settings.warmup} + {settings.steps} steps each ...", flush=True)
        timings.append(spawn_child("time", name, settings))
        medians = {v: 1e3 * statistics.median(s[settings.warmup:]) for v, s in timings[-1]["step_s"].items()}
        print(f"[{name}] {timings[0]['params'] / 1e6:.2f}M parameters; median step ms ({timings[-1]['clock']}): "
              + ", ".join(f"{v} {m:.1f}" for v, m in medians.items()), flush=True)
    if not timings[0]["packing"]:
        print(f"[{name}] note: this treg has no pair packing (TRegConfig.pack_pairs); treg and treg-padded are both "
              "padded", flush=True)
    memory = {}
    for variant in [v for v in settings.variants if v in settings.memory_variants]:
        memory[variant] = result = spawn_child(variant, name, settings)
        print(f"[{name}] memory {variant:11s} training peak {peak_mib(result)[0]:.0f} MiB above imports", flush=True)
    return summarize(name, timings, memory, settings)


def peak_mib(result: dict) -> tuple[float, float]:
    """(training peak above the child's RSS right after its imports, total training peak) in MiB; on a GPU CUDA's
    max allocated during training, twice."""
    if result["cuda_max_allocated_bytes"] is not None:
        peak = result["cuda_max_allocated_bytes"] / 2**20
        return peak, peak
    total = result["vmhwm_kib"] if result["peak_reset"] else result["peak_rss_kib"]
    return (total - result["rss_after_imports_kib"]) / 1024, total / 1024


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def max_loss_diff(timings: list[dict], a: str, b: str) -> float | None:
    """Largest |loss_a − loss_b| over every training step of every repeat (same batches, same initial weights)."""
    diffs = [abs(x - y) for run in timings if a in run["losses"] and b in run["losses"]
             for x, y in zip(run["losses"][a], run["losses"][b])]  # fmt: skip
    return max(diffs) if diffs else None


def mfu(timings: list[dict], median_step_s: float, settings) -> dict | None:
    """The T-REG step's model FLOPs utilisation on a GPU in bf16 (None on CPU or without a known peak)."""
    name = timings[0]["device_name"]
    peak = settings.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if name == "cpu" or not settings.bf16 or peak is None or timings[0].get("clock", "wall") != "wall":
        return None
    flops = timings[0]["pair_flops"]["flops"] * settings.batch_size
    return {"device": name, "peak_tflops": peak, "step_tflop": flops / 1e12,
            "achieved_tflops": flops / median_step_s / 1e12, "mfu": flops / median_step_s / (peak * 1e12)}


def paired_ratio(timings: list[dict], a: str, b: str, warmup: int) -> float | None:
    """Median over measured steps of step_a / step_b, each pair taken in the same round (same batch, seconds apart)."""
    ratios = [x / y for run in timings if a in run["step_s"] and b in run["step_s"]
              for x, y in zip(run["step_s"][a][warmup:], run["step_s"][b][warmup:]) if y > 0]  # fmt: skip
    return statistics.median(ratios) if ratios else None


def summarize(name: str, timings: list[dict], memory: dict, settings) -> dict:
    variants = {}
    for variant in settings.variants:
        steps = [t for run in timings for t in run["step_s"][variant][settings.warmup:]]
        above, total = peak_mib(memory[variant]) if variant in memory else (None, None)
        variants[variant] = {
            "timed_steps": len(steps), "median_step_s": statistics.median(steps),
            "step_s_per_repeat": [run["step_s"][variant] for run in timings],
            "step_wall_s_per_repeat": [run["step_wall_s"][variant] for run in timings],
            "init_s_per_repeat": [run["init_s"][variant] for run in timings],
            "losses_per_repeat": [run["losses"][variant] for run in timings],
            "peak_mib": above, "peak_total_mib": total, "memory_run": memory.get(variant),
        }  # fmt: skip

    def get(variant, key):
        return variants[variant][key] if variant in variants else None

    ratios = {
        "treg/trl-dpo-pre step": ratio(get("treg", "median_step_s"), get("trl-dpo-pre", "median_step_s")),
        "treg/trl-dpo step": ratio(get("treg", "median_step_s"), get("trl-dpo", "median_step_s")),
        "treg/dpo step": ratio(get("treg", "median_step_s"), get("dpo", "median_step_s")),
        "packed max loss diff": max_loss_diff(timings, "treg", "treg-padded"),
        "treg/trl-dpo-pre peak": ratio(get("treg", "peak_mib"), get("trl-dpo-pre", "peak_mib")),
        "treg/treg-padded step": ratio(get("treg", "median_step_s"), get("treg-padded", "median_step_s")),
        "treg-padded/trl-dpo-pre step": ratio(get("treg-padded", "median_step_s"),
                                              get("trl-dpo-pre", "median_step_s")),
        "treg/trl-dpo peak": ratio(get("treg", "peak_mib"), get("trl-dpo", "peak_mib")),
        "treg/treg-padded peak": ratio(get("treg", "peak_mib"), get("treg-padded", "peak_mib")),
        "treg/trl-dpo-pre peak total": ratio(get("treg", "peak_total_mib"), get("trl-dpo-pre", "peak_total_mib")),
    }  # fmt: skip
    for a, b in (("treg", "trl-dpo-pre"), ("treg", "dpo"), ("treg", "trl-dpo"), ("treg", "treg-padded")):
        ratios[f"{a}/{b} step paired"] = paired_ratio(timings, a, b, settings.warmup)
    run = {k: getattr(settings, k) for k in ("steps", "warmup", "repeats", "batch_size", "threads", "max_length",
                                             "bf16", "attn")}  # fmt: skip
    run.update(memory_steps=MEMORY_STEPS, device=timings[0]["device_name"], clock=timings[0]["clock"])
    mfu_treg = mfu(timings, variants["treg"]["median_step_s"], settings) if "treg" in variants else None
    return {"model": name, "params": timings[0]["params"], "packing": timings[0]["packing"], "settings": run,
            "pair": timings[0]["pair_flops"], "variants": variants, "ratios": ratios, "treg_mfu": mfu_treg}


def fmt_ratio(value: float | None, target_key: str | None = None) -> str:
    if value is None:
        return "n/a"
    if target_key is None:
        return f"{value:.2f}x"
    target = TARGETS[target_key]
    return f"{value:.2f}x (target ≤{target:.2f}x {'PASS' if value <= target else 'MISS'})"


def print_report(summaries: list[dict]) -> None:
    print(f"\n{'model':8s} {'params':>8s}  {'variant':11s} {'steps':>5s} {'step ms (median)':>17s} "
          f"{'train peak MiB':>15s} {'(total)':>8s}")
    for s in summaries:
        for variant, v in s["variants"].items():
            peak = "" if v["peak_mib"] is None else f"{v['peak_mib']:15.0f} {v['peak_total_mib']:8.0f}"
            print(f"{s['model']:8s} {s['params'] / 1e6:7.2f}M  {variant:11s} {v['timed_steps']:5d} "
                  f"{1e3 * v['median_step_s']:17.1f} {peak}")
    print()
    for s in summaries:
        r = s["ratios"]
        diff = r["packed max loss diff"]
        print(f"ratios: {s['model']} (packing {'on' if s['packing'] else 'NOT AVAILABLE: both treg variants padded'})\n"
              f"  T-REG/TRL-DPO-pre step {fmt_ratio(r['treg/trl-dpo-pre step'], 'treg/trl-dpo-pre step')}   "
              f"T-REG/DPO step {fmt_ratio(r['treg/dpo step'], 'treg/dpo step')}   "
              f"T-REG/TRL-DPO step {fmt_ratio(r['treg/trl-dpo step'], 'treg/trl-dpo step')}\n"
              f"  T-REG/TRL-DPO-pre peak {fmt_ratio(r['treg/trl-dpo-pre peak'], 'treg/trl-dpo-pre peak')}   "
              f"T-REG/T-REG-padded step {fmt_ratio(r['treg/treg-padded step'])} peak "
              f"{fmt_ratio(r['treg/treg-padded peak'])}   packed max loss diff "
              f"{'n/a' if diff is None else f'{diff:.2e}'}")
        if s["treg_mfu"]:
            m = s["treg_mfu"]
            print(f"  T-REG step MFU {100 * m['mfu']:.1f}% ({m['achieved_tflops']:.1f} of {m['peak_tflops']:.0f} "
                  f"TFLOP/s bf16 on {m['device']}; {s['pair']['tokens']:.0f} tokens per pair)")
    print("\nnote: peak = training peak above the child's RSS after its imports (CUDA: max allocated during training); "
          "TRL-DPO's includes its live reference model.\n      step = from a trainer's turn to its on_step_end "
          "(collate + forward(s) + backward + optimizer + metrics), variants interleaved step by step; init, the "
          "token-reward pass and TRL's reference precompute are not timed.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,20m,hh", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--memory-variants", default=",".join(VARIANTS), help="variants whose peak memory is measured "
                   "(one child each)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: per model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: per model)")
    p.add_argument("--repeats", type=int, default=None, help="timing runs, each a fresh process (default: 1)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=None, help="TRL's max_length (default: per model)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"], help="step time as this process's "
                   "CPU time (default on CPU: a busy machine's time-slicing does not count) or wall time (CUDA)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU mode) and the T-REG step's MFU")
    p.add_argument("--attn", default="sdpa", help="attn_implementation of the models (default sdpa)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOP/s, for MFU")
    p.add_argument("--smoke", action="store_true", help="the test suite's size: hh-smoke, 2 pairs, "
                   "1 step, peak memory of treg and trl-dpo-pre only")
    p.add_argument("--json", default=None, help="write every raw number to this file")
    p.add_argument("--child", choices=("time",) + VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch_size = "hh-smoke", 2
        args.steps, args.warmup, args.repeats = 1, 0, 1
        args.memory_variants = "treg,trl-dpo-pre"  # the peak ratio's two children only
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.memory_variants = [v.strip() for v in args.memory_variants.split(",") if v.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    unknown += [v for v in args.variants + args.memory_variants if v not in VARIANTS]
    if unknown or not args.models or not args.variants:
        p.error(f"unknown model(s)/variant(s) {unknown}; models: {list(MODELS)}, variants: {list(VARIANTS)}")
    for key in ("steps", "repeats", "batch_size", "threads", "max_length"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    start = time.perf_counter()
    summaries, skipped = [], {}
    for name in args.models:
        reason = skip_reason(name)
        if reason:
            print(f"[{name}] skipped: {reason}", flush=True)
            skipped[name] = reason
        else:
            summaries.append(measure(name, args))
    if summaries:
        print_report(summaries)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total {time.perf_counter() - start:.0f} s (orchestrator peak RSS {own_peak:.0f} MiB)")
    report = {"ratios": {s["model"]: s["ratios"] for s in summaries}, "targets": TARGETS, "skipped": skipped,
              "models": summaries}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"raw numbers written to {args.json}")
    return report


def skip_reason(name: str) -> str | None:
    """Why ``name`` cannot run, asked of a child (this process imports no ML library), or None."""
    if MODELS[name].tokenizer == "tiny":
        return None
    script = os.path.abspath(__file__)
    code = f"import runpy; m = runpy.run_path({script!r}); print(m['unavailable']({name!r}) or '')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return f"could not check: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else None


if __name__ == "__main__":
    main()
