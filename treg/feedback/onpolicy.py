"""On-policy preference pairs, the T-REG/SimPO papers' data recipe: sample N answers per prompt from the policy,
score them, keep the best as chosen and the worst as rejected.

    >>> pairs, stats = build_onpolicy_pairs(model, tokenizer, prompts, scorer=my_fn, num_samples=5)  # doctest: +SKIP
    >>> stats                                                                                           # doctest: +SKIP
    {'prompts': 64, 'pairs': 51, 'dropped_ties': 12, 'dropped_empty': 1, ..., 'pairs_per_s': 3.2}

A scorer is any callable ``(prompt, response) -> float`` (the prompt as given: a string or chat messages; the
response as text). Objects with ``score_batch(prompts, responses) -> list[float]`` are scored in one batched call:
:class:`RewardModelScorer` (an ``AutoModelForSequenceClassification`` checkpoint: its single logit on the
chat-formatted prompt + response) and :class:`treg.feedback.direct.DirectScorer` (direct RLAIF 1–10 scores).

Prompts where every non-empty sample gets the same score carry no preference and are dropped (``dropped_ties``);
empty samples are discarded, and prompts left with fewer than two samples are dropped (``dropped_empty``).

Command line (registered as ``treg pairs``)::

    python -m treg.feedback.onpolicy --model treg:tiny --prompts treg:toy --num-prompts 64 --scorer oracle --out pairs
    python -m treg.feedback.onpolicy --model ckpt --prompts prompts.jsonl --scorer rm:path/to/rm --out pairs
    python -m treg.feedback.onpolicy --model ckpt --prompts data.jsonl --scorer direct:path/to/judge --out pairs
    treg pairs --model ckpt --prompts hh-rlhf-harmless-base-test.jsonl.gz --drop-invalid-rows --scorer rm:RM --out pairs

Prompts are checked like training data (:mod:`treg.data`): a bad row (an empty prompt, turns that do not alternate,
an HH pair whose two transcripts disagree on the dialogue) stops the run with an error naming the row, unless
``--drop-invalid-rows`` drops such rows; their count is reported (``invalid_prompts_dropped``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from datasets import Dataset

from treg.files import UserError
from treg.generation import fold_system_turns, generate

Scorer = Callable[[object, str], float]


class PairsError(UserError):
    """A bad ``treg pairs`` setting or input (scorer spec, number of samples, output folder, prompts file); the
    ``treg`` command prints it as one line and exits 2."""


class PairsOutputExists(PairsError, FileExistsError):
    """``--out`` exists and ``--overwrite`` was not given."""


# ---------------------------------------------------------------------------------------------------------- scorers
def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


class RewardModelScorer:
    """Score = the single logit of a sequence-classification reward model on the chat-formatted prompt + response
    (plain ``prompt + response`` text when the tokenizer has no chat template)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None):
        if getattr(model.config, "num_labels", 1) != 1:
            raise PairsError(f"a reward model needs num_labels=1, got {model.config.num_labels}.")
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise PairsError("the reward model's tokenizer has neither a pad nor an eos token.")
        self.pad_token_id = pad
        if getattr(model.config, "pad_token_id", None) is None:  # needed to find the last token of each row
            model.config.pad_token_id = pad

    def encode(self, prompt, response: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            messages = fold_system_turns(self.tokenizer, _as_messages(prompt))  # e.g. Gemma: no system role
            messages += [{"role": "assistant", "content": response}]
            ids = list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            ids = list(self.tokenizer(text + response, add_special_tokens=True)["input_ids"])
        return ids[-self.max_length :] if self.max_length else ids

    @torch.inference_mode()
    def score_batch(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out = [0.0] * len(encoded)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):  # right padding, as TRL's RewardTrainer collates
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    attn[r, : len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
                for r, i in enumerate(batch):
                    out[i] = float(logits[r, 0])
        finally:
            self.model.train(was_training)
        return out

    def __call__(self, prompt, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


def score_all(scorer, prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """Scores of aligned (prompt, response) lists through ``scorer.score_batch`` when it has one, else one by one."""
    if hasattr(scorer, "score_batch"):
        scores = list(scorer.score_batch(list(prompts), list(responses)))
    else:
        scores = [scorer(p, r) for p, r in zip(prompts, responses)]
    if len(scores) != len(prompts):
        raise ValueError(f"the scorer returned {len(scores)} scores for {len(prompts)} responses.")
    for s in scores:
        if not isinstance(s, (int, float)) or s != s or s in (float("inf"), float("-inf")):
            raise ValueError(f"the scorer returned a non-finite or non-numeric score: {s!r}")
    return [float(s) for s in scores]


# -------------------------------------------------------------------------------------------------------- selection
def pairs_from_samples(prompts: Sequence, samples: Sequence[Sequence[str]], scorer) -> tuple[list[dict], dict]:
    """Best-vs-worst pairs from ``samples[i]`` (the responses to ``prompts[i]``). Returns (rows, counts).

    Rows are TRL conversational (``prompt`` messages, ``chosen``/``rejected`` one assistant message) plus
    ``chosen_score``/``rejected_score``. The first best and the first worst sample (in sampling order) are kept.
    """
    kept = [[t.strip() for t in texts if t and t.strip()] for texts in samples]
    flat_p = [p for p, texts in zip(prompts, kept) if len(texts) >= 2 for _ in texts]
    flat_r = [t for texts in kept if len(texts) >= 2 for t in texts]
    flat_s = iter(score_all(scorer, flat_p, flat_r))
    rows, ties, empty = [], 0, 0
    for prompt, texts in zip(prompts, kept):
        if len(texts) < 2:
            empty += 1
            continue
        scores = [next(flat_s) for _ in texts]
        best = max(range(len(texts)), key=lambda i: scores[i])
        worst = min(range(len(texts)), key=lambda i: scores[i])
        if scores[best] == scores[worst]:
            ties += 1
            continue
        rows.append({
            "prompt": _as_messages(prompt),
            "chosen": [{"role": "assistant", "content": texts[best]}],
            "rejected": [{"role": "assistant", "content": texts[worst]}],
            "chosen_score": scores[best],
            "rejected_score": scores[worst],
        })
    return rows, {"dropped_ties": ties, "dropped_empty": empty, "scored": len(flat_r)}


# --------------------------------------------------------------------------------------------------------- sampling
def sample_responses(model, tokenizer, prompts: Sequence, *, num_samples: int, temperature: float,
                     max_new_tokens: int, seed: int, batch_size: int, show_progress: bool,
                     backend: str = "hf") -> list[list[str]]:
    """``num_samples`` sampled answers per prompt. Strings become one user message when the tokenizer has a chat
    template (else they are used as raw text); message lists go through the chat template."""
    if backend == "vllm":
        return _sample_vllm(model, prompts, num_samples, temperature, max_new_tokens, seed)
    if backend != "hf":
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}.")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    inputs = [_as_messages(p) if (has_template or not isinstance(p, str)) else p for p in prompts]
    return generate(
        model, tokenizer, inputs, num_samples=num_samples, do_sample=True, temperature=temperature,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, show_progress=show_progress,
        desc="Sampling responses",
    )


def _sample_vllm(model, prompts, num_samples, temperature, max_new_tokens, seed) -> list[list[str]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise ImportError(
            "backend='vllm' needs vLLM, which is not installed (pip install -e '.[vllm]' on a CUDA machine); "
            "use backend='hf' otherwise."
        ) from err
    if not isinstance(model, str):
        raise TypeError("backend='vllm' takes the model as a path or hub id, not a loaded model.")
    llm = LLM(model=model, seed=seed)
    params = SamplingParams(n=num_samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed)
    outputs = llm.chat([_as_messages(p) for p in prompts], params, use_tqdm=False)
    return [[c.text for c in o.outputs] for o in outputs]


def build_onpolicy_pairs(
    model,
    tokenizer,
    prompts: Sequence,
    scorer,
    num_samples: int = 5,
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
    backend: str = "hf",
) -> tuple[Dataset, dict]:
    """Sample ``num_samples`` answers per prompt from ``model``, score them with ``scorer``, keep best and worst.

    Returns ``(dataset, stats)``: a TRL conversational dataset (``prompt``, ``chosen``, ``rejected``) with
    ``chosen_score`` and ``rejected_score``, and ``{prompts, pairs, dropped_ties, dropped_empty, samples,
    sampling_s, scoring_s, seconds, pairs_per_s}``. Same model, prompts, seed and batch size give the same pairs.
    """
    if num_samples < 2:
        raise PairsError(f"num_samples must be ≥ 2 to form a pair, got {num_samples} (treg pairs --num-samples).")
    start = time.perf_counter()
    samples = sample_responses(
        model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
        seed=seed, batch_size=batch_size, show_progress=show_progress, backend=backend,
    )
    sampled = time.perf_counter()
    rows, counts = pairs_from_samples(prompts, samples, scorer)
    end = time.perf_counter()
    stats = {
        "prompts": len(prompts),
        "pairs": len(rows),
        "dropped_ties": counts["dropped_ties"],
        "dropped_empty": counts["dropped_empty"],
        "samples": sum(len(s) for s in samples),
        "sampling_s": round(sampled - start, 3),
        "scoring_s": round(end - sampled, 3),
        "seconds": round(end - start, 3),
        "pairs_per_s": round(len(rows) / max(end - start, 1e-9), 3),
    }
    if not rows:
        dataset = Dataset.from_dict({k: [] for k in ("prompt", "chosen", "rejected", "chosen_score",
                                                     "rejected_score")})
    else:
        dataset = Dataset.from_list(rows)
    return dataset, stats


# ------------------------------------------------------------------------------------------------------ entry point
_DROP_HINT = "treg pairs --drop-invalid-rows drops such rows and counts them"


def load_prompts(spec: str, num_prompts: int | None, split: str, seed: int, drop_invalid: bool = False,
                 counts: dict | None = None) -> list:
    """``treg:toy`` (toy task prompts), a ``.jsonl`` file with a ``prompt`` field, or a preference dataset's prompts
    (checked and converted by :func:`treg.data.load_preference_dataset`).

    The first ``num_prompts`` prompts; with ``drop_invalid`` the first ``num_prompts`` valid ones, and ``counts``
    (when given) gets ``invalid_prompts_dropped``. Without it a bad row raises
    :class:`~treg.data.PreferenceDataError` naming the row (the line, for a ``.jsonl`` file of prompts).
    """
    from treg.data import PreferenceDataError

    if spec == "treg:toy":
        from treg.synthetic import task_prompts

        return task_prompts(num_prompts or 64, seed)
    dropped = 0
    if spec.endswith(".jsonl") and os.path.isfile(spec):
        from treg.data import prompt_problem

        prompts = []
        with open(spec, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip() or (num_prompts and len(prompts) >= num_prompts):
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreferenceDataError(f"{spec}:{n}: not JSON ({e.msg}).") from e
                if not isinstance(row, dict):
                    raise PreferenceDataError(f"{spec}:{n}: expected a JSON object with a 'prompt' field, got "
                                              f"{type(row).__name__}.")
                problem = prompt_problem(row.get("prompt")) if "prompt" in row else "no 'prompt' field"
                if problem is None:
                    prompts.append(row["prompt"])
                elif drop_invalid:
                    dropped += 1
                else:
                    raise PreferenceDataError(f"{spec}:{n}, field 'prompt': {problem}. {_DROP_HINT}.")
    else:
        from treg.data import load_preference_dataset

        loaded: dict = {}
        try:
            dataset = load_preference_dataset(spec, split=split, drop_invalid=drop_invalid, counts=loaded,
                                              max_rows=None if drop_invalid else num_prompts)
        except PreferenceDataError as e:
            raise PreferenceDataError(f"{spec}: {e} ({_DROP_HINT})") from e
        prompts, dropped = list(dataset["prompt"]), loaded.get("rows_dropped", 0)
    if counts is not None:
        counts["invalid_prompts_dropped"] = dropped
    return prompts[:num_prompts] if num_prompts else prompts


def make_scorer(spec: str, batch_size: int = 16):
    """``oracle`` (toy task), ``rm:PATH`` (sequence-classification reward model) or ``direct:MODEL`` (judge LLM)."""
    if spec == "oracle":
        from treg.synthetic import oracle

        def oracle_scorer(prompt, response: str) -> float:
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            return oracle(text, response)[0]

        return oracle_scorer
    kind, _, path = check_scorer_spec(spec)
    if kind == "rm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from treg.models import check_model_spec

        check_model_spec(path, f"--scorer {spec!r}")
        return RewardModelScorer(AutoModelForSequenceClassification.from_pretrained(path),
                                 AutoTokenizer.from_pretrained(path), batch_size=batch_size)
    from treg.feedback.direct import DirectScorer
    from treg.models import load_causal_lm

    judge, judge_tokenizer = load_causal_lm(path)
    return DirectScorer(judge, judge_tokenizer, batch_size=batch_size)


def check_scorer_spec(spec: str) -> tuple[str, str, str]:
    """``spec.partition(":")`` of a scorer spec :func:`make_scorer` accepts; :class:`PairsError` otherwise."""
    kind, colon, path = spec.partition(":")
    if spec != "oracle" and not (kind in ("rm", "direct") and path):
        raise PairsError(f"--scorer must be 'oracle', 'rm:PATH' or 'direct:MODEL', got {spec!r}.")
    return kind, colon, path


def save_atomically(dataset: Dataset, out: str, overwrite: bool = False) -> None:
    """``save_to_disk`` into a temporary folder next to ``out``, then rename it into place."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise PairsOutputExists(f"--out {out} exists; pass --overwrite to replace it.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-pairs-", dir=parent)
    try:
        dataset.save_to_disk(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treg pairs", description="Build on-policy preference pairs (best vs worst).")
    p.add_argument("--model", required=True, help="policy checkpoint (path or hub id) or treg:tiny")
    p.add_argument("--prompts", required=True, help="treg:toy, a .jsonl file with a 'prompt' field, or a dataset")
    p.add_argument("--scorer", required=True, help="oracle | rm:PATH | direct:MODEL")
    p.add_argument("--out", required=True, help="output folder (Dataset.save_to_disk)")
    p.add_argument("--num-samples", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts (treg:toy: how many; default 64)")
    p.add_argument("--split", default="train")
    p.add_argument("--drop-invalid-rows", action="store_true",
                   help="drop bad prompt rows (counted in the output) instead of failing on the first")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 24 for treg:toy, else 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scorer-batch-size", type=int, default=16)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # settings first: each of these would otherwise fail only after the model is loaded (or, --out, after sampling)
    if args.num_samples < 2:
        raise PairsError(f"--num-samples must be ≥ 2 to form a pair, got {args.num_samples}.")
    check_scorer_spec(args.scorer)
    if os.path.exists(args.out) and not args.overwrite:
        raise PairsOutputExists(f"--out {os.path.abspath(args.out)} exists; pass --overwrite to replace it.")
    counts: dict = {}
    prompts = load_prompts(args.prompts, args.num_prompts, args.split, args.seed,
                           drop_invalid=args.drop_invalid_rows, counts=counts)
    scorer = make_scorer(args.scorer, args.scorer_batch_size)
    if args.backend == "vllm":
        from transformers import AutoTokenizer

        model, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
    else:
        from treg.models import load_causal_lm

        model, tokenizer = load_causal_lm(args.model)
    max_new = args.max_new_tokens or (24 if args.prompts == "treg:toy" else 256)
    dataset, stats = build_onpolicy_pairs(
        model, tokenizer, prompts, scorer, num_samples=args.num_samples, temperature=args.temperature,
        max_new_tokens=max_new, seed=args.seed, batch_size=args.batch_size, show_progress=not args.no_progress,
        backend=args.backend,
    )
    save_atomically(dataset, args.out, overwrite=args.overwrite)
    print(json.dumps({**stats, **counts, "out": os.path.abspath(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------------------------- the embedded toy task (oracle)
def make_onpolicy_pairs(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[Dataset, dict]:
    """Preference pairs built the T-REG/SimPO papers' way, with the oracle as the reward model.

    For each prompt, sample ``num_samples`` responses from ``model`` (the SFT policy), score them with
    :func:`oracle`, keep the best as chosen and the worst as rejected, and drop the prompt when all scores tie (or
    fewer than two non-empty responses came back). Returns ``(dataset, stats)``; the dataset is conversational with
    ``chosen_defects`` / ``rejected_defects`` (one flag per word) and ``chosen_score`` / ``rejected_score``.
    """
    from treg.synthetic import oracle

    messages = [[{"role": "user", "content": p}] for p in prompts]
    samples = generate(
        model, tokenizer, messages, num_samples=num_samples, do_sample=True, temperature=temperature,
        max_new_tokens=24, batch_size=batch_size, seed=seed, show_progress=show_progress, desc="Sampling responses",
    )
    rows, counts = pairs_from_samples(prompts, samples, lambda p, r: oracle(p, r)[0])
    for row in rows:  # the oracle's per-word defect flags of the two kept responses
        prompt = row["prompt"][0]["content"]
        row["chosen_defects"] = oracle(prompt, row["chosen"][0]["content"])[1]
        row["rejected_defects"] = oracle(prompt, row["rejected"][0]["content"])[1]
    all_scores = [oracle(p, t.strip())[0] for p, texts in zip(prompts, samples) for t in texts]
    stats = {
        "prompts": len(prompts),
        "pairs": len(rows),
        "dropped_ties": counts["dropped_ties"],
        "dropped_empty": counts["dropped_empty"],
        "sample_oracle_score": sum(all_scores) / max(len(all_scores), 1),
    }
    return Dataset.from_list(rows), stats


def _answer_oracle_score(model, tokenizer, prompts, batch_size, show_progress, **sampling) -> dict:
    from treg.synthetic import oracle

    texts = generate(
        model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=24,
        batch_size=batch_size, show_progress=show_progress, desc="Answering held-out prompts", **sampling,
    )
    scores = [oracle(p, t[0].strip())[0] for p, t in zip(prompts, texts)]
    return {
        "oracle_accuracy": sum(scores) / len(scores),
        "exact_match": sum(s == 1.0 for s in scores) / len(scores),
        "samples": [(p, t[0]) for p, t in zip(prompts[:5], texts[:5])],
    }


def greedy_oracle_score(model, tokenizer, prompts: list[str], batch_size: int = 64,
                        show_progress: bool = True) -> dict:
    """Greedy answers to plain prompts, scored by the oracle: mean score and exact-match rate."""
    return _answer_oracle_score(model, tokenizer, prompts, batch_size, show_progress)


def sampled_oracle_score(model, tokenizer, prompts: list[str], seed: int = 0, temperature: float = 1.0,
                         batch_size: int = 64, show_progress: bool = True) -> dict:
    """One answer per prompt sampled at ``temperature`` (the distribution the pairs were drawn from), scored."""
    return _answer_oracle_score(model, tokenizer, prompts, batch_size, show_progress, do_sample=True,
                                temperature=temperature, seed=seed)
