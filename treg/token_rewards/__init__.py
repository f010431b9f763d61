"""Token-reward sources. Each returns, for every chosen and rejected response, one float per completion token as
the trainer tokenizes it (same tokenizer, chat template and truncation), stored as dataset columns.

Columns (lists of floats, one value per *kept* completion token, see :func:`kept_completion_length`):

    chosen_token_rewards, rejected_token_rewards        r̂_t in (-0.5, 0.5)
    ref_chosen_token_logps, ref_rejected_token_logps    log π_ref(y_t | x, y_<t)
    ref_chosen_logps, ref_rejected_logps                their sums (TRL's precomputed-reference columns)

Worked example (max_length=6, prompt of 4 tokens, chosen of 3 tokens): the collator keeps 6 tokens, so only the
first 2 chosen tokens are trained on and ``chosen_token_rewards`` has exactly 2 values.
"""

from __future__ import annotations

import math

CHOSEN_REWARDS = "chosen_token_rewards"
REJECTED_REWARDS = "rejected_token_rewards"
REF_CHOSEN = "ref_chosen_token_logps"
REF_REJECTED = "ref_rejected_token_logps"
REF_CHOSEN_SUM = "ref_chosen_logps"
REF_REJECTED_SUM = "ref_rejected_logps"
TOKEN_REWARD_COLUMNS = (CHOSEN_REWARDS, REJECTED_REWARDS)
REF_TOKEN_COLUMNS = (REF_CHOSEN, REF_REJECTED)
PER_TOKEN_COLUMNS = TOKEN_REWARD_COLUMNS + REF_TOKEN_COLUMNS


class TokenRewardError(ValueError):
    """Token rewards that do not fit the data they belong to; the message names the row and column."""


def kept_completion_length(prompt_len: int, completion_len: int, max_length: int | None) -> int:
    """How many completion tokens survive the collator's ``keep_start`` truncation to ``max_length``."""
    if max_length is None:
        return completion_len
    return max(0, min(completion_len, max_length - prompt_len))


def check_token_columns(dataset, max_length: int | None, columns=PER_TOKEN_COLUMNS) -> None:
    """Raise :class:`TokenRewardError` naming the first row whose per-token column does not have exactly one finite
    value per kept completion token (or, for r̂, a value outside (-0.5, 0.5))."""
    present = [c for c in columns if c in dataset.column_names]
    if not present:
        return
    prompt_lens = [len(p) for p in dataset["prompt_ids"]]
    for col in present:
        side = "chosen" if "chosen" in col else "rejected"
        completion_lens = [len(c) for c in dataset[f"{side}_ids"]]
        for row, values in enumerate(dataset[col]):
            expected = kept_completion_length(prompt_lens[row], completion_lens[row], max_length)
            if values is None or len(values) != expected:
                got = "None" if values is None else f"{len(values)} values"
                raise TokenRewardError(
                    f"row {row}, column {col!r}: {got} but the trainer trains on {expected} {side} tokens "
                    f"(prompt {prompt_lens[row]} + {side} {completion_lens[row]} tokens, max_length={max_length}). "
                    "Token rewards must be computed with the same tokenizer, chat template and max_length as "
                    "training; recompute them (delete the stale cache) instead of padding or cutting."
                )
            bad = next((v for v in values if not math.isfinite(v)), None)
            if bad is not None:
                raise TokenRewardError(
                    f"row {row}, column {col!r}: non-finite value {bad}. Check the scoring model's dtype "
                    "(fp16 overflow) and the row's text; drop the row or recompute."
                )
            if col in TOKEN_REWARD_COLUMNS and any(abs(v) >= 0.5 for v in values):
                raise TokenRewardError(
                    f"row {row}, column {col!r}: token rewards must lie in (-0.5, 0.5) (METHOD.md §2), got "
                    f"max |r̂| = {max(abs(v) for v in values):.3f}. Squash external rewards, e.g. sigmoid(x) - 0.5."
                )
