"""Verifiable instructions, IFEval-style: treg's own checkers, with the character spans that break each instruction.

The instruction types and their parameters are those of IFEval (Zhou et al. 2023, "Instruction-Following Evaluation
for Large Language Models", arXiv:2311.07911): a prompt carries ``instruction_id_list`` and one ``kwargs`` dict per
instruction. The checkers here are written for treg (no IFEval code): each returns pass/fail and, where a violation
sits on identifiable characters, the spans ``[start, end)`` of the response that break it (a comma, an uppercase
letter, a forbidden word, the words beyond a word limit, the ending that is not the required phrase, ...).
:func:`token_flags` turns spans into per-token defect flags from a fast tokenizer's offsets.

Row format (``load_ifeval``, ``compose_training_prompts``)::

    {"key": 1000, "prompt": "... Do not use any commas ...",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 300}]}

Choices where the wording leaves room (documented, applied the same way everywhere):

* words are runs of letters/digits joined by an apostrophe or hyphen (``don't`` and ``well-known`` are one word);
* keywords and forbidden words match whole words, case-insensitively; letters are counted case-insensitively;
* the end phrase, the postscript marker and section labels match case-insensitively (so "all lowercase" and an
  end phrase with capitals can both be met); the response's surrounding whitespace is ignored;
* a sentence ends at ``.``, ``!`` or ``?`` followed by whitespace (not after a common abbreviation or a single
  initial) or at a line break; a bullet is a line starting with ``* `` or ``- ``; a highlight is ``*text*`` or
  ``**text**`` (no space inside the asterisks); a placeholder is ``[text]``; a title is ``<<text>>``;
* count instructions "less than N" flag the N-th occurrence onwards (those that push the count to N); "at least N"
  and "exactly N" with too few have nothing to flag (the defect is what is missing); "exactly N" with too many flags
  the items after the N-th.

``language:response_language`` is not covered (it needs a language identifier and has no offending tokens).
"""

from __future__ import annotations

import bisect
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from treg.evaluation import data
from treg.files import UserError

AT_LEAST, LESS_THAN = "at least", "less than"
RELATIONS = (AT_LEAST, LESS_THAN)
IFEVAL_FILE = "ifeval/input_data.jsonl"


class InstructionError(UserError):
    """An instruction id treg does not check, or parameters that do not fit it."""


Span = tuple[int, int]
WORD = re.compile(r"\w+(?:['’-]\w+)*")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e eg ie inc ltd co approx fig p.s p.p.s ps pps a.m p.m".split()
)
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|\n")
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S.*$", re.M)
_BOLD = re.compile(r"\*\*(?=\S)[^\n*]+?(?<=\S)\*\*")
_ITALIC = re.compile(r"\*(?=\S)[^\n*]+?(?<=\S)\*")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*\S[^\[\]\n]*\]")
_TITLE = re.compile(r"<<[^\n<>]*\S[^\n<>]*>>")
_DIVIDER = re.compile(r"^[ \t]*\*[ \t]*\*[ \t]*\*[* \t]*$", re.M)
_TWO_RESPONSES = re.compile(r"\*{6,}")
_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")
CONSTRAINED_ANSWERS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


# ---------------------------------------------------------------------------------------------------------- helpers
def words(text: str) -> list[Span]:
    """The spans of the words of ``text`` (see the module docstring)."""
    return [m.span() for m in WORD.finditer(text)]


def _strip_span(text: str, start: int, end: int) -> Span | None:
    """``[start, end)`` shrunk to its non-space content; None when blank."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the ``.`` at ``period`` closes an abbreviation or an initial rather than a sentence."""
    before = re.search(r"[\w.]+$", text[:period])
    if not before:
        return False
    token = before.group().lower().strip(".")
    return token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())


def sentences(text: str) -> list[Span]:
    """The spans of the sentences of ``text``: pieces ending at terminal punctuation or a line break, holding a
    word."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.group() == "." and _is_abbreviation(text, m.start()):
            continue
        span = _strip_span(text, start, m.end())
        if span and re.search(r"\w", text[span[0] : span[1]]):
            spans.append(span)
        start = m.end()
    span = _strip_span(text, start, len(text))
    if span and re.search(r"\w", text[span[0] : span[1]]):
        spans.append(span)
    return spans


def _whole_word(word: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.I)


def _pieces(text: str, separator: re.Pattern) -> list[Span | None]:
    """The stripped spans between matches of ``separator`` (None for an empty piece)."""
    cuts = [0] + [x for m in separator.finditer(text) for x in m.span()] + [len(text)]
    return [_strip_span(text, cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]


def _less_than(items: list[Span], n: int) -> tuple[bool, list[Span]]:
    """Fewer than n: the items from the n-th on are the violation."""
    return len(items) < n, items[max(n - 1, 0) :] if len(items) >= n else []


def _count(items: list[Span], relation: str, n: int) -> tuple[bool, list[Span]]:
    if relation == LESS_THAN:
        return _less_than(items, n)
    return len(items) >= n, []


def _exactly(items: list[Span], n: int, text: str) -> tuple[bool, list[Span]]:
    """Exactly n items: too many flags everything from the (n+1)-th item to the end of the text's content."""
    if len(items) <= n:
        return len(items) == n, []
    end = _strip_span(text, 0, len(text))[1]
    return False, [(items[n][0], end)]


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sorted, overlapping or touching spans merged; empty spans dropped."""
    merged: list[list[int]] = []
    for s, e in sorted((int(s), int(e)) for s, e in spans if e > s):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


# ---------------------------------------------------------------------------------------------------------- checkers
def _no_comma(text):
    spans = [(m.start(), m.end()) for m in re.finditer(",", text)]
    return not spans, spans


def _chars(text, predicate):
    spans = merge_spans([(i, i + 1) for i, c in enumerate(text) if predicate(c)])
    return not spans, spans


def _lowercase(text):
    return _chars(text, str.isupper)


def _capital(text):
    return _chars(text, str.islower)


def _capital_words(text, capital_relation, capital_frequency):
    caps = [(s, e) for s, e in words(text) if text[s:e].isupper()]
    return _count(caps, capital_relation, capital_frequency)


def _forbidden(text, forbidden_words):
    spans = [m.span() for w in forbidden_words for m in _whole_word(w).finditer(text)]
    return not spans, merge_spans(spans)


def _existence(text, keywords):
    return all(_whole_word(k).search(text) for k in keywords), []


def _frequency(text, keyword, relation, frequency):
    return _count([m.span() for m in _whole_word(keyword).finditer(text)], relation, frequency)


def _letters(text, letter, let_relation, let_frequency):
    found = [(m.start(), m.end()) for m in re.finditer(re.escape(letter), text, re.I)]
    return _count(found, let_relation, let_frequency)


def _end_checker(text, end_phrase):
    """Ends with the phrase; else the offending ending: what follows the phrase's last occurrence, or the last
    ``len(phrase)`` characters less the part that already matches the phrase's end."""
    phrase, span = end_phrase.strip().lower(), _strip_span(text, 0, len(text))
    if span is None:
        return False, []
    start, end = span
    body = text[start:end].lower()
    if body.endswith(phrase):
        return True, []
    last = body.rfind(phrase)
    if last >= 0:
        return False, [(start + last + len(phrase), end)]
    matched = 0
    while matched < min(len(phrase), len(body)) and body[-1 - matched] == phrase[-1 - matched]:
        matched += 1
    return False, [(max(start, end - len(phrase)), end - matched)]


def _quotation(text):
    span = _strip_span(text, 0, len(text))
    if span is None:
        return False, []
    start, end = span
    bad = []
    if text[start] not in '"“':
        bad.append((start, start + 1))
    if text[end - 1] not in '"”' or end - start < 2:
        bad.append((end - 1, end))
    return not bad, merge_spans(bad)


def _number_words(text, relation, num_words):
    found = words(text)
    ok, spans = _count(found, relation, num_words)
    return ok, [(spans[0][0], spans[-1][1])] if spans else []


def _number_sentences(text, relation, num_sentences):
    found = sentences(text)
    ok, spans = _count(found, relation, num_sentences)
    return ok, [(spans[0][0], spans[-1][1])] if spans else []


def _postscript(text, postscript_marker):
    marker = re.escape(postscript_marker.strip().rstrip(".")) + r"\.?"
    return bool(re.search(r"^[ \t>*_#]*" + marker, text, re.I | re.M)), []


def _title(text):
    return bool(_TITLE.search(text)), []


def highlights(text: str) -> list[Span]:
    """``**bold**`` and ``*italic*`` sections (markdown emphasis: no space just inside the asterisks)."""
    bold = [m.span() for m in _BOLD.finditer(text)]
    masked = _BOLD.sub(lambda m: " " * len(m.group()), text)
    return sorted(bold + [m.span() for m in _ITALIC.finditer(masked)])


def _highlighted(text, num_highlights):
    return len(highlights(text)) >= num_highlights, []


def _bullets(text, num_bullets):
    found = [m.span() for m in _BULLET.finditer(text)]
    if len(found) <= num_bullets:
        return len(found) == num_bullets, []
    return False, found[num_bullets:]


def _placeholders(text, num_placeholders):
    return len(_PLACEHOLDER.findall(text)) >= num_placeholders, []


def _paragraphs(text, num_paragraphs):
    """Paragraphs separated by markdown dividers (a line of ``***``); an empty paragraph fails."""
    pieces = _pieces(text, _DIVIDER)
    if any(p is None for p in pieces):
        return False, []
    return _exactly(pieces, num_paragraphs, text)


def _nth_paragraph(text, num_paragraphs, nth_paragraph, first_word):
    """Paragraphs separated by blank lines; exactly ``num_paragraphs``, the ``nth_paragraph``-th (1-based) starting
    with ``first_word`` (case-insensitive; leading quotes and markdown ignored)."""
    pieces = [p for p in _pieces(text, _BLANK_LINES) if p]
    ok, spans = _exactly(pieces, num_paragraphs, text)
    if nth_paragraph > len(pieces):
        return False, spans
    start, end = pieces[nth_paragraph - 1]
    first = WORD.search(text, start, end)
    if first is None or first.group().lower() != first_word.strip().lower():
        return False, merge_spans(spans + ([first.span()] if first else []))
    return ok, spans


def _sections(text, section_spliter, num_sections):
    """Exactly ``num_sections`` sections, each opened by a line starting with the label and a number (e.g.
    ``SECTION 1``; case-insensitive, markdown ``#*_`` allowed before it)."""
    label = re.compile(r"^[ \t#*_>]*" + re.escape(section_spliter.strip()) + r"[ \t]*\d+", re.I | re.M)
    return _exactly([m.span() for m in label.finditer(text)], num_sections, text)


def _two_responses(text):
    """Two non-empty, different responses separated by one run of six asterisks."""
    pieces = _pieces(text, _TWO_RESPONSES)
    if len(pieces) != 2 or None in pieces:
        return False, []
    (a, b), (c, d) = pieces
    return text[a:b] != text[c:d], []


def _repeat_prompt(text, prompt_to_repeat):
    """Starts with the request, word for word (case-insensitive); else the first region that differs."""
    target = prompt_to_repeat.strip().lower()
    span = _strip_span(text, 0, len(text))
    start = span[0] if span else 0
    body = text[start : start + len(target)].lower()
    if body == target:
        return True, []
    same = 0
    while same < len(body) and body[same] == target[same]:
        same += 1
    end = min(start + len(target), len(text))
    return False, [(start + same, end)] if end > start + same else []


def _json_format(text):
    body = text.strip()
    fenced = re.fullmatch(r"```[a-zA-Z]*\s*\n?(.*?)\n?\s*```", body, re.S)
    try:
        json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return False, []
    return True, []


def _constrained(text):
    return any(a in text for a in CONSTRAINED_ANSWERS), []


@dataclass(frozen=True)
class _Kind:
    check: Callable
    params: dict = field(default_factory=dict)  # kwarg -> int | str | list | "relation"


_KINDS: dict[str, _Kind] = {
    "punctuation:no_comma": _Kind(_no_comma),
    "change_case:english_lowercase": _Kind(_lowercase),
    "change_case:english_capital": _Kind(_capital),
    "change_case:capital_word_frequency": _Kind(
        _capital_words, {"capital_relation": "relation", "capital_frequency": int}
    ),
    "keywords:forbidden_words": _Kind(_forbidden, {"forbidden_words": list}),
    "keywords:existence": _Kind(_existence, {"keywords": list}),
    "keywords:frequency": _Kind(_frequency, {"keyword": str, "relation": "relation", "frequency": int}),
    "keywords:letter_frequency": _Kind(_letters, {"letter": str, "let_relation": "relation", "let_frequency": int}),
    "startend:end_checker": _Kind(_end_checker, {"end_phrase": str}),
    "startend:quotation": _Kind(_quotation),
    "length_constraints:number_words": _Kind(_number_words, {"relation": "relation", "num_words": int}),
    "length_constraints:number_sentences": _Kind(_number_sentences, {"relation": "relation", "num_sentences": int}),
    "length_constraints:number_paragraphs": _Kind(_paragraphs, {"num_paragraphs": int}),
    "length_constraints:nth_paragraph_first_word": _Kind(
        _nth_paragraph, {"num_paragraphs": int, "nth_paragraph": int, "first_word": str}
    ),
    "detectable_content:postscript": _Kind(_postscript, {"postscript_marker": str}),
    "detectable_content:number_placeholders": _Kind(_placeholders, {"num_placeholders": int}),
    "detectable_format:title": _Kind(_title),
    "detectable_format:number_highlighted_sections": _Kind(_highlighted, {"num_highlights": int}),
    "detectable_format:number_bullet_lists": _Kind(_bullets, {"num_bullets": int}),
    "detectable_format:multiple_sections": _Kind(_sections, {"section_spliter": str, "num_sections": int}),
    "detectable_format:json_format": _Kind(_json_format),
    "detectable_format:constrained_response": _Kind(_constrained),
    "combination:two_responses": _Kind(_two_responses),
    "combination:repeat_prompt": _Kind(_repeat_prompt, {"prompt_to_repeat": str}),
}
SUPPORTED: frozenset[str] = frozenset(_KINDS)
# the types whose violations sit on identifiable characters (the others are pass/fail only)
WITH_SPANS: frozenset[str] = frozenset(
    {
        "punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
        "change_case:capital_word_frequency", "keywords:forbidden_words", "keywords:frequency",
        "keywords:letter_frequency", "startend:end_checker", "startend:quotation", "length_constraints:number_words",
        "length_constraints:number_sentences", "length_constraints:number_paragraphs",
        "length_constraints:nth_paragraph_first_word", "detectable_format:number_bullet_lists",
        "detectable_format:multiple_sections", "combination:repeat_prompt",
    }
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- parsing
def _validate(instruction_id: str, kwargs, where: str) -> dict:
    """The kwargs checked against the id's parameters (None values dropped, as some copies of IFEval fill every
    key with null)."""
    if instruction_id not in _KINDS:
        raise InstructionError(
            f"{where}: instruction {instruction_id!r} is not checked by treg (covered: {', '.join(sorted(SUPPORTED))});"
            " drop the row, or load with supported_only=True."
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise InstructionError(f"{where}: kwargs of {instruction_id!r} must be a dict, got {type(kwargs).__name__}.")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = _KINDS[instruction_id].params
    unknown, missing = sorted(set(kwargs) - set(params)), sorted(set(params) - set(kwargs))
    if unknown or missing:
        raise InstructionError(
            f"{where}: {instruction_id!r} takes kwargs {sorted(params) or 'none'}"
            + (f"; unexpected {unknown}" if unknown else "")
            + (f"; missing {missing}" if missing else "")
            + "; fix the row's kwargs."
        )
    for name, kind in params.items():
        _check_param(instruction_id, name, kind, kwargs[name], where)
    return kwargs


def _check_param(instruction_id: str, name: str, kind, value, where: str) -> None:
    bad = None
    if kind == "relation" and value not in RELATIONS:
        bad = f"one of {list(RELATIONS)}"
    elif kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        bad = "a non-negative integer"
    elif kind is str and (not isinstance(value, str) or not value.strip()):
        bad = "a non-empty string"
    elif kind is list and (not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value)):
        bad = "a list of non-empty strings"
    elif name == "letter" and len(value) != 1:
        bad = "a single character"
    elif name == "nth_paragraph" and value < 1:
        bad = "at least 1 (paragraphs count from 1)"
    if bad:
        raise InstructionError(f"{where}: {instruction_id!r} kwarg {name!r} must be {bad}, got {value!r}.")


@dataclass(frozen=True)
class Instruction:
    """One verifiable instruction: an IFEval id and its parameters, e.g.
    ``Instruction("keywords:frequency", {"keyword": "river", "relation": "at least", "frequency": 2})``."""

    id: str
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "kwargs", _validate(self.id, self.kwargs, "instruction"))

    def _run(self, response: str) -> tuple[bool, list[Span]]:
        return _KINDS[self.id].check(response, **self.kwargs)

    def check(self, response: str) -> bool:
        return bool(self._run(response)[0])

    def violations(self, response: str) -> list[Span]:
        """The character spans ``[start, end)`` of ``response`` that break the instruction, merged and sorted; []
        when it is followed, and possibly [] when it is not but nothing present is at fault (e.g. too few
        keywords)."""
        ok, spans = self._run(response)
        return [] if ok else merge_spans(spans)


def parse_instructions(row: dict, *, supported_only: bool = False) -> list[Instruction]:
    """The instructions of an IFEval-format row. Unsupported ids raise :class:`InstructionError`, or are skipped
    when ``supported_only``."""
    key = row.get("key", "?") if isinstance(row, dict) else "?"
    where = f"row key={key}"
    ids, kwargs = (row.get("instruction_id_list"), row.get("kwargs")) if isinstance(row, dict) else (None, None)
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise InstructionError(
            f"{where}: needs 'instruction_id_list' and 'kwargs', two lists of the same length (IFEval format)."
        )
    out = []
    for i, (instruction_id, kw) in enumerate(zip(ids, kwargs)):
        if supported_only and instruction_id not in SUPPORTED:
            continue
        kw = _validate(instruction_id, kw, f"{where}, instruction {i}")
        out.append(Instruction(instruction_id, kw))
    return out


def ifeval_path(path: str | None = None) -> str:
    """The IFEval input file: ``path``, else ``ifeval/input_data.jsonl`` under the data roots
    (:func:`treg.evaluation.data.data_roots`: ``$TREG_EVAL_DATA``, ``../shared/data`` from the working directory,
    ``shared/data`` beside the checkout holding treg)."""
    return path or data.resolve(IFEVAL_FILE, "--ifeval")


def load_ifeval(path: str | None = None, *, supported_only: bool = True) -> list[dict]:
    """IFEval's rows (every row's instructions parsed, so bad kwargs fail here); with ``supported_only`` only the rows
    whose instructions are all covered by :data:`SUPPORTED`."""
    path = ifeval_path(path)
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise InstructionError(f"{path}:{n}: not a JSON line ({err}); fix or remove the line.") from None
            parse_instructions(row, supported_only=True)
            if not supported_only or set(row["instruction_id_list"]) <= SUPPORTED:
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------- scoring
def check_response(instructions: list[Instruction], response: str) -> dict:
    """``{"follow_all": bool, "follow": [bool per instruction], "spans": merged sorted violation spans}``."""
    follow, spans = [], []
    for instruction in instructions:
        ok, found = instruction._run(response)
        follow.append(bool(ok))
        if not ok:
            spans.extend(found)
    return {"follow_all": all(follow), "follow": follow, "spans": merge_spans(spans)}


def token_flags(spans, offsets) -> list[bool]:
    """Per token: whether its character range ``offsets[i] = (start, end)`` overlaps a span (zero-width tokens, e.g.
    special tokens at ``(0, 0)``, are never flagged). ``offsets`` as a fast tokenizer's ``return_offsets_mapping``
    gives them (a list or tensor of pairs)."""
    if hasattr(offsets, "tolist"):
        offsets = offsets.tolist()
    merged = merge_spans(list(spans))
    starts = [s for s, _ in merged]
    flags = []
    for start, end in offsets:
        last = bisect.bisect_left(starts, end) - 1  # the last span starting before the token ends (spans disjoint)
        flags.append(bool(end > start and last >= 0 and merged[last][1] > start))
    return flags


def accuracy(results: list[dict]) -> dict:
    """IFEval's two accuracies over :func:`check_response` results: the share of prompts with every instruction
    followed, and the share of instructions followed."""
    if not results:
        raise UserError("accuracy: no results to score; check at least one response.")
    follows = [f for r in results for f in r["follow"]]
    return {
        "prompt_level": sum(bool(r["follow_all"]) for r in results) / len(results),
        "instruction_level": sum(map(bool, follows)) / len(follows) if follows else float("nan"),
    }


# ---------------------------------------------------------------------------------------------------- composition
# treg's own generic tasks and instruction wordings for training prompts (held out: IFEval's real prompts).
TASKS = (
    "Write a short story about a lighthouse keeper.", "Describe how bread is made.",
    "Explain why the sky looks blue during the day.", "Write a letter to a neighbour about a lost cat.",
    "Give advice to someone starting their first job.", "Describe a walk through a busy market.",
    "Write a product description for a reusable water bottle.", "Explain how a bicycle gear system works.",
    "Summarize the life cycle of a butterfly.", "Write a poem about the first snow of winter.",
    "Describe your ideal weekend in the mountains.", "Explain how to plant a tomato seedling.",
    "Write a review of an imaginary science museum.", "Tell a bedtime story about a sleepy dragon.",
    "Explain what a budget is to a teenager.", "Describe the sounds of a city at night.",
    "Write an invitation to a community picnic.", "Explain how rain forms.",
    "Give tips for learning to play the guitar.", "Write a diary entry from a sailor on a long voyage.",
    "Describe how to make a cup of tea.", "Explain the rules of a simple card game you invent.",
    "Write a thank-you note to a teacher.", "Describe an old library on a rainy afternoon.",
    "Explain why people keep houseplants.", "Write a short speech for a school sports day.",
    "Describe how a honeybee colony works.", "Give a beginner's guide to running a first 5 km race.",
    "Write a fable about a fox and a crow who share a secret.", "Explain how a refrigerator keeps food cold.",
    "Describe a train journey across a desert.", "Write a recipe for a simple vegetable soup.",
    "Explain what makes a good friend.", "Write an announcement for a new bakery opening in town.",
    "Describe the view from the top of a tall hill.", "Explain how to care for a pet rabbit.",
    "Write a short mystery about a missing umbrella.", "Explain how tides are connected to the moon.",
    "Describe a festival of lanterns.", "Give advice on keeping a tidy desk.",
    "Write a postcard from a seaside town.", "Explain how a seed becomes a tree.",
    "Describe an afternoon spent fishing at a lake.", "Write a motivational message for students before exams.",
    "Explain the water cycle to a child.", "Describe a robot that helps in a kitchen.",
    "Write a complaint to a shop about a broken kettle.", "Explain why sleep matters for health.",
)  # fmt: skip
_FORBIDDEN_POOL = ("very", "really", "thing", "nice", "good", "just", "also", "important", "great", "many", "stuff")
_KEYWORD_POOL = (
    "morning", "river", "patience", "window", "silver", "feather", "garden", "signal", "harvest", "compass",
    "lantern", "balance", "orange", "whisper", "meadow", "ladder", "shadow", "candle", "harbor", "pebble",
)  # fmt: skip
_END_PHRASES = (
    "Thanks for reading.", "That is the whole picture.", "Let me know what you think.", "Hope this helps!",
    "Those are my thoughts.", "And that is how it ends.", "Until we meet again.", "Have a lovely day!",
)  # fmt: skip
_RARE_LETTERS = "qzxj"  # "fewer than" letters: rare, and absent from the pools and phrases above
_COMMON_LETTERS = "aeiorstnl"


def _relation(rng, low, high, low_lt, high_lt):
    return (AT_LEAST, rng.randint(low, high)) if rng.random() < 0.6 else (LESS_THAN, rng.randint(low_lt, high_lt))


def _phrase(rng, options):
    return rng.choice(options)


def _compose_no_comma(rng, task):
    return {}, _phrase(rng, ("Leave every comma out of your answer.", "Your text must contain zero commas.",
                             "Write it without a single comma character."))  # fmt: skip


def _compose_lowercase(rng, task):
    return {}, _phrase(rng, ("Use only small letters: no capital letter may appear anywhere.",
                             "Type the whole reply in lowercase, with no uppercase character at all."))  # fmt: skip


def _compose_capital(rng, task):
    return {}, _phrase(rng, ("Type every letter of the reply in uppercase.",
                             "The whole answer must be in capital letters, with no lowercase letter."))  # fmt: skip


def _compose_capital_words(rng, task):
    relation, n = _relation(rng, 2, 8, 2, 6)
    text = (f"Include at least {n} words written entirely in capitals (ALL-CAPS words)." if relation == AT_LEAST
            else f"Use fewer than {n} words written entirely in capitals.")  # fmt: skip
    return {"capital_relation": relation, "capital_frequency": n}, text


def _compose_forbidden(rng, task):
    chosen = rng.sample(_FORBIDDEN_POOL, rng.randint(1, 3))
    listed = ("the word " if len(chosen) == 1 else "the words ") + " or ".join(f'"{w}"' for w in chosen)
    return {"forbidden_words": chosen}, _phrase(rng, (f"Never write {listed}.",
                                                      f"Stay away from {listed} entirely."))  # fmt: skip


def _compose_existence(rng, task):
    chosen = rng.sample(_KEYWORD_POOL, rng.randint(1, 3))
    listed = ("the word " if len(chosen) == 1 else "the words ") + " and ".join(f'"{w}"' for w in chosen)
    return {"keywords": chosen}, _phrase(rng, (f"Work {listed} into your reply.",
                                               f"Somewhere in the text, use {listed}."))  # fmt: skip


def _compose_frequency(rng, task):
    keyword = rng.choice(_KEYWORD_POOL)
    relation, n = _relation(rng, 2, 5, 2, 4)
    text = (f'Mention the word "{keyword}" {n} or more times.' if relation == AT_LEAST
            else f'The word "{keyword}" may occur at most {n - 1} times (fewer than {n}).')  # fmt: skip
    return {"keyword": keyword, "relation": relation, "frequency": n}, text


def _compose_letters(rng, task):
    if rng.random() < 0.6:
        letter, relation, n = rng.choice(_COMMON_LETTERS), AT_LEAST, rng.randint(5, 20)
        text = f'Make sure the letter "{letter}" shows up {n} times or more.'
    else:
        letter, relation, n = rng.choice(_RARE_LETTERS), LESS_THAN, rng.randint(1, 4)
        text = f'Keep the letter "{letter}" rare: fewer than {n} of them in the whole answer.'
    return {"letter": letter, "let_relation": relation, "let_frequency": n}, text


def _compose_end(rng, task):
    phrase = rng.choice(_END_PHRASES)
    return {"end_phrase": phrase}, _phrase(rng, (f'The last words of your reply must be "{phrase}"',
                                                 f'Close the reply with the exact sentence "{phrase}"'))  # fmt: skip


def _compose_quotation(rng, task):
    return {}, _phrase(rng, ('Put the complete reply inside one pair of double quotes (").',
                             "Open and close the whole text with a double quote character."))  # fmt: skip


def _compose_words(rng, task):
    relation, n = _relation(rng, 40, 250, 30, 150)
    text = (f"The reply needs {n} words or more." if relation == AT_LEAST
            else f"Stay under {n} words in total.")  # fmt: skip
    return {"relation": relation, "num_words": n}, text


def _compose_sentences(rng, task):
    relation, n = _relation(rng, 3, 12, 2, 8)
    text = (f"Write {n} sentences or more." if relation == AT_LEAST
            else f"Keep the reply shorter than {n} sentences.")  # fmt: skip
    return {"relation": relation, "num_sentences": n}, text


def _compose_postscript(rng, task):
    marker = rng.choice(("P.S.", "P.P.S"))
    return {"postscript_marker": marker}, f'After the main text, add a short note that begins with "{marker}".'


def _compose_title(rng, task):
    return {}, _phrase(rng, ("Put a title first, enclosed in double angle brackets such as <<A Fine Title>>.",
                             "Give the text a heading written between << and >>."))  # fmt: skip


def _compose_highlights(rng, task):
    n = rng.randint(1, 4)
    text = f"Emphasize {n} or more phrases in markdown by putting single asterisks around them (*like so*)."
    return {"num_highlights": n}, text


def _compose_bullets(rng, task):
    n = rng.randint(2, 6)
    text = f'Present the main points as a list of precisely {n} items, each line starting with "* ".'
    return {"num_bullets": n}, text


def _compose_placeholders(rng, task):
    n = rng.randint(1, 4)
    text = f"Leave {n} or more blanks to fill in later, written in square brackets like [date]."
    return {"num_placeholders": n}, text


def _compose_paragraphs(rng, task):
    n = rng.randint(2, 5)
    text = f"Split the text into {n} paragraphs with a line holding only *** between two paragraphs."
    return {"num_paragraphs": n}, text


def _compose_repeat(rng, task):
    text = "Before anything else, copy the request in the first sentence word for word, then answer it."
    return {"prompt_to_repeat": task}, text


def _compose_two(rng, task):
    return {}, "Offer two distinct versions, with a run of six asterisks (******) between them."


_COMPOSERS = {
    "punctuation:no_comma": _compose_no_comma,
    "change_case:english_lowercase": _compose_lowercase,
    "change_case:english_capital": _compose_capital,
    "change_case:capital_word_frequency": _compose_capital_words,
    "keywords:forbidden_words": _compose_forbidden,
    "keywords:existence": _compose_existence,
    "keywords:frequency": _compose_frequency,
    "keywords:letter_frequency": _compose_letters,
    "startend:end_checker": _compose_end,
    "startend:quotation": _compose_quotation,
    "length_constraints:number_words": _compose_words,
    "length_constraints:number_sentences": _compose_sentences,
    "length_constraints:number_paragraphs": _compose_paragraphs,
    "detectable_content:postscript": _compose_postscript,
    "detectable_content:number_placeholders": _compose_placeholders,
    "detectable_format:title": _compose_title,
    "detectable_format:number_highlighted_sections": _compose_highlights,
    "detectable_format:number_bullet_lists": _compose_bullets,
    "combination:repeat_prompt": _compose_repeat,
    "combination:two_responses": _compose_two,
}
COMPOSABLE: frozenset[str] = frozenset(_COMPOSERS)
_CASE = {"change_case:english_lowercase", "change_case:english_capital", "change_case:capital_word_frequency"}
_LENGTH = {"length_constraints:number_words", "length_constraints:number_sentences"}
_STRUCTURE = {"length_constraints:number_paragraphs", "combination:two_responses", "combination:repeat_prompt"}
# pairs that could not both be met (or read as contradictory) are never composed together
_CONFLICTS = [
    _CASE,
    _LENGTH,
    _STRUCTURE,
    {"startend:quotation", "startend:end_checker"},
    {"startend:quotation", "combination:repeat_prompt"},
    {"startend:end_checker", "combination:two_responses"},
    {"detectable_format:title", "combination:repeat_prompt"},
    {"length_constraints:number_sentences", "detectable_format:number_bullet_lists"},
    {"keywords:existence", "keywords:frequency"},
    {"combination:repeat_prompt", "keywords:forbidden_words"},
    {"combination:repeat_prompt", "keywords:letter_frequency"},
    {"combination:repeat_prompt", "length_constraints:number_sentences"},
    # two versions: a length or an exact count over the whole reply would be ambiguous
    *({"combination:two_responses", o} for o in (*_LENGTH, "detectable_format:number_bullet_lists")),
]


def _compatible(a: str, b: str) -> bool:
    return a != b and not any(a in group and b in group for group in _CONFLICTS)


def compose_training_prompts(n: int, *, seed: int = 0, ids=None) -> list[dict]:
    """``n`` training prompts in the IFEval row format, each a generic task from :data:`TASKS` followed by 1 or 2
    instructions (ids from ``ids``, default :data:`COMPOSABLE`) with random parameters, in treg's own wording;
    deterministic for a seed. Keys are 0..n-1."""
    ids = sorted(COMPOSABLE if ids is None else set(ids))
    unknown = sorted(set(ids) - COMPOSABLE)
    if unknown or not ids:
        raise InstructionError(f"compose_training_prompts: cannot compose {unknown or 'no ids'}; choose from "
                               f"{sorted(COMPOSABLE)}.")  # fmt: skip
    rng = random.Random(seed)
    rows = []
    for key in range(n):
        task = rng.choice(TASKS)
        chosen = [rng.choice(ids)]
        partners = [i for i in ids if _compatible(chosen[0], i)]
        if partners and rng.random() < 0.6:
            chosen.append(rng.choice(partners))
        kwargs, sentences_ = [], [task]
        for instruction_id in chosen:
            kw, text = _COMPOSERS[instruction_id](rng, task)
            kwargs.append(kw)
            sentences_.append(text)
        rows.append({"key": key, "prompt": " ".join(sentences_), "instruction_id_list": chosen, "kwargs": kwargs})
    return rows
