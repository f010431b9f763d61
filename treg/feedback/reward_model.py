"""Distilled RLAIF (METHOD.md §4): a reward model trained on soft AI preference labels.

With p = P(chosen is better) from the AI labeler (column ``ai_preference``; see :func:`load_label_dataset` for the
output of ``treg label``, where p is P(response_1 is better)) and
rewards r1 = r(prompt, chosen), r2 = r(prompt, rejected), the loss per pair is the cross-entropy

    ℓ = −[ p · log σ(r1 − r2) + (1 − p) · log σ(r2 − r1) ]

p = 1 is TRL's Bradley–Terry loss −log σ(r1 − r2); p = 0.5 is symmetric in the two responses and minimal at
r1 = r2 (its gradient in the margin is σ(r1 − r2) − p, zero at a zero margin).

Training reuses TRL's ``RewardTrainer`` (tokenization, chosen/rejected batching, metrics);
:class:`SoftLabelRewardTrainer` only carries the label column to the loss: it adds the column to the kept signature
columns, wraps the collator to batch it, and swaps the loss in ``compute_loss``.

Command line (registered as ``treg reward-model``)::

    python -m treg.feedback.reward_model --model treg:tiny --dataset labels/ --output_dir rm --max_steps 200
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from treg.files import UserError


class LabelDataError(UserError):
    """A labeled dataset that cannot be used to train the reward model; the message names the path, row or column."""

LABEL_COLUMN = "ai_preference"


def soft_label_loss(r1: torch.Tensor, r2: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-example −[p log σ(r1−r2) + (1−p) log σ(r2−r1)] (unreduced; stable through ``logsigmoid``)."""
    margin = r1 - r2
    p = torch.as_tensor(p, dtype=margin.dtype, device=margin.device)
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin))


@dataclass
class SoftLabelCollator:
    """TRL's preference collator plus the soft label as a float tensor under ``label_column``."""

    base: DataCollatorForPreference
    label_column: str = LABEL_COLUMN

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.base([{k: v for k, v in ex.items() if k != self.label_column} for ex in examples])
        out[self.label_column] = torch.tensor([float(ex[self.label_column]) for ex in examples], dtype=torch.float)
        return out


class SoftLabelRewardTrainer(RewardTrainer):
    """``RewardTrainer`` with the soft-label cross-entropy instead of the Bradley–Terry loss."""

    label_column = LABEL_COLUMN

    def __init__(self, *args, label_column: str = LABEL_COLUMN, **kwargs):
        self.label_column = label_column
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, SoftLabelCollator):
            self.data_collator = SoftLabelCollator(self.data_collator, label_column)
        columns = self.train_dataset.column_names or []
        if label_column not in columns:
            raise ValueError(f"the training dataset has no {label_column!r} column (P(chosen is better)); "
                             f"columns: {columns}")

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", self.label_column]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        p = inputs.pop(self.label_column)
        inputs.pop("margin", None)
        inputs["use_cache"] = False
        outputs = model(**inputs)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = soft_label_loss(rewards_chosen, rewards_rejected, p.to(rewards_chosen.device)).mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)

        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            all_rewards = self.accelerator.gather(outputs.logits)
            self._metrics[mode]["min_reward"].append(all_rewards.min().item())
            self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
            self._metrics[mode]["max_reward"].append(all_rewards.max().item())
            # accuracy against the AI label's argmax (p > 0.5: chosen preferred); p = 0.5 rows count half
            p = p.to(rewards_chosen.device)
            agree = ((rewards_chosen > rewards_rejected) == (p > 0.5)).float()
            agree = torch.where(p == 0.5, torch.full_like(agree, 0.5), agree)
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(agree.mean()).mean().item())
            margin = self.accelerator.gather_for_metrics((rewards_chosen - rewards_rejected).mean()).mean()
            self._metrics[mode]["margin"].append(margin.item())
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------------------------------------------ entry point
def load_reward_model(name: str):
    """(model, tokenizer): ``treg:tiny`` → a ``LlamaForSequenceClassification`` on the tiny model's backbone (random
    score head); anything else → ``AutoModelForSequenceClassification`` with ``num_labels=1``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name == "treg:tiny":
        from transformers import LlamaForSequenceClassification

        from treg.synthetic import load_tiny_model

        _, tokenizer, path = load_tiny_model()
        model = LlamaForSequenceClassification.from_pretrained(path, num_labels=1)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_label_dataset(path: str, label_column: str = LABEL_COLUMN):
    """A dataset saved by ``treg label`` (``save_to_disk`` folder, or a .jsonl/.json/.parquet file), checked.

    Returns columns ``prompt``, ``chosen``, ``rejected``, ``label_column`` with the label = P(chosen is better).
    ``treg label`` writes ``ai_preference`` = P(response_1 is better) and orients ``chosen``/``rejected`` by the AI
    label, so when ``response_1``/``response_2`` are present they are used as chosen/rejected (keeping p's meaning);
    otherwise the label is taken to be P(chosen is better).
    """
    import os

    import datasets

    if not os.path.exists(path):
        raise LabelDataError(
            f"labeled dataset {path!r} not found; pass the folder `treg label` wrote (its output_dir/<name>/labeled, "
            "e.g. treg-labels/hh-harmless-tiny/labeled) or a .jsonl/.json/.parquet file."
        )
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(path)[1])
        if kind is None:
            raise LabelDataError(f"{path}: expected a save_to_disk folder or a .jsonl/.json/.parquet file.")
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    if {"response_1", "response_2"} <= set(ds.column_names):
        ds = ds.remove_columns([c for c in ("chosen", "rejected") if c in ds.column_names])
        ds = ds.rename_columns({"response_1": "chosen", "response_2": "rejected"})
    missing = [c for c in ("prompt", "chosen", "rejected", label_column) if c not in ds.column_names]
    if missing:
        raise LabelDataError(f"{path}: missing columns {missing}; have {ds.column_names}. Label it with `treg label`.")
    for i, p in enumerate(ds[label_column]):
        if p is None or not 0.0 <= float(p) <= 1.0:
            raise LabelDataError(f"{path}: row {i}: {label_column}={p!r} is not a probability in [0, 1].")
    return ds.select_columns(["prompt", "chosen", "rejected", label_column])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treg reward-model", description="Train a reward model on soft AI labels.")
    p.add_argument("--model", required=True, help="sequence-classification checkpoint or treg:tiny")
    p.add_argument("--dataset", required=True, help="output of `treg label` (prompt, chosen, rejected, ai_preference)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--label_column", default=LABEL_COLUMN)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_reward_model(args.model)
    dataset = load_label_dataset(args.dataset, args.label_column)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    config = RewardConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
        logging_steps=args.logging_steps, seed=args.seed, bf16=use_bf16, save_strategy="no", report_to="none",
    )
    trainer = SoftLabelRewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                     label_column=args.label_column)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    steps = result.global_step
    print(json.dumps({"steps": steps, "train_loss": result.training_loss, "seconds": round(seconds, 3),
                      "seconds_per_step": round(seconds / max(steps, 1), 4), "output_dir": args.output_dir}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
