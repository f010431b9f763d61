"""Direct RLAIF (METHOD.md §4): ask an LLM for a 1–10 score and read the expected score from its log-probs.

The judge sees one (prompt, response) under :data:`DIRECT_TEMPLATE` and the answer is started for it with
:data:`DIRECT_ENDING` (``"Score:"``). For each candidate score string i = 1..10 we compute P(i) — the probability that
the judge's answer after the ending *is exactly* i — renormalise over the ten candidates, and take

    s = Σ_i i · P(i)  ∈ [1, 10],        normalised  (s − 1)/9 · 2 − 1  ∈ [−1, 1].

Multi-token scores. The probability of a score string is the product of its token probabilities after the ending.
Single-token spellings are all read from one next-token distribution per judged pair
(:func:`treg.scoring.next_token_logprobs`); multi-token ones (e.g. "10") are scored as sequences with
:func:`treg.scoring.score_completions`. Each score has two
spellings, with and without a leading space (``"7"`` and ``" 7"``; tokenizers spell the digit after ``"Score:"``
either way), whose probabilities are added. The token ids of a spelling are those that ``ending + spelling``
tokenizes to after the ending's own ids, so merges across the boundary are respected.

The "1" / "10" ambiguity. When "10" tokenizes as "1" followed by "0" (e.g. the tiny tokenizer: ``" 10"`` →
``[" 1", "0"]``), the probability of the token "1" includes every answer that *starts* with 1, "10" among them.
We count as the score 1 only "1" **not followed by "0"**:

    P(1) = P("1") · (1 − P("0" | "1")) = P("1") − P("10").

In general, a candidate whose ids are a proper prefix of another candidate's ids loses the probability of those
continuations (computed from the longer candidate's per-token log-probs, so no extra forward is needed). "1"
followed by other digits ("15") still counts as 1: such answers are not scores at all and carry almost no mass
after a 1–10 instruction. When "10" is a single token no correction is needed and none is applied.

Example::

    >>> direct_scores(model, tokenizer, ["sort: 3 1 2"], ["1 2 3"])  # doctest: +SKIP
    [0.71]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from treg.generation import encode_pieces
from treg.scoring import next_token_logprobs, score_completions

DIRECT_TEMPLATE = (
    "You are grading an assistant's answer. Read the request and the answer, then rate the answer on a scale "
    "from 1 to 10: 1 means useless, wrong or harmful, 10 means correct, complete and as helpful as possible. "
    "Reply with the number only.\n\n"
    "Request:\n{prompt}\n\n"
    "Answer:\n{response}"
)
DIRECT_ENDING = "Score:"
SCORES = tuple(range(1, 11))
SPELLINGS = ("", " ")  # prefixes tried before each score string; their probabilities are added


@dataclass
class DirectScore:
    """One judged response: ``score`` in [−1, 1], ``expected`` = Σ i·P(i) in [1, 10], ``probs`` P(1)..P(10)
    (renormalised), ``mass`` = total probability the judge put on the ten scores before renormalising."""

    score: float
    expected: float
    probs: list[float] = field(default_factory=list)
    mass: float = 0.0


def _text(value) -> str:
    """A prompt or response as text: strings as is, chat messages as a ``Role: content`` transcript."""
    if isinstance(value, str):
        return value
    messages = list(value)
    if len(messages) == 1:
        return str(messages[0]["content"])
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def judge_context(tokenizer, prompt, response, template: str = DIRECT_TEMPLATE, ending: str = DIRECT_ENDING):
    """Token ids of the judge prompt up to and including the ending (chat template used when the tokenizer has one).

    The ending is tokenized as part of the joined text (:func:`treg.generation.encode_pieces`), never alone: a
    SentencePiece tokenizer (Llama-2, Mistral) would read a lone "Score:" as "▁Score:"."""
    question = template.format(prompt=_text(prompt), response=_text(response))
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        head, tail = encode_pieces(tokenizer, [rendered, ending])
        return head + tail
    return _ids(tokenizer, question + "\n" + ending)


def candidate_ids(tokenizer, ending: str = DIRECT_ENDING, spellings: Sequence[str] = SPELLINGS):
    """``[(score, token ids)]``: every distinct spelling of every score, as tokenized right after ``ending``."""
    ending_ids = _ids(tokenizer, ending)
    out, seen = [], set()
    for score in SCORES:
        for prefix in spellings:
            full = _ids(tokenizer, ending + prefix + str(score))
            if full[: len(ending_ids)] == ending_ids and len(full) > len(ending_ids):
                ids = full[len(ending_ids) :]
            else:  # the ending merged with the score: fall back to the score tokenized alone
                ids = _ids(tokenizer, prefix + str(score))
            if ids and tuple(ids) not in seen:
                seen.add(tuple(ids))
                out.append((score, ids))
    return out


def probs_from_logps(candidates, logps: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Turn per-token log-probs of each candidate (aligned with ``candidates``) into (P(1..10) renormalised, mass).

    A candidate whose ids are a proper prefix of another's keeps only the probability of *not* continuing into it:
    P(c) · (1 − Σ_d P(d's remaining tokens | c)).
    """
    raw = np.zeros(len(SCORES), dtype=np.float64)
    for k, (score, ids) in enumerate(candidates):
        lp = np.asarray(logps[k], dtype=np.float64)
        p = float(np.exp(lp.sum()))
        continue_p = 0.0
        for j, (_, other) in enumerate(candidates):
            if len(other) > len(ids) and list(other[: len(ids)]) == list(ids):
                continue_p += float(np.exp(np.asarray(logps[j], dtype=np.float64)[len(ids) :].sum()))
        raw[score - 1] += p * max(0.0, 1.0 - continue_p)
    mass = float(raw.sum())
    if mass <= 0.0 or not np.isfinite(mass):
        return np.full(len(SCORES), 1.0 / len(SCORES)), 0.0
    return raw / mass, mass


def normalise(expected: float) -> float:
    """Map an expected score in [1, 10] to [−1, 1]: (s − 1)/9 · 2 − 1 (clipped against rounding)."""
    return float(min(1.0, max(-1.0, (expected - 1.0) / 9.0 * 2.0 - 1.0)))


def direct_score_details(
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence,
    *,
    batch_size: int = 8,
    show_progress: bool = True,
    template: str = DIRECT_TEMPLATE,
    ending: str = DIRECT_ENDING,
) -> list[DirectScore]:
    """Judge each (prompt, response) with ``model``; one :class:`DirectScore` per pair."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    candidates = candidate_ids(tokenizer, ending)
    contexts = [judge_context(tokenizer, p, r, template, ending) for p, r in zip(prompts, responses)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # Single-token candidates all come from one next-token distribution per context; only multi-token spellings
    # (e.g. "10" = "1" + "0") need their own scored sequence.
    single = [k for k, (_, ids) in enumerate(candidates) if len(ids) == 1]
    multi = [k for k, (_, ids) in enumerate(candidates) if len(ids) > 1]
    first = next_token_logprobs(
        model, contexts, [candidates[k][1][0] for k in single], batch_size=batch_size, pad_token_id=pad,
        desc="Direct AI scores", show_progress=show_progress,
    )
    longer = score_completions(
        model, [(ctx, candidates[k][1]) for ctx in contexts for k in multi], batch_size=batch_size * max(1, len(multi)),
        pad_token_id=pad, show_progress=False,
    )
    logps: list[np.ndarray] = []
    for r in range(len(contexts)):
        row: list[np.ndarray | None] = [None] * len(candidates)
        for j, k in enumerate(single):
            row[k] = first[r, j : j + 1]
        for j, k in enumerate(multi):
            row[k] = longer[r * len(multi) + j]
        logps.extend(row)  # type: ignore[arg-type]
    out = []
    values = np.asarray(SCORES, dtype=np.float64)
    for r in range(len(prompts)):
        probs, mass = probs_from_logps(candidates, logps[r * len(candidates) : (r + 1) * len(candidates)])
        expected = float((values * probs).sum())
        out.append(DirectScore(normalise(expected), expected, probs.tolist(), mass))
    return out


def direct_scores(
    model, tokenizer, prompts: Sequence, responses: Sequence, batch_size: int = 8, show_progress: bool = True
) -> list[float]:
    """Direct RLAIF scores in [−1, 1], one per (prompt, response). ``batch_size`` counts pairs per forward (each
    pair is scored as one row per score spelling). See :func:`direct_score_details` for the raw expected score."""
    details = direct_score_details(model, tokenizer, prompts, responses, batch_size=batch_size,
                                   show_progress=show_progress)
    return [d.score for d in details]


class DirectScorer:
    """A scorer for :func:`treg.feedback.onpolicy.build_onpolicy_pairs`: ``scorer(prompt, response) -> float``,
    with ``score_batch`` doing all pairs in batched forwards."""

    def __init__(self, model, tokenizer, batch_size: int = 8, show_progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.show_progress = model, tokenizer, batch_size, show_progress

    def score_batch(self, prompts: Sequence, responses: Sequence) -> list[float]:
        return direct_scores(self.model, self.tokenizer, prompts, responses, self.batch_size, self.show_progress)

    def __call__(self, prompt, response) -> float:
        return self.score_batch([prompt], [response])[0]
