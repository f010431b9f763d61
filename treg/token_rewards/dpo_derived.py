"""DPO-derived token rewards (METHOD.md §3; the T-REG paper's ablation, also used by RTO and TGDPO).

An already-trained DPO model ``π_dpo`` and the reference ``π_ref`` give every response token a log-ratio; it is
squashed into the same open interval as the contrastive rewards **(choice)**:

    r̂_t = σ( s · [log π_dpo(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)] ) − 0.5        ∈ (−0.5, 0.5)

with ``s = 1`` by default (the same form as the contrastive reward: the log-ratio of two token probabilities; a
recipe may sharpen or flatten it with ``scale``). The reference log-probs are the dataset's
``ref_*_token_logps`` columns, so the rewards are aligned with the very tokens the trainer trains on.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from treg.packing import score_groups, use_packing
from treg.scoring import score_completions
from treg.token_rewards import (
    CHOSEN_REWARDS,
    REF_CHOSEN,
    REF_REJECTED,
    REJECTED_REWARDS,
    TokenRewardError,
    check_token_columns,
    kept_completion_length,
)
from treg.token_rewards.contrastive import contrastive_rewards


def dpo_derived_rewards(dpo_logps, ref_logps, scale: float = 1.0) -> np.ndarray:
    """r̂_t = σ(scale · (log π_dpo − log π_ref)) − 0.5, elementwise, float32."""
    diff = scale * (np.asarray(dpo_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64))
    return contrastive_rewards(diff, np.zeros_like(diff))


def attach_dpo_derived_rewards(
    dataset: Dataset,
    dpo_model,
    tokenizer,
    *,
    max_length: int | None,
    scale: float = 1.0,
    batch_size: int = 8,
    show_progress: bool = True,
    pack_pairs: bool = False,
) -> Dataset:
    """Add ``chosen_token_rewards`` / ``rejected_token_rewards`` from ``dpo_model`` to a tokenized dataset that
    already carries the per-token reference log-probs (``ref_chosen_token_logps``, ``ref_rejected_token_logps``).
    ``pack_pairs``: each prompt computed once for both responses (:func:`treg.packing.score_groups`) where the
    model allows it."""
    missing = [c for c in (REF_CHOSEN, REF_REJECTED) if c not in dataset.column_names]
    if missing:
        raise TokenRewardError(
            f"DPO-derived token rewards need the per-token reference log-prob columns {missing}; run the reference "
            "pass first (TRegTrainer does this before calling this source)."
        )
    prompts = list(dataset["prompt_ids"])
    kept = {
        side: [c[: kept_completion_length(len(p), len(c), max_length)] for p, c in zip(prompts, dataset[f"{side}_ids"])]
        for side in ("chosen", "rejected")
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = dict(batch_size=batch_size, pad_token_id=pad_id, desc="DPO-derived token rewards",
                  show_progress=show_progress)
    if pack_pairs and not hasattr(dpo_model, "score_items") and use_packing(dpo_model, where="DPO-derived rewards"):
        scored = score_groups(dpo_model, [(p, [c, r]) for p, c, r in zip(prompts, kept["chosen"], kept["rejected"])],
                              **kwargs)
        logps = [g[0] for g in scored] + [g[1] for g in scored]
    else:
        items = [(p, c) for side in ("chosen", "rejected") for p, c in zip(prompts, kept[side])]
        logps = score_completions(dpo_model, items, **kwargs)
    n = len(prompts)
    columns = {
        CHOSEN_REWARDS: [
            dpo_derived_rewards(lp, ref, scale).tolist() for lp, ref in zip(logps[:n], dataset[REF_CHOSEN])
        ],
        REJECTED_REWARDS: [
            dpo_derived_rewards(lp, ref, scale).tolist() for lp, ref in zip(logps[n:], dataset[REF_REJECTED])
        ],
    }
    dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    check_token_columns(dataset, max_length)
    return dataset
