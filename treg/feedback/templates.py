"""Label-prompt templates for RLAIF pairwise preference labels (Lee et al. 2023, arXiv 2309.00267; METHOD.md §4).

A label prompt is, in this order::

    preamble
    [few-shot exemplars, each: context, response 1, response 2, then the ending and the exemplar's answer]
    the sample: context, response 1, response 2
    ending                                   (e.g. "Preferred Response=")

The labeler's next-token log-probabilities of ``1`` and ``2`` right after the ending give the preference. With
chain of thought the sample is followed by ``cot_ending`` instead; the judge writes a rationale, then the rationale
and the ending are appended and the ``1``/``2`` log-probs are read as before.

``asks_for_worse=True`` marks a template whose question is which response is *worse* (harmlessness asks which is
more harmful): its label is inverted so that the result is always P(response 1 is the better one).

Few-shot exemplars are dicts ``{"context", "response1", "response2", "preferred"}`` where ``preferred`` (1 or 2) is
the answer *to the template's question*: for harmlessness, the more harmful response.

The wording is our own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["LabelTemplate", "TEMPLATES", "get_template", "format_sample", "format_exemplars", "sample_pieces"]


@dataclass(frozen=True)
class LabelTemplate:
    """One pairwise labeling task. ``ending`` must not end in whitespace (the label token follows it directly)."""

    name: str
    preamble: str
    ending: str = "Preferred Response="
    cot_ending: str = "Rationale (compare both responses step by step before choosing):"
    asks_for_worse: bool = False
    context_label: str = "Context"
    response_label: str = "Response"


_COMMON_TAIL = (
    "Answer with a single number, 1 or 2, after the text \"{ending}\"."
)

TEMPLATES: dict[str, LabelTemplate] = {
    "summarization": LabelTemplate(
        name="summarization",
        preamble=(
            "You will see a text and two candidate summaries of it. A good summary states the main points of the "
            "text accurately and briefly, adds nothing the text does not say, and reads clearly. Decide which of "
            "the two summaries is better. " + _COMMON_TAIL.format(ending="Preferred Summary=")
        ),
        ending="Preferred Summary=",
        context_label="Text",
        response_label="Summary",
    ),
    "helpfulness": LabelTemplate(
        name="helpfulness",
        preamble=(
            "You will see a conversation between a person and an AI assistant, followed by two possible next "
            "replies from the assistant. The better reply answers what the person actually asked, is correct and "
            "specific, and is easy to follow. Decide which of the two replies is more helpful. "
            + _COMMON_TAIL.format(ending="Preferred Response=")
        ),
    ),
    "harmlessness": LabelTemplate(
        name="harmlessness",
        preamble=(
            "You will see a conversation between a person and an AI assistant, followed by two possible next "
            "replies from the assistant. A harmful reply helps with something dangerous, illegal or unethical, "
            "is offensive or demeaning, or encourages the person to hurt themselves or others. Decide which of "
            "the two replies is MORE harmful. " + _COMMON_TAIL.format(ending="More Harmful Response=")
        ),
        ending="More Harmful Response=",
        asks_for_worse=True,
    ),
}


def get_template(task: str | LabelTemplate) -> LabelTemplate:
    if isinstance(task, LabelTemplate):
        return task
    if task not in TEMPLATES:
        choices = ", ".join(TEMPLATES)
        raise ValueError(f"unknown labeling task {task!r}; choose one of {choices} or pass a LabelTemplate.")
    return TEMPLATES[task]


def sample_pieces(template: LabelTemplate, context: str, response1: str, response2: str) -> list[str]:
    """The sample block in its seven pieces: context label, context (with the blank line after it), response-1
    label, response 1, response-2 label, response 2, closing blank line. Joined they are :func:`format_sample`; a
    labeler tokenizes them as one text (:func:`treg.generation.encode_pieces`) and cuts the context and responses
    at token boundaries."""
    t = template
    return [
        f"{t.context_label}:\n",
        f"{context}\n\n",
        f"{t.response_label} 1:\n",
        response1,
        f"\n\n{t.response_label} 2:\n",
        response2,
        "\n\n",
    ]


def format_sample(template: LabelTemplate, context: str, response1: str, response2: str) -> str:
    """The sample block (no ending): context, response 1, response 2."""
    return "".join(sample_pieces(template, context, response1, response2))


def format_exemplars(template: LabelTemplate, few_shot: Sequence[Mapping]) -> str:
    """Few-shot exemplars, each a sample followed by the ending and its answer (see the module docstring)."""
    out = []
    for i, ex in enumerate(few_shot):
        missing = [k for k in ("context", "response1", "response2", "preferred") if k not in ex]
        if missing:
            raise ValueError(f"few-shot exemplar {i}: missing key(s) {missing}.")
        if ex["preferred"] not in (1, 2, "1", "2"):
            raise ValueError(f"few-shot exemplar {i}: 'preferred' must be 1 or 2, got {ex['preferred']!r}.")
        sample = format_sample(template, ex["context"], ex["response1"], ex["response2"])
        out.append(f"Example {i + 1}:\n{sample}{template.ending}{ex['preferred']}\n\n")
    return "".join(out)


def label_prompt_body(template: LabelTemplate, few_shot: Sequence[Mapping] = ()) -> str:
    """Preamble and exemplars: everything before the sample."""
    head = template.preamble + "\n\n"
    if few_shot:
        head += format_exemplars(template, few_shot) + "Now the sample to judge:\n"
    return head
