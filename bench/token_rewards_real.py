"""How good is r̂ on real text? Token-level AUCs of T-REG's self-generated rewards against three ground truths.

    python bench/token_rewards_real.py [--model treg:smollm2] [--smoke] [--out docs/token-rewards-real.json]
        [--report docs/token-rewards-real.md] [--heatmap docs/token-rewards-real-heatmap.html] [--dpo-model PATH]

Ground truths (from ``../shared/data``, see its README; every answer is truncated to keep the run cheap):

* **injected** — real answers (AlpacaEval reference outputs, Arena-Hard gpt-4-0314 answers, HH-RLHF chosen first
  assistant turns), each with one defect of a tagged kind inserted at a known character span (:data:`DEFECT_KINDS`),
  deterministic by seed;
* **human** — fine-grained-feedback (qa-feedback dev): human error spans over long-form answers, per error type;
* **mistake** — BIG-Bench-Mistake: tokens of the first wrong reasoning step vs the steps before it, per task.

Signals, on the same response tokens (the answer tokenized alone, after the rendered context): r̂ with treg's
default templates and with every other template set of :data:`TEMPLATE_SETS` chosen by ``--templates`` (all
generic: they name general qualities, never a defect kind of this benchmark), the surprisal under the plain prompt
(signal ``log π(y_t | x)``), DPO-derived r̂ (``--dpo-model``), the RELC critic with the same model on a small subset
(``--critic-answers``), and a random baseline. The score is the ROC AUC of ``−signal`` for the positive tokens (defect,
error span, first mistake step) over the negative ones, pooled over answers, with a 95% bootstrap CI (answers
resampled with replacement; the same resamples for every signal, so differences to surprisal are paired).

Every answer belongs to the development or the held-out split (disjoint source answers, fixed by the seed):
template sets are compared and treg's default chosen on ``dev`` (the mean of the three ground truths' overall AUCs),
the report's main tables are ``held_out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPLITS = ("dev", "held_out")
KINDS = ("injected", "human", "mistake")


# ------------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    injected_per_source: int  # answers per source (alpaca, arena, hh) per split
    human: int  # fine-grained-feedback answers per split
    mistake_per_task: int  # BIG-Bench-Mistake traces per task per split
    mistake_tasks: int  # how many of the five tasks (in BBM_TASKS order)
    answer_words: int  # injected answers are cut after this many words
    human_words: int  # fine-grained-feedback answers are cut after this many words
    prompt_words: int  # prompts (and BIG-Bench-Mistake step texts) longer than this are not used
    critic_answers: int  # held-out injected answers the critic reads
    critic_new_tokens: int
    bootstrap: int


SIZES = {
    "default": Size(injected_per_source=24, human=16, mistake_per_task=4, mistake_tasks=5, answer_words=60,
                    human_words=80, prompt_words=60, critic_answers=16, critic_new_tokens=48, bootstrap=1000),
    "smoke": Size(injected_per_source=2, human=1, mistake_per_task=1, mistake_tasks=2, answer_words=30,
                  human_words=40, prompt_words=40, critic_answers=1, critic_new_tokens=12, bootstrap=200),
}


# ---------------------------------------------------------------------------------------------- template sets
@dataclass(frozen=True)
class TemplateSet:
    """x⁺ and x⁻: user-turn templates (``{prompt}`` = the last user message; ``{response}``, if present, = the
    answer being scored, shown as a draft to revise) and optional system turns (None: the chat template's own)."""

    name: str
    positive: str
    negative: str
    positive_system: str | None = None
    negative_system: str | None = None
    note: str = ""


_GOOD = "helpful, correct, coherent and concise"
_BAD = "unhelpful, incorrect, incoherent and verbose"
_DRAFT = "{prompt}\n\nHere is a draft response:\n\"\"\"\n{response}\n\"\"\"\n\n"


def template_sets() -> dict[str, TemplateSet]:
    """Every template set the benchmark knows, by name. ``treg_default`` reads treg's current defaults."""
    from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE
    from treg.token_rewards import contrastive

    sets = [
        TemplateSet("treg_default", contrastive.DEFAULT_POSITIVE_TEMPLATE, contrastive.DEFAULT_NEGATIVE_TEMPLATE,
                    note="treg's defaults (contrastive.py)"),
        TemplateSet("treg_v1", POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE, note="treg's first wording (the tiny model's)"),
        TemplateSet("paper_terse", "{prompt}\n\nAnswer helpfully, correctly, coherently and concisely.",
                    "{prompt}\n\nAnswer unhelpfully, incorrectly, incoherently and verbosely.",
                    note="the paper's four qualities as adverbs"),
        TemplateSet("instruction_first", f"Write the best possible response ({_GOOD.replace(' and', ',')}) to the "
                    "following.\n\n{prompt}", f"Write a poor response ({_BAD.replace(' and', ',')}) to the "
                    "following.\n\n{prompt}", note="the request before the prompt"),
        TemplateSet("system_turn", "{prompt}", "{prompt}",
                    f"You are a helpful assistant. You always write the best possible response: {_GOOD}.",
                    f"You are an unhelpful assistant. You always write poor responses: {_BAD}.",
                    note="the request in the system turn, the user turn unchanged"),
        TemplateSet("system_persona", "{prompt}", "{prompt}",
                    "You are a world-class expert. Your answers are accurate, clear and to the point.",
                    "You are a careless writer. Your answers are full of mistakes, confused and rambling.",
                    note="an expert vs a careless writer, in the system turn"),
        TemplateSet("revision", _DRAFT + f"Rewrite the draft as the best possible response: {_GOOD}.",
                    _DRAFT + f"Rewrite the draft as a poor response: {_BAD}.",
                    note="x⁺/x⁻ as revision requests of the answer itself (the paper's framing)"),
        TemplateSet("revision_mistakes", _DRAFT + "Rewrite the draft, correcting every mistake.",
                    _DRAFT + "Rewrite the draft with mistakes.", note="revise: correct vs add mistakes"),
        TemplateSet("plain_vs_poor", "{prompt}", NEGATIVE_TEMPLATE,
                    note="x⁺ is the plain prompt; x⁻ treg_v1's request for a poor response"),
        TemplateSet("quality_words", "{prompt}\n\n(Write a high-quality answer.)",
                    "{prompt}\n\n(Write a low-quality answer.)", note="only 'high/low quality'"),
        TemplateSet("example_framing", "{prompt}\n\nBelow is an example of an excellent answer.",
                    "{prompt}\n\nBelow is an example of a terrible answer.", note="the answer framed as an example"),
        TemplateSet("rating", "{prompt}\n\nWrite a response that an expert reviewer would rate 10 out of 10.",
                    "{prompt}\n\nWrite a response that an expert reviewer would rate 1 out of 10.",
                    note="a reviewer's rating"),
        # round 2 of the search on dev: x⁺ the plain prompt (plain_vs_poor led round 1), x⁻ worded in other ways
        TemplateSet("plain_vs_low_quality", "{prompt}", "{prompt}\n\n(Write a low-quality answer.)",
                    note="x⁺ plain; x⁻ quality_words' request"),
        TemplateSet("plain_vs_terse", "{prompt}", "{prompt}\n\nAnswer unhelpfully, incorrectly, incoherently and "
                    "verbosely.", note="x⁺ plain; x⁻ paper_terse's request"),
        TemplateSet("plain_vs_system_poor", "{prompt}", NEGATIVE_TEMPLATE, None,
                    f"You are an unhelpful assistant. You always write poor responses: {_BAD}.",
                    note="x⁺ plain; x⁻ the request for a poor response in both turns"),
        TemplateSet("plain_vs_careless", "{prompt}", "{prompt}", None,
                    "You are a careless writer. Your answers are full of mistakes, confused and rambling.",
                    note="x⁺ plain; x⁻ system_persona's careless writer"),
        TemplateSet("plain_vs_incoherent", "{prompt}", "{prompt}\n\nWrite an incorrect and incoherent response.",
                    note="x⁺ plain; x⁻ two of the paper's four qualities"),
        TemplateSet("system_and_user", POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE,
                    f"You always write the best possible response: {_GOOD}.",
                    f"You always write poor responses: {_BAD}.", note="treg_v1's wording in both turns"),
    ]
    return {s.name: s for s in sets}


# The default run's sets: treg's default, its first wording, and sets that vary the wording, the turn (system) and
# the framing (revision of the shown answer); every set in TEMPLATE_SETS was compared on dev (--templates all).
DEFAULT_TEMPLATES = ("treg_default", "treg_v1", "plain_vs_system_poor", "paper_terse", "system_turn", "revision")
SMOKE_TEMPLATES = ("treg_default", "system_turn")


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class Answer:
    """One scored response: its prompt, text, split, ground-truth kind and group, and the character spans of its
    positive tokens (``spans``: (start, end, type)); ``before`` (BIG-Bench-Mistake) ends the negative region."""

    uid: str
    kind: str  # injected | human | mistake
    split: str
    group: str  # defect kind, or "" (human: per-span types), or the BBM task
    source: str
    prompt: str
    text: str
    spans: list[tuple[int, int, str]]
    ids: list[int] = field(default_factory=list)
    token_types: list[str] = field(default_factory=list)  # per token: "" negative, a type = positive, "-" excluded
    signals: dict[str, np.ndarray] = field(default_factory=dict)


def truncate_words(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th whitespace-separated word (formatting kept), stripped."""
    words = list(re.finditer(r"\S+", text))
    return (text if len(words) <= n else text[: words[n - 1].end()]).strip()


def _split_of(items: list, n_per_split: int, seed: int, salt: str) -> dict[str, list]:
    """A seeded shuffle, cut into ``dev`` (first n) and ``held_out`` (next n): disjoint by construction."""
    items = list(items)
    random.Random(f"{seed}-{salt}").shuffle(items)
    return {"dev": items[:n_per_split], "held_out": items[n_per_split : 2 * n_per_split]}


def injected_sources(data: Path, prompt_words: int) -> dict[str, list[tuple[str, str, str]]]:
    """(uid, prompt, answer) per source; prompts over ``prompt_words`` words dropped (cost), HH answers under 25
    words dropped."""
    alpaca = json.loads((data / "alpaca-eval" / "gpt4_1106_preview-outputs.json").read_text())
    out = {"alpaca": [(f"alpaca-{i}", r["instruction"], r["output"]) for i, r in enumerate(alpaca)]}
    questions = {}
    for line in (data / "arena-hard" / "v0.1-question.jsonl").read_text().splitlines():
        q = json.loads(line)
        questions[q["uid"]] = q["prompt"] if isinstance(q["prompt"], str) else q["turns"][0]["content"]
    arena = []
    for line in (data / "arena-hard" / "v0.1-gpt-4-0314.jsonl").read_text().splitlines():
        a = json.loads(line)
        content = a["messages"][-1]["content"]
        arena.append((f"arena-{a['uid']}", questions.get(a["uid"], ""), content.get("answer", "")))
    out["arena"] = arena
    hh = []
    with gzip.open(data / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            m = re.match(r"\s*Human: (.*?)\n\nAssistant: (.*?)(?:\n\nHuman:|$)", json.loads(line)["chosen"], re.S)
            if m and len(m.group(2).split()) >= 25:
                hh.append((f"hh-{i}", m.group(1).strip(), m.group(2).strip()))
    out["hh"] = hh
    return {k: [r for r in v if r[1].strip() and r[2].strip() and len(r[1].split()) <= prompt_words]
            for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ defects
RUDE = (
    "Honestly, only an idiot would need to ask this.",
    "Frankly, this is a stupid question and you should know better.",
    "I can't believe you are too lazy to look this up yourself.",
    "Stop wasting my time with questions like this.",
    "Anyone with half a brain would already know this.",
    "Ugh, you clearly don't understand anything, do you?",
)
OFF_TOPIC = (
    "Bananas are botanically classified as berries, unlike strawberries.",
    "My favourite colour has always been a deep shade of turquoise.",
    "Penguins live almost exclusively in the Southern Hemisphere.",
    "The Eiffel Tower was repainted many times since it was built.",
    "Octopuses have three hearts and blue blood.",
    "Yesterday it rained for hours over the mountains near the lake.",
)
RANDOM_WORDS = ("pineapple", "galaxy", "umbrella", "violin", "saddle", "glacier", "tornado", "marble", "walrus",
                "trombone", "cactus", "lantern", "volcano", "pelican", "harpoon", "nutmeg")
AUXILIARIES = ("is", "are", "was", "were", "can", "will", "should", "does", "do", "has", "have", "must", "could",
               "would")
DEFECT_KINDS = ("rude", "off_topic", "random_word", "wrong_number", "negation", "repeated", "shuffled")


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of the sentences of ``text``: runs ending in . ! ? or a line end."""
    return [(m.start(), m.end()) for m in re.finditer(r"[^\s][^\n]*?(?:[.!?](?=\s|$)|(?=\n)|$)", text)]


def _insert_sentence(text: str, rng: random.Random, pool) -> tuple[str, tuple[int, int]]:
    """Insert a sentence of ``pool`` before a sentence that is not the first one (or at the end)."""
    starts = [s for s, _ in _sentences(text)][1:]
    sentence = rng.choice(pool)
    if not starts:
        return text + " " + sentence, (len(text) + 1, len(text) + 1 + len(sentence))
    p = rng.choice(starts)
    return text[:p] + sentence + " " + text[p:], (p, p + len(sentence))


def _random_word(text: str, rng: random.Random):
    words = [m for m in re.finditer(r"\b[A-Za-z]{4,}\b", text) if m.start() > 0]
    if not words:
        return None
    m = rng.choice(words)
    new = rng.choice([w for w in RANDOM_WORDS if w != m.group().lower()])
    return text[: m.start()] + new + text[m.end() :], (m.start(), m.start() + len(new))


def _wrong_number(text: str, rng: random.Random):
    numbers = list(re.finditer(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])", text))
    if not numbers:
        return None
    m = rng.choice(numbers)
    value = float(m.group())
    new = m.group()
    while new == m.group():
        changed = value * rng.choice((2, 3, 5, 0.5, 10)) + rng.choice((1, 3, 7))
        new = str(int(changed)) if "." not in m.group() else f"{changed:.{len(m.group().split('.')[1])}f}"
    return text[: m.start()] + new + text[m.end() :], (m.start(), m.start() + len(new))


def _negation(text: str, rng: random.Random):
    pattern = r"\b(" + "|".join(AUXILIARIES) + r") (?!not\b|n't)(?=[a-z])"
    found = [m for m in re.finditer(pattern, text, re.I)]
    if not found:
        return None
    m = rng.choice(found)
    at = m.end()
    return text[:at] + "not " + text[at:], (at, at + 3)


def _sentence_choice(text: str, rng: random.Random, min_words: int = 5):
    candidates = [(s, e) for s, e in _sentences(text) if len(text[s:e].split()) >= min_words]
    return rng.choice(candidates) if candidates else None


def _repeated(text: str, rng: random.Random):
    found = _sentence_choice(text, rng)
    if found is None:
        return None
    s, e = found
    copy = text[s:e]
    return text[:e] + " " + copy + text[e:], (e + 1, e + 1 + len(copy))


def _shuffled(text: str, rng: random.Random):
    found = _sentence_choice(text, rng)
    if found is None:
        return None
    s, e = found
    words = text[s:e].split()
    shuffled = list(words)
    while shuffled == words:
        rng.shuffle(shuffled)
    new = " ".join(shuffled)
    return text[:s] + new + text[e:], (s, s + len(new))


def inject(text: str, kind: str, rng: random.Random):
    """``(new text, (start, end))`` with one defect of ``kind`` at that character span, or None if the text
    offers no place for it (no number for wrong_number, no auxiliary verb for negation, ...)."""
    if kind == "rude":
        return _insert_sentence(text, rng, RUDE)
    if kind == "off_topic":
        return _insert_sentence(text, rng, OFF_TOPIC)
    return {"random_word": _random_word, "wrong_number": _wrong_number, "negation": _negation,
            "repeated": _repeated, "shuffled": _shuffled}[kind](text, rng)


def injected_answers(data: Path, size: Size, seed: int) -> list[Answer]:
    """Per source and split, ``size.injected_per_source`` truncated answers; the defect kinds are cycled over the
    split's answers (a kind that does not fit an answer passes to the next kind that does)."""
    out, n = [], {split: 0 for split in SPLITS}
    for source, rows in injected_sources(data, size.prompt_words).items():
        for split, chosen in _split_of(rows, size.injected_per_source, seed, source).items():
            for uid, prompt, answer in chosen:
                text = truncate_words(answer, size.answer_words)
                rng = random.Random(f"{seed}-{uid}")
                for k in range(len(DEFECT_KINDS)):
                    kind = DEFECT_KINDS[(n[split] + k) % len(DEFECT_KINDS)]
                    done = inject(text, kind, rng)
                    if done is not None:
                        break
                n[split] += 1
                new, (s, e) = done
                out.append(Answer(uid, "injected", split, kind, source, prompt, new, [(s, e, kind)]))
    return out


def human_answers(data: Path, size: Size, seed: int) -> list[Answer]:
    """fine-grained-feedback: ``prediction 1`` cut after ``size.human_words`` words, its error spans clipped to
    that text; answers with no span left are not used."""
    rows = json.loads(gzip.open(data / "fine-grained-feedback" / "qa-feedback-dev_feedback.json.gz", "rt").read())
    usable = []
    for i, r in enumerate(rows):
        text = truncate_words(r["prediction 1"], size.human_words)
        lead = len(r["prediction 1"]) - len(r["prediction 1"].lstrip())
        spans = [(max(0, e["start"] - lead), min(len(text), e["end"] - lead), e["error type"])
                 for e in r["feedback"]["errors"]]
        spans = [s for s in spans if s[1] > s[0]]
        if spans:
            usable.append(Answer(f"fgf-{i}", "human", "", "", "fine-grained-feedback", r["question"], text, spans))
    out = []
    for split, chosen in _split_of(usable, size.human, seed, "fgf").items():
        for a in chosen:
            a.split = split
            out.append(a)
    return out


BBM_TASKS = {
    "multistep_arithmetic": "Solve the following arithmetic problem: {input}",
    "dyck_languages": "Complete the rest of the sequence, making sure that the parentheses are closed properly. "
    "Input: {input}",
    "tracking_shuffled_objects": "{input}",
    "logical_deduction": "{input}",
    "word_sorting": "Sort the following words alphabetically: List: {input}",
}


def mistake_answers(data: Path, size: Size, seed: int) -> list[Answer]:
    """BIG-Bench-Mistake: the steps up to and including the first mistake (one per line); positives are the
    mistake step's tokens, negatives the steps before it. Traces whose prompt or steps are over
    ``2 * size.prompt_words`` words are not used."""
    out = []
    for task, instruction in list(BBM_TASKS.items())[: size.mistake_tasks]:
        usable = []
        with gzip.open(data / "big-bench-mistake" / f"{task}.jsonl.gz", "rt") as f:
            for i, line in enumerate(f):
                r = json.loads(line)
                m = r["mistake_index"]
                if m is None or m == 0:
                    continue
                text = "\n".join(r["steps"][: m + 1])
                prompt = instruction.format(input=r["input"]) + "\nLet's think step by step."
                if len(text.split()) <= 2 * size.prompt_words and len(prompt.split()) <= 2 * size.prompt_words:
                    start = len("\n".join(r["steps"][:m])) + 1
                    usable.append(Answer(f"bbm-{task}-{i}", "mistake", "", task, "big-bench-mistake", prompt, text,
                                         [(start, len(text), "mistake")]))
        for split, chosen in _split_of(usable, size.mistake_per_task, seed, task).items():
            for a in chosen:
                a.split = split
                out.append(a)
    return out


# -------------------------------------------------------------------------------------------------- tokens
def tokenize_answer(tokenizer, answer: Answer) -> None:
    """The answer's ids (tokenized alone) and each token's type: the type of a positive span it overlaps, "" for a
    negative token; BIG-Bench-Mistake has no tokens after its mistake step, the other ground truths mark every
    token outside the spans negative."""
    enc = tokenizer(answer.text, add_special_tokens=False, return_offsets_mapping=True)
    answer.ids = list(enc["input_ids"])
    types = []
    for a, b in enc["offset_mapping"]:
        hit = next((t for s, e, t in answer.spans if a < e and s < b), "")
        types.append(hit)
    answer.token_types = types


def render_context(tokenizer, answer: Answer, tset: TemplateSet | None, side: str) -> list[int]:
    """The context ids: the plain prompt (``tset`` None), or x⁺ / x⁻ of ``tset`` rendered by treg's own
    :func:`treg.token_rewards.contrastive.render_prompt_ids` through the model's chat template."""
    from treg.token_rewards.contrastive import render_prompt_ids

    messages = [{"role": "user", "content": answer.prompt}]
    if tset is None:
        return render_prompt_ids(tokenizer, messages, "{prompt}")
    template = tset.positive if side == "positive" else tset.negative
    system = tset.positive_system if side == "positive" else tset.negative_system
    if "{response}" in template:
        template = template.replace("{response}", answer.text.replace("{", "{{").replace("}", "}}"))
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return render_prompt_ids(tokenizer, messages, template)


# ------------------------------------------------------------------------------------------------- scoring
_WORKER: dict = {}


def _init_worker(spec: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model, tokenizer = load_model(spec)
    _WORKER.update(model=model, pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def _score_in_worker(items, batch_size: int) -> list[np.ndarray]:
    from treg.scoring import score_completions

    return score_completions(_WORKER["model"], items, batch_size=batch_size, pad_token_id=_WORKER["pad"],
                             show_progress=False)


class Scorer:
    """``score_completions`` over ``workers`` processes (each loads ``spec`` and runs one torch thread; 1: in this
    process, on ``model``), with an optional on-disk memo (``--memo``: reruns during a template search skip what was
    scored before; keyed by the model and the exact ids)."""

    def __init__(self, model, tokenizer, model_key: str, memo_dir: str | None, batch_size: int, spec: str = "",
                 workers: int = 1):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.path = Path(memo_dir) / f"{model_key}.npz" if memo_dir else None
        self.memo: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.exists():
            with np.load(self.path) as z:
                self.memo = {k: z[k] for k in z.files}
        self.scored = 0
        self.pool = None
        if workers > 1:
            import concurrent.futures
            import multiprocessing as mp

            self.pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                                               initializer=_init_worker, initargs=(spec, 1))
        self.workers = workers

    @staticmethod
    def key(ctx, comp) -> str:
        import hashlib

        return hashlib.sha1(np.asarray(list(ctx) + [-1] + list(comp), dtype=np.int64).tobytes()).hexdigest()

    def _score(self, items, desc: str) -> list[np.ndarray]:
        from treg.scoring import score_completions

        if self.pool is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            return score_completions(self.model, items, batch_size=self.batch_size, pad_token_id=pad, desc=desc,
                                     show_progress=sys.stderr.isatty())
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        shares = [order[w :: self.workers] for w in range(self.workers)]
        futures = [self.pool.submit(_score_in_worker, [items[i] for i in share], self.batch_size)
                   for share in shares]
        out: list = [None] * len(items)
        for share, future in zip(shares, futures):
            for i, lp in zip(share, future.result()):
                out[i] = lp
        return out

    def __call__(self, items: list[tuple[list[int], list[int]]], desc: str) -> list[np.ndarray]:
        keys = [self.key(c, y) for c, y in items]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.memo}.values())
        if todo:
            for i, lp in zip(todo, self._score([items[i] for i in todo], desc)):
                self.memo[keys[i]] = lp
            self.scored += len(todo)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(str(self.path) + ".tmp.npz", **self.memo)
                os.replace(str(self.path) + ".tmp.npz", self.path)
        return [self.memo[k] for k in keys]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def score_signals(scorer: Scorer, tokenizer, answers: list[Answer], tsets: list[TemplateSet], seed: int) -> None:
    """Fill ``answer.signals``: ``surprisal`` (stored as log π(y|x): higher = better, like r̂), ``rhat:<set>`` for
    every template set, and ``random``."""
    from treg.token_rewards.contrastive import contrastive_rewards

    plain = scorer([(render_context(tokenizer, a, None, ""), a.ids) for a in answers], "surprisal")
    for a, lp in zip(answers, plain):
        a.signals["surprisal"] = lp
    for tset in tsets:
        t0 = time.time()
        items = [(render_context(tokenizer, a, tset, side), a.ids) for a in answers for side in ("positive",
                                                                                                   "negative")]
        logps = scorer(items, f"r̂ {tset.name}")
        for j, a in enumerate(answers):
            a.signals[f"rhat:{tset.name}"] = contrastive_rewards(logps[2 * j], logps[2 * j + 1])
        print(f"  r̂ {tset.name:<20} {len(answers)} answers  {time.time() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(seed)
    for a in answers:
        a.signals["random"] = rng.random(len(a.ids))


def score_dpo(dpo_model, tokenizer, answers: list[Answer], batch_size: int) -> None:
    """``dpo_derived``: σ(log π_dpo − log π_ref) − 0.5 per token (treg's DPO-derived source, scale 1)."""
    from treg.token_rewards.dpo_derived import dpo_derived_rewards

    scorer = Scorer(dpo_model, tokenizer, "dpo", None, batch_size)
    logps = scorer([(render_context(tokenizer, a, None, ""), a.ids) for a in answers], "DPO-derived")
    for a, lp in zip(answers, logps):
        a.signals["dpo_derived"] = dpo_derived_rewards(lp, a.signals["surprisal"])


def score_critic(model, tokenizer, answers: list[Answer], max_new_tokens: int) -> dict:
    """The RELC critic (treg's default prompt and few-shot) with the same model on ``answers``: ``critic`` values
    per token (BAD −0.25, GOOD +0.25, else 0; a failed answer all 0). Returns the critic's counts."""
    from treg.token_rewards.critic import (
        HFCritic,
        build_critic_prompt,
        is_failure,
        map_spans_to_tokens,
        parse_critic_output,
    )

    critic = HFCritic(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=4)
    outputs = critic([build_critic_prompt(a.prompt, a.text) for a in answers])
    stats = {"answers": len(answers), "failed": 0, "spans": 0, "found": 0, "missing": 0, "bad_tokens": 0,
             "max_new_tokens": max_new_tokens, "examples": []}
    for a, out in zip(answers, outputs):
        spans, _ = parse_critic_output(out)
        failed = is_failure(out)
        values, st = ([0.0] * len(a.ids), {}) if failed else map_spans_to_tokens(tokenizer, a.text, a.ids, spans)
        a.signals["critic"] = np.asarray(values, dtype=np.float32)
        stats["failed"] += int(failed)
        for k in ("spans", "found", "missing", "bad_tokens"):
            stats[k] += st.get(k, 0)
        if len(stats["examples"]) < 3:
            stats["examples"].append({"uid": a.uid, "output": out})
    return stats


# ----------------------------------------------------------------------------------------------- statistics
def weighted_aucs(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` (positives above negatives, ties half) for each row of token ``weights`` [B, n] (a
    bootstrap resample repeats an answer's tokens by weight); ``weights`` of ones is the plain AUC."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = weights[:, order]
    wp = np.add.reduceat(w * positive[order], starts, axis=1)
    wn = np.add.reduceat(w * negative[order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    denom = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (wp * (below + 0.5 * wn)).sum(1) / denom, np.nan)


def group_tokens(answers: list[Answer], positive_type: str | None):
    """A group's tokens: per answer the mask of its tokens that take part, and over those the answer index and the
    positive / negative flags. ``positive_type`` None: every span type is positive; else only that type, and tokens
    of other types are left out. Tokens typed "-" never take part."""
    masks, idx, pos, neg = [], [], [], []
    for i, a in enumerate(answers):
        types = np.asarray(a.token_types, dtype=object)
        is_pos = (types != "") & (types != "-")
        if positive_type is not None:
            is_pos &= types == positive_type
        is_neg = types == ""
        m = is_pos | is_neg
        masks.append(m)
        idx.append(np.full(int(m.sum()), i))
        pos.append(is_pos[m])
        neg.append(is_neg[m])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return masks, cat(idx, np.int64), cat(pos, np.float64), cat(neg, np.float64)


def group_stats(answers: list[Answer], signals: list[str], positive_type: str | None, n_boot: int, seed: int,
                reference: str = "surprisal") -> dict:
    """Per signal: AUC of −signal, its 95% bootstrap CI (answers resampled with replacement, the same resamples for
    every signal), and the paired difference to ``reference`` with its CI; plus the numbers of answers, positive
    and negative tokens."""
    masks, idx, pos, neg = group_tokens(answers, positive_type)
    rng = np.random.default_rng(seed)
    n = len(answers)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)
    out = {"answers": n, "positive_tokens": int(pos.sum()), "negative_tokens": int(neg.sum()), "signals": {}}
    boots = {}
    for name in signals:
        if not answers or not all(name in a.signals for a in answers):
            continue
        scores = -np.concatenate([np.asarray(a.signals[name], dtype=np.float64)[m] for a, m in zip(answers, masks)])
        point = float(weighted_aucs(scores, pos, neg, np.ones((1, len(scores))))[0])
        boot = np.concatenate([weighted_aucs(scores, pos, neg, counts[k : k + 100][:, idx])
                               for k in range(0, n_boot, 100)])
        boots[name] = boot
        out["signals"][name] = {"auc": point, "ci95": _ci(boot)}
    for name, boot in boots.items():
        if name != reference and reference in boots:
            diff = out["signals"][name]["auc"] - out["signals"][reference]["auc"]
            out["signals"][name][f"minus_{reference}"] = {"diff": diff, "ci95": _ci(boot - boots[reference])}
    return out


def _ci(boot: np.ndarray) -> list[float]:
    boot = boot[~np.isnan(boot)]
    if len(boot) == 0:
        return [math.nan, math.nan]
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def evaluate(answers: list[Answer], signals: list[str], n_boot: int, seed: int) -> dict:
    """``{split: {kind: {group: group_stats}}}``: every ground truth overall (``all``) and per defect kind / error
    type / task; injected defects also per source."""
    out: dict = {}
    for split in SPLITS:
        for kind in KINDS:
            these = [a for a in answers if a.split == split and a.kind == kind]
            if not these:
                continue
            groups = {"all": (these, None)}
            if kind == "human":
                for t in sorted({t for a in these for *_, t in a.spans}):
                    groups[t] = (these, t)
            else:
                for g in sorted({a.group for a in these}, key=_group_order):
                    groups[g] = ([a for a in these if a.group == g], None)
            if kind == "injected":
                for src in sorted({a.source for a in these}):
                    groups[f"source:{src}"] = ([a for a in these if a.source == src], None)
            out.setdefault(split, {})[kind] = {g: group_stats(sub, signals, t, n_boot, seed)
                                               for g, (sub, t) in groups.items()}
    return out


def _group_order(g: str):
    return (DEFECT_KINDS.index(g), g) if g in DEFECT_KINDS else (len(DEFECT_KINDS), g)


def user_turn_only(tset: dict | TemplateSet) -> bool:
    """Whether treg's pass can express the set: user-turn templates of ``{prompt}`` only (no system turn, no
    ``{response}``), which every chat template and plain-text prompts support."""
    t = asdict(tset) if isinstance(tset, TemplateSet) else tset
    return (t["positive_system"] is None and t["negative_system"] is None
            and "{response}" not in t["positive"] + t["negative"])


def select_default(stats: dict, tsets: dict[str, dict]) -> dict:
    """The template sets ranked on ``dev`` by the mean over the ground truths of their overall AUC; ``best``, and
    ``best_user_turn`` among the sets treg's pass can express (:func:`user_turn_only`)."""
    dev = stats.get("dev", {})
    ranking = []
    for name, t in tsets.items():
        aucs = {k: dev[k]["all"]["signals"].get(f"rhat:{name}", {}).get("auc", math.nan) for k in dev}
        mean = float(np.nanmean(list(aucs.values()))) if aucs else math.nan
        ranking.append({"set": name, "mean": mean, "user_turn": user_turn_only(t), **aucs})
    surprisal = {k: dev[k]["all"]["signals"]["surprisal"]["auc"] for k in dev}
    ranking.sort(key=lambda r: -r["mean"] if not math.isnan(r["mean"]) else math.inf)
    expressible = [r for r in ranking if r["user_turn"]]
    return {"criterion": "mean over the ground truths of the dev overall AUC", "ranking": ranking,
            "best": ranking[0]["set"] if ranking else None,
            "best_user_turn": expressible[0]["set"] if expressible else None,
            "surprisal": {"mean": float(np.mean(list(surprisal.values()))) if surprisal else math.nan, **surprisal}}


def merge_search(paths: list[str], result: dict) -> dict:
    """Every template set of this run and of earlier dev-only runs (``--search``), ranked as :func:`select_default`
    does, with their wording. Sets are told apart by wording, this run's first: a set an earlier run held under
    another name (or under a name whose wording has since changed, e.g. ``treg_default``) appears once."""
    runs = [result] + [json.loads(Path(p).read_text()) for p in paths]
    rows, sets, seen = [], {}, set()
    for run_result in runs:
        for r in run_result["selection"]["ranking"]:
            t = run_result["template_sets"][r["set"]]
            wording = (t["positive"], t["negative"], t["positive_system"], t["negative_system"])
            if wording in seen:
                continue
            seen.add(wording)
            name = r["set"] if r["set"] not in sets else f"{r['set']} ({len(sets)})"
            sets[name] = t
            rows.append({**r, "set": name, "user_turn": user_turn_only(t)})
    rows.sort(key=lambda r: -r["mean"])
    return {"ranking": rows, "template_sets": sets, "runs": list(paths)}


# ------------------------------------------------------------------------------------------------------ run
def build_answers(data: Path, size: Size, seed: int, splits: tuple[str, ...]) -> list[Answer]:
    answers = injected_answers(data, size, seed) + human_answers(data, size, seed) + mistake_answers(data, size, seed)
    return [a for a in answers if a.split in splits]


def load_model(spec: str):
    from treg.models import load_causal_lm

    model, tokenizer = load_causal_lm(spec, show_progress=False)
    return model.eval(), tokenizer


def run(args, size: Size, size_name: str) -> tuple[dict, list[Answer], object]:
    """Build the answers, score every signal, and compute the statistics; returns (result, answers, tokenizer)."""
    import torch

    from treg.models import module_hash

    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    from treg.evaluation.data import find_root

    data = Path(args.data_dir) if args.data_dir else Path(find_root("alpaca-eval", "--data-dir"))
    splits = SPLITS if args.split == "both" else (args.split,)
    answers = build_answers(data, size, args.seed, splits)
    model, tokenizer = load_model(args.model)
    for a in answers:
        tokenize_answer(tokenizer, a)
    all_sets = template_sets()
    names = list(args.templates or (SMOKE_TEMPLATES if size_name == "smoke" else DEFAULT_TEMPLATES))
    if names == ["all"]:
        names = list(all_sets)
    tsets = [all_sets[n] for n in names]
    print(f"{len(answers)} answers ({', '.join(splits)}), {sum(len(a.ids) for a in answers)} tokens, "
          f"{len(tsets)} template sets, model {args.model}", flush=True)
    scorer = Scorer(model, tokenizer, f"{args.model.replace(':', '_').replace('/', '_')}-{module_hash(model)[:12]}",
                    args.memo, args.batch_size, spec=args.model, workers=args.workers)
    try:
        score_signals(scorer, tokenizer, answers, tsets, args.seed)
    finally:
        scorer.close()
    signals = [f"rhat:{n}" for n in names] + ["surprisal", "random"]
    if args.dpo_model:
        dpo_model, _ = load_model(args.dpo_model)
        score_dpo(dpo_model, tokenizer, answers, args.batch_size)
        signals.insert(len(names), "dpo_derived")
        del dpo_model
    critic_stats, critic_eval = None, None
    n_critic = size.critic_answers if args.critic_answers is None else args.critic_answers
    if n_critic > 0:
        pool = [a for a in answers if a.kind == "injected" and a.split == splits[-1]][:n_critic]
        t0 = time.time()
        critic_stats = score_critic(model, tokenizer, pool, size.critic_new_tokens)
        critic_stats["seconds"] = time.time() - t0
        critic_eval = group_stats(pool, ["critic", f"rhat:{names[0]}", "surprisal", "random"], None, size.bootstrap,
                                  args.seed)
    stats = evaluate(answers, signals, size.bootstrap, args.seed)
    result = {
        "model": args.model, "size": size_name, "sizes": asdict(size), "seed": args.seed, "splits": list(splits),
        "signals": signals, "template_sets": {n: asdict(all_sets[n]) for n in names},
        "defect_kinds": list(DEFECT_KINDS), "stats": stats,
        "selection": select_default(stats, {n: asdict(all_sets[n]) for n in names}),
        "critic": {"counts": critic_stats, "stats": critic_eval},
        "answers": {s: {k: sum(a.split == s and a.kind == k for a in answers) for k in KINDS} for s in splits},
        "forwards": scorer.scored, "seconds": time.time() - start, "machine": machine(torch),
        "workers": args.workers,
    }
    return result, answers, tokenizer


def machine(torch) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_average_at_end": [round(x, 1) for x in load] if load else None, "python": platform.python_version(),
            "torch": torch.__version__}


# --------------------------------------------------------------------------------------------------- report
def _label(signal: str) -> str:
    if signal.startswith("rhat:"):
        return f"r̂ {signal[5:]}"
    return {"surprisal": "surprisal −log π(y_t|x)", "random": "random", "dpo_derived": "r̂ DPO-derived",
            "critic": "RELC critic"}.get(signal, signal)


def _cell(entry: dict | None) -> str:
    if not entry:
        return "—"
    lo, hi = entry["ci95"]
    value = entry["auc"] if "auc" in entry else entry["diff"]
    sign = "+" if "diff" in entry and value >= 0 else ""
    return f"{sign}{value:.3f} [{lo:.2f}, {hi:.2f}]" if not math.isnan(lo) else f"{sign}{value:.3f}"


def stats_table(groups: dict, signals: list[str], first: str = "all") -> list[str]:
    """One row per signal: the ``all`` AUC, its difference to surprisal, then every other group's AUC."""
    names = [first] + [g for g in groups if g != first and not g.startswith("source:")]
    head = ["signal", f"{first}", "Δ vs surprisal"] + names[1:]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    counts = [f"{groups[g]['answers']} / {groups[g]['positive_tokens']} / {groups[g]['negative_tokens']}"
              for g in names]
    lines.append("| *answers / positive / negative tokens* | " + counts[0] + " | | " + " | ".join(counts[1:]) + " |")
    for s in signals:
        row = [_label(s).replace("|", "\\|"), _cell(groups[first]["signals"].get(s)),
               _cell(groups[first]["signals"].get(s, {}).get("minus_surprisal"))]
        row += [_cell(groups[g]["signals"].get(s)) for g in names[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return lines


TITLES = {"injected": "injected defects (AlpacaEval, Arena-Hard, HH-RLHF answers)",
          "human": "human error spans (fine-grained-feedback, qa-feedback dev)",
          "mistake": "first mistake step (BIG-Bench-Mistake)"}
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the report is rewritten -->", "<!-- /notes -->"


def report(result: dict, notes: str) -> str:
    stats, signals = result["stats"], result["signals"]
    main = "held_out" if "held_out" in stats else "dev"
    lines = ["# r̂ on real text: token-level AUCs against injected, human and first-mistake ground truth", "",
             f"Generated by `bench/token_rewards_real.py` ({result['size']} size, model `{result['model']}`, seed "
             f"{result['seed']}); the numbers below are the JSON's (`docs/token-rewards-real.json`).", "",
             "Cell: ROC AUC of −signal for the positive tokens (defect / error span / first mistake step) over the "
             "negative ones, pooled over answers, with its 95% bootstrap CI (answers resampled, "
             f"{result['sizes']['bootstrap']} resamples). Δ vs surprisal: the paired difference on the same resamples. "
             "0.5 is chance.", "", NOTES_BEGIN, notes.strip(), NOTES_END, ""]
    for kind in KINDS:
        if kind in stats.get(main, {}):
            lines += [f"## {main.replace('_', '-')}: {TITLES[kind]}", ""] + stats_table(stats[main][kind], signals)
            lines.append("")
    inj = stats.get(main, {}).get("injected", {})
    sources = {g[7:]: v for g, v in inj.items() if g.startswith("source:")}
    if sources:
        lines += [f"### {main.replace('_', '-')} injected defects by source", ""]
        lines += stats_table({"all": inj["all"], **sources}, signals) + [""]
    lines += selection_section(result) + critic_section(result) + settings_section(result)
    return "\n".join(lines) + "\n"


def selection_section(result: dict) -> list[str]:
    sel = result["selection"]
    kinds = [k for k in KINDS if k in result["stats"].get("dev", {})]
    if not kinds:
        return []
    search = result.get("search") or {"ranking": sel["ranking"], "template_sets": result["template_sets"]}
    best = search["ranking"][0]["set"]
    best_user = next((r["set"] for r in search["ranking"] if r["user_turn"]), None)
    lines = ["## Template sets on the development split (the default is chosen here)", "",
             f"Criterion: {sel['criterion']}, over every set tried on dev ({len(search['ranking'])}). Best: "
             f"**{best}**; best of the sets treg's pass can express (user turn only, no system turn, no answer "
             f"shown): **{best_user}**. Surprisal: {sel['surprisal']['mean']:.3f}.", "",
             "| template set | " + " | ".join(kinds) + " | mean | user turn only | x⁺ | x⁻ |",
             "|---" * (len(kinds) + 5) + "|"]
    for r in search["ranking"]:
        t = search["template_sets"][r["set"]]
        lines.append(f"| {r['set']} | " + " | ".join(f"{r.get(k, math.nan):.3f}" for k in kinds)
                     + f" | {r['mean']:.3f} | {'yes' if r['user_turn'] else 'no'} | "
                     f"{_show(t['positive'], t['positive_system'])} | {_show(t['negative'], t['negative_system'])} |")
    s = sel["surprisal"]
    lines.append("| *surprisal (no template)* | " + " | ".join(f"{s.get(k, math.nan):.3f}" for k in kinds)
                 + f" | {s['mean']:.3f} | | | |")
    return lines + [""]


def _show(template: str, system: str | None) -> str:
    text = template.replace("\n", "\\n").replace("|", "\\|")
    return f"system: *{system}* / user: `{text}`" if system else f"`{text}`"


def critic_section(result: dict) -> list[str]:
    critic = result["critic"]
    if not critic["counts"]:
        return ["## RELC critic", "", "Not run (`--critic-answers 0`).", ""]
    c, st = critic["counts"], critic["stats"]
    lines = ["## RELC critic (same model, treg's default critic prompt)", "",
             f"{c['answers']} injected answers of the last split, {c['max_new_tokens']} new tokens each "
             f"({c['seconds']:.0f} s): {c['failed']} failed answers, {c['spans']} spans named, {c['found']} found in "
             f"the answer, {c['missing']} missing, {c['bad_tokens']} tokens marked BAD.", "",
             "| signal (same answers) | AUC [95% CI] |", "|---|---|"]
    for s, e in st["signals"].items():
        lines.append("| " + _label(s).replace("|", "\\|") + f" | {_cell(e)} |")
    return lines + [""]


def settings_section(result: dict) -> list[str]:
    m, sizes = result["machine"], result["sizes"]
    lines = ["## Settings", "",
             "* answers per split: " + "; ".join(f"{s}: " + ", ".join(f"{k} {n}" for k, n in v.items())
                                                  for s, v in result["answers"].items()),
             f"* sizes: {json.dumps(sizes)}",
             f"* defect kinds (one per answer, cycled): {', '.join(result['defect_kinds'])}",
             f"* run time {result['seconds'] / 60:.1f} min, {result['forwards']} scored sequences on "
             f"{result.get('workers', 1)} scoring process(es) (one torch thread each when more than one); machine: "
             f"{m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads in the main "
             "process), "
             f"CUDA {m['cuda']}, load average at the end {m['load_average_at_end']}", "",
             "| template set | x⁺ | x⁻ | note |", "|---|---|---|---|"]
    for name, t in result["template_sets"].items():
        lines.append(f"| {name} | {_show(t['positive'], t['positive_system'])} | "
                     f"{_show(t['negative'], t['negative_system'])} | {t['note']} |")
    return lines + [""]


def existing_notes(path: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError:
        return "*(findings: written by hand between the notes markers; kept when the report is regenerated)*"
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return ""


def write_heatmap(answers: list[Answer], tokenizer, result: dict, path: str) -> str | None:
    """A few held-out examples (one per defect kind shown, one human, one mistake) through :mod:`treg.viz`."""
    from treg.viz import TokenHeatmap, render_html, token_texts

    split = result["splits"][-1]
    shown, picks = set(), []
    for a in answers:
        key = a.group if a.kind == "injected" else a.kind
        if a.split == split and key not in shown and key in ("rude", "random_word", "negation", "repeated",
                                                               "human", "mistake"):
            shown.add(key)
            picks.append(a)
    names = [s for s in result["signals"] if s.startswith("rhat:")]
    rows = [names[0]] + ([f"rhat:{result['selection']['best']}"] if result["selection"]["best"] and
                         f"rhat:{result['selection']['best']}" != names[0] else [])
    heatmaps = []
    for a in picks:
        lp = np.asarray(a.signals["surprisal"], dtype=np.float64)
        values = {_label(s): a.signals[s] for s in rows}
        values["log π(y_t|x) − its mean"] = lp - lp.mean()
        title = f"{a.uid} ({a.kind}: {a.group or ', '.join(sorted({t for *_, t in a.spans}))}) — {a.prompt[:90]!r}"
        heatmaps.append(TokenHeatmap(tokens=token_texts(tokenizer, a.ids), rows=values,
                                     defects=[t not in ("", "-") for t in a.token_types], title=title))
    if not heatmaps:
        return None
    render_html(heatmaps, path)
    return path


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="treg:smollm2", help="model spec (treg.models.load_causal_lm)")
    parser.add_argument("--smoke", action="store_true", help="a handful of answers, 2 template sets (tests)")
    parser.add_argument("--split", choices=["dev", "held_out", "both"], default="both")
    parser.add_argument("--templates", nargs="+", default=None,
                        help=f"template sets (or 'all'); default {' '.join(DEFAULT_TEMPLATES)}")
    parser.add_argument("--dpo-model", default=None, help="a DPO checkpoint of --model: adds DPO-derived r̂")
    parser.add_argument("--critic-answers", type=int, default=None, help="answers the critic reads (0: no critic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    parser.add_argument("--workers", type=int, default=2, help="scoring processes, one torch thread each (1: here)")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--memo", default=None, help="folder memoizing scored sequences across runs")
    parser.add_argument("--search", nargs="+", default=[],
                        help="JSONs of earlier dev-only runs (e.g. --split dev --templates all): their sets join the "
                        "report's dev ranking")
    parser.add_argument("--out", default="token-rewards-real.json")
    parser.add_argument("--report", default=None, help="markdown report path")
    parser.add_argument("--heatmap", default=None, help="HTML heatmap page path")
    parser.add_argument("--report-from", default=None, help="only rewrite --report from this run's JSON")
    args = parser.parse_args(argv)
    size_name = "smoke" if args.smoke else "default"
    from treg.files import write_json_atomic, write_text_atomic

    if args.report_from:
        write_text_atomic(args.report, report(json.loads(Path(args.report_from).read_text()),
                                              existing_notes(args.report)))
        return 0
    result, answers, tokenizer = run(args, SIZES[size_name], size_name)
    if args.search:
        result["search"] = merge_search(args.search, result)
    result["answer_list"] = [{"uid": a.uid, "kind": a.kind, "split": a.split, "group": a.group, "source": a.source,
                              "tokens": len(a.ids), "spans": a.spans} for a in answers]
    write_json_atomic(args.out, result, indent=1)
    if args.report:
        write_text_atomic(args.report, report(result, existing_notes(args.report)))
    if args.heatmap:
        write_heatmap(answers, tokenizer, result, args.heatmap)
    main_split = result["splits"][-1]
    for kind, groups in result["stats"].get(main_split, {}).items():
        print(f"\n{main_split} {kind}:")
        print("\n".join(stats_table(groups, result["signals"])))
    print(f"\ndev ranking: {[(r['set'], round(r['mean'], 3)) for r in result['selection']['ranking']]}")
    print(f"results in {args.out} ({result['seconds'] / 60:.1f} min, {result['forwards']} sequences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
