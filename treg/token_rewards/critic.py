"""RELC-style critic token rewards (Cao et al. 2024, arXiv 2401.07382; METHOD.md §3).

A critic LLM reads a task description, few-shot examples, the prompt, the response and optionally its extrinsic
score, and names the spans of the response that are good or bad. Every response token that overlaps a named span
gets a constant intrinsic reward: ``good_value`` (> 0) for GOOD spans, ``bad_value`` (< 0) for BAD spans, 0 elsewhere.
Here those values are T-REG's r̂ (the extrinsic, sequence-level signal of RELC is the preference label itself, carried
by the DPO/SimPO loss), so they must lie in (−0.5, 0.5).

**Output format (choice).** One span per line, the label, an optional 1-based occurrence index, and the exact text::

    BAD: "Sydney"
    GOOD: "The capital of Australia is"
    BAD#2: "1"          <- only the 2nd occurrence of "1" in the response
    NONE                <- nothing to mark (a valid answer: all-zero rewards, not a failure)

The parser (:func:`parse_critic_output`) accepts labels in any case, leading bullets (``-``, ``*``, ``•``, ``1.``,
``2)``), extra whitespace, and straight, curly or back quotes (or none) around the span. Blank lines are ignored; any
other line is *unparsed* and counted.

**Mapping rules (choice).** Spans are matched *exactly* (case and whitespace) against the response text; a span that
is not in the response is dropped and counted as missing, never guessed. Without an occurrence index every
non-overlapping occurrence (scanned left to right) is marked; with ``#k`` only the k-th (a k beyond the count is
missing). Character ranges map onto the trainer's own ``chosen_ids`` / ``rejected_ids`` (the response followed by
the chat template's end-of-turn tokens, perhaps preceded by the end of the prompt where tokens merge across the
boundary): those ids are decoded with each token's character range (:func:`decode_with_offsets`) and the response
text is found in that decoded text (as it is, or without the surrounding whitespace a template or a SentencePiece
decoder drops; failing that, aligned with it character by character, where whitespace may differ and an unknown
token covers the characters it stands for). The response is never tokenized on its own, so a tokenizer that
tokenizes it differently in context (a SentencePiece prefix space on plain-text rows) changes nothing. A token gets
the value if it overlaps the span by at least one character (so a BPE token that straddles a span edge is marked);
special tokens (end of turn) never do. Where a GOOD and a BAD span cover the same token, BAD wins. If the decoded ids
do not hold the response the row is an error.

**Failures.** A critic answer that is None, blank, or has no parseable line (and is not ``NONE``) is a failure: that
response gets all-zero rewards and is counted.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from datasets import Dataset, concatenate_datasets

from treg.token_rewards import (
    CHOSEN_REWARDS,
    REJECTED_REWARDS,
    TOKEN_REWARD_COLUMNS,
    TokenRewardError,
    check_token_columns,
    kept_completion_length,
)
from treg.token_rewards import cache as cache_lib

logger = logging.getLogger(__name__)

CACHE_VERSION = "critic-v1"
GOOD, BAD = "GOOD", "BAD"
DEFAULT_GOOD_VALUE = 0.25
DEFAULT_BAD_VALUE = -0.25

Critic = Callable[[list[str]], list["str | None"]]


class Span(NamedTuple):
    label: str  # "GOOD" or "BAD"
    text: str  # exact text of the response
    occurrence: int | None = None  # 1-based; None marks every occurrence


DEFAULT_TASK_DESCRIPTION = (
    "You are a careful critic. Read the prompt and the response. Name the parts of the response that are clearly "
    "good (correct, helpful) and the parts that are clearly bad (wrong, unhelpful, irrelevant). Write one span per "
    'line as GOOD: "<exact text>" or BAD: "<exact text>", copying the text exactly from the response. To mark only '
    'the k-th occurrence of a repeated text write BAD#k: "<text>". Write NONE if nothing stands out. Write nothing '
    "else."
)

DEFAULT_FEW_SHOT: tuple[dict, ...] = (
    {
        "prompt": "What is the capital of Australia?",
        "response": "The capital of Australia is Sydney, its largest city.",
        "score": 0.1,
        "spans": [Span(BAD, "Sydney"), Span(GOOD, "The capital of Australia is")],
    },
    {
        "prompt": "Add 2 to every number: 1 5 1",
        "response": "3 7 1",
        "score": 0.67,
        "spans": [Span(GOOD, "3 7"), Span(BAD, "1", 2)],
    },
)


# ---------------------------------------------------------------------------------------------------- the prompt
def format_critic_answer(spans: Sequence) -> str:
    """The critic's answer in the output format: one ``LABEL[#k]: "text"`` line per span, or ``NONE``."""
    lines = []
    for s in spans:
        s = Span(*s)
        tag = s.label if s.occurrence is None else f"{s.label}#{s.occurrence}"
        lines.append(f'{tag}: "{s.text}"')
    return "\n".join(lines) if lines else "NONE"


def _section(prompt: str, response: str, score: float | None) -> str:
    text = f"### Prompt\n{prompt}\n\n### Response\n{response}\n\n"
    if score is not None:
        text += f"### Score\n{score:g}\n\n"
    return text + "### Critique\n"


def build_critic_prompt(
    prompt: str,
    response: str,
    score: float | None = None,
    *,
    task_description: str = DEFAULT_TASK_DESCRIPTION,
    few_shot: Sequence[dict] = DEFAULT_FEW_SHOT,
) -> str:
    """The critic's input: task description, few-shot examples (each with its answer), then the query, ending with
    ``### Critique`` for the critic to continue. A ``score`` (the extrinsic reward) is shown when given."""
    parts = [task_description.strip(), ""]
    for i, ex in enumerate(few_shot, 1):
        parts.append(
            f"## Example {i}\n"
            + _section(ex["prompt"], ex["response"], ex.get("score"))
            + format_critic_answer(ex["spans"])
            + "\n"
        )
    parts.append("## Your turn\n" + _section(prompt, response, score))
    return "\n".join(parts)


_QUERY_RE = re.compile(
    r"## Your turn\n### Prompt\n(.*)\n\n### Response\n(.*?)\n\n(?:### Score\n[^\n]*\n\n)?### Critique\n$", re.S
)


def split_critic_prompt(critic_prompt: str) -> tuple[str, str]:
    """(prompt, response) of the query in a prompt built by :func:`build_critic_prompt` (for rule critics)."""
    m = _QUERY_RE.search(critic_prompt)
    if m is None:
        raise ValueError("not a prompt built by build_critic_prompt")
    return m.group(1), m.group(2)


# ---------------------------------------------------------------------------------------------------- the parser
_BULLET_RE = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+")
_LINE_RE = re.compile(r"^(GOOD|BAD)\s*(?:#\s*(\d+))?\s*[:=\-]\s*(.*?)\s*$", re.I)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»", "”": "”"}


def parse_critic_output(text: str | None) -> tuple[list[Span], int]:
    """Parse a critic answer into spans. Returns (spans, number of non-blank lines that are neither a span nor NONE).

    Accepts ``GOOD: "x"``, ``bad : 'x'``, ``- BAD#2: “x”``, ``1. GOOD: x`` (unquoted: the rest of the line, stripped).
    """
    if text is None:
        return [], 0
    spans, unparsed = [], 0
    for raw in text.splitlines():
        line = _BULLET_RE.sub("", raw.strip()).strip().strip("*").strip()  # also markdown bold **BAD**
        if not line:
            continue
        if line.upper().rstrip(".") == "NONE":
            continue
        m = _LINE_RE.match(line)
        if m is None:
            unparsed += 1
            continue
        label, occurrence, body = m.group(1).upper(), m.group(2), m.group(3)
        if len(body) >= 2 and body[0] in _QUOTES and body.endswith(_QUOTES[body[0]]):
            body = body[1:-1]
        if not body or (occurrence is not None and int(occurrence) < 1):
            unparsed += 1
            continue
        spans.append(Span(label, body, int(occurrence) if occurrence is not None else None))
    return spans, unparsed


def is_failure(text: str | None) -> bool:
    """None, blank, or nothing parseable (``NONE`` alone is a valid, empty answer)."""
    if text is None or not text.strip():
        return True
    spans, unparsed = parse_critic_output(text)
    return not spans and unparsed > 0


# --------------------------------------------------------------------------------------------------- the mapping
def check_values(good_value: float, bad_value: float) -> None:
    if not 0.0 <= good_value < 0.5:
        raise ValueError(f"critic good_value must lie in [0, 0.5) (r̂ lies in (-0.5, 0.5)); got {good_value}.")
    if not -0.5 < bad_value <= 0.0:
        raise ValueError(f"critic bad_value must lie in (-0.5, 0]; got {bad_value}.")


def find_occurrences(text: str, span: str) -> list[int]:
    """Start offsets of the non-overlapping occurrences of ``span`` in ``text``, left to right."""
    out, start = [], 0
    while span:
        i = text.find(span, start)
        if i < 0:
            break
        out.append(i)
        start = i + len(span)
    return out


def _locate_response(response_text: str, decoded: str) -> tuple[int, int, int] | None:
    """Where the response sits in the decoded completion: ``(start in decoded, start in response, length)`` of the
    response as it is, or without the leading and/or trailing whitespace that a chat template strips or a
    SentencePiece decoder drops from its first token; None when the decoded text holds none of them."""
    for text in (response_text, response_text.strip(), response_text.lstrip(), response_text.rstrip()):
        at = decoded.find(text) if text else -1
        if at >= 0:
            return at, response_text.index(text), len(text)
    return None


def _aligned_ranges(response_text: str, decoded: str, offsets, unknown: set[int]) -> list[tuple[int, int]] | None:
    """Each token's character range in ``response_text`` from a character alignment of the decoded ids with it, for
    ids that do not decode to the response verbatim: a tokenizer that normalises whitespace, or one that maps
    characters it does not know to its unknown token (``unknown``: those tokens' indices), which decodes to nothing.
    Decoded text before or after the response (the end of a prompt, end-of-turn text) and whitespace may differ; every
    other response character must be matched, or sit where an unknown token does (which then covers it). None when
    the ids do not spell the response."""
    import difflib

    to_response: dict[int, int] = {}  # decoded position -> response position of the same character
    unknown_ranges: dict[int, tuple[int, int]] = {}
    matcher = difflib.SequenceMatcher(None, decoded, response_text, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            to_response.update((i1 + k, j1 + k) for k in range(i2 - i1))
            continue
        extra, lost = decoded[i1:i2], response_text[j1:j2]
        if extra.strip() and not (tag == "delete" and j1 in (0, len(response_text))):
            return None
        if lost.strip():
            holders = [t for t in unknown if i1 <= offsets[t][0] <= i2]
            if not holders:
                return None
            unknown_ranges.update((t, (j1, j2)) for t in holders)
    ranges = []
    for t, (a, b) in enumerate(offsets):
        matched = [to_response[k] for k in range(a, b) if k in to_response]
        ranges.append(unknown_ranges.get(t) or ((min(matched), max(matched) + 1) if matched else (0, 0)))
    return ranges


def map_spans_to_tokens(
    tokenizer,
    response_text: str,
    completion_ids: Sequence[int],
    spans: Sequence,
    good_value: float = DEFAULT_GOOD_VALUE,
    bad_value: float = DEFAULT_BAD_VALUE,
    *,
    row: str = "?",
) -> tuple[list[float], dict[str, int]]:
    """One value per completion token: ``bad_value`` on tokens overlapping a BAD span, else ``good_value`` on tokens
    overlapping a GOOD span, else 0. ``spans`` are :class:`Span` or ``(label, text[, occurrence])`` tuples, found in
    ``response_text`` (the text the critic read).

    The spans are placed on ``completion_ids`` themselves: the ids are decoded with each token's character range
    (:func:`decode_with_offsets`) and the response is located in that text (:func:`_locate_response`; failing that,
    aligned with it character by character, :func:`_aligned_ranges`), so the values line up one-to-one with the
    trainer's ids whatever the tokenizer does to the response in context. Tokens outside the response (end of turn,
    the end of a prompt merged into the first token) get a value only where they overlap a span's characters.

    Returns (values, stats) with stats ``spans``, ``found``, ``missing``, ``good_tokens``, ``bad_tokens``. Raises
    :class:`TokenRewardError` naming ``row`` when the decoded ids do not hold the response.
    """
    check_values(good_value, bad_value)
    decoded, offsets = decode_with_offsets(tokenizer, completion_ids)
    found = _locate_response(response_text, decoded) if response_text.strip() else (0, 0, 0)
    if found is not None:
        # each token's character range in response coordinates, clipped to the response (what lies outside is not
        # text the critic read)
        at, begin, length = found
        shift = begin - at
        ranges = [(max(a, at) + shift, min(b, at + length) + shift) for a, b in offsets]
        return _mark_spans(response_text, ranges, spans, good_value, bad_value)
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = {t for t, i in enumerate(completion_ids) if unk is not None and i == unk}
    ranges = _aligned_ranges(response_text, decoded, offsets, unknown)
    if ranges is None:
        raise TokenRewardError(
            f"row {row}: the trainer's {len(completion_ids)} completion ids decode to {_preview(decoded)}, which does "
            f"not hold the response {_preview(response_text)}, so critic spans cannot be placed. Check that the "
            "dataset's prompt_ids / chosen_ids / rejected_ids were tokenized from its text columns with this tokenizer."
        )
    return _mark_spans(response_text, ranges, spans, good_value, bad_value)


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _mark_spans(text: str, offsets, spans, good_value: float, bad_value: float) -> tuple[list[float], dict[str, int]]:
    """One value per ``(start, end)`` character range of ``text``: BAD wins over GOOD, unmarked ranges get 0."""
    is_good, is_bad = [False] * len(offsets), [False] * len(offsets)
    stats = {"spans": 0, "found": 0, "missing": 0}
    for s in spans:
        s = Span(*s)
        stats["spans"] += 1
        occ = find_occurrences(text, s.text)
        if s.occurrence is not None:
            occ = occ[s.occurrence - 1 : s.occurrence]
        if not occ:
            stats["missing"] += 1
            continue
        stats["found"] += 1
        marks = is_bad if s.label == BAD else is_good
        for begin in occ:
            end = begin + len(s.text)
            for t, (a, b) in enumerate(offsets):
                if a < b and a < end and begin < b:  # an empty range (a special token) is never marked
                    marks[t] = True
    values = [bad_value if b else good_value if g else 0.0 for g, b in zip(is_good, is_bad)]
    stats["bad_tokens"] = sum(is_bad)
    stats["good_tokens"] = sum(g and not b for g, b in zip(is_good, is_bad))
    return values, stats


def decode_with_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` (special tokens skipped, no clean-up of spaces) and each token's character range in it,
    from decoding growing prefixes: token t covers ``[common prefix of text(<t) and text(≤t), len(text(≤t)))``.

    Unlike re-tokenizing the text, this holds for any id sequence a policy samples, canonical or not; a byte-level
    token that ends inside a multi-byte character shares that character with the next token. Special tokens get an
    empty range, so no span can mark them.
    """

    def text(n: int) -> str:
        return tokenizer.decode(list(ids[:n]), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    offsets, prev = [], ""
    for t in range(len(ids)):
        cur = text(t + 1)
        common = 0
        limit = min(len(prev), len(cur))
        while common < limit and prev[common] == cur[common]:
            common += 1
        offsets.append((common, len(cur)) if len(cur) > common else (len(cur), len(cur)))
        prev = cur
    return prev, offsets


def map_spans_to_completion_ids(
    tokenizer,
    completion_ids: Sequence[int],
    spans: Sequence,
    good_value: float = DEFAULT_GOOD_VALUE,
    bad_value: float = DEFAULT_BAD_VALUE,
) -> tuple[list[float], dict[str, int]]:
    """Like :func:`map_spans_to_tokens` for sampled completions (online RL): spans are matched in the text the ids
    decode to (:func:`decode_with_offsets`, the text the critic was shown), so the values line up one-to-one with
    ``completion_ids`` whatever their tokenization. End-of-turn and other special tokens get 0."""
    check_values(good_value, bad_value)
    text, offsets = decode_with_offsets(tokenizer, completion_ids)
    return _mark_spans(text, offsets, spans, good_value, bad_value)


# ------------------------------------------------------------------------------------------------------- critics
class HFCritic:
    """A causal LM as critic: each critic prompt is sent as one user turn through the chat template (plain text when
    the tokenizer has none) and answered greedily. Prompts longer than the model's context minus
    ``max_new_tokens`` are not sent; their answer is None (a counted failure). The caller's random state is left as
    it was (a critic call inside an RL step must not re-seed the policy's sampling)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 256, batch_size: int = 8, show_progress: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.show_progress = max_new_tokens, batch_size, show_progress

    def _as_prompt(self, text: str):
        if getattr(self.tokenizer, "chat_template", None):
            return [{"role": "user", "content": text}]
        return text

    def __call__(self, prompts: list[str]) -> list[str | None]:
        from treg.generation import generate, render_prompt

        limit = getattr(self.model.config, "max_position_embeddings", None)
        out: list[str | None] = [None] * len(prompts)
        keep = []
        for i, p in enumerate(prompts):
            n = len(render_prompt(self.tokenizer, self._as_prompt(p)))
            if limit is None or n + self.max_new_tokens <= limit:
                keep.append(i)
            else:
                logger.warning(
                    "critic prompt %d has %d tokens; with %d new tokens it exceeds the context of %d",
                    i,
                    n,
                    self.max_new_tokens,
                    limit,
                )
        if keep:
            import torch

            device = next(self.model.parameters()).device
            # generate() seeds the global RNG; greedy decoding needs none, and an online trainer sampling from the
            # same RNG must not be reset to the same state at every critic call
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                texts = generate(
                    self.model,
                    self.tokenizer,
                    [self._as_prompt(prompts[i]) for i in keep],
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                    show_progress=self.show_progress,
                    desc="Critic",
                )
            for i, t in zip(keep, texts):
                out[i] = t[0]
        return out


class RuleCritic:
    """A deterministic critic for the toy task of :mod:`treg.synthetic`: :func:`treg.synthetic.oracle` finds the
    defect words; runs of defect words become BAD spans and runs of correct words GOOD spans, each with its
    occurrence index, written in the critic output format (so the text → parse → map path is the real one).
    Prompts it cannot read (not built by :func:`build_critic_prompt`, or not a toy task) get None."""

    critic_id = "rule:toy-v1"

    def __init__(self, good: bool = True):
        self.good = good

    def answer(self, prompt: str, response: str) -> str | None:
        from treg.synthetic import oracle

        try:
            _, flags = oracle(prompt.strip(), response)
        except ValueError:
            return None
        words, pos = [], 0
        for w in response.split():
            begin = response.index(w, pos)
            words.append((begin, begin + len(w)))
            pos = begin + len(w)
        spans, i = [], 0
        while i < len(words):
            j = i
            while j + 1 < len(words) and flags[j + 1] == flags[i]:
                j += 1
            if flags[i] or self.good:
                label = BAD if flags[i] else GOOD
                pieces = [(words[i][0], words[j][1])]
                run = response[words[i][0] : words[j][1]]
                if len(run.splitlines()) > 1 or words[i][0] not in find_occurrences(response, run):
                    # e.g. "1 1" at 2 in "1 1 1", or a run across lines (the output format is one span per line):
                    # address each word on its own
                    pieces = words[i : j + 1]
                for begin, end in pieces:
                    occ = find_occurrences(response, response[begin:end])
                    index = occ.index(begin) + 1 if len(occ) > 1 else None
                    spans.append(Span(label, response[begin:end], index))
            i = j + 1
        return format_critic_answer(spans)

    def __call__(self, prompts: list[str]) -> list[str | None]:
        out = []
        for p in prompts:
            try:
                prompt, response = split_critic_prompt(p)
            except ValueError:
                out.append(None)
                continue
            out.append(self.answer(prompt, response))
        return out


# ------------------------------------------------------------------------------------------- guarded calls
class CriticCallStats(NamedTuple):
    """What went wrong in :func:`call_critic`, counted per prompt: the call raised, did not return within the
    timeout, or returned the wrong number of answers. Every such prompt's answer is None."""

    errors: int = 0
    timeouts: int = 0
    bad_length: int = 0

    @property
    def failed_calls(self) -> int:
        return self.errors + self.timeouts + self.bad_length


def call_critic(
    critic: Critic,
    prompts: Sequence[str],
    *,
    batch_size: int = 32,
    timeout_s: float | None = None,
    show_progress: bool = False,
    desc: str = "Critic",
    statuses: list[str] | None = None,
) -> tuple[list[str | None], CriticCallStats]:
    """Answers to ``prompts`` from ``critic``, ``batch_size`` prompts per call, never raising for the critic's sake.

    A call that raises, returns a wrong number of answers or (with ``timeout_s``) does not return in time gives None
    for each of its prompts, counted in the returned :class:`CriticCallStats` and logged. Timed calls run in one
    worker thread: a call that overruns cannot be stopped and keeps that thread busy until it returns, so later calls
    queue behind it (and time out in turn) rather than run the critic concurrently. ``statuses``, when given, is
    extended with one of ``"ok"``, ``"error"``, ``"timeout"``, ``"bad_length"`` per prompt.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    answers: list[str | None] = []
    errors = timeouts = bad_length = 0
    executor = _critic_executor() if timeout_s else None
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE")) or len(prompts) <= batch_size
    statuses = [] if statuses is None else statuses
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=disable):
        chunk = prompts[start : start + batch_size]
        try:
            if executor is None:
                got = list(critic(chunk))
            else:
                future = executor.submit(critic, chunk)
                try:
                    got = list(future.result(timeout=timeout_s))
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    timeouts += len(chunk)
                    logger.warning(
                        "critic call on %d prompts timed out after %.1f s; their rewards are 0", len(chunk), timeout_s
                    )
                    answers += [None] * len(chunk)
                    statuses += ["timeout"] * len(chunk)
                    continue
        except Exception as e:  # a critic failure must never end the run: count it, log it, give zeros
            errors += len(chunk)
            logger.warning(
                "critic call on %d prompts raised %s: %s; their rewards are 0", len(chunk), type(e).__name__, e
            )
            answers += [None] * len(chunk)
            statuses += ["error"] * len(chunk)
            continue
        if len(got) != len(chunk):
            bad_length += len(chunk)
            logger.warning("the critic returned %d answers for %d prompts; their rewards are 0", len(got), len(chunk))
            answers += [None] * len(chunk)
            statuses += ["bad_length"] * len(chunk)
            continue
        answers += [a if isinstance(a, str) else None for a in got]
        statuses += ["ok"] * len(chunk)
    return answers, CriticCallStats(errors, timeouts, bad_length)


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _critic_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="treg-critic")
    return _EXECUTOR


# ---------------------------------------------------------------------------------------------- dataset columns
def _text(value, tokenizer, field: str, row: int) -> str:
    if isinstance(value, str):
        eos = getattr(tokenizer, "eos_token", None)
        if field != "prompt" and eos and value.endswith(eos):  # TRL appends the EOS text to plain completions
            value = value[: -len(eos)]
        return value
    messages = list(value)
    if field == "prompt":
        if len(messages) == 1:
            return messages[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    if len(messages) != 1:
        raise TokenRewardError(
            f"row {row}, field {field!r}: critic rewards need one completion message, got {len(messages)}."
        )
    return messages[0]["content"]


def attach_critic_rewards(
    dataset: Dataset,
    critic: Critic,
    tokenizer,
    *,
    critic_id: str,
    max_length: int | None,
    task_description: str = DEFAULT_TASK_DESCRIPTION,
    few_shot: Sequence[dict] = DEFAULT_FEW_SHOT,
    use_extrinsic: bool = True,
    good_value: float = DEFAULT_GOOD_VALUE,
    bad_value: float = DEFAULT_BAD_VALUE,
    batch_size: int = 64,
    cache_dir: str | None = None,
    show_progress: bool = True,
    main_process_first=None,
    return_stats: bool = False,
):
    """Add ``chosen_token_rewards`` / ``rejected_token_rewards`` from a critic to a tokenized dataset (``prompt``,
    ``chosen``, ``rejected`` and their ``*_ids``), from the cache when an entry for these inputs exists.

    Args:
        critic: ``critic(list of critic prompts) -> list of answers`` (None = failure), e.g. :class:`HFCritic`,
            :class:`RuleCritic`.
        critic_id: identifies the critic (model and weights, or rule version); part of the cache key.
        max_length: the trainer's ``max_length``; values are kept for the kept completion tokens only.
        task_description, few_shot: the critic prompt (see :func:`build_critic_prompt`).
        use_extrinsic: show the row's ``score_chosen`` / ``score_rejected`` to the critic when the dataset has them.
        good_value, bad_value: r̂ on tokens of GOOD / BAD spans, in [0, 0.5) and (−0.5, 0].
        batch_size: critic prompts per critic call (progress is logged per call).
        cache_dir: cache root (default ``$TREG_CACHE_DIR`` or ``~/.cache/treg``); ``"none"`` disables it.

    Returns the dataset, or (dataset, stats) with ``return_stats``; stats are also logged.
    """
    check_values(good_value, bad_value)
    n = len(dataset)
    prompts, responses, scores = _critic_inputs(dataset, tokenizer, use_extrinsic)
    few_shot = [dict(ex, spans=[Span(*s) for s in ex["spans"]]) for ex in few_shot]
    key = _cache_key(
        dataset, tokenizer, (prompts, responses, scores), critic_id=critic_id, task_description=task_description,
        few_shot=few_shot, good_value=good_value, bad_value=bad_value, use_extrinsic=use_extrinsic,
        max_length=max_length,
    )

    def compute() -> dict[str, list]:
        critic_prompts = [
            build_critic_prompt(
                prompts[r], responses[side][r], scores[side][r], task_description=task_description, few_shot=few_shot
            )
            for side in ("chosen", "rejected")
            for r in range(n)
        ]
        answers = _ask_critic(critic, critic_prompts, batch_size, show_progress)
        columns: dict[str, list] = {}
        for s, side in enumerate(("chosen", "rejected")):
            columns.update(_side_columns(
                dataset, tokenizer, side, answers[s * n : (s + 1) * n], responses[side], max_length=max_length,
                good_value=good_value, bad_value=bad_value,
            ))
        return columns

    columns = cache_lib.load_or_compute(
        compute, cache_dir=cache_dir, entry=f"{CACHE_VERSION}-{key[:24]}", what="Critic token rewards",
        main_process_first=main_process_first,
    )
    if len(columns) != n:
        raise ValueError(f"critic cache holds {len(columns)} rows for a dataset of {n}; delete it.")
    stats = _critic_stats(columns)
    logger.info("critic token rewards (%s): %s", critic_id, stats)
    rewards = columns.select_columns([CHOSEN_REWARDS, REJECTED_REWARDS])
    dataset = dataset.remove_columns([c for c in rewards.column_names if c in dataset.column_names])
    dataset = concatenate_datasets([dataset, rewards], axis=1)
    check_token_columns(dataset, max_length, TOKEN_REWARD_COLUMNS)
    return (dataset, stats) if return_stats else dataset


def _cache_key(dataset: Dataset, tokenizer, inputs: tuple, *, critic_id: str, task_description: str, few_shot: list,
               good_value: float, bad_value: float, use_extrinsic: bool, max_length: int | None) -> str:
    """The cache key of critic rewards: the critic, its prompt, the values, the tokenizer, the texts it reads
    (``inputs`` from :func:`_critic_inputs`) and the token ids."""
    prompts, responses, scores = inputs
    settings = {
        "version": CACHE_VERSION,
        "critic": critic_id,
        "task_description": task_description,
        "few_shot": json.loads(json.dumps(few_shot, default=str)),
        "good_value": good_value,
        "bad_value": bad_value,
        "use_extrinsic": use_extrinsic,
        "max_length": max_length,
        "tokenizer": type(tokenizer).__name__,
        "vocab": len(tokenizer),
        "texts": [prompts, responses["chosen"], responses["rejected"], scores["chosen"], scores["rejected"]],
    }
    return cache_lib.fingerprint(settings, [dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]])


def _critic_stats(columns: Dataset) -> dict[str, int]:
    """Totals over both sides of the per-row counts (failed answers, unparsed lines, spans named, found, missing),
    and the number of responses."""
    stats = {
        k: sum(sum(columns[f"critic_{side}_{k}"]) for side in ("chosen", "rejected"))
        for k in ("failed", "unparsed", "spans", "found", "missing")
    }
    stats["responses"] = 2 * len(columns)
    return stats


def _critic_inputs(dataset: Dataset, tokenizer, use_extrinsic: bool) -> tuple[list[str], dict, dict]:
    """What the critic reads, per row: the prompt text, and per side the response text and its extrinsic score
    (None unless ``use_extrinsic`` and the dataset has ``score_chosen`` / ``score_rejected``)."""
    n = len(dataset)
    prompts = [_text(p, tokenizer, "prompt", r) for r, p in enumerate(dataset["prompt"])]
    responses, scores = {}, {}
    for side in ("chosen", "rejected"):
        responses[side] = [_text(v, tokenizer, side, r) for r, v in enumerate(dataset[side])]
        col = f"score_{side}"
        scores[side] = list(dataset[col]) if use_extrinsic and col in dataset.column_names else [None] * n
    return prompts, responses, scores


def _ask_critic(critic: Critic, critic_prompts: list[str], batch_size: int, show_progress: bool) -> list[str | None]:
    """The critic's answers, ``batch_size`` prompts per call; a call that returns a wrong number of answers raises."""
    answers: list[str | None] = []
    for start in range(0, len(critic_prompts), batch_size):
        got = list(critic(critic_prompts[start : start + batch_size]))
        if len(got) != len(critic_prompts[start : start + batch_size]):
            raise ValueError(
                f"the critic returned {len(got)} answers for {min(batch_size, len(critic_prompts) - start)} prompts"
            )
        answers += got
        if show_progress:
            logger.info("critic: %d/%d responses", len(answers), len(critic_prompts))
    return answers


def _side_columns(dataset: Dataset, tokenizer, side: str, answers: list[str | None], responses: list[str], *,
                  max_length: int | None, good_value: float, bad_value: float) -> dict[str, list]:
    """One side's columns from the critic's answers: r̂ per kept completion token (all 0 for a failed answer), the
    raw answers, and per row the counts of failure, unparsed lines, spans, spans found and spans missing."""
    col = CHOSEN_REWARDS if side == "chosen" else REJECTED_REWARDS
    values, stat_rows = [], {k: [] for k in ("failed", "unparsed", "spans", "found", "missing")}
    for r, (prompt_ids, ids) in enumerate(zip(dataset["prompt_ids"], dataset[f"{side}_ids"])):
        answer = answers[r]
        kept = kept_completion_length(len(prompt_ids), len(ids), max_length)
        spans, unparsed = parse_critic_output(answer)
        failed = is_failure(answer)
        if failed:
            row_values, st = [0.0] * len(ids), {"spans": 0, "found": 0, "missing": 0}
        else:
            row_values, st = map_spans_to_tokens(
                tokenizer, responses[r], ids, spans, good_value, bad_value, row=f"{r} ({side})"
            )
        values.append(row_values[:kept])
        for k, v in (("failed", int(failed)), ("unparsed", unparsed), ("spans", st["spans"]), ("found", st["found"]),
                     ("missing", st["missing"])):
            stat_rows[k].append(v)
    columns = {col: values, f"critic_{side}_output": [a if a is not None else "" for a in answers]}
    for k, v in stat_rows.items():
        columns[f"critic_{side}_{k}"] = v
    return columns
