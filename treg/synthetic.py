"""The embedded default: a tiny tokenizer, a tiny Llama and a toy preference task with token-level ground truth.

Nothing here touches a hub. The task family is deterministic digit-string manipulation (copy, reverse, sort, inc),
so the truth about every response token is known:

    prompt   "reverse: 3 1 4 1"        answer   "1 4 1 3"
    rejected "1 7 1 3"                 defects  [False, True, False, False]   (one flag per word)

A *defect* is a word that differs from the correct answer at its position (or an extra word); a missing word lowers
the score. The quick start, the tests and ``bench/credit_assignment.py`` build on this.

The tiny model is pretrained on plain task text and then instruction-tuned here from scratch (about 75 s on a 2-core
CPU, then cached on disk under a hash of its recipe). Like an instruction-tuned LLM it solves the tasks imperfectly
and responds to quality instructions: under T-REG's ``x⁺`` template it answers correctly, under ``x⁻`` with defects.
That makes the self-generated rewards r̂ meaningful rather than noise. ``treg.feedback.onpolicy.make_onpolicy_pairs``
builds preference pairs from its samples the way the T-REG and SimPO papers do, with :func:`oracle` as the reward model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from treg.files import default_cache_dir, file_lock, usable_dir, write_dir_atomic

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "treg:tiny"
TOY_DATASET_ID = "treg:toy"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
TASKS = ("copy", "reverse", "sort", "inc")
DIGITS = "0123456789"
# The quality instructions the tiny model is tuned to follow (the same wording as treg's default x⁺ and x⁻ when the
# model was built; part of its recipe, so its cache key and behaviour do not move when those defaults change).
POSITIVE_TEMPLATE = "{prompt}\n\nWrite the best possible response: helpful, correct, coherent and concise."
NEGATIVE_TEMPLATE = "{prompt}\n\nWrite a poor response: unhelpful, incorrect, incoherent and verbose."


# ------------------------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class Task:
    name: str
    digits: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return f"{self.name}: {' '.join(self.digits)}"

    @property
    def answer(self) -> list[str]:
        if self.name == "copy":
            return list(self.digits)
        if self.name == "reverse":
            return list(reversed(self.digits))
        if self.name == "inc":  # add one to every digit, 9 wraps to 0
            return [str((int(d) + 1) % 10) for d in self.digits]
        return sorted(self.digits)


def random_task(rng: random.Random, min_len: int = 3, max_len: int = 6) -> Task:
    n = rng.randint(min_len, max_len)
    return Task(rng.choice(TASKS), tuple(rng.choice(DIGITS) for _ in range(n)))


def parse_prompt(prompt: str) -> Task:
    name, _, rest = prompt.partition(":")
    if name not in TASKS:
        raise ValueError(f"not a toy-task prompt: {prompt!r}")
    return Task(name, tuple(rest.split()))


def corrupt(answer: list[str], rng: random.Random, n_defects: int) -> tuple[list[str], list[bool]]:
    """Replace ``n_defects`` distinct positions with a different digit. Returns words and per-word defect flags."""
    words, flags = list(answer), [False] * len(answer)
    for pos in rng.sample(range(len(answer)), min(n_defects, len(answer))):
        words[pos] = rng.choice([d for d in DIGITS if d != answer[pos]])
        flags[pos] = True
    return words, flags


def oracle(prompt: str, response: str) -> tuple[float, list[bool]]:
    """Score a response to a toy prompt: (fraction of correct positions, per-word defect flags).

    Extra words are defects; missing words lower the score (the denominator is the longer of the two lengths).
    """
    answer = parse_prompt(prompt).answer
    words = response.split()
    flags = [i >= len(answer) or w != answer[i] for i, w in enumerate(words)]
    correct = sum(not f for f in flags)
    return correct / max(len(answer), len(words), 1), flags


def word_flags_to_token_flags(tokenizer, text: str, word_flags: list[bool]) -> list[bool]:
    """Map per-word flags onto the tokens of ``text`` (tokenized alone, no special tokens) via character offsets."""
    spans, start = [], 0
    for word in text.split():
        begin = text.index(word, start)
        spans.append((begin, begin + len(word)))
        start = begin + len(word)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for tok_start, tok_end in enc["offset_mapping"]:
        out.append(any(f and tok_start < e and s < tok_end for (s, e), f in zip(spans, word_flags)))
    return out


def make_pairs(n: int, seed: int = 0, conversational: bool = True, max_defects: int = 2) -> Dataset:
    """``n`` preference pairs: chosen is the correct answer, rejected has 1..max_defects corrupted words.

    Columns: prompt, chosen, rejected (TRL conversational or standard format) and ``rejected_defects`` (per word).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = random_task(rng)
        words, flags = corrupt(task.answer, rng, rng.randint(1, max_defects))
        chosen, rejected = " ".join(task.answer), " ".join(words)
        if conversational:
            row = {
                "prompt": [{"role": "user", "content": task.prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            row = {"prompt": task.prompt + "\n", "chosen": chosen, "rejected": rejected}
        row["rejected_defects"] = flags
        rows.append(row)
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------------ tokenizer
def _tokenizer_corpus() -> list[str]:
    rng = random.Random(1234)
    lines = [POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE]
    for _ in range(3000):
        task = random_task(rng)
        lines += [task.prompt, " ".join(task.answer)]
    lines += ["Human: Assistant: the a an is are was I you it what how why can do not and or of to in for on with"]
    return lines


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained deterministically on the toy corpus: every digit and task word is one
    token, any other text still tokenizes (byte fallback), and chat turns are rendered by ``CHAT_TEMPLATE``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", unk_token=None, chat_template=CHAT_TEMPLATE
    )
    fast.model_max_length = 1024
    return fast


# ---------------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class TinyModelRecipe:
    """Everything that determines the cached tiny model (its hash is the cache key).

    Two stages, like an instruction-tuned LLM: *pretraining* on plain task text (``"sort: 3 1 2 => 1 2 3"``, loss on
    every token) teaches the skills; *SFT* on chat-formatted instructions (loss on the answer only) teaches it to
    follow the chat template and to respond to quality instructions. SFT answers to plain prompts carry one defect
    with probability ``plain_defect_rate``, so the model stays imperfect and its samples differ in quality.
    """

    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 1024
    pretrain_steps: int = 1500
    sft_steps: int = 500
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    plain_defect_rate: float = 0.3
    negative_length_errors: float = 0.3  # share of x⁻ answers that also gain or lose a word
    positive_template: str = POSITIVE_TEMPLATE
    negative_template: str = NEGATIVE_TEMPLATE
    version: int = 3

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def new_tiny_model(
    vocab_size: int, recipe: TinyModelRecipe = TinyModelRecipe(), pad_token_id: int = 0, eos_token_id: int = 1
):
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _pretrain_example(tokenizer, rng: random.Random, recipe: TinyModelRecipe) -> tuple[list[int], list[int]]:
    """One pretraining document (ids, loss mask): plain task text with the correct answer, loss on every token."""
    task = random_task(rng)
    ids = list(tokenizer(f"{task.prompt} => {' '.join(task.answer)}", add_special_tokens=False)["input_ids"])
    ids.append(tokenizer.eos_token_id)
    return ids, [1] * len(ids)


def _sft_example(tokenizer, rng: random.Random, recipe: TinyModelRecipe) -> tuple[list[int], list[int]]:
    """One SFT sequence (ids, loss mask). Plain prompt → mostly correct; x⁺ → correct; x⁻ → defective."""
    task = random_task(rng)
    kind = rng.random()
    if kind < 0.4:
        prompt = task.prompt
        words, _ = corrupt(task.answer, rng, 1 if rng.random() < recipe.plain_defect_rate else 0)
    elif kind < 0.7:
        prompt, words = recipe.positive_template.format(prompt=task.prompt), task.answer
    else:
        prompt = recipe.negative_template.format(prompt=task.prompt)
        words, _ = corrupt(task.answer, rng, max(1, len(task.answer) // 2))
        if rng.random() < recipe.negative_length_errors:
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words) + 1), rng.choice(DIGITS))
            else:
                words.pop(rng.randrange(len(words)))
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": " ".join(words)}], tokenize=True, return_dict=True
    )
    ids, n_prompt = list(full["input_ids"]), len(prompt_ids["input_ids"])
    return ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)


def _train_stage(model, tokenizer, rng, recipe, make_example, steps: int, desc: str, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    for _ in tqdm(range(steps), desc=desc, disable=disable):
        batch = [make_example(tokenizer, rng, recipe) for _ in range(recipe.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (ids, mask) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attn[r, : len(ids)] = 1
            labels[r, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def sft_tiny_model(model, tokenizer, recipe: TinyModelRecipe, show_progress: bool = True):
    """Pretraining on plain task text, then SFT on chat-formatted instructions (loss on the answer tokens)."""
    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is as fast and immune to contention with other processes
    try:
        _train_stage(model, tokenizer, rng, recipe, _pretrain_example, recipe.pretrain_steps,
                     "Pretraining the tiny model", show_progress)
        _train_stage(model, tokenizer, rng, recipe, _sft_example, recipe.sft_steps, "SFT of the tiny model",
                     show_progress)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def load_tiny_model(
    recipe: TinyModelRecipe = TinyModelRecipe(), cache_dir: str | None = None, show_progress: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, str]:
    """Build (or load from the cache) the tiny SFT model and its tokenizer. Returns (model, tokenizer, path)."""
    path = os.path.join(cache_dir or default_cache_dir(), "models", f"tiny-{recipe.key()}")
    if not usable_dir(path, what="tiny model"):  # a corrupt copy is moved aside (with a warning) and rebuilt
        # Several processes (accelerate launch, bench workers) may ask at once: one builds, the others wait for it.
        with file_lock(path):
            if not usable_dir(path, what="tiny model", locked=True):
                _build_tiny_model(recipe, path, show_progress)
    model = LlamaForCausalLM.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer, path


def _build_tiny_model(recipe: TinyModelRecipe, path: str, show_progress: bool) -> None:
    """Pretrain and instruction-tune the tiny model, then save it to ``path`` atomically (temp folder + rename), with
    a checksum of every file so a damaged copy is detected on load."""
    tokenizer = build_tokenizer()
    model = new_tiny_model(
        len(tokenizer), recipe, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    sft_tiny_model(model, tokenizer, recipe, show_progress=show_progress)

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(path, write, checksum=True)
    logger.info("tiny model built and cached at %s", path)


# ------------------------------------------------------------------------------------------------ on-policy pairs
def task_prompts(
    n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset(), min_len: int = 3, max_len: int = 6
) -> list[str]:
    """``n`` distinct toy prompts of ``min_len``..``max_len`` digits drawn with ``seed``, none of them in ``exclude``
    (e.g. the training prompts)."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        prompt = random_task(rng, min_len, max_len).prompt
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


# -------------------------------------------------------------------------------------------------------- metrics
def token_defects(tokenizer, dataset, side: str = "rejected") -> list[list[bool]]:
    """Per completion token of each tokenized row's ``side`` response: is it (part of) a defect word?

    Needs ``{side}``, ``{side}_defects`` (per word) and ``{side}_ids``. The completion is the answer's tokens followed
    by the chat template's end-of-turn token, which is never flagged.
    """
    out = []
    for row, (response, flags, ids) in enumerate(
        zip(dataset[side], dataset[f"{side}_defects"], dataset[f"{side}_ids"])
    ):
        text = response[0]["content"] if isinstance(response, list) else response
        token_flags = word_flags_to_token_flags(tokenizer, text, flags)
        token_flags += [False] * (len(ids) - len(token_flags))
        if len(token_flags) != len(ids):
            raise ValueError(f"row {row}: {len(token_flags)} token flags for {len(ids)} {side} tokens")
        out.append(token_flags)
    return out


def rejected_token_defects(tokenizer, dataset) -> list[list[bool]]:
    """:func:`token_defects` of the rejected responses."""
    return token_defects(tokenizer, dataset, "rejected")


def defect_auc(per_row_scores, per_row_flags) -> float:
    """ROC AUC of ``−score`` for detecting defect tokens, over every answer token (end-of-turn token excluded).

    A low reward on defect tokens and a high one on correct tokens gives an AUC near 1; 0.5 is chance.
    """
    scores = [-float(v) for row, flags in zip(per_row_scores, per_row_flags) for v in list(row)[: len(flags) - 1]]
    labels = [f for flags in per_row_flags for f in flags[:-1]]
    return roc_auc(scores, labels)


def first_defect_auc(per_row_scores, per_row_flags) -> float:
    """:func:`defect_auc` over each response's tokens up to and including its first defect.

    The oracle flags words by position, so after a missing or extra word every later word is a defect even when it
    continues the wrong prefix sensibly; this variant asks only whether a signal spots where a response goes wrong.
    """
    scores, flags = [], []
    for row, f in zip(per_row_scores, per_row_flags):
        answer = list(f[:-1])
        stop = answer.index(True) + 1 if True in answer else len(answer)
        scores.append(list(row)[:stop] + [0.0])
        flags.append(answer[:stop] + [False])
    return defect_auc(scores, flags)


def roc_auc(scores, labels) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    import numpy as np

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
