"""Pairwise judges behind one protocol, judged in both orders, with retries, failure counts and an atomic cache.

A judge reads a :class:`JudgePrompt` (chat messages that show two answers, *first* and *second*) and returns a
:class:`Verdict` whose ``p_first`` is P(the first shown answer is better), or ``None`` when it failed (a transport
error, a verdict it never gave, non-finite log-probs). Two kinds of prompt:

* ``"choice"`` (AlpacaEval): the judge names the better answer with one token, ``choices[0]`` for the first answer
  and ``choices[1]`` for the second (AlpacaEval 2 uses ``m`` / ``M``). A log-prob reader gets
  ``p_first = softmax(ℓ_m, ℓ_M)[0]``; a text reader gets 1 or 0.
* ``"verdict"`` (Arena-Hard): the judge writes a judgment ending in a label ``[[A>>B]] … [[B>>A]]``, parsed by the
  official regex (:func:`parse_verdict`) with one re-prompt on a miss. ``p_first`` follows the official scores
  (A>B, A>>B → 1; A=B → 0.5; B>A, B>>A → 0).

Judges:

* :class:`LocalLogprobJudge` — any HF causal LM. ``choice`` prompts: next-token log-probs of the choice tokens
  (:func:`treg.scoring.next_token_logprobs`, one forward per prompt). ``verdict`` prompts: by default the judge is
  made to write ``My final verdict is: [[`` and the five labels ``A>>B]]`` … are scored as continuations
  (:func:`treg.scoring.score_completions`); the label with the highest probability is its verdict (no written
  explanation, so no "own answer first" step; this differs from the official text judge). ``mode="generate"`` writes
  the judgment greedily and parses it like an API judge. Text that follows the chat template (the verdict prefix, a
  choice, a label) is tokenized as part of the joined text (:func:`treg.generation.encode_pieces`), never alone: a
  SentencePiece tokenizer would read a lone "A>>B]]" as "▁A>>B]]". A chat template without a system role (Gemma's)
  gets the system prompt folded into the user turn (:func:`treg.generation.fold_system_turns`).
* :class:`EndpointJudge` — an OpenAI-compatible ``/chat/completions`` server (an API, or ``vllm serve`` on a local
  port). ``choice`` prompts ask for one token with ``logprobs``; a server that does not return them is parsed as text.
  The API key is read from the environment variable named by ``api_key_env`` and only ever sent in the
  ``Authorization`` header: it is never logged, cached or written.

:func:`judge_both_orders` judges every pair as (x, y) and (y, x) and averages
``p = (p_xy + 1 − p_yx) / 2``, which cancels a constant position bias: a judge that always prefers the first position
gives ``(1 + 1 − 1) / 2 = 0.5``. A pair with a failure in either order is a failure: it is counted and reported, never
silently a tie or a win. Every verdict is cached (:class:`JudgmentCache`) under a hash of the judge and the prompt, in
shard files written atomically, so an interrupted run resumes where it stopped; failures are not cached (a rerun
retries them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from treg.files import UserError, write_json_atomic
from treg.generation import encode_pieces, fold_system_turns, generate

logger = logging.getLogger(__name__)

ARENA_REGEX = r"\[\[([AB<>=]+)\]\]"  # lmarena/arena-hard-auto config/arena-hard-v0.1.yaml
VERDICT_LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
# P(first shown is better) for each label the official show_result maps (v2.0 also accepts the mirrored spellings).
LABEL_P_FIRST = {
    "A>>B": 1.0,
    "A>B": 1.0,
    "A=B": 0.5,
    "B>A": 0.0,
    "B>>A": 0.0,
    "A<<B": 0.0,
    "A<B": 0.0,
    "B=A": 0.5,
    "B<<A": 1.0,
    "B<A": 1.0,
}
STRONG_LABELS = frozenset({"A>>B", "B>>A", "A<<B", "B<<A"})
VERDICT_PREFIX = "My final verdict is: [["


class JudgeError(UserError):
    """A judge that cannot be built or a prompt it cannot read (not a per-item failure: those return None)."""


def parse_verdict(text: str, pattern: str = ARENA_REGEX) -> tuple[str | None, bool]:
    """(label, try_again) exactly as arena-hard-auto v0.1's ``get_score``: all regex matches, empty ones dropped; no
    match → (None, True) (re-prompt); one distinct label → (label, False); several distinct labels → (None, False).

    >>> parse_verdict("... My final verdict is: [[A>B]]")
    ('A>B', False)
    >>> parse_verdict("A is better")
    (None, True)
    >>> parse_verdict("[[A>B]] no, [[B>A]]")
    (None, False)
    """
    matches = [m for m in re.findall(pattern, text or "") if m != ""]
    if not matches:
        return None, True
    if len(set(matches)) == 1:
        return matches[0].strip("\n"), False
    return None, False


# ---------------------------------------------------------------------------------------------------- prompts
def fill_template(template: str, fields: dict[str, str]) -> str:
    """Replace ``{NAME}`` for each field in one pass (inserted text is not re-scanned; other braces stay)."""
    if not fields:
        return template
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in fields))
    return pattern.sub(lambda m: fields[m.group(0)[1:-1]], template)


@dataclass(frozen=True)
class JudgePrompt:
    """What a judge reads: an optional system prompt and a user template whose ``fields`` hold the two answers.

    ``kind``: "choice" (``choices[0]`` names the first answer) or "verdict" (Arena-Hard labels; ``regex`` and
    ``reprompt`` as in the official judge). ``fields`` are kept apart from the template so a judge with a short context
    can shorten the answers rather than cut the instructions.
    """

    user_template: str
    fields: tuple[tuple[str, str], ...]
    system: str | None = None
    kind: str = "choice"
    choices: tuple[str, str] = ("m", "M")
    regex: str = ARENA_REGEX
    reprompt: str | None = "continue your judgment and finish by outputting a final verdict label"

    def __post_init__(self):
        if self.kind not in ("choice", "verdict"):
            raise JudgeError(f"JudgePrompt.kind must be 'choice' or 'verdict', got {self.kind!r}.")

    def messages(self, fields: dict[str, str] | None = None) -> list[dict[str, str]]:
        user = fill_template(self.user_template, dict(self.fields) if fields is None else fields)
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": user}]

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Verdict:
    """One judgment of one ordered prompt. ``p_first``: P(first shown answer better); ``label``: the verdict label or
    the chosen token; ``text``: the judgment as written (or a summary of the log-probs); ``probs``: label → probability
    for log-prob judges; ``attempts``: calls it took; ``truncated``: answers were shortened to fit the context."""

    p_first: float
    label: str | None = None
    text: str = ""
    probs: dict[str, float] | None = None
    attempts: int = 1
    truncated: bool = False

    @classmethod
    def from_json(cls, d: dict) -> Verdict:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@runtime_checkable
class PairwiseJudge(Protocol):
    """``name`` (written into results), ``cache_id`` (everything the verdicts depend on) and ``judge``."""

    name: str
    cache_id: str

    def judge(self, prompts: Sequence[JudgePrompt]) -> list[Verdict | None]: ...


def _normalize(logps: Sequence[float]) -> np.ndarray:
    x = np.asarray(logps, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"non-finite log-probs {x.tolist()}")
    x = np.exp(x - x.max())
    return x / x.sum()


# ------------------------------------------------------------------------------------------------ local judge
class LocalLogprobJudge:
    """A judge that is a local HF causal LM (see the module docstring for how it reads each kind of prompt).

    Args:
        model, tokenizer: the judge LM and its tokenizer (with a chat template).
        name: label written into results (default: the model's ``name_or_path``).
        mode: "logprob" (default) or "generate" for ``verdict`` prompts; ``choice`` prompts always use log-probs.
        max_length: context budget in tokens (default: the model's ``max_position_embeddings``); longer prompts have
            their answer fields shortened proportionally and the verdict is flagged ``truncated``.
        batch_size, max_new_tokens (mode="generate"), show_progress.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str | None = None,
        mode: str = "logprob",
        max_length: int | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 512,
        show_progress: bool = True,
    ):
        if mode not in ("logprob", "generate"):
            raise JudgeError(f"mode must be 'logprob' or 'generate', got {mode!r}.")
        if getattr(tokenizer, "chat_template", None) is None:
            raise JudgeError("the judge's tokenizer has no chat template; use an instruction-tuned judge model.")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.name = name or str(getattr(getattr(model, "config", None), "name_or_path", "") or "local-judge")
        n_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = max_length or (n_pos if isinstance(n_pos, int) and n_pos > 0 else 4096)
        self.batch_size, self.max_new_tokens, self.show_progress = batch_size, max_new_tokens, show_progress
        self._warned = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        from trl.trainer.utils import hash_module

        self.cache_id = f"local:{self.name}:{hash_module(model)}:{mode}:{self.max_length}:{max_new_tokens}"

    # -- rendering
    def _render(self, messages, suffix: str = "") -> list[int]:
        """The chat-template ids of ``messages`` with the generation prompt, and ``suffix`` tokenized after it as the
        joined text tokenizes (the judge's template may lack a system role: then the system text is folded)."""
        messages = fold_system_turns(self.tokenizer, messages)
        if not suffix:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
            return list(out["input_ids"])
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, tail = encode_pieces(self.tokenizer, [text, suffix])
        return head + tail

    def _fit(self, prompt: JudgePrompt, suffix: str, reserve: int) -> tuple[list[int], bool, dict[str, str]]:
        """Prompt ids within ``max_length - reserve``, whether they were cut, and the answer fields they show (cut
        proportionally when needed)."""
        fields = dict(prompt.fields)
        budget = self.max_length - reserve
        ids = self._render(prompt.messages(fields), suffix)
        truncated = False
        for _ in range(8):
            if len(ids) <= budget:
                return ids, truncated, fields
            truncated = True
            ratio = max(0.0, (budget / len(ids)) * 0.9)
            fields = {k: v[: int(len(v) * ratio)] for k, v in fields.items()}
            ids = self._render(prompt.messages(fields), suffix)
        if len(ids) > budget:  # the instructions alone do not fit: keep the end (answers' remains, the question)
            if not self._warned:
                logger.warning(
                    "the judge prompt's instructions alone (%d tokens) exceed this judge's context (%d); "
                    "keeping the last %d tokens. Such verdicts are flagged truncated: use a judge with a "
                    "longer context for meaningful results.",
                    len(ids),
                    self.max_length,
                    budget,
                )
                self._warned = True
            ids = ids[-budget:]
        return ids, truncated, fields

    def _verdict_items(self, prompt: JudgePrompt, reserve: int) -> tuple[list[tuple[list[int], list[int]]], bool]:
        """``(context, label ids)`` for each of the five labels, and whether the prompt was cut. The chat text, the
        verdict prefix and the label are tokenized as one text ("…My final verdict is: [[A>>B]]"); the context is
        the ids the five texts share (a tokenizer may merge "[[" with the label), cut to ``max_length - reserve``."""
        _, truncated, fields = self._fit(prompt, VERDICT_PREFIX, reserve)
        messages = fold_system_turns(self.tokenizer, prompt.messages(fields))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        fulls = [
            list(self.tokenizer(text + VERDICT_PREFIX + label + "]]", add_special_tokens=False)["input_ids"])
            for label in VERDICT_LABELS
        ]
        common = len(fulls[0])
        for other in fulls[1:]:
            same = next((k for k, (a, b) in enumerate(zip(fulls[0], other)) if a != b), min(len(fulls[0]), len(other)))
            common = min(common, same)
        context = fulls[0][:common][-(self.max_length - reserve) :]
        return [(context, full[common:]) for full in fulls], truncated

    def _choice_ids(self, choices) -> list[int]:
        """Each choice's token as it follows the generation prompt (the judge's first reply token)."""
        probe = [{"role": "user", "content": "Which is better?"}]
        context = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        ids = []
        for c in choices:
            enc = encode_pieces(self.tokenizer, [context, c])[1]
            if len(enc) != 1:
                raise JudgeError(
                    f"choice {c!r} is {len(enc)} tokens after this judge's generation prompt; it must be one."
                )
            ids.append(enc[0])
        return ids

    # -- judging
    def judge(self, prompts: Sequence[JudgePrompt]) -> list[Verdict | None]:
        out: list[Verdict | None] = [None] * len(prompts)
        choice = [i for i, p in enumerate(prompts) if p.kind == "choice"]
        verdict = [i for i, p in enumerate(prompts) if p.kind == "verdict"]
        if choice:
            self._judge_choice(prompts, choice, out)
        if verdict:
            (self._judge_verdict_logprob if self.mode == "logprob" else self._judge_verdict_generate)(
                prompts, verdict, out
            )
        return out

    def _judge_choice(self, prompts, idx, out):
        from treg.scoring import next_token_logprobs

        fitted = [self._fit(prompts[i], "", 1) for i in idx]
        by_choices: dict[tuple, list[int]] = {}
        for j, i in enumerate(idx):
            by_choices.setdefault(tuple(prompts[i].choices), []).append(j)
        for choices, js in by_choices.items():
            logps = next_token_logprobs(
                self.model,
                [fitted[j][0] for j in js],
                self._choice_ids(choices),
                batch_size=self.batch_size,
                pad_token_id=self.pad_id,
                desc="Judging",
                show_progress=self.show_progress,
            )
            for row, j in zip(logps, js):
                try:
                    p = _normalize(row)
                except FloatingPointError as e:
                    logger.warning("judge failure on prompt %d: %s", idx[j], e)
                    continue
                label = choices[int(np.argmax(p))]
                out[idx[j]] = Verdict(
                    p_first=float(p[0]),
                    label=label,
                    probs=dict(zip(choices, map(float, p))),
                    text=f"[log-prob judge] {label}",
                    truncated=fitted[j][1],
                )

    def _judge_verdict_logprob(self, prompts, idx, out):
        from treg.scoring import score_completions

        n = len(VERDICT_LABELS)
        reserve = max(len(self.tokenizer(label + "]]", add_special_tokens=False)["input_ids"]) for label in
                      VERDICT_LABELS) + 2
        fitted = [self._verdict_items(prompts[i], reserve) for i in idx]
        items = [item for label_items, _ in fitted for item in label_items]
        scores = score_completions(
            self.model,
            items,
            batch_size=self.batch_size * n,
            pad_token_id=self.pad_id,
            desc="Judging",
            show_progress=self.show_progress,
        )
        for j, i in enumerate(idx):
            try:
                p = _normalize([float(s.sum()) for s in scores[j * n : (j + 1) * n]])
            except FloatingPointError as e:
                logger.warning("judge failure on prompt %d: %s", i, e)
                continue
            label = VERDICT_LABELS[int(np.argmax(p))]
            probs = dict(zip(VERDICT_LABELS, map(float, p)))
            out[i] = Verdict(
                p_first=LABEL_P_FIRST[label],
                label=label,
                probs=probs,
                text=f"[log-prob judge] {VERDICT_PREFIX}{label}]]",
                truncated=fitted[j][1],
            )

    def _judge_verdict_generate(self, prompts, idx, out):
        convs = {i: prompts[i].messages() for i in idx}
        texts = {i: "" for i in idx}
        pending = list(idx)
        attempts = dict.fromkeys(idx, 0)
        labels: dict[int, str | None] = {}
        for _ in range(2):  # the first judgment, then one re-prompt on a miss (official number_of_judgment_attempts)
            if not pending:
                break
            ids = [self._fit_conv(convs[i]) for i in pending]
            gens = generate(
                self.model,
                self.tokenizer,
                ids,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                show_progress=self.show_progress,
                desc="Judging",
            )
            again = []
            for i, g in zip(pending, gens):
                attempts[i] += 1
                texts[i] += "\n" + g[0]
                label, try_again = parse_verdict(texts[i], prompts[i].regex)
                labels[i] = label
                convs[i] = convs[i] + [{"role": "assistant", "content": g[0]}]
                if try_again and prompts[i].reprompt:
                    convs[i] = convs[i] + [{"role": "user", "content": prompts[i].reprompt}]
                    again.append(i)
            pending = again
        for i in idx:
            label = labels.get(i)
            if label in LABEL_P_FIRST:
                out[i] = Verdict(p_first=LABEL_P_FIRST[label], label=label, text=texts[i], attempts=attempts[i])

    def _fit_conv(self, messages) -> list[int]:
        ids = self._render(messages)
        budget = self.max_length - self.max_new_tokens
        return ids[-budget:] if len(ids) > budget else ids  # keep the end: the answers' tail and the question to it


# --------------------------------------------------------------------------------------------- endpoint judge
class EndpointError(RuntimeError):
    """An HTTP failure of the judge endpoint (status and a short body; never the API key)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class EndpointJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (an API, or ``vllm serve`` on a port).

    Args:
        model: the model name the server expects. base_url: e.g. ``https://api.openai.com/v1`` or
            ``http://localhost:8000/v1``.
        api_key_env: name of the environment variable holding the key (read at each call; a local server may need
            none). The key is sent only in the ``Authorization`` header.
        temperature, max_tokens: for ``verdict`` prompts (the official Arena-Hard judge uses 0 and 4096).
        use_logprobs: ask for log-probs on ``choice`` prompts (falls back to text if the server refuses or omits them).
        top_logprobs, parallel (concurrent requests), timeout (s), retries (per request, with exponential backoff on
        timeouts, 429 and 5xx), backoff (s).
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 4096,
        use_logprobs: bool = True,
        top_logprobs: int = 20,
        parallel: int = 8,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        name: str | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"base_url {base_url!r} must start with http:// or https://.")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env, self.temperature, self.max_tokens = api_key_env, temperature, max_tokens
        self.use_logprobs, self.top_logprobs = use_logprobs, top_logprobs
        self.parallel, self.timeout, self.retries, self.backoff = max(1, parallel), timeout, retries, backoff
        self.name = name or model
        self.cache_id = f"endpoint:{self.base_url}:{model}:{temperature}:{max_tokens}:{use_logprobs}"
        self._logprobs_ok = use_logprobs
        self.n_requests = 0

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _redact(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            self.n_requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    return json.loads(r.read().decode())
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode(errors="replace")[:300])
                last = EndpointError(f"HTTP {e.code} from {self.base_url}: {detail}", e.code == 429 or e.code >= 500)
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = EndpointError(f"{type(e).__name__} calling {self.base_url}: {self._redact(str(e))}", True)
            if not last.retryable or attempt == self.retries:
                break
            time.sleep(self.backoff * 2**attempt)
        raise last  # type: ignore[misc]

    def _choice(self, prompt: JudgePrompt) -> Verdict | None:
        payload = {"model": self.model, "messages": prompt.messages(), "max_tokens": 1, "temperature": 0.0}
        if self._logprobs_ok:
            payload.update(logprobs=True, top_logprobs=self.top_logprobs)
        try:
            resp = self._post(payload)
        except EndpointError as e:
            if self._logprobs_ok and not e.retryable:  # e.g. a 400: this server does not do logprobs
                logger.warning("endpoint refused logprobs (%s); parsing text from now on", e)
                self._logprobs_ok = False
                return self._choice(prompt)
            raise
        choice = (resp.get("choices") or [{}])[0]
        text = ((choice.get("message") or {}).get("content") or "").strip()
        top = ((((choice.get("logprobs") or {}).get("content")) or [{}])[0] or {}).get("top_logprobs") or []
        lp = {}
        for t in top:
            tok = str(t.get("token", "")).strip()
            if tok in prompt.choices and tok not in lp:
                lp[tok] = float(t["logprob"])
        if lp:
            ls = [lp.get(c, -math.inf) for c in prompt.choices]
            p = np.exp(np.asarray(ls) - max(ls))
            p = p / p.sum()
            label = prompt.choices[int(np.argmax(p))]
            return Verdict(p_first=float(p[0]), label=label, text=text, probs=dict(zip(prompt.choices, p.tolist())))
        if text in prompt.choices:
            return Verdict(p_first=1.0 if text == prompt.choices[0] else 0.0, label=text, text=text)
        logger.warning("judge answer %r is none of %s", text[:40], list(prompt.choices))
        return None

    def _verdict(self, prompt: JudgePrompt) -> Verdict | None:
        conv = prompt.messages()
        judgment, label = "", None
        attempts = 0
        for _ in range(2):  # official: number_of_judgment_attempts = 2
            attempts += 1
            resp = self._post(
                {"model": self.model, "messages": conv, "max_tokens": self.max_tokens, "temperature": self.temperature}
            )
            new = ((resp.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
            judgment += "\n" + new
            label, try_again = parse_verdict(judgment, prompt.regex)
            conv = conv + [{"role": "assistant", "content": new}]
            if not try_again or not prompt.reprompt:
                break
            conv = conv + [{"role": "user", "content": prompt.reprompt}]
        if label not in LABEL_P_FIRST:
            return None
        return Verdict(p_first=LABEL_P_FIRST[label], label=label, text=judgment, attempts=attempts)

    def _one(self, prompt: JudgePrompt) -> Verdict | None:
        try:
            return self._choice(prompt) if prompt.kind == "choice" else self._verdict(prompt)
        except EndpointError as e:
            logger.warning("judge request failed: %s", e)
            return None

    def judge(self, prompts: Sequence[JudgePrompt]) -> list[Verdict | None]:
        if self.parallel == 1 or len(prompts) <= 1:
            return [self._one(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            return list(pool.map(self._one, prompts))


# ------------------------------------------------------------------------------------------------------ cache
class JudgmentCache:
    """Verdicts on disk under ``directory``: shard files ``<n>.json`` each written atomically (temp + os.replace),
    loaded as the union of all shards. Keyed by sha256(judge.cache_id, prompt)."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.entries: dict[str, dict] = {}
        if directory:
            os.makedirs(directory, exist_ok=True)
            for name in sorted(os.listdir(directory)):
                if name.endswith(".json") and not name.startswith("."):
                    try:
                        with open(os.path.join(directory, name)) as f:
                            self.entries.update(json.load(f))
                    except (OSError, json.JSONDecodeError) as e:  # a shard from another tool; never ours half-written
                        logger.warning("skipping unreadable judgment cache shard %s: %s", name, e)

    @staticmethod
    def key(judge: PairwiseJudge, prompt: JudgePrompt) -> str:
        return hashlib.sha256(f"{judge.cache_id}\n{prompt.key()}".encode()).hexdigest()

    def get(self, key: str) -> Verdict | None:
        d = self.entries.get(key)
        return Verdict.from_json(d) if d is not None else None

    def put_many(self, items: dict[str, Verdict]) -> None:
        if not items:
            return
        data = {k: asdict(v) for k, v in items.items()}
        self.entries.update(data)
        if not self.directory:
            return
        name = f"{time.time_ns()}-{os.getpid()}-{hashlib.sha256(''.join(sorted(items)).encode()).hexdigest()[:8]}"
        write_json_atomic(os.path.join(self.directory, name + ".json"), data)


# --------------------------------------------------------------------------------------------- both orders
@dataclass
class JudgeStats:
    """What happened: prompts judged now, loaded from cache, failed after retries; pairs that failed."""

    judged: int = 0
    cached: int = 0
    failed_prompts: int = 0
    failed_pairs: int = 0
    truncated_prompts: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)


def run_judge(
    judge: PairwiseJudge,
    prompts: Sequence[JudgePrompt],
    cache: JudgmentCache | None = None,
    *,
    retries: int = 1,
    chunk_size: int = 64,
    show_progress: bool = True,
    stats: JudgeStats | None = None,
) -> list[Verdict | None]:
    """Verdicts for ``prompts`` (same order): cached ones loaded, the rest judged in chunks (each chunk cached before
    the next starts), failures re-judged up to ``retries`` more times and then returned as None and counted."""
    from tqdm.auto import tqdm

    cache = cache or JudgmentCache(None)
    stats = stats if stats is not None else JudgeStats()
    keys = [JudgmentCache.key(judge, p) for p in prompts]
    out: list[Verdict | None] = [cache.get(k) for k in keys]
    stats.cached += sum(v is not None for v in out)
    todo = [i for i, v in enumerate(out) if v is None]
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    for attempt in range(retries + 1):
        if not todo:
            break
        if attempt:
            stats.retries += len(todo)
            logger.info("retrying %d failed judgments (attempt %d of %d)", len(todo), attempt + 1, retries + 1)
        for start in tqdm(range(0, len(todo), chunk_size), desc=f"Judging ({judge.name})", disable=disable):
            chunk = todo[start : start + chunk_size]
            verdicts = judge.judge([prompts[i] for i in chunk])
            if len(verdicts) != len(chunk):
                raise JudgeError(f"judge {judge.name} returned {len(verdicts)} verdicts for {len(chunk)} prompts.")
            new = {}
            for i, v in zip(chunk, verdicts):
                if v is not None and not (isinstance(v.p_first, float) and math.isfinite(v.p_first)):
                    v = None
                out[i] = v
                if v is not None:
                    new[keys[i]] = v
                    stats.judged += 1
            cache.put_many(new)
        todo = [i for i in todo if out[i] is None]
    stats.failed_prompts += len(todo)
    stats.truncated_prompts += sum(1 for v in out if v is not None and v.truncated)
    return out


@dataclass
class PairResult:
    """Both orders of one pair (x, y): ``p`` = P(x better) averaged over the orders, or None if either failed."""

    p: float | None
    forward: Verdict | None  # x shown first
    backward: Verdict | None  # y shown first

    @property
    def position_biased(self) -> bool | None:
        """The same position won in both orders (the verdict flips when the answers are swapped)."""
        if self.forward is None or self.backward is None:
            return None
        return bool((self.forward.p_first - 0.5) * (self.backward.p_first - 0.5) > 0)


def combine_orders(forward: Verdict | None, backward: Verdict | None) -> float | None:
    """P(x better) from the verdicts on (x, y) and on (y, x): (p_xy + 1 − p_yx) / 2; None if either failed."""
    if forward is None or backward is None:
        return None
    return 0.5 * (forward.p_first + 1.0 - backward.p_first)


def judge_both_orders(
    judge: PairwiseJudge,
    make_prompt: Callable[[Any, str, str], JudgePrompt],
    pairs: Sequence[tuple[Any, str, str]],
    cache: JudgmentCache | None = None,
    *,
    retries: int = 1,
    show_progress: bool = True,
    stats: JudgeStats | None = None,
) -> list[PairResult]:
    """Judge each ``(item, x, y)`` as ``make_prompt(item, x, y)`` and ``make_prompt(item, y, x)``."""
    stats = stats if stats is not None else JudgeStats()
    prompts = []
    for item, x, y in pairs:
        prompts += [make_prompt(item, x, y), make_prompt(item, y, x)]
    verdicts = run_judge(judge, prompts, cache, retries=retries, show_progress=show_progress, stats=stats)
    results = [
        PairResult(combine_orders(verdicts[2 * i], verdicts[2 * i + 1]), verdicts[2 * i], verdicts[2 * i + 1])
        for i in range(len(pairs))
    ]
    stats.failed_pairs += sum(r.p is None for r in results)
    return results


# ------------------------------------------------------------------------------------------------- factory
def build_judge(
    spec: str,
    *,
    device: str | None = None,
    batch_size: int = 8,
    mode: str = "logprob",
    api_key_env: str = "OPENAI_API_KEY",
    max_tokens: int = 4096,
    parallel: int = 8,
    show_progress: bool = True,
    judge_model=None,
) -> PairwiseJudge:
    """A judge from a spec string:

    * ``treg:tiny`` — the embedded tiny model (mechanics only; its verdicts mean nothing);
    * ``hf:PATH`` or a local path / hub id — a local HF causal LM, :class:`LocalLogprobJudge`;
    * ``openai:MODEL@BASE_URL`` — :class:`EndpointJudge` (``openai:gpt-4-1106-preview@https://api.openai.com/v1``,
      ``openai:Qwen/Qwen2.5-72B-Instruct@http://localhost:8000/v1``).

    ``judge_model`` = (model, tokenizer) skips loading (e.g. the policy itself judging in a test).
    """
    if spec.startswith("openai:"):
        rest = spec[len("openai:") :]
        if "@" not in rest:
            raise JudgeError(
                f"judge {spec!r}: write openai:MODEL@BASE_URL, e.g. openai:gpt-4-1106-preview@"
                "https://api.openai.com/v1 or openai:my-judge@http://localhost:8000/v1."
            )
        model, url = rest.rsplit("@", 1)
        return EndpointJudge(model, url, api_key_env=api_key_env, max_tokens=max_tokens, parallel=parallel)
    if judge_model is not None:
        model, tokenizer = judge_model
    else:
        from treg.models import load_causal_lm

        model, tokenizer = load_causal_lm(spec[3:] if spec.startswith("hf:") else spec, device=device, inference=True)
    return LocalLogprobJudge(model, tokenizer, name=spec, mode=mode, batch_size=batch_size, show_progress=show_progress)
