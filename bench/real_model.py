"""T-REG vs DPO (and SimPO-REG vs SimPO) on a real model: SmolLM2-135M-Instruct on verifiable instructions, scored on
IFEval's real prompts.

    python bench/real_model.py [--smoke | --gpu | --size NAME] [--seeds 0 1 2] [--workers 2]
        [--out docs/real-model.json] [--report docs/real-model.md] [--runs-dir DIR | --no-resume]

Each finished (method, seed) run is saved under ``--runs-dir`` (default: ``bench-real-model/`` in treg's cache) with
a key of everything that determines it, so the same command after a crash or a kill trains only the missing runs.

The task (:mod:`treg.evaluation.instructions`): prompts carrying IFEval-style verifiable instructions (no commas, all
lowercase, forbidden words, keyword counts, end phrase, word and sentence limits, ...), checked by treg's own
checkers, which also give the character spans that break an instruction (mapped onto tokens as violation flags).

1. **Prompts.** Training: treg's own composed prompts (:func:`compose_training_prompts`: generic tasks plus 1–2
   instructions in treg's wording, disjoint from IFEval's). Held out: IFEval's real prompts whose instruction types
   are all covered (:func:`load_ifeval`), a fixed random subset at the CPU sizes.
2. **On-policy pairs, the papers' way.** ``samples`` answers per training prompt sampled from the start model (HF
   generate; vLLM when it is importable and a GPU is present; held-out answers always HF generate), each scored by
   the checker: the share of its instructions followed, minus 1e-4 per violation token (a tie-break: fewer offending
   tokens is better); best
   (chosen) vs worst (rejected) by :func:`treg.feedback.onpolicy.pairs_from_samples`, ties dropped and counted.
   The pairs depend on ``--pair-seed`` only: every training seed uses the same pairs (and one cached token-reward
   pass).
3. **Methods from the same start** (the same weights, the same pairs): dpo, treg_dpo (DPO-REG), simpo, treg_simpo
   (SimPO-REG) and sft_chosen (the SFT-on-chosen ablation, as ``bench/credit_assignment.py``'s sft_reg: DPO plus
   treg's regularizer with r̂ ≡ c on chosen tokens and 0 on rejected ones, which makes it −α·w·c·β·Σ log π(y_w), an
   SFT term on the chosen response; c is the mean |r̂| of the pass, so its strength matches the contrastive
   rewards'). CPU sizes train LoRA adapters, the GPU size fine-tunes every weight (see :data:`LORA`). Seeds vary the
   adapters' initialisation and the data order.
4. **Metrics.** On the held-out IFEval prompts (greedy answers): prompt-level and instruction-level accuracy and the
   share of answers that ran into the token budget. On the training pairs' chosen and rejected answer tokens (the
   end-of-turn tokens excluded): ``token_auc``, the ROC AUC of −(log π_θ − log π_ref) for violation tokens (the
   implicit token reward of DPO up to the constant β: which tokens training took credit away from), its
   rejected-only variant, ``token_auc_logp`` (of −log π_θ, SimPO's implicit reward up to length normalisation), and
   the displacement of likelihood: ``chosen_logp_change`` and ``rejected_logp_change``, the mean over pairs of
   Σ_t (log π_θ − log π_ref) on the chosen (rejected) response; ``rhat_corr``, the rank correlation over answer
   tokens of log π_θ − log π_ref with the pass's r̂ (what T-REG's regularizer pulls the former toward: it should
   rise with T-REG if the regularizer does its job, whatever r̂ is worth). The token-reward pass's r̂ is scored the
   same way (``rhat_auc``), with the reference's own log-probabilities as a baseline (``ref_logp_auc``).

Every mean is over seeds; its 95% CI comes from a two-level bootstrap (seeds resampled with replacement, and the
held-out prompts, or the training pairs for token metrics, resampled with replacement; the same resamples for every
method, so differences are paired). Differences (T-REG minus its base) are per seed on the same prompts and pairs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other benches' pieces, below
from credit_assignment import ALPHA, DPO, SIMPO  # noqa: E402  (the same β, α, γ as the toy benchmark)
from credit_assignment import sft_reg_data as sft_chosen_data  # noqa: E402
from token_rewards_real import machine  # noqa: E402  (the platform, CPUs, torch and load average of a result)

MODEL = "treg:smollm2"


# ------------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    train_prompts: int  # composed training prompts (pairs come from these, ties dropped)
    samples: int  # sampled answers per training prompt
    eval_prompts: int  # held-out IFEval prompts (0: every covered prompt)
    max_new_tokens: int  # sampled training answers
    eval_max_new_tokens: int  # greedy held-out answers
    epochs: float
    max_steps: int  # > 0 overrides epochs
    batch_size: int
    learning_rate: float
    lora: bool  # LoRA adapters (True) or a full fine-tune
    bf16: bool
    seeds: tuple[int, ...]
    bootstrap: int
    gen_batch: int  # generation batch size


SIZES = {
    # tests: the plumbing in minutes on a busy 2-core CPU (one seed: each run costs ~20 s of trainer set-up alone)
    "smoke": Size(train_prompts=12, samples=3, eval_prompts=4, max_new_tokens=16, eval_max_new_tokens=16, epochs=1.0,
                  max_steps=1, batch_size=2, learning_rate=1e-4, lora=True, bf16=False, seeds=(0,), bootstrap=200,
                  gen_batch=16),
    # the first CPU size (its dpo/treg_dpo results: docs/real-model-short.json): one epoch of 9 steps at lr 1e-4 left
    # the policies close to the start (mean DPO loss 0.692, log 2 = 0.693), too little training to compare methods
    "short": Size(train_prompts=96, samples=4, eval_prompts=64, max_new_tokens=48, eval_max_new_tokens=96,
                  epochs=1.0, max_steps=0, batch_size=8, learning_rate=1e-4, lora=True, bf16=False, seeds=(0, 1, 2),
                  bootstrap=1000, gen_batch=64),
    # the documented CPU size (~70 min on an idle 2-core CPU with 2 workers): the same prompts and pairs as "short",
    # trained 3 epochs (27 steps of 8 pairs) at lr 3e-4 so that the policies move; fixed after seeing only that
    # "short" did not train (its loss and displacement), before any run of this size
    "default": Size(train_prompts=96, samples=4, eval_prompts=64, max_new_tokens=48, eval_max_new_tokens=96,
                    epochs=3.0, max_steps=0, batch_size=8, learning_rate=3e-4, lora=True, bf16=False, seeds=(0, 1, 2),
                    bootstrap=1000, gen_batch=64),
    # one GPU (bf16, full fine-tune): every covered IFEval prompt, answers long enough for most instructions
    "gpu": Size(train_prompts=2048, samples=8, eval_prompts=0, max_new_tokens=256, eval_max_new_tokens=512, epochs=1.0,
                max_steps=0, batch_size=32, learning_rate=5e-6, lora=False, bf16=True, seeds=(0, 1, 2, 3, 4),
                bootstrap=2000, gen_batch=128),
}

# Fixed before any result was seen. DPO β = 0.1 (the T-REG paper's Llama-3 recipe); α = 0.5, the largest value the
# paper uses (as bench/credit_assignment.py); SimPO β = 2, γ = 1 (γ/β = 0.5, its Gemma recipe's ratio, the same as
# bench/credit_assignment.py). LoRA r = 16 on every projection, lr 1e-4: twice the SmolLM2 LoRA recipe's 5e-5, as
# a CPU run takes only about ten steps ("short"; "default" trains 3 epochs at 3e-4, see SIZES); the full fine-tune
# (GPU) takes the SmolLM2 recipe's 5e-6.
METHODS = {
    "dpo": {**DPO, "treg_alpha": 0.0},
    "treg_dpo": {**DPO, "treg_alpha": ALPHA},
    "simpo": {**SIMPO, "treg_alpha": 0.0},
    "treg_simpo": {**SIMPO, "treg_alpha": ALPHA},
    "sft_chosen": {**DPO, "treg_alpha": ALPHA},  # r̂ replaced by c on chosen, 0 on rejected (see the docstring)
}
DIFFERENCES = (("treg_dpo", "dpo"), ("treg_simpo", "simpo"), ("treg_dpo", "sft_chosen"))
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TEMPERATURE = 0.8  # sampling the pairs (treg pairs' default)
EVAL_SEED = 1234  # which IFEval prompts the CPU sizes keep (the same for every run)
CHUNK = 32  # prompts per sampling job (each with its own seed, so the pairs do not depend on --workers)
TIE_BREAK = 1e-4  # score = share of instructions followed − TIE_BREAK × violation tokens
EVAL_METRICS = ("prompt_level", "instruction_level", "eval_truncated")
TOKEN_METRICS = ("token_auc", "token_auc_rejected", "token_auc_logp", "rhat_corr", "chosen_logp_change",
                 "rejected_logp_change")


# ------------------------------------------------------------------------------------------------------ prompts
def training_rows(size: Size, pair_seed: int) -> list[dict]:
    from treg.evaluation.instructions import compose_training_prompts

    return compose_training_prompts(size.train_prompts, seed=pair_seed)


def eval_rows(size: Size, path: str | None = None) -> list[dict]:
    """IFEval's covered prompts; at a CPU size a fixed random subset (:data:`EVAL_SEED`), in file order."""
    from treg.evaluation.instructions import load_ifeval

    rows = load_ifeval(path)
    if size.eval_prompts and size.eval_prompts < len(rows):
        keep = set(random.Random(EVAL_SEED).sample(range(len(rows)), size.eval_prompts))
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows


def messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}]


# ------------------------------------------------------------------------------------------------ checker scores
def violation_tokens(tokenizer, text: str, spans) -> int:
    from treg.evaluation.instructions import token_flags

    if not spans:
        return 0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return sum(token_flags(spans, enc["offset_mapping"]))


def check(row: dict, text: str) -> dict:
    from treg.evaluation.instructions import check_response, parse_instructions

    return check_response(parse_instructions(row, supported_only=True), text)


def sample_score(tokenizer, row: dict, text: str) -> float:
    """Share of the row's instructions followed, minus :data:`TIE_BREAK` per violation token."""
    result = check(row, text)
    return sum(result["follow"]) / len(result["follow"]) - TIE_BREAK * violation_tokens(tokenizer, text,
                                                                                       result["spans"])


# ---------------------------------------------------------------------------------------------- generation jobs
_WORKER: dict = {}


def init_worker(spec: str, threads: int, cache_dir: str | None) -> None:
    """Load the start model once per process (a pool worker, or the main process with ``--workers 1``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if cache_dir:
        os.environ["TREG_CACHE_DIR"] = cache_dir
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    from treg.models import load_causal_lm

    disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, tokenizer = load_causal_lm(spec, show_progress=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    _WORKER.update(model=model, tokenizer=tokenizer, spec=spec, start_hash=weights_fingerprint(model))


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of the weights (every tensor's sum and sum of squares, float64): the same start for every
    method, and no run changed the shared model."""
    import torch

    with torch.no_grad():
        stats = [(n, float(p.double().sum()), float(p.double().square().sum())) for n, p in model.state_dict().items()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def backend_for(requested: str) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


def generate_texts(model, tokenizer, rows, *, samples: int, max_new_tokens: int, seed: int, batch: int,
                   backend: str = "hf", show: bool = False, desc: str = "Generating") -> list[list[str]]:
    """``samples`` answers per row (sampled at :data:`TEMPERATURE`), or one greedy answer (``samples`` 0)."""
    from treg.generation import generate

    sampling = {"do_sample": True, "temperature": TEMPERATURE} if samples else {}
    return generate(model, tokenizer, [messages(r) for r in rows], num_samples=max(samples, 1),
                    max_new_tokens=max_new_tokens, batch_size=batch, seed=seed, show_progress=show, desc=desc,
                    backend=backend, **sampling)


def vllm_engine(seed: int):
    """A vLLM engine on the start model's folder, sharing the GPU with training (30% of its memory)."""
    import vllm

    from treg.models import resolve_model_spec

    path = resolve_model_spec(_WORKER["spec"], show_progress=False)
    return vllm.LLM(model=path, seed=seed, dtype="bfloat16", gpu_memory_utilization=0.3)


def sample_chunk(rows: list[dict], size: Size, seed: int, backend: str = "hf", show: bool = False) -> list[list[str]]:
    model = vllm_engine(seed) if backend == "vllm" else _WORKER["model"]
    return generate_texts(model, _WORKER["tokenizer"], rows, samples=size.samples, max_new_tokens=size.max_new_tokens,
                          seed=seed, batch=size.gen_batch, backend=backend, show=show, desc="Sampling pairs")


def answer_and_check(model, tokenizer, rows: list[dict], size: Size, show: bool = False) -> list:
    """Greedy answers to the held-out rows, checked: per row ``follow`` (per instruction), ``follow_all`` and
    ``truncated`` (the answer used the whole token budget)."""
    texts = generate_texts(model, tokenizer, rows, samples=0, max_new_tokens=size.eval_max_new_tokens, seed=0,
                           batch=size.gen_batch, show=show, desc="Answering held-out prompts")
    out = []
    for row, (text,) in zip(rows, texts):
        text = text.strip()
        result = check(row, text)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append({"follow": result["follow"], "follow_all": result["follow_all"],
                    "truncated": n >= size.eval_max_new_tokens - 1})
    return out


def eval_start(rows: list[dict], size: Size) -> dict:
    t0 = time.time()
    results = answer_and_check(_WORKER["model"], _WORKER["tokenizer"], rows, size)
    return {"eval": results, "start_hash": _WORKER["start_hash"], "seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------------- pairs
def chunk_seed(pair_seed: int, chunk: int) -> int:
    return int(hashlib.sha256(f"{pair_seed}-{chunk}".encode()).hexdigest()[:8], 16)


def build_pairs(rows: list[dict], samples: list[list[str]], tokenizer) -> tuple[list[dict], dict]:
    """Best vs worst of each row's samples by :func:`sample_score` (ties dropped and counted), with the row's key."""
    from treg.feedback.onpolicy import pairs_from_samples

    by_prompt = {r["prompt"]: r for r in rows}
    pairs, counts = pairs_from_samples([r["prompt"] for r in rows], samples,
                                       lambda p, text: sample_score(tokenizer, by_prompt[p], text))
    for p in pairs:
        row = by_prompt[p["prompt"][0]["content"]]
        p.update(key=row["key"], instruction_id_list=row["instruction_id_list"], kwargs=json.dumps(row["kwargs"]))
    scores = [sample_score(tokenizer, r, t.strip()) for r, texts in zip(rows, samples) for t in texts if t.strip()]
    follow = [check(r, t.strip())["follow_all"] for r, texts in zip(rows, samples) for t in texts if t.strip()]
    stats = {"prompts": len(rows), "pairs": len(pairs), **counts,
             "sample_mean_score": float(np.mean(scores)) if scores else math.nan,
             "sample_follow_all": float(np.mean(follow)) if follow else math.nan,
             "chosen_follow_all": float(np.mean([p["chosen_score"] >= 1 - 1e-9 for p in pairs])) if pairs else 0.0}
    return pairs, stats


def instruction_row(pair: dict) -> dict:
    """The IFEval-format row of a pair (its kwargs are stored as JSON text: Arrow wants one type per column)."""
    return {"key": pair["key"], "instruction_id_list": list(pair["instruction_id_list"]),
            "kwargs": json.loads(pair["kwargs"])}


def pairs_fingerprint(pairs: list[dict]) -> str:
    text = json.dumps([[p["key"], p["chosen"][0]["content"], p["rejected"][0]["content"]] for p in pairs])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_pairs(rows: list[dict], size: Size, pair_seed: int, pool=None, backend: str = "hf") -> tuple[list, dict]:
    """Sample every chunk of :data:`CHUNK` rows with its own seed (in ``pool`` when given), then pick the pairs."""
    if backend == "vllm":  # one engine, every prompt (vLLM seeds each request itself)
        chunks, pool = [rows], None
    else:
        chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    jobs = [(c, size, chunk_seed(pair_seed, k), backend) for k, c in enumerate(chunks)]
    if pool is None:
        results = [sample_chunk(*job, show=sys.stderr.isatty()) for job in jobs]
    else:
        results = list(pool.map(_star_sample_chunk, jobs))
    samples = [s for chunk in results for s in chunk]
    pairs, stats = build_pairs(rows, samples, _WORKER["tokenizer"])
    stats["fingerprint"] = pairs_fingerprint(pairs)
    return pairs, stats


def _star_sample_chunk(job):
    return sample_chunk(*job)


# ------------------------------------------------------------------------------------------- token-reward pass
def config(output_dir: str, size: Size, seed: int, **method):
    import torch

    from treg.trainer import TRegConfig

    steps = {"max_steps": size.max_steps} if size.max_steps > 0 else {"num_train_epochs": size.epochs}
    return TRegConfig(
        output_dir=output_dir, learning_rate=size.learning_rate, per_device_train_batch_size=size.batch_size,
        max_length=2048, lr_scheduler_type="cosine", warmup_steps=0.1 if size.max_steps <= 0 else 0,  # 1-step smoke
        save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=size.bf16,
        activation_checkpointing=False, disable_tqdm=True, logging_steps=10_000, seed=seed,
        token_reward_batch_size=16, **steps, **method,
    )


def completion_flags(tokenizer, text: str, ids, spans) -> tuple[list[bool], list[bool]]:
    """Per completion token (the trainer's ``*_ids``: the answer, then the chat template's end-of-turn tokens): is it
    a violation token, and is it an answer token (the end-of-turn tokens are not)? The answer is tokenized alone with
    offsets; when its ids are not a prefix of ``ids``, the offsets come from decoding growing prefixes of ``ids``."""
    from treg.evaluation.instructions import token_flags

    ids = list(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if list(enc["input_ids"]) == ids[:n]:
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    else:
        offsets, prev = [], 0
        for k in range(len(ids)):
            end = min(len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)), len(text))
            offsets.append((prev, end))
            prev = end
        n = max((k + 1 for k, (a, b) in enumerate(offsets) if b > a), default=0)
        offsets = offsets[:n]
    flags = token_flags(spans, offsets) + [False] * (len(ids) - n)
    return flags, [True] * n + [False] * (len(ids) - n)


def token_pass(model, tokenizer, pairs: list[dict], size: Size, workdir: str) -> tuple[object, dict]:
    """The token-reward pass (treg's default contrastive templates, cached under TREG_CACHE_DIR) through a probe
    trainer; returns the tokenized pairs with r̂ and reference columns, and per side the violation flags and
    answer-token masks."""
    from datasets import Dataset

    from treg.trainer import TRegTrainer

    probe = TRegTrainer(copy.deepcopy(model), args=config(os.path.join(workdir, "probe"), size, 0,
                                                          **METHODS["treg_dpo"]),
                        train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    data = probe.train_dataset
    del probe
    marks = {}
    for side in ("chosen", "rejected"):
        flags, answer = [], []
        for row in data:
            text = row[side][0]["content"]
            f, a = completion_flags(tokenizer, text, row[f"{side}_ids"], check(instruction_row(row), text)["spans"])
            flags.append(f)
            answer.append(a)
        marks[side] = {"flags": flags, "answer": answer}
    return data, marks


# -------------------------------------------------------------------------------------------------- method jobs
def run_method(seed: int, name: str, data_dir: str, rows: list[dict], size: Size) -> dict:
    """Train ``name`` from the start weights on the pass-annotated pairs in ``data_dir``; answer the held-out
    ``rows`` greedily; score the training pairs' tokens under the trained policy."""
    from datasets import load_from_disk
    from transformers import PrinterCallback, set_seed

    from treg.scoring import score_completions
    from treg.trainer import TRegTrainer

    t0 = time.time()
    model, tokenizer = _WORKER["model"], _WORKER["tokenizer"]
    data = load_from_disk(data_dir)
    if name == "sft_chosen":
        data, _ = sft_chosen_data(data)
    peft = None
    if size.lora:
        from peft import LoraConfig

        peft = LoraConfig(task_type="CAUSAL_LM", **LORA)
    set_seed(seed)  # the adapters' initialisation (made before the Trainer seeds itself) and the data order
    start_hash = weights_fingerprint(model)
    with tempfile.TemporaryDirectory(prefix=f"treg-real-{name}-") as tmp:
        trainer = TRegTrainer(copy.deepcopy(model), args=config(tmp, size, seed, **METHODS[name]),
                              train_dataset=data, processing_class=tokenizer, peft_config=peft)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "train_loss" in h]
        steps = trainer.state.global_step
        policy = trainer.model.merge_and_unload() if peft is not None else trainer.model
        del trainer
    policy.eval()
    trained = time.time()
    results = answer_and_check(policy, tokenizer, rows, size)
    answered = time.time()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logps = {side: score_completions(policy, list(zip(data["prompt_ids"], data[f"{side}_ids"])), batch_size=16,
                                     pad_token_id=pad, show_progress=False) for side in ("chosen", "rejected")}
    return {"seed": seed, "method": name, "eval": results, "logps": logps, "start_hash": start_hash,
            "train_loss": logs[-1]["train_loss"] if logs else math.nan, "steps": steps,
            "train_seconds": trained - t0, "eval_seconds": answered - trained, "seconds": time.time() - t0}


def _star_run_method(job):
    return run_method(*job)


# ------------------------------------------------------------------------------------ finished runs (resuming)
def run_key(name: str, seed: int, size: Size, fixed: dict) -> str:
    """What determines one (method, seed) run: the method's settings, the seed, the size's training and answering
    settings (not its seed list or bootstrap count) and ``fixed`` (model, start weights, pairs, held-out prompts,
    templates: the same for every run)."""
    trained = {k: v for k, v in asdict(size).items() if k not in ("seeds", "bootstrap")}
    what = {"name": name, "method": METHODS[name], "seed": seed, "size": trained,
            "lora": LORA if size.lora else None, **fixed}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_file(runs_dir: str, name: str, seed: int, key: str) -> str:
    return os.path.join(runs_dir, f"{name}-seed{seed}-{key}.pkl")


def save_run(path: str, result: dict) -> None:
    """Written atomically: a run killed while saving leaves no file, never half of one."""
    from treg.files import write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(result, f)

    write_atomic(path, write)


def load_run(path: str) -> dict | None:
    """A finished run saved by :func:`save_run`, or None (absent; unreadable ones are set aside and rerun)."""
    from treg.files import move_aside

    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            result = pickle.load(f)
        if isinstance(result, dict) and {"eval", "logps", "train_loss"} <= set(result):
            return result
        reason = "not a finished run"
    except Exception as e:  # a file from another version, or damaged
        reason = f"unreadable: {type(e).__name__}: {e}"
    print(f"  set aside {move_aside(path, reason, what='finished run')} ({reason}); rerunning it", flush=True)
    return None


# ----------------------------------------------------------------------------------------------------- statistics
def resamples(n_units: int, n_seeds: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-level bootstrap draws: per resample the multiplicity of every unit (prompt or pair), ``[B, n_units]``, and
    the seeds drawn with replacement, ``[B, n_seeds]`` (indices into the seed list)."""
    rng = np.random.default_rng(seed)
    units = np.stack([np.bincount(rng.integers(0, n_units, n_units), minlength=n_units) for _ in range(n_boot)])
    seeds = rng.integers(0, n_seeds, (n_boot, n_seeds))
    return units.astype(np.float64), seeds


def summary(point_per_seed: np.ndarray, boot_per_seed: np.ndarray, seed_draws: np.ndarray) -> dict:
    """``{"mean", "ci"}``: the mean over seeds of the per-seed values, and the 2.5/97.5 percentiles of the mean over
    the drawn seeds of the resampled per-seed values (``boot_per_seed`` ``[n_seeds, B]``)."""
    boot = np.take_along_axis(boot_per_seed.T, seed_draws, axis=1).mean(1)  # [B]
    boot = boot[~np.isnan(boot)]
    mean = float(np.nanmean(point_per_seed)) if np.isfinite(point_per_seed).any() else math.nan
    ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if len(boot) else [math.nan, math.nan]
    return {"mean": mean, "ci": ci}


def eval_values(results: list[dict], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Prompt-level and instruction-level accuracy and the truncated share, for each row of prompt ``weights``."""
    follow_all = np.array([r["follow_all"] for r in results], dtype=np.float64)
    followed = np.array([sum(r["follow"]) for r in results], dtype=np.float64)
    n = np.array([len(r["follow"]) for r in results], dtype=np.float64)
    truncated = np.array([r["truncated"] for r in results], dtype=np.float64)
    total = weights.sum(1)
    return {"prompt_level": weights @ follow_all / total, "instruction_level": weights @ followed / (weights @ n),
            "eval_truncated": weights @ truncated / total}


def token_table(marks: dict, sides=("chosen", "rejected")) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over the answer tokens of ``sides`` (pairs in order, chosen first): pair index, violation flag, and the mask
    selecting them from the concatenated completion tokens."""
    idx, pos, masks = [], [], []
    for side in sides:
        for i, (flags, answer) in enumerate(zip(marks[side]["flags"], marks[side]["answer"])):
            a = np.asarray(answer, dtype=bool)
            masks.append(a)
            idx.append(np.full(int(a.sum()), i))
            pos.append(np.asarray(flags, dtype=bool)[a])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(idx, np.int64), cat(pos, np.float64), cat(masks, bool)


def auc_values(signal: dict, marks: dict, weights: np.ndarray, sides=("chosen", "rejected")) -> np.ndarray:
    """ROC AUC of −signal for violation tokens over the answer tokens of ``sides``, for each row of pair
    ``weights`` ``[B, n_pairs]`` (``bench/token_rewards_real.py``'s weighted AUC)."""
    from token_rewards_real import weighted_aucs

    idx, pos, mask = token_table(marks, sides)
    scores = -np.concatenate([np.asarray(v, dtype=np.float64) for s in sides for v in signal[s]])[mask]
    out = [weighted_aucs(scores, pos, 1.0 - pos, weights[k : k + 100][:, idx]) for k in range(0, len(weights), 100)]
    return np.concatenate(out) if out else np.zeros(0)


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.empty(len(values))
    order[values.argsort(kind="stable")] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=order) / counts)[inverse]


def rank_correlation(a: dict, b: dict, marks: dict, weights: np.ndarray) -> np.ndarray:
    """The correlation over the answer tokens (chosen and rejected) of the ranks of two per-token signals, each token
    weighted by its pair's multiplicity in each row of ``weights`` ``[B, n_pairs]`` (the ranks are taken once, over
    every token, ties sharing their mean rank: Spearman's ρ for the unit weights)."""
    idx, _, mask = token_table(marks)
    flat = [np.concatenate([np.asarray(v, dtype=np.float64) for s in ("chosen", "rejected") for v in x[s]])[mask]
            for x in (a, b)]  # fmt: skip
    x, y = (ranks(v) for v in flat)
    w = weights[:, idx]  # [B, tokens]
    total = w.sum(1, keepdims=True)
    mx, my = (w @ x)[:, None] / total, (w @ y)[:, None] / total
    cov = (w * (x - mx) * (y - my)).sum(1)
    return cov / np.sqrt((w * (x - mx) ** 2).sum(1) * (w * (y - my) ** 2).sum(1))


def token_values(logps: dict, ref: dict, marks: dict, weights: np.ndarray, rhat: dict) -> dict[str, np.ndarray]:
    ratio = {s: [np.asarray(p, dtype=np.float64) - np.asarray(r, dtype=np.float64) for p, r in zip(logps[s], ref[s])]
             for s in ("chosen", "rejected")}
    total = weights.sum(1)
    change = {s: np.array([v.sum() for v in ratio[s]]) for s in ratio}
    return {
        "rhat_corr": rank_correlation(ratio, rhat, marks, weights),
        "token_auc": auc_values(ratio, marks, weights),
        "token_auc_rejected": auc_values(ratio, marks, weights, ("rejected",)),
        "token_auc_logp": auc_values(logps, marks, weights),
        "chosen_logp_change": weights @ change["chosen"] / total,
        "rejected_logp_change": weights @ change["rejected"] / total,
    }


def per_seed_stack(values: list[dict[str, np.ndarray]], metrics) -> dict[str, np.ndarray]:
    return {m: np.stack([v[m] for v in values]) for m in metrics}


def by_instruction(held_out: list[dict], start: dict, runs: dict, seeds: list[int]) -> dict:
    """Descriptive: per instruction type of the held-out prompts, how many instructions carry it and the share
    followed by the start model and by each method (mean over seeds; no CI, the counts are small)."""
    ids = [i for row in held_out for i in row["instruction_id_list"]]
    counts = {i: ids.count(i) for i in sorted(set(ids))}

    def shares(results: list[dict]) -> dict[str, float]:
        followed = [f for r in results for f in r["follow"]]
        return {i: float(np.mean([f for f, j in zip(followed, ids) if j == i])) for i in counts}

    at_start = shares(start["eval"])
    out = {i: {"n": n, "start": at_start[i]} for i, n in counts.items()}
    for name in METHODS:
        if all((name, seed) in runs for seed in seeds):
            per_seed = [shares(runs[(name, seed)]["eval"]) for seed in seeds]
            for i in counts:
                out[i][name] = float(np.mean([p[i] for p in per_seed]))
    return out


def summarize(runs: dict, start: dict, data, marks: dict, seeds: list[int], size: Size) -> dict:
    """The JSON's ``methods``, ``differences``, ``token_rewards`` and ``per_seed`` from the runs ``{(name, seed):
    run_method's result}``, the start model's held-out results and the pass-annotated pairs."""
    from treg.token_rewards import CHOSEN_REWARDS, REF_CHOSEN, REF_REJECTED, REJECTED_REWARDS

    n_prompts, n_pairs = len(start["eval"]), len(data)
    w_prompts, draws = resamples(n_prompts, len(seeds), size.bootstrap, seed=1)
    w_pairs, _ = resamples(n_pairs, len(seeds), size.bootstrap, seed=2)
    one_p, one_t = np.ones((1, n_prompts)), np.ones((1, n_pairs))
    ref = {"chosen": list(data[REF_CHOSEN]), "rejected": list(data[REF_REJECTED])}
    rhat = {"chosen": list(data[CHOSEN_REWARDS]), "rejected": list(data[REJECTED_REWARDS])}
    points, boots = {}, {}
    for name in METHODS:
        if not all((name, s) in runs for s in seeds):
            continue
        rs = [runs[(name, s)] for s in seeds]
        for out, wp, wt in ((points, one_p, one_t), (boots, w_prompts, w_pairs)):
            out[name] = {**per_seed_stack([eval_values(r["eval"], wp) for r in rs], EVAL_METRICS),
                         **per_seed_stack([token_values(r["logps"], ref, marks, wt, rhat) for r in rs], TOKEN_METRICS)}
    single = np.zeros((size.bootstrap, 1), dtype=np.int64)
    start_point, start_boot = eval_values(start["eval"], one_p), eval_values(start["eval"], w_prompts)
    methods = {"start": {m: summary(start_point[m], start_boot[m][None], single) for m in EVAL_METRICS}}
    for name in points:
        methods[name] = {m: summary(points[name][m][:, 0], boots[name][m], draws) for m in points[name]}
        loss = np.array([runs[(name, s)]["train_loss"] for s in seeds], dtype=np.float64)
        methods[name]["train_loss"] = summary(loss, np.repeat(loss[:, None], size.bootstrap, 1), draws)
    differences = {}
    for a, b in DIFFERENCES:
        if a in points and b in points:
            differences[f"{a}-{b}"] = {m: summary(points[a][m][:, 0] - points[b][m][:, 0],
                                                  boots[a][m] - boots[b][m], draws) for m in points[a]}
    token_rewards = {}
    for label, signal in (("rhat_auc", rhat), ("ref_logp_auc", ref)):
        for suffix, sides in (("", ("chosen", "rejected")), ("_rejected", ("rejected",))):
            point = auc_values(signal, marks, one_t, sides)
            token_rewards[label + suffix] = summary(point, auc_values(signal, marks, w_pairs, sides)[None], single)
    idx, pos, _ = token_table(marks)
    per_seed = {name: {m: [float(x) for x in points[name][m][:, 0]] for m in points[name]} for name in points}
    return {"methods": methods, "differences": differences, "token_rewards": token_rewards, "per_seed": per_seed,
            "tokens": {"answer_tokens": int(len(pos)), "violation_tokens": int(pos.sum()),
                       "pairs_with_violations": int(len(set(idx[pos > 0].tolist())))}}


# ------------------------------------------------------------------------------------------------------- report
FIXED = {
    "*": "the methods' hyperparameters (β, α, γ, learning rate, LoRA rank, epochs), the sizes, the pair-selection "
    "score and the metrics were set in `bench/real_model.py` before any result of this benchmark was looked at, and "
    "were not changed after.",
    "default": "the methods' hyperparameters (β, α, γ, LoRA rank), the pairs, the pair-selection score and the "
    "metrics are those of the first size (now `short`), set before any result was looked at. This size's training "
    "length and learning rate (3 epochs at 3e-4 instead of 1 at 1e-4) were set after `short` had run, on one "
    "observation only: its policies barely moved (mean DPO loss 0.692 against log 2 = 0.693); that choice was made "
    "before any run of this size, and nothing was changed after.",
}
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the report is rewritten -->", "<!-- /notes -->"
LABELS = {"prompt_level": "IFEval prompt-level acc.", "instruction_level": "instruction-level acc.",
          "eval_truncated": "answers at the token budget", "token_auc": "token AUC (log π/π_ref)",
          "token_auc_rejected": "token AUC, rejected only", "token_auc_logp": "token AUC (log π)",
          "rhat_corr": "ρ(log π/π_ref, r̂)",
          "chosen_logp_change": "Δ log π(chosen)", "rejected_logp_change": "Δ log π(rejected)",
          "train_loss": "train loss", "rhat_auc": "r̂ (treg's default templates)",
          "ref_logp_auc": "log π_ref (surprisal baseline)", "rhat_auc_rejected": "r̂, rejected answers only",
          "ref_logp_auc_rejected": "log π_ref, rejected answers only"}


def cell(entry: dict | None, sign: bool = False) -> str:
    if not entry or entry["mean"] is None or (isinstance(entry["mean"], float) and math.isnan(entry["mean"])):
        return "—"
    lo, hi = entry["ci"]
    head = f"{entry['mean']:+.3f}" if sign else f"{entry['mean']:.3f}"
    return head if math.isnan(lo) else f"{head} [{lo:.3f}, {hi:.3f}]"


def table(rows: dict, metrics, sign: bool = False, first: str = "method") -> list[str]:
    lines = [f"| {first} | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, entry in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(entry.get(m), sign) for m in metrics) + " |")
    return lines


def verdict(result: dict) -> list[str]:
    """One sentence per difference and headline metric: the CI's side of 0."""
    out = []
    for name, diff in result["differences"].items():
        for metric in ("prompt_level", "instruction_level", "token_auc"):
            e = diff.get(metric)
            if not e:
                continue
            lo, hi = e["ci"]
            side = ("higher (CI above 0)" if lo > 0 else "lower (CI below 0)" if hi < 0
                    else "no difference detected (CI contains 0)")
            out.append(f"* {name}, {LABELS[metric]}: {e['mean']:+.3f} [{lo:.3f}, {hi:.3f}]: {side}.")
    return out


def report(result: dict, notes: str) -> str:
    s = result["settings"]
    size = s["size"]
    metrics_eval = list(EVAL_METRICS)
    metrics_tok = [m for m in TOKEN_METRICS] + ["train_loss"]
    lines = [
        "# T-REG vs DPO on a real model: SmolLM2-135M-Instruct, verifiable instructions, IFEval's real prompts", "",
        f"Generated by `bench/real_model.py` ({s['size_name']} size, model `{s['model']}`, seeds {result['seeds']}, "
        f"{'LoRA' if size['lora'] else 'full fine-tune'}); the numbers are the JSON's (`{s['out']}`).", "",
        "**Settings fixed before results were seen**: " + FIXED.get(s["size_name"], FIXED["*"]), "",
        "Cells: mean over seeds [95% CI: two-level bootstrap, seeds and held-out prompts (accuracies) or training "
        "pairs (token metrics) resampled with replacement]. Differences are paired (same seed, same prompts and "
        "pairs, same resamples).", "",
        NOTES_BEGIN, notes.strip(), NOTES_END, "",
        "## Verdict (read off the CIs)", "", *verdict(result), "",
        "## Held-out instruction following (IFEval's real prompts, greedy)", "",
        *table(result["methods"], metrics_eval), "",
        "## Token credit and likelihood displacement (training pairs' answer tokens)", "",
        *table({k: v for k, v in result["methods"].items() if k != "start"}, metrics_tok), "",
        *instruction_table(result.get("by_instruction")),
        "## Paired differences", "",
        *table(result["differences"], metrics_eval + list(TOKEN_METRICS), sign=True, first="difference"), "",
        "## Token rewards on the training pairs' violation tokens", "",
        "ROC AUC of −signal for violation tokens over the answer tokens of chosen and rejected answers "
        f"({result['tokens']['answer_tokens']} tokens, {result['tokens']['violation_tokens']} violation tokens in "
        f"{result['tokens']['pairs_with_violations']} pairs); CI: pairs resampled.", "",
        "| signal | AUC [95% CI] |", "|---|---|",
        *[f"| {LABELS.get(k, k)} | {cell(v)} |" for k, v in result["token_rewards"].items()], "",
        *settings_section(result)]
    return "\n".join(lines) + "\n"


def instruction_table(rows: dict | None) -> list[str]:
    if not rows:
        return []
    names = [k for k in next(iter(rows.values())) if k != "n"]
    return ["## Held-out instruction-level accuracy by instruction type (descriptive)", "",
            "Share of the held-out instructions of each type that were followed (mean over seeds; no CI: n is small).",
            "", "| instruction | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
            *[f"| {i} | {r['n']} | " + " | ".join(f"{r[k]:.2f}" for k in names) + " |" for i, r in rows.items()], ""]


def reused_note(result: dict) -> str:
    """How much of the run time was spent in earlier invocations (runs reused from ``--runs-dir``)."""
    reused = [r for r in result["runs"].values() if r.get("reused")]
    if not reused:
        return ""
    minutes = sum(r["seconds"] for r in result["runs"].values()) / 60
    return (f"; {len(reused)} of {len(result['runs'])} method runs reused from an earlier invocation with the same "
            f"settings (every run's own time in the JSON's runs: {minutes:.0f} worker-minutes in all)")


def settings_section(result: dict) -> list[str]:
    s, p = result["settings"], result["pairs"]
    m = s["machine"]
    return [
        "## Settings", "",
        f"* size `{s['size_name']}`: {json.dumps(s['size'])}",
        f"* methods: {json.dumps(s['methods'])}; LoRA: {json.dumps(s['lora']) if s['size']['lora'] else 'no'}",
        f"* pairs (pair seed {s['pair_seed']}): {p['prompts']} composed prompts × {s['size']['samples']} samples "
        f"(temperature {TEMPERATURE}, ≤ {s['size']['max_new_tokens']} new tokens) → {p['pairs']} pairs, "
        f"{p['dropped_ties']} prompts dropped as ties, {p['dropped_empty']} for empty answers; samples following "
        f"every instruction {p['sample_follow_all']:.3f}, chosen answers following every instruction "
        f"{p['chosen_follow_all']:.3f}; score = share of instructions followed − {TIE_BREAK} × violation tokens",
        f"* held out: {s['eval_prompts']} IFEval prompts (all instruction types covered by treg's checkers; "
        f"{'every such prompt' if not s['size']['eval_prompts'] else f'a fixed random subset, seed {EVAL_SEED}'}), "
        f"greedy answers of ≤ {s['size']['eval_max_new_tokens']} new tokens",
        f"* start weights {s['start_hash']} (every method, every seed); pairs fingerprint {p['fingerprint']}",
        f"* token-reward pass: treg's default contrastive templates, x⁺ {json.dumps(s['templates'][0])}, x⁻ "
        f"{json.dumps(s['templates'][1])}; sft_chosen's constant c = {s['sft_c']:.4f}",
        f"* run time {s['seconds'] / 60:.1f} min ({json.dumps(s['phase_seconds'])}){reused_note(result)}, "
        f"{s['workers']} worker(s); "
        f"backend {s['backend']}; machine: {m['processor']}, {m['cpus']} CPUs, CUDA {m['cuda']}, torch {m['torch']}, "
        f"load average at the end {m['load_average_at_end']}", ""]


def existing_notes(path: str | None) -> str:
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return "*(findings: written by hand between the notes markers; kept when the report is regenerated)*"


# --------------------------------------------------------------------------------------------------------- run
class BenchError(Exception):
    """A run that cannot give a result (e.g. too few pairs); the message says what to change."""


def estimate(size: Size, n_seeds: int, n_eval: int, workers: int, n_methods: int = len(METHODS)) -> dict:
    """Rough minutes per phase from a short calibration (greedy generation and a forward on the start model)."""
    from treg.scoring import score_completions

    model, tokenizer = _WORKER["model"], _WORKER["tokenizer"]
    prompts = [{"prompt": f"Name {i} colours."} for i in range(8)]
    generate_texts(model, tokenizer, prompts[:1], samples=0, max_new_tokens=1, seed=0, batch=1)  # warm-up
    t0 = time.time()
    generate_texts(model, tokenizer, prompts, samples=0, max_new_tokens=8, seed=0, batch=8)
    gen = 64 / (time.time() - t0) * 1.5  # larger batches run about 1.5x faster per token
    items = [(list(range(10, 70)), list(range(100, 150)))] * 8
    t0 = time.time()
    score_completions(model, items, batch_size=8, pad_token_id=0, show_progress=False)
    fwd = 8 * 110 / (time.time() - t0)
    pairs, length, runs = 0.8 * size.train_prompts, 70 + size.max_new_tokens, n_seeds * n_methods
    steps = size.max_steps * size.batch_size if size.max_steps > 0 else size.epochs * pairs
    minutes = {
        "sampling": size.train_prompts * size.samples * size.max_new_tokens / gen / workers / 60,
        "token_pass": pairs * 4 * length / fwd / 60,
        "start_eval": n_eval * size.eval_max_new_tokens / gen / 60,
        "methods": runs * (steps * 2 * length * 3.5 / fwd + pairs * 2 * length / fwd
                           + n_eval * size.eval_max_new_tokens / gen) / workers / 60,
    }
    minutes["methods"] += runs * 15 / workers / 60  # building each trainer, merging, loading (measured ~15 s)
    return {"generate_tokens_per_s": round(gen, 1), "forward_tokens_per_s": round(fwd, 1),
            **{k: round(v, 1) for k, v in minutes.items()}, "total": round(sum(minutes.values()), 1)}


def phase(name: str, t0: float, times: dict, extra: str = "") -> float:
    times[name] = round(time.time() - t0, 1)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {times[name]:.0f} s{'  ' + extra if extra else ''}", flush=True)
    return time.time()


def make_pool(workers: int, spec: str, cache_dir: str | None):
    if workers <= 1:
        return None
    import concurrent.futures
    import multiprocessing as mp

    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                                  initializer=init_worker, initargs=(spec, 1, cache_dir))


def train_all(pool, seeds, data_dir, held_out, size, times, methods=tuple(METHODS), runs_dir=None,
              fixed=None) -> dict:
    """Every (method, seed) run, in the pool when there is one; one line per finished run. With ``runs_dir``, each
    finished run is saved there under :func:`run_key` and a saved one is reused instead of trained again, so a
    killed benchmark resumes where it stopped."""
    from tqdm.auto import tqdm

    jobs = [(seed, name, data_dir, held_out, size) for seed in seeds for name in methods]
    files = {(name, seed): run_file(runs_dir, name, seed, run_key(name, seed, size, fixed or {}))
             for seed in seeds for name in methods} if runs_dir else {}
    runs = {}
    bar = tqdm(total=len(jobs), desc="methods × seeds", disable=not sys.stderr.isatty())

    def done(r):
        runs[(r["method"], r["seed"])] = r
        reused = r.get("reused", False)
        if files and not reused:
            save_run(files[(r["method"], r["seed"])], r)
        acc = np.mean([x["follow_all"] for x in r["eval"]])
        bar.update(1)
        print(f"  seed {r['seed']} {r['method']:<11} prompt-level {acc:.3f}  loss {r['train_loss']:.4f}  "
              f"{r['steps']} steps, {r['train_seconds']:.0f} s training, {r['eval_seconds']:.0f} s answering, "
              f"{r['seconds']:.0f} s in all{'  (saved earlier: reused)' if reused else ''}", flush=True)

    todo = []
    for job in jobs:
        saved = load_run(files[(job[1], job[0])]) if files else None
        if saved is not None:
            done({**saved, "reused": True})
        else:
            todo.append(job)
    if pool is None:
        for job in todo:
            done(run_method(*job))
    else:
        import concurrent.futures

        for future in concurrent.futures.as_completed([pool.submit(_star_run_method, job) for job in todo]):
            done(future.result())
    bar.close()
    return runs


def run(args, size: Size, size_name: str) -> dict:
    import torch

    from treg.token_rewards.contrastive import DEFAULT_NEGATIVE_TEMPLATE, DEFAULT_POSITIVE_TEMPLATE

    start, times = time.time(), {}
    seeds = list(args.seeds or size.seeds)
    backend = backend_for(args.backend)
    init_worker(args.model, 1 if args.workers > 1 else args.threads, args.cache_dir)
    rows, held_out = training_rows(size, args.pair_seed), eval_rows(size, args.ifeval)
    est = estimate(size, len(seeds), len(held_out), args.workers, len(args.methods))
    print(f"real-model benchmark: {size_name} {size}, seeds {seeds}, {args.workers} worker(s), backend {backend}\n"
          f"  {len(rows)} training prompts, {len(held_out)} held-out IFEval prompts; estimate (rough, minutes): "
          f"{est}", flush=True)
    if args.estimate_only:
        return {"estimate_minutes": est}
    t0 = time.time()
    pool = make_pool(args.workers, args.model, args.cache_dir)
    try:
        pairs, pair_stats = make_pairs(rows, size, args.pair_seed, pool, backend)
        t0 = phase("pairs", t0, times, f"{pair_stats['pairs']} pairs, {pair_stats['dropped_ties']} ties dropped")
        if len(pairs) < 2:
            raise BenchError(f"only {len(pairs)} pairs from {len(rows)} prompts: raise the training prompts or "
                             "samples (a larger size).")
        start_future = pool.submit(eval_start, held_out, size) if pool is not None else None
        with tempfile.TemporaryDirectory(prefix="treg-real-") as workdir:
            data, marks = token_pass(_WORKER["model"], _WORKER["tokenizer"], pairs, size, workdir)
            _, sft_c = sft_chosen_data(data)
            data_dir = os.path.join(workdir, "pairs")
            data.save_to_disk(data_dir)
            t0 = phase("token-reward pass", t0, times)
            start_eval = start_future.result() if start_future is not None else eval_start(held_out, size)
            t0 = phase("start model on held-out prompts", t0, times,
                       f"prompt-level {np.mean([r['follow_all'] for r in start_eval['eval']]):.3f} "
                       f"({start_eval['seconds']:.0f} s of answering, beside the pass when in a worker)")
            fixed = {"model": args.model, "start": _WORKER["start_hash"],
                     "pairs": pair_stats["fingerprint"], "eval_keys": [r["key"] for r in held_out],
                     "templates": [DEFAULT_POSITIVE_TEMPLATE, DEFAULT_NEGATIVE_TEMPLATE]}
            runs_dir = None if args.no_resume else args.runs_dir
            if runs_dir:
                print(f"  finished runs are kept in {runs_dir} (a rerun with the same settings reuses them; "
                      "--no-resume trains every run again)", flush=True)
            runs = train_all(pool, seeds, data_dir, held_out, size, times, args.methods, runs_dir, fixed)
            t0 = phase("methods", t0, times)
            result = {"seeds": seeds, **summarize(runs, start_eval, data, marks, seeds, size),
                      "by_instruction": by_instruction(held_out, start_eval, runs, seeds)}
    finally:
        if pool is not None:
            pool.shutdown()
    hashes = {start_eval["start_hash"], *(r["start_hash"] for r in runs.values())}
    result["pairs"] = pair_stats
    result["runs"] = {f"{n}/{s}": {"start_hash": r["start_hash"], "steps": r["steps"], "train_loss": r["train_loss"],
                                   "seconds": round(r["seconds"], 1), "reused": bool(r.get("reused"))}
                      for (n, s), r in sorted(runs.items())}
    result["settings"] = {
        "model": args.model, "size_name": size_name, "size": asdict(size), "pair_seed": args.pair_seed,
        "methods": METHODS, "trained": list(args.methods),
        "lora": LORA, "temperature": TEMPERATURE, "eval_prompts": len(held_out),
        "eval_keys": [r["key"] for r in held_out], "start_hash": "/".join(sorted(hashes)), "backend": backend,
        "templates": [DEFAULT_POSITIVE_TEMPLATE, DEFAULT_NEGATIVE_TEMPLATE], "sft_c": sft_c, "workers": args.workers,
        "estimate_minutes": est, "phase_seconds": times, "seconds": time.time() - start, "out": args.out,
        "machine": machine(torch),
    }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true", help="a minutes-long run that checks the plumbing (tests)")
    which.add_argument("--gpu", action="store_true", help="the GPU size (bf16, full fine-tune; use --workers 1)")
    which.add_argument("--size", choices=list(SIZES), default=None, help="a size by name (default: default)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the size's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to train (default: all); differences need both of their methods")
    parser.add_argument("--pair-seed", type=int, default=0, help="seed of the prompts and sampled pairs")
    parser.add_argument("--workers", type=int, default=None, help="processes, one torch thread each (default 2 on "
                        "CPU, 1 on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads with --workers 1 (0: torch's; on a "
                        "busy CPU more threads than free cores is slower)")
    parser.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto",
                        help="sampling the pairs (auto: vLLM when importable and a GPU is present)")
    parser.add_argument("--ifeval", default=None, help="IFEval input_data.jsonl (default ../shared/data/ifeval)")
    parser.add_argument("--cache-dir", default=None, help="TREG_CACHE_DIR for the workers")
    parser.add_argument("--estimate-only", action="store_true", help="print the time estimate and stop")
    parser.add_argument("--runs-dir", default=None, help="where finished runs are kept, so that a killed benchmark "
                        "resumes (default: bench-real-model/ in treg's cache dir)")
    parser.add_argument("--no-resume", action="store_true", help="train every run again (saved runs are ignored)")
    parser.add_argument("--out", default="real-model.json")
    parser.add_argument("--report", default=None, help="markdown report path (its notes block is kept)")
    parser.add_argument("--report-from", default=None, help="only rewrite --report from this JSON")
    args = parser.parse_args(argv)
    from treg.files import write_json_atomic, write_text_atomic

    if args.report_from:
        write_text_atomic(args.report, report(json.loads(Path(args.report_from).read_text()),
                                              existing_notes(args.report)))
        return 0
    size_name = args.size or ("smoke" if args.smoke else "gpu" if args.gpu else "default")
    if args.workers is None:
        import torch

        args.workers = 1 if torch.cuda.is_available() else 2
    args.cache_dir = args.cache_dir or os.environ.get("TREG_CACHE_DIR")
    if args.runs_dir is None:
        from treg.files import default_cache_dir

        args.runs_dir = os.path.join(args.cache_dir or default_cache_dir(), "bench-real-model")
    try:
        result = run(args, SIZES[size_name], size_name)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.estimate_only:
        return 0
    write_json_atomic(args.out, result, indent=1)
    if args.report:
        write_text_atomic(args.report, report(result, existing_notes(args.report)))
    print("\n".join(verdict(result)))
    print(f"results in {args.out} ({result['settings']['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
