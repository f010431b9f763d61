"""Does T-REG assign token-level credit better than DPO? A benchmark with ground truth for every token.

    python bench/credit_assignment.py --quick --seeds 0 1 2 --out results.json [--report docs/credit-assignment]

The embedded toy task (``treg.synthetic``: copy, reverse, sort, increment digit strings) has an oracle that marks
every defect word, and the tiny model (pretrained and SFT-ed here from scratch, cached) solves it imperfectly and
answers quality instructions the way T-REG's contrastive prompts need. For each seed:

1. pairs the papers' way: ``--samples`` responses per prompt sampled from the SFT model, the oracle picks best
   (chosen) and worst (rejected), ties dropped; held-out pairs and prompts are built the same way from disjoint
   prompts;
2. r̂ by contrastive prompting (one pass, cached) and ``reward_auc``: ROC AUC of −r̂ for defect tokens over all
   chosen and rejected answer tokens of the training pairs (the end-of-turn token excluded);
3. every method trains from the same SFT model on the same pairs, then is measured on the held-out pairs and prompts:
   ``token_auc`` (ROC AUC of −log π/π_ref for defect tokens; β is a positive constant and does not change an AUC),
   ``pair_accuracy`` (the held-out chosen has the higher sequence log-ratio), ``oracle_accuracy`` (mean oracle
   score of greedy answers), ``exact_match`` (share of fully correct greedy answers) and ``sampled_accuracy`` (mean
   oracle score of one answer sampled at temperature 1, the distribution the pairs came from).

Methods: dpo, treg_dpo (DPO-REG), simpo, treg_simpo (SimPO-REG) and the paper's ablations of DPO-REG:
treg_dpo_no_weight (w ≡ 1), treg_dpo_dpo_rewards (r̂ from the seed's trained DPO model, METHOD.md §3) and
sft_reg (an SFT-on-chosen regularizer: r̂ ≡ c on chosen tokens and 0 on rejected ones, which makes the regularizer
−α·w·c·β·Σ log π(y_w); c is the seed's mean |r̂|, so its strength matches the contrastive rewards').

Means and 95% confidence intervals (Student t over seeds) are reported for each metric, and paired differences
(same seed, same data) for T-REG minus its base. Seeds vary the prompts, the sampled pairs and the training order;
the SFT model is the same for all. Work is spread over ``--workers`` processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from treg.files import write_atomic, write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Size:
    train_prompts: int
    eval_prompts: int
    samples: int
    epochs: float
    batch_size: int


SIZES = {
    "quick": Size(train_prompts=2048, eval_prompts=512, samples=4, epochs=2.0, batch_size=16),
    "full": Size(train_prompts=8192, eval_prompts=1024, samples=8, epochs=3.0, batch_size=32),
    "smoke": Size(train_prompts=48, eval_prompts=24, samples=4, epochs=1.0, batch_size=16),  # tests only
}

# Fixed before any result was seen: DPO β from the T-REG paper's Llama-3 recipe; α = 0.5, the largest value the
# paper uses; SimPO with γ/β = 0.5 (its Gemma recipe) at a β suited to a model whose answers are a few tokens long.
DPO = {"base_loss": "dpo", "beta": 0.1}
SIMPO = {"base_loss": "simpo", "beta": 2.0, "simpo_gamma": 1.0}
ALPHA = 0.5
METHODS = {
    "dpo": {**DPO, "treg_alpha": 0.0},
    "treg_dpo": {**DPO, "treg_alpha": ALPHA},
    "simpo": {**SIMPO, "treg_alpha": 0.0},
    "treg_simpo": {**SIMPO, "treg_alpha": ALPHA},
    "treg_dpo_no_weight": {**DPO, "treg_alpha": ALPHA, "treg_sequence_weight": False},
    "treg_dpo_dpo_rewards": {**DPO, "treg_alpha": ALPHA, "token_reward_source": "dpo_derived"},
    "sft_reg": {**DPO, "treg_alpha": ALPHA},
}
# Two balanced groups per seed for two workers; dpo_rewards needs the same group's trained DPO model.
GROUPS = (("dpo", "treg_dpo_dpo_rewards", "simpo", "treg_simpo"), ("treg_dpo", "treg_dpo_no_weight", "sft_reg"))
HEATMAP_ROWS = 3  # held-out pairs drawn in the token heatmap (seed of the first run only)


# ------------------------------------------------------------------------------------------------------ one seed
def _pairs(model, tokenizer, size: Size, seed: int):
    from treg.feedback.onpolicy import make_onpolicy_pairs
    from treg.synthetic import task_prompts

    train_prompts = task_prompts(size.train_prompts, seed=1000 * seed + 1)
    eval_prompts = task_prompts(size.eval_prompts, seed=1000 * seed + 2, exclude=set(train_prompts))
    train, train_stats = make_onpolicy_pairs(model, tokenizer, train_prompts, num_samples=size.samples, seed=seed,
                                             show_progress=False)
    held_out, _ = make_onpolicy_pairs(model, tokenizer, eval_prompts, num_samples=size.samples, seed=seed + 7919,
                                      show_progress=False)
    return train, held_out, eval_prompts, train_stats


# The preference stage's learning rate is a tenth of the tiny model's SFT peak (1e-3), the usual practice of
# training the preference stage far more gently than SFT (the DPO/SimPO papers use 1/20–1/40). --learning-rate
# overrides it; docs/credit-assignment.md also reports 5e-4.
LEARNING_RATE = 1e-4


def sft_reg_data(data):
    """sft_reg's rows (also bench/real_model.py's sft_chosen): r̂ ≡ c, the pass's mean |r̂| over chosen and rejected
    tokens, on every chosen token and 0 on every rejected one; returns (rows, c)."""
    from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS

    rhat = [np.asarray(r) for col in (CHOSEN_REWARDS, REJECTED_REWARDS) for r in data[col]]
    c = float(np.mean(np.abs(np.concatenate(rhat)))) if rhat else 0.0
    chosen = [[c] * len(r) for r in data[CHOSEN_REWARDS]]
    rejected = [[0.0] * len(r) for r in data[REJECTED_REWARDS]]
    data = data.remove_columns([CHOSEN_REWARDS, REJECTED_REWARDS])
    return data.add_column(CHOSEN_REWARDS, chosen).add_column(REJECTED_REWARDS, rejected), c


def _config(output_dir: str, size: Size, seed: int, learning_rate: float = LEARNING_RATE, **method):
    from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE
    from treg.trainer import TRegConfig

    return TRegConfig(
        output_dir=output_dir,
        contrastive_positive_template=POSITIVE_TEMPLATE,  # the wording the tiny model was instruction-tuned on
        contrastive_negative_template=NEGATIVE_TEMPLATE,
        learning_rate=learning_rate,
        num_train_epochs=size.epochs,
        per_device_train_batch_size=size.batch_size,
        max_length=128,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        save_strategy="no",
        report_to="none",
        use_cpu=not _cuda(),
        activation_checkpointing=False,
        disable_tqdm=True,
        logging_steps=10_000,
        seed=seed,
        **method,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _token_scores(model, dataset, ref: dict, pad_id: int) -> dict:
    """log π_θ − log π_ref per answer token of every held-out chosen and rejected response."""
    from treg.scoring import score_completions

    out = {}
    for side in ("chosen", "rejected"):
        items = list(zip(dataset["prompt_ids"], dataset[f"{side}_ids"]))
        logps = score_completions(model, items, batch_size=64, pad_token_id=pad_id, show_progress=False)
        out[side] = [lp - r for lp, r in zip(logps, ref[side])]
    return out


def _measure(model, tokenizer, held_out, ref, flags, eval_prompts, pad_id, seed) -> tuple[dict, dict]:
    from treg.feedback.onpolicy import greedy_oracle_score, sampled_oracle_score
    from treg.synthetic import defect_auc, first_defect_auc

    scores = _token_scores(model, held_out, ref, pad_id)
    greedy = greedy_oracle_score(model, tokenizer, eval_prompts, show_progress=False)
    sampled = sampled_oracle_score(model, tokenizer, eval_prompts, seed=seed, show_progress=False)
    margins = [c.sum() - r.sum() for c, r in zip(scores["chosen"], scores["rejected"])]
    metrics = {
        "token_auc": defect_auc(scores["chosen"] + scores["rejected"], flags["chosen"] + flags["rejected"]),
        "token_auc_rejected": defect_auc(scores["rejected"], flags["rejected"]),
        "token_auc_first_defect": first_defect_auc(scores["chosen"] + scores["rejected"],
                                                   flags["chosen"] + flags["rejected"]),
        "pair_accuracy": float(np.mean([m > 0 for m in margins])),
        "oracle_accuracy": greedy["oracle_accuracy"],
        "exact_match": greedy["exact_match"],
        "sampled_accuracy": sampled["oracle_accuracy"],
    }
    return metrics, scores


def run_group(seed: int, group: tuple[str, ...], size: Size, cache_dir: str, learning_rate: float = LEARNING_RATE,
              heatmap_seed: int = 0) -> dict:
    """Train and measure the methods of one group for one seed (a worker process)."""
    import torch

    torch.set_num_threads(1)
    os.environ["TREG_CACHE_DIR"] = cache_dir
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.set_verbosity_error()
    from transformers import PrinterCallback

    from treg.feedback.onpolicy import greedy_oracle_score, sampled_oracle_score
    from treg.scoring import score_completions
    from treg.synthetic import load_tiny_model, token_defects
    from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS
    from treg.trainer import TRegTrainer

    start = time.time()
    sft, tokenizer, _ = load_tiny_model(cache_dir=cache_dir, show_progress=False)
    pad_id = tokenizer.pad_token_id
    train, held_out_raw, eval_prompts, stats = _pairs(sft, tokenizer, size, seed)
    out = {"seed": seed, "pairs": stats, "held_out_pairs": len(held_out_raw), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="treg-credit-") as tmp:
        # The contrastive pass on training and held-out pairs (cached, shared by every method of this seed).
        probe = TRegTrainer(copy.deepcopy(sft), args=_config(tmp, size, seed, **METHODS["treg_dpo"]),
                            train_dataset=train, eval_dataset=held_out_raw, processing_class=tokenizer)
        train_tok, held_out = probe.train_dataset, probe.eval_dataset
        del probe
        train_flags = {s: token_defects(tokenizer, train_tok, s) for s in ("chosen", "rejected")}
        flags = {s: token_defects(tokenizer, held_out, s) for s in ("chosen", "rejected")}
        from treg.synthetic import defect_auc, first_defect_auc

        rhat = list(train_tok[CHOSEN_REWARDS]) + list(train_tok[REJECTED_REWARDS])
        out["reward_auc"] = defect_auc(rhat, train_flags["chosen"] + train_flags["rejected"])
        out["reward_auc_first_defect"] = first_defect_auc(rhat, train_flags["chosen"] + train_flags["rejected"])
        out["reward_auc_held_out"] = defect_auc(
            list(held_out[CHOSEN_REWARDS]) + list(held_out[REJECTED_REWARDS]), flags["chosen"] + flags["rejected"]
        )
        ref = {
            s: score_completions(sft, list(zip(held_out["prompt_ids"], held_out[f"{s}_ids"])), batch_size=64,
                                 pad_token_id=pad_id, show_progress=False)
            for s in ("chosen", "rejected")
        }
        sft_greedy = greedy_oracle_score(sft, tokenizer, eval_prompts, show_progress=False)
        sft_sampled = sampled_oracle_score(sft, tokenizer, eval_prompts, seed=seed, show_progress=False)
        out["sft"] = {"oracle_accuracy": sft_greedy["oracle_accuracy"], "exact_match": sft_greedy["exact_match"],
                      "sampled_accuracy": sft_sampled["oracle_accuracy"]}
        heat = {"rows": [], "rhat": {}, "methods": {}}
        if seed == heatmap_seed:
            rows = [i for i, f in enumerate(flags["rejected"]) if any(f)][:HEATMAP_ROWS]
            heat["rows"] = rows
            heat["tokens"] = [[tokenizer.decode([t]) for t in held_out[i]["rejected_ids"]] for i in rows]
            heat["defects"] = [flags["rejected"][i] for i in rows]
            heat["prompts"] = [held_out[i]["prompt"][0]["content"] for i in rows]
            heat["rhat"] = [held_out[i][REJECTED_REWARDS] for i in rows]
        dpo_dir = None
        for name in group:
            t0 = time.time()
            method = dict(METHODS[name])
            data = train
            if name == "treg_dpo_dpo_rewards":
                method["token_reward_model"] = dpo_dir
            if name == "sft_reg":
                data, _ = sft_reg_data(train_tok)
            config = _config(os.path.join(tmp, name), size, seed, learning_rate, **method)
            trainer = TRegTrainer(copy.deepcopy(sft), args=config, train_dataset=data, processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            logs = [h for h in trainer.state.log_history if "train_loss" in h]
            metrics, scores = _measure(trainer.model, tokenizer, held_out, ref, flags, eval_prompts, pad_id, seed)
            metrics["train_loss"] = logs[-1]["train_loss"] if logs else float("nan")
            metrics["train_seconds"] = time.time() - t0
            out["methods"][name] = metrics
            if heat["rows"]:
                heat["methods"][name] = [scores["rejected"][i].tolist() for i in heat["rows"]]
            if name == "dpo":
                dpo_dir = os.path.join(tmp, "dpo-model")
                trainer.save_model(dpo_dir)
            del trainer
            print(f"  seed {seed} {name:<22} token_auc {metrics['token_auc']:.3f}  oracle "
                  f"{metrics['oracle_accuracy']:.3f}  ({metrics['train_seconds']:.0f} s)", flush=True)
    out["heatmap"] = heat
    out["seconds"] = time.time() - start
    return out


def _run_group_star(args):
    return run_group(*args)


# ----------------------------------------------------------------------------------------------------- statistics
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile (table; df between entries rounds down, i.e. the wider interval)."""
    if df <= 0:
        return float("nan")
    keys = [k for k in _T975 if k <= df]
    return _T975[max(keys)] if df <= 30 else 1.96


def mean_ci(values) -> dict:
    """Mean and 95% CI (Student t) of per-seed values; a single seed gives an undefined (NaN) interval."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "per_seed": list(map(float, values))}
    m = float(v.mean())
    half = t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": m, "ci95": [m - half, m + half], "per_seed": [float(x) for x in values]}


def summarize(runs: list[dict], size_name: str, seeds: list[int], seconds: float,
              learning_rate: float = LEARNING_RATE) -> dict:
    by_seed: dict[int, dict] = {}
    for r in runs:
        merged = by_seed.setdefault(r["seed"], {"methods": {}})
        merged["methods"].update(r["methods"])
        for key in ("reward_auc", "reward_auc_held_out", "reward_auc_first_defect", "sft", "pairs",
                    "held_out_pairs"):
            merged[key] = r[key]
    order = [s for s in seeds if s in by_seed]
    reward = mean_ci([by_seed[s]["reward_auc"] for s in order])
    result = {
        "reward_auc": reward["mean"],
        "reward_auc_ci95": reward["ci95"],
        "reward_auc_per_seed": reward["per_seed"],
        "reward_auc_held_out": mean_ci([by_seed[s]["reward_auc_held_out"] for s in order])["mean"],
        "reward_auc_first_defect": mean_ci([by_seed[s]["reward_auc_first_defect"] for s in order])["mean"],
        "sft": {k: mean_ci([by_seed[s]["sft"][k] for s in order])["mean"]
                for k in ("oracle_accuracy", "exact_match", "sampled_accuracy")},
        "methods": {},
        "differences": {},
        "seeds": order,
        "size": size_name,
        "config": {"size": SIZES[size_name].__dict__, "methods": METHODS, "learning_rate": learning_rate},
        "pairs_per_seed": [by_seed[s]["pairs"] for s in order],
        "seconds": seconds,
    }
    metric_names = ("token_auc", "token_auc_rejected", "token_auc_first_defect", "pair_accuracy",
                    "oracle_accuracy", "exact_match", "sampled_accuracy", "train_loss")
    for name in METHODS:
        if not all(name in by_seed[s]["methods"] for s in order):
            continue
        entry = {}
        for metric in metric_names:
            stats = mean_ci([by_seed[s]["methods"][name][metric] for s in order])
            entry[metric] = stats["mean"]
            entry[f"{metric}_ci95"] = stats["ci95"]
            entry[f"{metric}_per_seed"] = stats["per_seed"]
        result["methods"][name] = entry
    for treated, base in (("treg_dpo", "dpo"), ("treg_simpo", "simpo")):
        if treated in result["methods"] and base in result["methods"]:
            diff = {}
            for metric in ("token_auc", "token_auc_first_defect", "oracle_accuracy", "sampled_accuracy",
                           "pair_accuracy"):
                stats = mean_ci([by_seed[s]["methods"][treated][metric] - by_seed[s]["methods"][base][metric]
                                 for s in order])
                diff[metric] = stats["mean"]
                diff[f"{metric}_ci95"] = stats["ci95"]
                diff[f"{metric}_per_seed"] = stats["per_seed"]
            result["differences"][f"{treated}-{base}"] = diff
    d = result["differences"].get("treg_dpo-dpo")
    if d:
        result["targets"] = {
            "reward_auc>=0.8": result["reward_auc"] >= 0.8,
            "treg_dpo token_auc >= dpo + 0.1": d["token_auc"] >= 0.1,
            "treg_dpo oracle_accuracy > dpo, CI excludes 0": d["oracle_accuracy_ci95"][0] > 0,
        }
    return result


def markdown_table(result: dict) -> str:
    def cell(entry, metric):
        lo, hi = entry[f"{metric}_ci95"]
        return f"{entry[metric]:.3f} [{lo:.3f}, {hi:.3f}]" if not math.isnan(lo) else f"{entry[metric]:.3f}"

    cols = ("token_auc", "token_auc_first_defect", "oracle_accuracy", "exact_match", "sampled_accuracy",
            "pair_accuracy")
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    sft = result["sft"]
    lines.append(f"| SFT model (start) | — | — | {sft['oracle_accuracy']:.3f} | {sft['exact_match']:.3f} | "
                 f"{sft['sampled_accuracy']:.3f} | — |")
    for name, e in result["methods"].items():
        lines.append(f"| {name} | " + " | ".join(cell(e, c) for c in cols) + " |")
    lines.append("")
    diff_cols = ("token_auc", "token_auc_first_defect", "oracle_accuracy", "sampled_accuracy", "pair_accuracy")
    lines.append("| paired difference | " + " | ".join(diff_cols) + " |")
    lines.append("|---" * (len(diff_cols) + 1) + "|")
    for name, d in result["differences"].items():
        lines.append(f"| {name} | " + " | ".join(cell(d, c) for c in diff_cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- report
def write_report(result: dict, heat: dict, prefix: str) -> list[str]:
    """``{prefix}-metrics.png`` (metric per method with 95% CIs) and ``{prefix}-heatmap.{png,html}``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from treg.viz import TokenHeatmap, render_html, render_png

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    names = list(result["methods"])
    fig = Figure(figsize=(14, 3.8))
    FigureCanvasAgg(fig)
    for k, metric in enumerate(("token_auc", "oracle_accuracy", "sampled_accuracy", "pair_accuracy")):
        ax = fig.add_subplot(1, 4, k + 1)
        means = [result["methods"][n][metric] for n in names]
        cis = [result["methods"][n][f"{metric}_ci95"] for n in names]
        err = np.array([[m - lo, hi - m] for m, (lo, hi) in zip(means, cis)]).T
        err = np.nan_to_num(err)
        colors = ["#1a9850" if n.startswith("treg") else "#888888" for n in names]
        ax.bar(range(len(names)), means, yerr=err, color=colors, capsize=3)
        for n_i, n in enumerate(names):
            ax.scatter([n_i] * len(result["methods"][n][f"{metric}_per_seed"]),
                       result["methods"][n][f"{metric}_per_seed"], s=8, color="black", zorder=3)
        if metric in ("oracle_accuracy", "sampled_accuracy"):
            ax.axhline(result["sft"][metric], color="#d73027", lw=1, ls="--", label="SFT model")
            ax.legend(fontsize=7, loc="lower right")
        if metric == "token_auc":
            ax.axhline(0.5, color="black", lw=0.6, ls=":")
        lows = [lo for lo, _ in cis if not math.isnan(lo)] + [min(result["methods"][n][f"{metric}_per_seed"])
                                                            for n in names]
        ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(max(means) + 0.05, max(
            [hi for _, hi in cis if not math.isnan(hi)] or [0]) + 0.02)))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    seeds = result["seeds"]
    fig.suptitle(f"credit-assignment benchmark ({result['size']}, seeds {seeds}): mean, 95% CI, per-seed dots",
                 fontsize=9)
    fig.tight_layout()
    metrics_png = f"{prefix}-metrics.png"
    write_atomic(metrics_png, lambda tmp: fig.savefig(tmp, dpi=130))

    heatmaps = []
    for j, row in enumerate(heat.get("rows", [])):
        rows = {"r̂ (self-generated)": heat["rhat"][j]}
        for name, values in heat["methods"].items():
            rows[f"{name}: log π/π_ref"] = values[j]
        heatmaps.append(TokenHeatmap(tokens=heat["tokens"][j], rows=rows, defects=heat["defects"][j],
                                     title=f"held-out row {row}: {heat['prompts'][j]!r} → rejected response"))
    paths = [metrics_png]
    if heatmaps:
        paths.append(render_png(heatmaps, f"{prefix}-heatmap.png"))
        render_html(heatmaps, f"{prefix}-heatmap.html")
        paths.append(f"{prefix}-heatmap.html")
    return paths


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2-core CPU size (default)")
    size.add_argument("--full", action="store_true", help="GPU size")
    size.add_argument("--smoke", action="store_true", help="a seconds-long run that checks the plumbing (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (one torch thread each)")
    parser.add_argument("--out", default="credit-assignment.json")
    parser.add_argument("--report", default=None, help="path prefix for the PNG/HTML figures")
    parser.add_argument("--cache-dir", default=None, help="tiny model and token-reward cache (default TREG_CACHE_DIR)")
    args = parser.parse_args(argv)
    size_name = "full" if args.full else "smoke" if args.smoke else "quick"
    size = SIZES[size_name]
    from treg.files import default_cache_dir
    from treg.synthetic import load_tiny_model

    cache_dir = args.cache_dir or default_cache_dir()
    start = time.time()
    print(f"credit-assignment benchmark: {size_name} {size}, lr {args.learning_rate}, seeds {args.seeds}, "
          f"{args.workers} workers")
    load_tiny_model(cache_dir=cache_dir)  # build once (cached) before the workers start
    selected = set(args.methods)
    if "treg_dpo_dpo_rewards" in selected:
        selected.add("dpo")
    groups = [tuple(m for m in g if m in selected) for g in GROUPS]
    jobs = [(seed, g, size, cache_dir, args.learning_rate, args.seeds[0]) for seed in args.seeds for g in groups if g]
    if args.workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            runs = pool.map(_run_group_star, jobs, chunksize=1)
    else:
        runs = [run_group(*job) for job in jobs]
    result = summarize(runs, size_name, args.seeds, time.time() - start, args.learning_rate)
    heat = next((dict(r["heatmap"]) for r in runs if r["heatmap"]["rows"]), {})
    if heat:  # every group drew the same held-out rows; gather the methods in the table's order
        drawn = {k: v for r in runs if r["heatmap"]["rows"] for k, v in r["heatmap"]["methods"].items()}
        heat["methods"] = {name: drawn[name] for name in METHODS if name in drawn}
    write_json_atomic(args.out, result, indent=2)
    print()
    print(f"reward_auc (r̂ vs defect tokens, training pairs): {result['reward_auc']:.3f} "
          f"{result['reward_auc_ci95']}  held-out {result['reward_auc_held_out']:.3f}  up to the first defect "
          f"{result['reward_auc_first_defect']:.3f}")
    print(markdown_table(result))
    for target, met in result.get("targets", {}).items():
        print(f"target {target}: {'met' if met else 'NOT met'}")
    if args.report:
        for path in write_report(result, heat, args.report):
            print(f"wrote {path}")
    print(f"results in {args.out} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
