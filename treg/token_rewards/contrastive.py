"""T-REG's self-generated token rewards by contrastive prompting (Zhou et al. 2024, arXiv 2412.02685, METHOD.md §2).

The frozen reference model scores the same response tokens under two prompts that wrap the original prompt ``x``:
``x⁺`` asks for a better answer, ``x⁻`` for a worse one. Then

    r̂_t = σ( log π_ref(y_t | x⁺, y_<t) − log π_ref(y_t | x⁻, y_<t) ) − 0.5        ∈ (−0.5, 0.5)

In the same pass the per-token reference log-probs under the plain prompt ``x`` are computed, so training needs no
reference model in memory. Forwards per response: 3 (``x``, ``x⁺``, ``x⁻``) with a DPO base, 2 when x⁺ is x (the
default); 2 (``x⁺``, ``x⁻``) with ``with_reference=False`` (a SimPO base needs no reference log-probs).

The paper does not publish its prompt wording; the defaults below are ours **(choice)** and a recipe overrides them
with ``contrastive_positive_template`` / ``contrastive_negative_template``. They were chosen with
``bench/token_rewards_real.py`` on SmolLM2-135M-Instruct, on the benchmark's development split only (injected
defects in AlpacaEval / Arena-Hard / HH-RLHF answers, fine-grained-feedback human error spans, BIG-Bench-Mistake first
mistakes; 108 answers): of 17 generic template sets, the best mean AUC among those a user turn can express was
x⁺ = the plain prompt, x⁻ = the prompt plus "Write an incorrect and incoherent response." (0.566, vs 0.516 for
treg's first wording and 0.554 for plain surprisal −log π(y_t|x)). Held out, it finds injected defects with AUC 0.659
(first wording 0.543, surprisal 0.620; the target 0.75 is not met) and human error spans and first mistakes at
chance, like every other signal; per defect kind plain surprisal does better on 6 of 7 kinds: at this model size no
template set beats surprisal reliably (``docs/token-rewards-real.md``). The
embedded ``treg:tiny`` model was instruction-tuned on treg's first wording (:data:`treg.synthetic.POSITIVE_TEMPLATE`,
:data:`treg.synthetic.NEGATIVE_TEMPLATE`); its recipes set those explicitly. With x⁺ the plain prompt, its forward
is the reference log-probs' own (one forward saved with a DPO base).

Templates must contain ``{prompt}``. For conversational rows the template wraps the content of the last user
message and the result is rendered through the model's chat template with the generation prompt; for plain-text rows
it wraps the prompt text without its trailing whitespace, which then follows the wrapped text: TRL joins a plain
prompt and its response as they are, so x⁺ ends with the same separator as x ("…response.\n" then the response, not
"…response." glued to it). x⁺ is tokenized as TRL tokenizes x. The response ids are the trainer's own ``chosen_ids``
/ ``rejected_ids``, so the three passes score identical tokens; and where TRL's x lacks the end of x's own
tokenization (the response's first token merged with it, e.g. Qwen's generation prompt "…assistant\n" before a
response starting with "\n" gives one "\n\n" token, which TRL counts to the response), that end is left out of x⁺
and x⁻ too (:func:`render_prompt_ids`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from datasets import Dataset, concatenate_datasets

from treg.packing import score_groups, use_packing
from treg.scoring import score_completions
from treg.token_rewards import (
    CHOSEN_REWARDS,
    REF_CHOSEN,
    REF_CHOSEN_SUM,
    REF_REJECTED,
    REF_REJECTED_SUM,
    REJECTED_REWARDS,
    TokenRewardError,
    check_token_columns,
    kept_completion_length,
)
from treg.token_rewards import cache as cache_lib

logger = logging.getLogger(__name__)

# Chosen on bench/token_rewards_real.py's development split (see the module docstring and docs/token-rewards-real.md).
DEFAULT_POSITIVE_TEMPLATE = "{prompt}"
DEFAULT_NEGATIVE_TEMPLATE = "{prompt}\n\nWrite an incorrect and incoherent response."
CACHE_VERSION = "contrastive-v1"


def check_template(template: str, name: str) -> None:
    if "{prompt}" not in template:
        raise ValueError(f"{name} must contain the placeholder {{prompt}}; got {template!r}.")
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{name}: braces other than {{prompt}} must be doubled ({{{{ }}}}); got {template!r}.") from e


def render_prompt_ids(tokenizer, prompt, template: str, prompt_ids=None, *, row: int | str = "?") -> list[int]:
    """Token ids of ``template`` applied to ``prompt`` (a string, or a list of chat messages), tokenized as TRL
    tokenizes a prompt: a string's trailing whitespace stays at the end (``template`` wraps the text before it).

    ``prompt_ids``: the trainer's ids of the prompt itself (TRL's ``prompt_ids``). When they lack the end of the
    prompt's own tokenization (TRL moved it into the response), the same end is left out of the result: cut as
    tokens when the result ends with them, else as text (the common end of both texts). :class:`TokenRewardError`
    naming ``row`` when ``prompt_ids`` are not a beginning of the prompt's tokenization.
    """
    ids = _render_ids(tokenizer, prompt, template)
    if prompt_ids is None:
        return ids
    prompt_ids = list(prompt_ids)
    full = _render_ids(tokenizer, prompt, "{prompt}")
    if full[: len(prompt_ids)] != prompt_ids:
        raise TokenRewardError(
            f"row {row}: the trainer's prompt ids are not a beginning of the prompt's own tokenization, so x⁺/x⁻ "
            "cannot be aligned with it; was the dataset tokenized with another tokenizer or chat template?"
        )
    tail = full[len(prompt_ids) :]
    if not tail:
        return ids
    if ids[-len(tail) :] == tail:
        return ids[: -len(tail)]
    tail_text = _text_after(tokenizer, prompt_ids, full)
    text = _render_text(tokenizer, prompt, template)
    common = 0
    while common < min(len(text), len(tail_text)) and text[-1 - common] == tail_text[-1 - common]:
        common += 1
    return _tokenize_like(tokenizer, prompt, text[: len(text) - common])


def _wrapped_messages(messages, template: str) -> list[dict]:
    """A copy of ``messages`` whose last user message's content is wrapped in ``template``."""
    messages = [dict(m) for m in messages]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"])
    return messages


def _render_text(tokenizer, prompt, template: str) -> str:
    if isinstance(prompt, str):
        body = prompt.rstrip()
        return template.format(prompt=body) + prompt[len(body) :]
    messages = _wrapped_messages(prompt, template)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _tokenize_like(tokenizer, prompt, text: str) -> list[int]:
    """``text`` tokenized as TRL tokenizes the prompt it was rendered from: a plain string with the tokenizer's
    special tokens (e.g. BOS), a chat-template text without (the template writes them)."""
    return list(tokenizer(text=text, add_special_tokens=isinstance(prompt, str))["input_ids"])


def _render_ids(tokenizer, prompt, template: str) -> list[int]:
    if isinstance(prompt, str):
        return _tokenize_like(tokenizer, prompt, _render_text(tokenizer, prompt, template))
    messages = _wrapped_messages(prompt, template)
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def _text_after(tokenizer, head: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after their beginning ``head`` (decoded together, so word-boundary spaces survive)."""
    whole, start = tokenizer.decode(ids), tokenizer.decode(head)
    return whole[len(start) :] if whole.startswith(start) else tokenizer.decode(ids[len(head) :])


def _settings(
    tokenizer, positive_template, negative_template, max_length, with_rewards, model_hash, dtype, with_reference=True
) -> dict:
    extra = {} if with_reference else {"with_reference": False}  # keeps the keys of existing 3-context entries
    return {
        **extra,
        "version": CACHE_VERSION,
        "model": model_hash,
        "dtype": str(dtype),
        "tokenizer": type(tokenizer).__name__,
        "vocab": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "positive_template": positive_template if with_rewards else None,
        "negative_template": negative_template if with_rewards else None,
        "max_length": max_length,
    }


def compute_columns(
    model,
    tokenizer,
    dataset: Dataset,
    *,
    positive_ids: list[list[int]] | None,
    negative_ids: list[list[int]] | None,
    max_length: int | None,
    batch_size: int = 8,
    show_progress: bool = True,
    with_reference: bool = True,
    pack_pairs: bool = False,
) -> dict[str, list]:
    """Score every kept chosen/rejected token under x (unless ``with_reference=False``) and under x⁺, x⁻ (when their
    ids are given), in one call to the scoring engine so that all contexts share length-sorted batches; a (context,
    completion) that occurs twice (x⁺ equal to x, duplicate rows) is scored once.

    ``pack_pairs``: with the HF backend and a model whose attention allows it (:func:`treg.packing.use_packing`),
    each context is computed once per pair, followed by both completions (:func:`treg.packing.score_groups`);
    otherwise every (context, completion) is its own padded row (:func:`treg.scoring.score_completions`). The two
    agree to float rounding. ``dataset`` is tokenized the trainer's way (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``).
    """
    if not with_reference and positive_ids is None:
        raise ValueError("compute_columns: nothing to compute (with_reference=False and no x⁺/x⁻ ids).")
    prompts = list(dataset["prompt_ids"])
    sides = {"chosen": list(dataset["chosen_ids"]), "rejected": list(dataset["rejected_ids"])}
    contexts = {"plain": prompts} if with_reference else {}
    if positive_ids is not None:
        contexts.update(positive=positive_ids, negative=negative_ids)
    kept = {side: [c[: kept_completion_length(len(p), len(c), max_length)] for p, c in zip(prompts, completions)]
            for side, completions in sides.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    desc = "Reference log-probs" if positive_ids is None else f"Token rewards ({', '.join(contexts)})"
    packed = pack_pairs and not hasattr(model, "score_items") and use_packing(model, where="the token-reward pass")
    score = _score_packed if packed else _score_items
    logps = score(model, contexts, kept, batch_size=batch_size, pad_token_id=pad_id, desc=desc,
                  show_progress=show_progress)

    columns: dict[str, list] = {}
    for side, ref_col, sum_col, rew_col in (
        ("chosen", REF_CHOSEN, REF_CHOSEN_SUM, CHOSEN_REWARDS),
        ("rejected", REF_REJECTED, REF_REJECTED_SUM, REJECTED_REWARDS),
    ):
        if with_reference:
            plain = [logps[("plain", side, r)] for r in range(len(prompts))]
            columns[ref_col] = [lp.tolist() for lp in plain]
            columns[sum_col] = [float(lp.astype(np.float64).sum()) for lp in plain]
        if positive_ids is not None:
            columns[rew_col] = [
                contrastive_rewards(logps[("positive", side, r)], logps[("negative", side, r)]).tolist()
                for r in range(len(prompts))
            ]
    return columns


def _score_items(model, contexts: dict, kept: dict, **kwargs) -> dict[tuple, np.ndarray]:
    """``{(context name, side, row): log-probs}``, each distinct (context, completion) one item of
    :func:`treg.scoring.score_completions`."""
    items, index, seen = [], {}, {}
    for ctx_name, ctx_ids in contexts.items():
        for side, completions in kept.items():
            for row, completion in enumerate(completions):
                key = (tuple(ctx_ids[row]), tuple(completion))  # x⁺ = x (the default x⁺): scored once, not twice
                if key not in seen:
                    seen[key] = len(items)
                    items.append((ctx_ids[row], completion))
                index[(ctx_name, side, row)] = seen[key]
    logps = score_completions(model, items, **kwargs)
    return {key: logps[i] for key, i in index.items()}


def _score_packed(model, contexts: dict, kept: dict, **kwargs) -> dict[tuple, np.ndarray]:
    """``{(context name, side, row): log-probs}``, each distinct (context, chosen, rejected) one group of
    :func:`treg.packing.score_groups`: the context computed once for both completions."""
    groups, index, seen = [], {}, {}
    sides = list(kept)
    for ctx_name, ctx_ids in contexts.items():
        for row in range(len(ctx_ids)):
            completions = tuple(tuple(kept[side][row]) for side in sides)
            key = (tuple(ctx_ids[row]), completions)  # x⁺ = x (the default x⁺): computed once, not twice
            if key not in seen:
                seen[key] = len(groups)
                groups.append((ctx_ids[row], [kept[side][row] for side in sides]))
            index[(ctx_name, row)] = seen[key]
    logps = score_groups(model, groups, **kwargs)
    return {(ctx_name, side, row): logps[g][k] for (ctx_name, row), g in index.items() for k, side in enumerate(sides)}


def model_dtype(model):
    """The dtype a model (or a scorer backend with a ``dtype`` attribute) scores in; part of cache keys."""
    if hasattr(model, "score_items"):
        return getattr(model, "dtype", None)
    return next(model.parameters()).dtype


def contrastive_rewards(positive_logps: np.ndarray, negative_logps: np.ndarray) -> np.ndarray:
    """r̂_t = σ(logp⁺_t − logp⁻_t) − 0.5, computed stably; same shape as the inputs."""
    diff = np.asarray(positive_logps, dtype=np.float64) - np.asarray(negative_logps, dtype=np.float64)
    # 0.5 * tanh(d / 2) == σ(d) − 0.5 exactly, without the cancellation of subtracting 0.5 from σ(d) ≈ 1.
    # Keep the result strictly inside (−0.5, 0.5) in float32.
    return np.clip(0.5 * np.tanh(diff / 2), -0.5 + 1e-7, 0.5 - 1e-7).astype(np.float32)


def attach_contrastive_rewards(
    dataset: Dataset,
    model,
    tokenizer,
    *,
    model_hash: str,
    max_length: int | None,
    with_rewards: bool = True,
    with_reference: bool = True,
    positive_template: str = DEFAULT_POSITIVE_TEMPLATE,
    negative_template: str = DEFAULT_NEGATIVE_TEMPLATE,
    cache_dir: str | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    main_process_first=None,
    pack_pairs: bool = False,
) -> Dataset:
    """Add the per-token columns to a tokenized dataset, from the cache when an entry for these inputs exists.

    Args:
        dataset: rows with ``prompt`` (text or messages), ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
        model, tokenizer: the frozen reference model (the policy before training) and its tokenizer.
        model_hash: identifies the weights (e.g. ``trl.trainer.utils.hash_module``); part of the cache key.
        max_length: the trainer's ``max_length``; values are stored for the kept completion tokens only.
        with_rewards: False computes only the reference log-probs (no x⁺/x⁻ passes), e.g. for α = 0.
        with_reference: False skips the reference log-probs under x (a SimPO base needs none): 2 forwards, not 3.
        cache_dir: where entries live (default ``$TREG_CACHE_DIR`` or ``~/.cache/treg``); ``"none"`` disables it.
        main_process_first: a context-manager factory (``accelerator.main_process_first``) so that in a distributed
            run one process computes and the others read the cache.
        pack_pairs: score each context once per pair, followed by both completions (:func:`compute_columns`).
    """
    check_template(positive_template, "contrastive_positive_template")
    check_template(negative_template, "contrastive_negative_template")
    positive_ids = negative_ids = None
    if with_rewards:
        rows = list(enumerate(zip(dataset["prompt"], dataset["prompt_ids"])))
        positive_ids = [render_prompt_ids(tokenizer, p, positive_template, ids, row=r) for r, (p, ids) in rows]
        negative_ids = [render_prompt_ids(tokenizer, p, negative_template, ids, row=r) for r, (p, ids) in rows]
    dtype = model_dtype(model)
    settings = _settings(
        tokenizer, positive_template, negative_template, max_length, with_rewards, model_hash, dtype, with_reference
    )
    id_columns = [dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]]
    if with_rewards:
        id_columns += [positive_ids, negative_ids]
    key = cache_lib.fingerprint(settings, id_columns)

    def compute() -> dict[str, list]:
        return compute_columns(
            model,
            tokenizer,
            dataset,
            positive_ids=positive_ids,
            negative_ids=negative_ids,
            max_length=max_length,
            batch_size=batch_size,
            show_progress=show_progress,
            with_reference=with_reference,
            pack_pairs=pack_pairs,
        )

    columns = cache_lib.load_or_compute(
        compute,
        cache_dir=cache_dir,
        entry=f"{CACHE_VERSION}-{key[:24]}",
        what="Token rewards",
        main_process_first=main_process_first,
    )
    if len(columns) != len(dataset):
        raise ValueError(f"token-reward cache holds {len(columns)} rows for a dataset of {len(dataset)}; delete it.")
    dataset = dataset.remove_columns([c for c in columns.column_names if c in dataset.column_names])
    dataset = concatenate_datasets([dataset, columns], axis=1)
    check_token_columns(dataset, max_length)
    return dataset


def summarize(values: list[list[float]]) -> dict[str, float]:
    """Mean, std and fraction positive of r̂ over all tokens (for logs and the quick start)."""
    flat = [v for row in values for v in row]
    if not flat:
        return {"mean": math.nan, "std": math.nan, "frac_positive": math.nan}
    arr = np.asarray(flat)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "frac_positive": float((arr > 0).mean())}
