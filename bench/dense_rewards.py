"""Do RELC's dense critic rewards make online RL more sample-efficient than the sparse reward alone? Measured.

    python bench/dense_rewards.py --quick --out docs/dense-rewards.json --plot docs/dense-rewards.png

Setting (fixed before any result was seen). Policy: the embedded tiny SFT model (``treg.synthetic``). Prompts: toy
digit tasks (copy, reverse, sort, inc) of 3–6 digits, the model's training distribution; at temperature 1 about half
of its answers are entirely correct, so there is room to learn. Extrinsic reward: **sparse**, 1 if the answer is
entirely correct, else 0 (``toy:exact``). Trainer: :class:`treg.rl.TRegGRPOTrainer` (TRL GRPO, group-scaled
advantages, DAPO loss, β = 0), G = 8 samples per prompt, 8 prompts per step, one optimizer step per generation.

Arms (all from the same model, same seeds, same prompts; only the reward differs):

* ``sparse``     α2 = 0: the stock GRPO objective.
* ``rule``       + the rule critic (``rule:toy``, a deterministic stand-in for a perfect critic LLM: BAD spans exactly
                 on the oracle's defect words), BAD only (r_in = −0.25 per marked token), τ = 0.5 (failed answers
                 only), α2 = 4 (one BAD token's α2·|r_in| = 1, the typical size of GRPO's scaled advantage), γ = 1.
* ``rule_g0``    as ``rule`` with γ = 0: each marked token's own reward, no reward-to-go.
* ``llm``        + the tiny model itself as critic LLM (``treg:tiny``, greedy, 32 new tokens, 2 few-shot examples,
                 GOOD +0.25 / BAD −0.25), τ = 0.5, α2 = 4, γ = 1. It was never trained to critique; expect many
                 unparseable answers (counted, r_in = 0).

Measured per seed: the held-out exact-match rate of one answer sampled at temperature 1 (the extrinsic reward on
256 held-out prompts, the same prompts and sampling seed for every arm) every ``eval_every`` steps, from step 0; the
training reward per step; the critic's counters. Reported: mean and 95% CI (Student t over seeds) of the held-out
reward at the fixed budget (last step) and of its mean over the evaluation points (area under the curve per step),
and paired differences to ``sparse`` (same seed). JSON is written atomically; ``--plot`` draws the curves.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings

from treg.files import write_atomic, write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARMS = {
    "sparse": dict(critic_model=None, critic_alpha_in=0.0),
    "rule": dict(
        critic_model="rule:toy",
        critic_alpha_in=4.0,
        critic_gamma=1.0,
        critic_good_value=0.0,
        critic_bad_value=-0.25,
        critic_threshold=0.5,
    ),
    "llm": dict(
        critic_model="treg:tiny",
        critic_alpha_in=4.0,
        critic_gamma=1.0,
        critic_good_value=0.25,
        critic_bad_value=-0.25,
        critic_threshold=0.5,
        critic_max_new_tokens=32,
        critic_few_shot=2,
    ),
}
ARMS["rule_g0"] = {**ARMS["rule"], "critic_gamma": 0.0}  # the same perfect critic, penalty only on defect tokens
ARMS = {k: ARMS[k] for k in ("sparse", "rule", "rule_g0", "llm")}  # report order
SIZES = {
    # steps, eval_every, train prompts, eval prompts, prompts per step
    "quick": dict(steps=40, eval_every=5, train_prompts=512, eval_prompts=256, prompts_per_step=8),
    "full": dict(steps=120, eval_every=10, train_prompts=2048, eval_prompts=512, prompts_per_step=8),
    "smoke": dict(steps=2, eval_every=1, train_prompts=16, eval_prompts=8, prompts_per_step=2),
}
NUM_GENERATIONS = 8
LEARNING_RATE = 1e-4


def t_ci(values) -> dict:
    """Mean and 95% Student-t confidence interval over seeds (a single value has no interval: NaN bounds)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean()) if len(v) else float("nan")
    if len(v) < 2:
        return {"mean": mean, "ci95": [float("nan"), float("nan")], "n": int(len(v))}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(len(v))}


def eval_exact(model, tokenizer, prompts, seed: int) -> float:
    """Share of entirely correct answers, one sampled at temperature 1 per prompt (global RNG state restored)."""
    import torch

    from treg.feedback.onpolicy import sampled_oracle_score

    state = torch.get_rng_state()
    try:
        out = sampled_oracle_score(
            model, tokenizer, prompts, seed=seed, temperature=1.0, batch_size=128, show_progress=False
        )
    finally:
        torch.set_rng_state(state)
    return out["exact_match"]


def run_one(arm: str, seed: int, size: str, work_dir: str, lengths: tuple[int, int] = (3, 6)) -> dict:
    """Train one arm with one seed; returns its curves and counters."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from treg.rl import CriticTokenRewards, ToyReward, TRegGRPOConfig, TRegGRPOTrainer, build_critic_rewards
    from treg.synthetic import load_tiny_model, task_prompts

    torch.set_num_threads(1)
    s = SIZES[size]
    model, tokenizer, _ = load_tiny_model(show_progress=False)
    lo, hi = lengths
    # the same held-out prompts for every run
    eval_prompts = task_prompts(s["eval_prompts"], seed=10_000, min_len=lo, max_len=hi)
    train_prompts = task_prompts(s["train_prompts"], seed=seed, exclude=set(eval_prompts), min_len=lo, max_len=hi)
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in train_prompts]})
    batch = s["prompts_per_step"] * NUM_GENERATIONS
    settings = dict(ARMS[arm])
    critic_model = settings.pop("critic_model")
    config = TRegGRPOConfig(
        output_dir=os.path.join(work_dir, f"{arm}-{seed}"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=seed,
        max_steps=s["steps"],
        per_device_train_batch_size=batch,
        num_generations=NUM_GENERATIONS,
        max_completion_length=24,
        temperature=1.0,
        learning_rate=LEARNING_RATE,
        beta=0.0,
        critic_model=critic_model,
        critic_batch_size=64,
        critic_cache_dir="none",
        **settings,
    )
    curve: list[tuple[int, float]] = []

    class EvalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % s["eval_every"] == 0 or state.global_step == s["steps"]:
                curve.append((state.global_step, eval_exact(kwargs["model"], tokenizer, eval_prompts, seed)))

    curve.append((0, eval_exact(model, tokenizer, eval_prompts, seed)))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TRegGRPOTrainer(
            model,
            reward_funcs=[ToyReward("exact")],
            args=config,
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[EvalCallback()],
        )
        trainer.remove_callback(PrinterCallback)  # per-step log dicts; the curves are in the JSON
        critic: CriticTokenRewards | None = build_critic_rewards(config, tokenizer) if critic_model else None
        if critic is not None:
            critic.show_progress = False
        trainer.critic_rewards = critic
        trainer.train()
    seconds = time.perf_counter() - start
    train_reward = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "arm": arm,
        "seed": seed,
        "eval_steps": [st for st, _ in curve],
        "eval_exact": [v for _, v in curve],
        "train_reward": train_reward,
        "critic": dict(trainer.critic_totals),
        "seconds": round(seconds, 2),
    }


def summarize(runs: list[dict], arms: list[str]) -> dict:
    import numpy as np

    out = {}
    by_arm = {a: sorted((r for r in runs if r["arm"] == a), key=lambda r: r["seed"]) for a in arms}
    for arm, rs in by_arm.items():
        if not rs:
            continue
        final = [r["eval_exact"][-1] for r in rs]
        auc = [float(np.mean(r["eval_exact"])) for r in rs]
        steps = rs[0]["eval_steps"]
        curve = [t_ci([r["eval_exact"][k] for r in rs]) for k in range(len(steps))]
        train = [t_ci([r["train_reward"][k] for r in rs]) for k in range(min(len(r["train_reward"]) for r in rs))]
        critic = {}
        for r in rs:
            for k, v in r["critic"].items():
                critic[k] = critic.get(k, 0) + v
        out[arm] = {
            "settings": ARMS[arm],
            "seeds": [r["seed"] for r in rs],
            "final_exact": t_ci(final),
            "auc_exact": t_ci(auc),
            "start_exact": t_ci([r["eval_exact"][0] for r in rs]),
            "eval_steps": steps,
            "eval_curve": curve,
            "train_reward_curve": train,
            "critic_totals": critic,
            "seconds_per_run": t_ci([r["seconds"] for r in rs])["mean"],
        }
    base = {r["seed"]: r for r in by_arm.get("sparse", [])}
    comparisons = {}
    for arm, rs in by_arm.items():
        if arm == "sparse" or not base:
            continue
        pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
        comparisons[f"{arm}-sparse"] = {
            "final_exact": t_ci([a["eval_exact"][-1] - b["eval_exact"][-1] for a, b in pairs]),
            "auc_exact": t_ci([float(np.mean(a["eval_exact"]) - np.mean(b["eval_exact"])) for a, b in pairs]),
        }
    return {"arms": out, "comparisons": comparisons}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"sparse": "-", "rule": "-", "rule_g0": "-.", "llm": ":"}  # llm overlays sparse when it always fails
    for arm, res in result["summary"]["arms"].items():
        steps = res["eval_steps"]
        mean = [c["mean"] for c in res["eval_curve"]]
        lo = [c["ci95"][0] for c in res["eval_curve"]]
        hi = [c["ci95"][1] for c in res["eval_curve"]]
        (line,) = axes[0].plot(steps, mean, marker="o", ms=3, label=arm, ls=styles.get(arm, "-"), lw=2)
        axes[0].fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
        train = [c["mean"] for c in res["train_reward_curve"]]
        axes[1].plot(range(1, len(train) + 1), train, label=arm, color=line.get_color(), ls=styles.get(arm, "-"))
    n = max(len(res["seeds"]) for res in result["summary"]["arms"].values())
    axes[0].set(
        xlabel="optimizer step",
        ylabel="held-out exact match (T=1 sample)",
        title=f"Held-out reward, mean and 95% CI over {n} seeds",
    )
    axes[1].set(
        xlabel="optimizer step",
        ylabel="training reward (mean over the step's samples)",
        title="Training reward (mean over seeds)",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def _worker(job):
    return run_one(*job)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the 2-core CPU size (default: full)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run that only checks the plumbing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="dense-rewards.json")
    p.add_argument("--plot", default=None, help="PNG of the curves")
    p.add_argument("--workers", type=int, default=1, help="processes (one torch thread each)")
    p.add_argument("--work-dir", default=None, help="trainer output dirs (default: a temporary folder)")
    p.add_argument(
        "--task-lengths", type=int, nargs=2, default=[3, 6], metavar=("MIN", "MAX"),
        help="digits per toy task (3 6: the model's training range; 6 7: a hard setting where the sparse reward "
        "rarely fires)",
    )
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    load_start = os.getloadavg()
    start = time.perf_counter()
    from treg.synthetic import load_tiny_model

    load_tiny_model(show_progress=True)  # build the cached model once, before any worker needs it
    jobs = [(arm, seed, size) for seed in args.seeds for arm in args.arms]
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="treg-dense-")
    jobs = [(*j, work_dir, tuple(args.task_lengths)) for j in jobs]
    from tqdm.auto import tqdm

    runs = []
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for r in tqdm(pool.imap_unordered(_worker, jobs), total=len(jobs), desc="Runs"):
                runs.append(r)
    else:
        for job in tqdm(jobs, desc="Runs"):
            runs.append(_worker(job))
            r = runs[-1]
            print(
                f"{r['arm']:8s} seed {r['seed']}: exact {r['eval_exact'][0]:.3f} -> {r['eval_exact'][-1]:.3f} "
                f"({r['seconds']:.0f} s) critic {r['critic']}",
                file=sys.stderr,
                flush=True,
            )
    wall = time.perf_counter() - start
    result = {
        "benchmark": "dense_rewards",
        "size": size,
        "setting": {
            **SIZES[size],
            "num_generations": NUM_GENERATIONS,
            "learning_rate": LEARNING_RATE,
            "extrinsic_reward": "toy:exact",
            "task_lengths": f"{args.task_lengths[0]}-{args.task_lengths[1]}",
            "temperature": 1.0,
            "beta": 0.0,
        },
        "seeds": args.seeds,
        "summary": summarize(runs, args.arms),
        "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"])),
        "wall_s": round(wall, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
            "workers": args.workers,
        },
    }
    write_json_atomic(args.out, result, indent=2)
    if args.plot:
        plot(result, args.plot)
    for arm, res in result["summary"]["arms"].items():
        f, a = res["final_exact"], res["auc_exact"]
        print(
            f"{arm:8s} final {f['mean']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]  "
            f"auc {a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        )
    for name, c in result["summary"]["comparisons"].items():
        f, a = c["final_exact"], c["auc_exact"]
        print(
            f"{name:14s} final {f['mean']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]  "
            f"auc {a['mean']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}]"
        )
    print(f"wall {wall:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
