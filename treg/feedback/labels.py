"""RLAIF pairwise AI preference labels from a labeler LM's log-probabilities (Lee et al. 2023; METHOD.md §4).

For each pair (context, response 1, response 2) the labeler reads a label prompt (:mod:`treg.feedback.templates`)
that ends in e.g. ``Preferred Response=`` and we read the log-probs ``ℓ1``, ``ℓ2`` of the next tokens ``1`` and
``2``:

    P(first shown is preferred) = softmax(ℓ1, ℓ2)[0] = σ(ℓ1 − ℓ2)                       (:func:`preference_probs`)

Both orders are scored. Order A shows response 1 first, order B shows response 2 first; with ``a`` and ``b`` the
probabilities of the label ``1`` in each order,

    p_order_a = a                 = P(response 1 better) read in order A
    p_order_b = 1 − b             = P(response 1 better) read in order B (swapped back)
    p_first   = (p_order_a + p_order_b) / 2                       (single order: p_first = p_order_a)

For a template that asks which response is *worse* (harmlessness: "more harmful"), every probability above is
inverted (p → 1 − p) before averaging, so ``p_first`` is always P(response 1 is the better = less harmful one).

Position bias of a pair: the *same position* wins in both orders, i.e. the labeler's choice flips when the
responses are swapped:  ``(p_order_a − 0.5) · (p_order_b − 0.5) < 0``. (Order A's first position wins iff
``a > 0.5``; order B's first position wins iff ``b > 0.5``, i.e. ``p_order_b < 0.5``.) An exact 0.5 in either
order counts as not biased. The indicator is the same before and after the harmlessness inversion.

Chain of thought: the prompt ends with the template's ``cot_ending``; the labeler writes a rationale (greedy,
``max_rationale_tokens``) from exactly those token ids (BOS included, as when the label is read); the rationale, a
newline and the ordinary ending are appended and ``1``/``2`` are read.

A label prompt is tokenized as one text (:func:`treg.generation.encode_pieces`), not piece by piece: a SentencePiece
tokenizer that prepends "▁" to each text it tokenizes (Llama-2, Mistral) would otherwise read " Response 1:".

Prompts longer than ``max_length`` tokens are cut: the context loses tokens from its start (the latest turns are
kept); if both responses alone still do not fit, each is cut at its end to an equal share. Such pairs are flagged
``truncated`` and counted in the report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from treg.feedback.templates import TEMPLATES, LabelTemplate, get_template, label_prompt_body, sample_pieces
from treg.files import UserError
from treg.generation import encode_pieces, generate

logger = logging.getLogger(__name__)

__all__ = [
    "LABEL_KEYS", "LabelError", "label_dataset", "label_pairs", "label_token_ids", "load_label_dataset", "parse_bool",
    "preference_probs", "render_text",
]


class LabelError(UserError):
    """A pair that cannot be labeled (malformed row, non-finite log-probs, label tokens that do not exist), or an
    unknown labeling task."""


def label_task(task) -> str:
    """The name of a labeling task of :data:`treg.feedback.templates.TEMPLATES`; :class:`LabelError` otherwise (the
    ``task`` setting of ``treg label`` is read through it, so a typo fails before the model loads)."""
    if not isinstance(task, str) or task not in TEMPLATES:
        raise LabelError(f"unknown labeling task {task!r}; choose one of {', '.join(TEMPLATES)}.")
    return task


def _template(task: str | LabelTemplate) -> LabelTemplate:
    return task if isinstance(task, LabelTemplate) else get_template(label_task(task))


# ------------------------------------------------------------------------------------------------- tokens & math
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (e.g. BOS), if any."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = _encode(tokenizer, "a")
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i : i + len(without)] == without:
            return with_sp[:i]
    return []


def label_token_ids(tokenizer, ending: str = "Preferred Response=", labels: Sequence[str] = ("1", "2")) -> list[int]:
    """The ids of the label tokens ``1`` and ``2`` as they follow ``ending``.

    Tokenizes ``ending`` and ``ending + label`` and takes the tokens after the ending's own tokens, so tokenizers
    that spell the digit differently in context (``▁1``, ``Ġ1``, ``1``) are handled. Raises :class:`LabelError` if
    the ending's tokens change when the label follows (e.g. a trailing space that merges into the label) or the
    label is not exactly one token there.
    """
    base = _encode(tokenizer, ending)
    ids = []
    for label in labels:
        full = _encode(tokenizer, ending + label)
        if full[: len(base)] != base:
            raise LabelError(
                f"the tokens of the ending {ending!r} change when {label!r} follows it ({base} vs {full}); use an "
                "ending without trailing whitespace that the label token cannot merge with."
            )
        rest = full[len(base) :]
        if len(rest) != 1:
            pieces = tokenizer.convert_ids_to_tokens(rest) if rest else []
            raise LabelError(
                f"label {label!r} after the ending {ending!r} is {len(rest)} tokens {pieces}, not one; the labeler "
                "needs a single-token label. Change the ending or the labels."
            )
        ids.append(rest[0])
    if len(set(ids)) != len(ids):
        raise LabelError(f"labels {list(labels)} map to the same token id(s) {ids} after {ending!r}.")
    return ids


def preference_probs(logp1, logp2):
    """P(label 1) = softmax over the two label log-probs = exp(ℓ1) / (exp(ℓ1) + exp(ℓ2)) = σ(ℓ1 − ℓ2).

    Scalars give a float, arrays an array. Non-finite results raise :class:`LabelError`.
    """
    l1, l2 = np.asarray(logp1, dtype=np.float64), np.asarray(logp2, dtype=np.float64)
    m = np.maximum(l1, l2)
    e1, e2 = np.exp(l1 - m), np.exp(l2 - m)
    p = e1 / (e1 + e2)
    if not np.all(np.isfinite(p)):
        raise LabelError(f"non-finite preference from log-probs {logp1!r}, {logp2!r}.")
    return float(p) if p.ndim == 0 else p


# ---------------------------------------------------------------------------------------------------- rendering
_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def render_text(value: Any, what: str = "value") -> str:
    """A string as is; a message list as ``Human: …\\n\\nAssistant: …`` (one message: its content alone)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "content" in m for m in value):
        if len(value) == 1 and value[0].get("role") == "assistant":
            return str(value[0]["content"])
        names = [_ROLE_NAMES.get(m.get("role"), str(m.get("role")).title()) for m in value]
        return "\n\n".join(f"{name}: {m['content']}" for name, m in zip(names, value))
    raise LabelError(f"{what}: expected a string or a list of {{role, content}} messages, got {type(value).__name__}.")


# ------------------------------------------------------------------------------------------------------ prompts
class _PromptBuilder:
    def __init__(self, tokenizer, template: LabelTemplate, few_shot, chain_of_thought, max_length, reserve):
        self.t = template
        self.tok = tokenizer
        self.special = _special_prefix(tokenizer)
        self.body = label_prompt_body(template, few_shot)
        self.end = template.cot_ending if chain_of_thought else template.ending
        self.max_length = max_length
        self.reserve = reserve  # tokens kept free after the prompt (label; with CoT the rationale and ending)

    def sample_ids(self, context: str, first: str, second: str) -> tuple[list[int], bool]:
        """Special prefix (BOS) + preamble, exemplars, sample and ending (the CoT ending with chain of thought),
        tokenized as one text, context and responses cut to fit ``max_length``; and whether anything was cut."""
        pieces = encode_pieces(self.tok, [self.body, *sample_pieces(self.t, context, first, second), self.end])
        body, ctx_label, ctx, r1_label, r1, r2_label, r2, tail, end = pieces
        head = self.special + body
        fixed = len(head) + len(ctx_label) + len(r1_label) + len(r2_label) + len(tail) + len(end) + self.reserve
        truncated = False
        if self.max_length is not None:
            room = self.max_length - fixed
            if room < 2:
                raise LabelError(
                    f"max_length {self.max_length} leaves no room for the sample after the preamble, exemplars and "
                    f"ending ({fixed} tokens)."
                )
            if len(ctx) + len(r1) + len(r2) > room:
                truncated = True
                ctx = ctx[max(0, len(ctx) - max(0, room - len(r1) - len(r2))) :] if room > len(r1) + len(r2) else []
                if len(r1) + len(r2) > room:  # water-fill: the shorter keeps all it can, the longer the rest
                    share = room // 2
                    n1 = min(len(r1), max(share, room - len(r2)))
                    r1, r2 = r1[:n1], r2[: room - n1]
        return head + ctx_label + ctx + r1_label + r1 + r2_label + r2 + tail + end, truncated


def _default_max_length(model, tokenizer) -> int | None:
    limits = []
    n_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n_pos, int) and n_pos > 0:
        limits.append(n_pos)
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < 1_000_000:
        limits.append(mml)
    return min(limits) if limits else None


# ------------------------------------------------------------------------------------------------------ labeling
def label_pairs(
    model,
    tokenizer,
    rows: Sequence[Sequence[str]],
    task: str | LabelTemplate = "helpfulness",
    few_shot: Sequence[Mapping] = (),
    chain_of_thought: bool = False,
    both_orders: bool = True,
    batch_size: int = 8,
    max_rationale_tokens: int = 64,
    show_progress: bool = True,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Label ``rows`` of ``(context, response1, response2)`` strings; one record per pair.

    Record keys: ``p_first`` (P(response 1 better), both orders averaged), ``p_order_a``, ``p_order_b`` (None with
    ``both_orders=False``), ``position_biased`` (see the module docstring; None with one order), ``truncated``, and
    with chain of thought ``rationale_a`` / ``rationale_b``. ``max_length`` defaults to the smaller of the model's
    ``max_position_embeddings`` and the tokenizer's ``model_max_length``.
    """
    from treg.scoring import next_token_logprobs

    template = _template(task)
    rows = [_check_row(i, r) for i, r in enumerate(rows)]
    if not rows:
        return []
    label_ids = label_token_ids(tokenizer, template.ending)
    if max_length is None:
        max_length = _default_max_length(model, tokenizer)
    reserve = 1
    if chain_of_thought:  # the rationale (and a space before it), then a newline and the ending
        reserve += max_rationale_tokens + 1 + len(_encode(tokenizer, "\n" + template.ending))
    builder = _PromptBuilder(tokenizer, template, few_shot, chain_of_thought, max_length, reserve)

    orders = ("a", "b") if both_orders else ("a",)
    jobs = []  # (row index, order, sample ids, truncated)
    for i, (ctx, r1, r2) in enumerate(rows):
        for order in orders:
            first, second = (r1, r2) if order == "a" else (r2, r1)
            ids, cut = builder.sample_ids(ctx, first, second)
            jobs.append((i, order, ids, cut))

    prompts, rationales = _label_prompts(
        model, tokenizer, builder, jobs, chain_of_thought, max_rationale_tokens, batch_size, show_progress
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    label_logps = next_token_logprobs(  # [len(prompts), 2]: ℓ1, ℓ2 from one forward per prompt
        model, prompts, label_ids, batch_size=batch_size, pad_token_id=pad, desc="Labeling",
        show_progress=show_progress,
    )
    return _pair_records(len(rows), jobs, label_logps, rationales, template, chain_of_thought)


def _label_prompts(model, tokenizer, builder, jobs, chain_of_thought, max_rationale_tokens, batch_size, show_progress):
    """Each job's prompt, which ends with the label ending; with chain of thought it ends with the CoT ending: the
    labeler writes a rationale from those very ids (BOS included) and the rationale and label ending follow, all
    tokenized as the joined text reads."""
    rationales: list[str | None] = [None] * len(jobs)
    if not chain_of_thought:
        return [ids for _, _, ids, _ in jobs], rationales
    outs = generate(
        model, tokenizer, [ids for _, _, ids, _ in jobs], max_new_tokens=max_rationale_tokens, batch_size=batch_size,
        show_progress=show_progress, desc="Rationales",
    )
    prompts = []
    for j, (_, _, ids, _) in enumerate(jobs):
        rationale = outs[j][0].strip()
        rationales[j] = rationale
        t = builder.t
        _, rationale_ids, ending_ids = encode_pieces(tokenizer, [t.cot_ending, " " + rationale, "\n" + t.ending])
        prompts.append(ids + rationale_ids + ending_ids)
    return prompts, rationales


def _pair_records(n_pairs, jobs, label_logps, rationales, template, chain_of_thought) -> list[dict[str, Any]]:
    """Turn the label log-probs of every (pair, order) job into one record per pair (see the module docstring)."""
    records: list[dict[str, Any]] = [
        {"p_first": None, "p_order_a": None, "p_order_b": None, "position_biased": None, "truncated": False}
        for _ in range(n_pairs)
    ]
    for j, (i, order, _, cut) in enumerate(jobs):
        l1, l2 = float(label_logps[j, 0]), float(label_logps[j, 1])
        if not (math.isfinite(l1) and math.isfinite(l2)):
            raise LabelError(f"pair {i}, order {order.upper()}: non-finite label log-probs ({l1}, {l2}).")
        p_label1 = preference_probs(l1, l2)
        p_r1 = p_label1 if order == "a" else 1.0 - p_label1
        if template.asks_for_worse:
            p_r1 = 1.0 - p_r1
        rec = records[i]
        rec[f"p_order_{order}"] = p_r1
        rec["truncated"] = rec["truncated"] or cut
        if chain_of_thought:
            rec[f"rationale_{order}"] = rationales[j]
    for rec in records:
        a, b = rec["p_order_a"], rec["p_order_b"]
        rec["p_first"] = a if b is None else 0.5 * (a + b)
        rec["position_biased"] = None if b is None else bool((a - 0.5) * (b - 0.5) < 0)
    return records


def _check_row(i: int, row) -> tuple[str, str, str]:
    if not isinstance(row, (tuple, list)) or len(row) != 3:
        raise LabelError(f"pair {i}: expected (context, response1, response2), got {type(row).__name__}.")
    for name, value in zip(("context", "response1", "response2"), row):
        if not isinstance(value, str) or not value.strip():
            raise LabelError(f"pair {i}, {name}: expected a non-empty string, got {value!r:.60}.")
    return tuple(row)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ datasets
def _pair_columns(dataset) -> tuple[str, str, bool]:
    cols = dataset.column_names
    if {"prompt", "response_1", "response_2"} <= set(cols):
        return "response_1", "response_2", False
    if {"chosen", "rejected"} <= set(cols):
        return "chosen", "rejected", True
    raise LabelError(
        f"dataset columns {cols}: need prompt/response_1/response_2 (unlabeled pairs) or prompt/chosen/rejected "
        "(human-labeled pairs; HH-RLHF transcripts are converted)."
    )


def label_dataset(
    model,
    tokenizer,
    dataset,
    task: str | LabelTemplate = "helpfulness",
    few_shot: Sequence[Mapping] = (),
    chain_of_thought: bool = False,
    both_orders: bool = True,
    batch_size: int = 8,
    max_rationale_tokens: int = 64,
    show_progress: bool = True,
    max_length: int | None = None,
):
    """AI-label a dataset of pairs. Returns ``(labeled dataset, report dict)``.

    Input: columns ``prompt``, ``response_1``, ``response_2`` (no human label), or a preference dataset
    ``prompt``/``chosen``/``rejected`` (standard, conversational or HH-RLHF; normalised and validated by
    :mod:`treg.data`), whose ``chosen`` is the human label: response_1 = chosen, response_2 = rejected.

    Output columns: ``response_1``, ``response_2``, ``ai_preference`` (soft label P(response_1 better)),
    ``ai_p_order_a``, ``ai_p_order_b``, ``ai_position_biased``, ``ai_truncated``, ``chosen``/``rejected`` oriented
    by the AI label (response_1 is chosen when ``ai_preference >= 0.5``), ``human_preference`` (1.0, when the input
    had human labels), and with chain of thought ``ai_rationale_a``/``ai_rationale_b``. Other columns are kept.

    Report: ``n_pairs``, ``position_bias_rate`` (fraction of pairs where the same position wins in both orders;
    None with one order), ``human_alignment`` (accuracy of the argmax AI preference against the human label, ties
    counting one half; None without human labels), ``n_ties``, ``mean_confidence`` (mean of max(p, 1 − p)),
    ``mean_ai_preference``, ``n_truncated``, ``seconds``, ``pairs_per_s``, and the settings.
    """
    dataset, col1, col2, has_human, rows = _dataset_pairs(dataset)
    start = time.perf_counter()
    records = label_pairs(
        model, tokenizer, rows, task=task, few_shot=few_shot, chain_of_thought=chain_of_thought,
        both_orders=both_orders, batch_size=batch_size, max_rationale_tokens=max_rationale_tokens,
        show_progress=show_progress, max_length=max_length,
    )
    seconds = time.perf_counter() - start

    p = np.array([r["p_first"] for r in records], dtype=np.float64)
    extra = _labeled_columns(records, p, dataset[col1], dataset[col2], chain_of_thought, has_human)
    out = dataset.remove_columns([c for c in extra if c in dataset.column_names])
    for name, values in extra.items():
        out = out.add_column(name, values)

    ties = int(np.sum(p == 0.5))
    biased = [r["position_biased"] for r in records if r["position_biased"] is not None]
    report = {
        "task": _template(task).name,
        "n_pairs": len(records),
        "both_orders": both_orders,
        "chain_of_thought": chain_of_thought,
        "position_bias_rate": (sum(biased) / len(biased)) if biased else None,
        "human_alignment": (float(np.mean(np.where(p == 0.5, 0.5, p > 0.5)))) if has_human else None,
        "n_ties": ties,
        "mean_confidence": float(np.mean(np.maximum(p, 1 - p))),
        "mean_ai_preference": float(np.mean(p)),
        "n_truncated": int(sum(r["truncated"] for r in records)),
        "seconds": round(seconds, 3),
        "pairs_per_s": round(len(records) / seconds, 3) if seconds > 0 else None,
    }
    return out, report


def _dataset_pairs(dataset):
    """Normalise ``dataset`` and render each row's prompt and two responses as the text triples to label.

    Returns ``(dataset, response-1 column, response-2 column, has human labels, rows)``.
    """
    from treg.data import PreferenceDataError, to_preference_format, validate_preference_rows

    if len(dataset) == 0:
        raise LabelError("the dataset has no rows.")
    if not {"response_1", "response_2"} <= set(dataset.column_names):
        try:
            dataset = to_preference_format(dataset)
            validate_preference_rows(dataset)
        except PreferenceDataError as e:
            raise LabelError(str(e)) from e
    col1, col2, has_human = _pair_columns(dataset)
    rows = []
    for i, row in enumerate(dataset):
        texts = []
        for field in ("prompt", col1, col2):
            value = row[field]
            text = render_text(value, f"row {i}, field '{field}'")
            if not text.strip():
                raise LabelError(f"row {i}, field '{field}': empty text; fix or drop the row.")
            texts.append(text)
        rows.append(tuple(texts))
    return dataset, col1, col2, has_human, rows


def _labeled_columns(records, p, r1_values, r2_values, chain_of_thought, has_human) -> dict[str, list]:
    """The columns the AI labels add or replace: ai_* values, and chosen/rejected oriented by the AI preference."""
    first_wins = p >= 0.5
    extra: dict[str, list] = {
        "ai_preference": p.tolist(),
        "ai_p_order_a": [r["p_order_a"] for r in records],
        "ai_p_order_b": [r["p_order_b"] for r in records],
        "ai_position_biased": [r["position_biased"] for r in records],
        "ai_truncated": [r["truncated"] for r in records],
    }
    if chain_of_thought:
        extra["ai_rationale_a"] = [r.get("rationale_a") for r in records]
        extra["ai_rationale_b"] = [r.get("rationale_b") for r in records]
    if has_human:
        extra["response_1"] = list(r1_values)
        extra["response_2"] = list(r2_values)
        extra["human_preference"] = [1.0] * len(records)
    extra["chosen"] = [a if w else b for a, b, w in zip(r1_values, r2_values, first_wins)]
    extra["rejected"] = [b if w else a for a, b, w in zip(r1_values, r2_values, first_wins)]
    return extra


# ------------------------------------------------------------------------------------------ `treg label` helpers

LABEL_KEYS = {  # key: (type, default, help)
    "model_name_or_path": (str, None, "labeler model: hub id, local path, or treg:tiny"),
    "dataset": (str, None, "pairs: local file/folder (jsonl, jsonl.gz, HH-RLHF, ...) or hub id"),
    "split": (str, "train", "dataset split (folders and hub datasets)"),
    "max_rows": (int, None, "label the first N valid rows"),
    "drop_invalid_rows": (bool, False, "drop malformed rows (logged) instead of failing"),
    "task": (label_task, "helpfulness", "summarization, helpfulness or harmlessness"),
    "chain_of_thought": (bool, False, "generate a rationale before reading the label"),
    "both_orders": (bool, True, "score both orders and average (removes position bias)"),
    "batch_size": (int, 8, "sequences per forward"),
    "max_rationale_tokens": (int, 64, "chain of thought: rationale length"),
    "max_length": (int, None, "cut longer label prompts (default: the model's limit)"),
    "output_dir": (str, "treg-labels", "where labeled/ and report.json go"),
    "output_format": (str, "disk", "disk (save_to_disk) or jsonl"),
}


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}.")


def load_label_dataset(values: Mapping[str, Any]):
    """Unlabeled pairs (prompt/response_1/response_2) load as they are; anything else as preference data."""
    from treg.data import _load_raw, load_preference_dataset

    raw = _load_raw(values["dataset"], values["split"], None)
    n = values["max_rows"]
    if {"prompt", "response_1", "response_2"} <= set(raw.column_names):
        return raw.select(range(min(n, len(raw)))) if n else raw
    del raw
    ds = load_preference_dataset(values["dataset"], split=values["split"], drop_invalid=values["drop_invalid_rows"],
                                 max_rows=None if values["drop_invalid_rows"] else n)
    if n and len(ds) > n:
        ds = ds.select(range(n))
    return ds

