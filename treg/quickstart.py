"""``treg quickstart``: the whole T-REG path on the embedded tiny model, on a 2-core CPU in a few minutes.

Build (or load the cached) tiny instruction-following model → preference pairs built the papers' way (4 sampled
answers per prompt, the oracle keeps best and worst) → self-generated token rewards r̂ by contrastive prompting →
T-REG training → checkpoint → a summary that checks each signal against the task's ground truth: does r̂ point at
the defect tokens, does the trained policy prefer the better answers, and do its greedy answers improve?
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import PrinterCallback, TrainerCallback

from treg.feedback.onpolicy import greedy_oracle_score, make_onpolicy_pairs
from treg.scoring import score_completions
from treg.synthetic import (
    NEGATIVE_TEMPLATE,
    POSITIVE_TEMPLATE,
    defect_auc,
    load_tiny_model,
    task_prompts,
    token_defects,
)
from treg.token_rewards import CHOSEN_REWARDS, REF_CHOSEN, REF_REJECTED, REJECTED_REWARDS
from treg.trainer import TRegConfig, TRegTrainer


def _implicit_token_rewards(trainer, dataset) -> list[np.ndarray]:
    """β·(log π_θ − log π_ref) of the trained policy on every chosen, then every rejected token."""
    out = []
    for side, ref_col in (("chosen", REF_CHOSEN), ("rejected", REF_REJECTED)):
        items = list(zip(dataset["prompt_ids"], dataset[f"{side}_ids"]))
        policy = score_completions(
            trainer.model, items, batch_size=32, pad_token_id=trainer._tokenizer.pad_token_id, show_progress=False
        )
        out += [trainer.args.beta * (p - np.asarray(r)) for p, r in zip(policy, dataset[ref_col])]
    return out


class _CompactLog(TrainerCallback):
    """One short line per training log instead of the raw metrics dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"      step {state.global_step:>3}/{state.max_steps}  loss {float(logs['loss']):.4f}  "
                  f"reward acc {float(logs.get('rewards/accuracies', float('nan'))):.3f}  "
                  f"r̂ sign agreement {float(logs.get('treg/token_agreement', float('nan'))):.3f}")


def _render_sample(tokenizer, dataset, flags) -> str:
    row = next((i for i, f in enumerate(flags) if any(f)), 0)
    ids, rhat = dataset[row]["rejected_ids"], dataset[row][REJECTED_REWARDS]
    cells = [
        f"{tokenizer.decode([i])!r}:{r:+.2f}{'(defect)' if f else ''}" for i, r, f in zip(ids, rhat, flags[row])
    ]
    prompt = dataset[row]["prompt"][0]["content"]
    chosen, rejected = dataset[row]["chosen"][0]["content"], dataset[row]["rejected"][0]["content"]
    return (
        f"  prompt {prompt!r}: chosen {chosen!r}, rejected {rejected!r}\n"
        f"  r̂ on the rejected tokens:  " + "  ".join(cells)
    )


def run(output_dir: str = "treg-quickstart", train_prompts: int = 512, epochs: float = 2.0, alpha: float = 0.5,
        seed: int = 0) -> dict:
    start = time.time()
    # A tiny model gains nothing from more threads, and two threads competing with any other busy process on a
    # 2-core machine slow small kernels down by orders of magnitude.
    torch.set_num_threads(1)
    print("[1/6] tiny instruction-following model (pretrained and SFT-ed here once, then cached) ...")
    model, tokenizer, path = load_tiny_model()
    print(f"      {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, cached at {path}")
    print("[2/6] pairs the papers' way: 4 sampled answers per prompt, the oracle keeps best and worst ...")
    train_p = task_prompts(train_prompts, seed=seed)
    eval_p = task_prompts(128, seed=seed + 10_000, exclude=set(train_p))
    train, stats = make_onpolicy_pairs(model, tokenizer, train_p, seed=seed, show_progress=False)
    eval_, _ = make_onpolicy_pairs(model, tokenizer, eval_p, seed=seed + 1, show_progress=False)
    print(f"      {stats['pairs']} training pairs from {stats['prompts']} prompts ({stats['dropped_ties']} dropped: "
          f"all answers tied), {len(eval_)} held-out pairs")
    before = greedy_oracle_score(model, tokenizer, eval_p, show_progress=False)
    config = TRegConfig(
        output_dir=output_dir,
        treg_alpha=alpha,
        contrastive_positive_template=POSITIVE_TEMPLATE,  # the wording the tiny model was instruction-tuned on
        contrastive_negative_template=NEGATIVE_TEMPLATE,
        beta=0.1,
        learning_rate=1e-4,  # a tenth of the tiny model's SFT peak, as in bench/credit_assignment.py
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        max_length=128,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        logging_steps=0.125,  # a fraction of the total steps: 8 logs whatever the size
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        activation_checkpointing=False,
        seed=seed,
        disable_tqdm=True,
    )
    print("[3/6] token rewards r̂ by contrastive prompting + per-token reference log-probs ...")
    trainer = TRegTrainer(model, args=config, train_dataset=train, eval_dataset=eval_, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_CompactLog())
    eval_ds = trainer.eval_dataset
    flags = token_defects(tokenizer, eval_ds, "chosen") + token_defects(tokenizer, eval_ds, "rejected")
    reward_auc = defect_auc(list(eval_ds[CHOSEN_REWARDS]) + list(eval_ds[REJECTED_REWARDS]), flags)
    print(f"[4/6] training T-REG (DPO base, α={alpha}) on {len(train)} pairs ...")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = trainer.evaluate()
    token_auc = defect_auc(_implicit_token_rewards(trainer, eval_ds), flags)
    after = greedy_oracle_score(trainer.model, tokenizer, eval_p, show_progress=False)
    print(f"[5/6] saving checkpoint to {output_dir}")
    trainer.save_model(output_dir)
    summary = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "eval_reward_accuracy": metrics["eval_rewards/accuracies"],
        "eval_reward_margin": metrics["eval_rewards/margins"],
        "reward_auc": reward_auc,
        "token_auc": token_auc,
        "oracle_before": before["oracle_accuracy"],
        "oracle_after": after["oracle_accuracy"],
        "seconds": time.time() - start,
    }
    print("[6/6] summary (held-out pairs and prompts; the oracle knows the truth about every token)")
    print(f"  training loss            {summary['loss_first']:.4f} → {summary['loss_last']:.4f} ({len(losses)} logs)")
    print(f"  reward accuracy          {summary['eval_reward_accuracy']:.3f}  (chosen's implicit reward > rejected's)")
    print(f"  r̂ finds defect tokens    AUC {reward_auc:.3f}  (0.5 = chance; the model scored itself, no labels)")
    print(f"  policy token reward AUC  {token_auc:.3f}  (β·log π/π_ref vs true defects)")
    print(f"  greedy oracle score      {summary['oracle_before']:.3f} (SFT) → {summary['oracle_after']:.3f} (T-REG)"
          "  (preference training lowers this near-perfect SFT model's score; T-REG less than DPO, see "
          "docs/credit-assignment.md)")
    print(_render_sample(tokenizer, eval_ds, flags[len(eval_ds):]))
    print(f"  done in {summary['seconds']:.0f} s")
    return summary
