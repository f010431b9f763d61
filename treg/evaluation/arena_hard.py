"""Arena-Hard (Li et al. 2024, arXiv:2406.11939), native and faithful to lmarena/arena-hard-auto.

Judging (``gen_judgment.py``): for every question two games against the baseline's answer, game 1 with the baseline
as assistant A and the model as B, game 2 swapped; the official system prompt and template
(``eval/arena_hard/arena-hard-v0.1.yaml``); the verdict parsed with ``\\[\\[([AB<>=]+)\\]\\]`` and one re-prompt on a
miss (:func:`treg.evaluation.judges.parse_verdict`).

Scoring (v0.1 ``show_result.py`` / ``utils_math.py``): each game becomes a battle model_a = baseline vs model_b =
model (game 2's labels read mirrored); ``A>>B`` / ``B>>A`` count 3 times (``--weight``); a game without a valid label
is dropped *and counted* (the official script drops it silently). Bradley–Terry by maximum likelihood as a logistic
regression without intercept on ``±ln 10`` columns, every battle duplicated and a tie split into one win each
(:func:`fit_bt`); Elo = 400·β + 1000 with the baseline anchored at 1000; the score is the full-data fit's win rate
against the baseline, ``1 / (1 + 10^((R_baseline − R_model)/400))``, and the 95% interval the 2.5/97.5 percentiles of
100 bootstrap fits on battles resampled with replacement. Style control (the official ``--style-control``,
``--length-control-only``, ``--markdown-control-only``) adds normalised length and markdown-count differences as
features of an L2-regularised (C = 1) fit, as the official ``construct_style_matrices`` / ``fit_bt`` do.

The fit is a batched Newton solver over the sufficient statistics (all bootstrap rounds at once), not sklearn in a
loop; ``tests/test_eval_arena_hard.py`` checks it against sklearn's ``LogisticRegression`` set up as the official code
does, and ``bench/arena_hard_bootstrap.py`` times it on 500 questions.

Files: questions (``{uid, category, prompt}``; the older ``{question_id, turns}`` is read too), model answers
(``{uid, model, messages: [user, {assistant, content: {answer}}]}`` or the older ``{question_id, model_id, choices}``),
judgments ``model_judgment/<judge>/<model>.jsonl`` with ``{question_id, uid, category, model, judge, baseline,
games: [{user_prompt, judgment, score}, …]}`` (v0.1's keys plus v2.0's ``uid``/``category``/``baseline``), so the
official ``show_result.py`` reads what treg writes and :func:`show` reads what it writes.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import yaml

from treg.evaluation import data
from treg.evaluation.judges import (
    LABEL_P_FIRST,
    STRONG_LABELS,
    JudgeError,
    JudgePrompt,
    JudgeStats,
    JudgmentCache,
    PairwiseJudge,
    run_judge,
)
from treg.files import UserError

logger = logging.getLogger(__name__)

LN10 = math.log(10.0)
STYLE_FEATURES = ("token_len", "header_count", "list_count", "bold_count")
STYLE_MODES = {"style": (0, 1, 2, 3), "length": (0,), "markdown": (1, 2, 3)}


class ArenaHardError(UserError):
    """Malformed Arena-Hard files or settings; the message names the file, row and field."""


# ------------------------------------------------------------------------------------------------------ files
def load_judge_config(bench: str = "v0.1", path: str | None = None) -> dict:
    """The judge settings of ``eval/arena_hard/arena-hard-<bench>.yaml`` (shipped with treg) or of ``path``."""
    path = path or data.asset("arena_hard", f"arena-hard-{bench}.yaml")
    if not os.path.isfile(path):
        raise ArenaHardError(f"Arena-Hard judge config {path!r} not found (bench {bench!r}: v0.1 or v2.0).")
    with open(path) as f:
        return yaml.safe_load(f)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ArenaHardError(f"{path!r} does not exist; pass an existing JSON-lines file (or leave the flag out to use "
                             "the data manifest).")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ArenaHardError(f"{path} line {n}: not JSON ({e.msg}).") from e
    except UnicodeDecodeError as e:
        raise ArenaHardError(f"{path}: not UTF-8 text (byte {e.start}); expected JSON lines.") from e
    return rows


def load_questions(path: str) -> list[dict]:
    """``[{"uid", "category", "prompt"}]`` from a question.jsonl (v0.1/v2.0 ``uid``/``prompt`` or older
    ``question_id``/``turns``)."""
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        uid = row.get("uid", row.get("question_id"))
        prompt = row.get("prompt")
        if prompt is None and row.get("turns"):
            prompt = row["turns"][0]["content"]
        if uid is None or not isinstance(prompt, str):
            raise ArenaHardError(f"{path} line {n}: needs 'uid' and 'prompt' (or 'question_id' and 'turns').")
        out.append({"uid": str(uid), "category": row.get("category", "arena-hard-v0.1"), "prompt": prompt})
    return out


def load_answers(path: str) -> tuple[str, dict[str, str], dict[str, dict]]:
    """(model name, uid → answer text, uid → metadata) from a model_answer jsonl in either official format.

    Metadata is the row's ``metadata`` (v2.0) or ``conv_metadata`` (v0.1 with style counts), else ``{"token_len"}``
    from ``choices[0].turns[0].token_len`` (v0.1): the stored counts that the official scripts use."""
    model, answers, meta = None, {}, {}
    for n, row in enumerate(_read_jsonl(path), 1):
        uid = row.get("uid", row.get("question_id"))
        name = row.get("model", row.get("model_id"))
        try:
            if "messages" in row:
                content = row["messages"][-1]["content"]
                text = content["answer"] if isinstance(content, dict) else content
            else:
                text = row["choices"][0]["turns"][0]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise ArenaHardError(
                f"{path} line {n}: no answer at messages[-1].content.answer or choices[0].turns[0].content ({e!r})."
            ) from e
        if uid is None or name is None:
            raise ArenaHardError(f"{path} line {n}: needs 'uid' (or 'question_id') and 'model' (or 'model_id').")
        model = model or name
        answers[str(uid)] = text
        stored = row.get("metadata") or row.get("conv_metadata")
        if not isinstance(stored, dict):
            turn = (row.get("choices") or [{}])[0].get("turns", [{}])[0] if "choices" in row else {}
            stored = {"token_len": turn["token_len"]} if isinstance(turn, dict) and "token_len" in turn else None
        if stored is not None:
            length = stored.get("token_len")
            if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float)) or length < 0):
                raise ArenaHardError(f"{path} line {n}: token_len must be a non-negative number, got {length!r}.")
            meta[str(uid)] = stored
    if model is None:
        raise ArenaHardError(f"{path}: no answers.")
    return model, answers, meta


# -------------------------------------------------------------------------------------------- style features
_CODE = re.compile("```([^`]*)```")


def token_counter():
    """(count(text) → int, name): tiktoken's gpt-4o encoding as arena-hard-auto's ``add_markdown_info.py`` uses when it
    is available offline, else a word/punctuation count (only ratios of the two answers' counts enter the fit)."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding("o200k_base")
        return (lambda t: len(enc.encode(t, disallowed_special=()))), "tiktoken:o200k_base"
    except Exception:  # not installed, or its encoding file cannot be downloaded here
        pattern = re.compile(r"\w+|[^\w\s]")
        return (lambda t: len(pattern.findall(t))), "regex-words"


def markdown_metadata(answer: str, count_tokens) -> dict:
    """Length and markdown counts of an answer, as arena-hard-auto's ``add_markdown_info.py`` counts them (code blocks
    removed before counting markdown; the token count on the full answer)."""
    text = answer
    for block in _CODE.findall(answer):
        text = text.replace(block, "")
    return {
        "token_len": count_tokens(answer),
        "header_count": {f"h{i}": len(re.findall(rf"^#{{{i}}}\s", text, re.MULTILINE)) for i in range(1, 7)},
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE)),
        },
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)), "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def _feature_vector(meta: dict) -> list[float]:
    return [float(meta[k] if isinstance(meta[k], (int, float)) else sum(meta[k].values())) for k in STYLE_FEATURES]


# ---------------------------------------------------------------------------------------------------- judging
def make_prompt(config: dict, category: str, question: str, answer_a: str, answer_b: str) -> JudgePrompt:
    """The official judge prompt for one game (assistant A's and B's answers)."""
    cats = config["categories"]
    setting = cats.get(category) or next(iter(cats.values()))
    return JudgePrompt(
        user_template=config["prompt_template"],
        fields=(("QUESTION", question), ("ANSWER_A", answer_a), ("ANSWER_B", answer_b)),
        system=setting["system_prompt"],
        kind="verdict",
        regex=config["regex_pattern"],
        reprompt=config["reprompt"],
    )


def judge_model(
    judge: PairwiseJudge,
    config: dict,
    questions: Sequence[dict],
    answers: dict[str, str],
    model: str,
    baseline_answers: dict[str, dict[str, str]],
    cache: JudgmentCache | None = None,
    *,
    retries: int = 1,
    show_progress: bool = True,
    stats: JudgeStats | None = None,
) -> list[dict]:
    """Judgment records (official format) for ``model`` on ``questions``: two games each against the baseline of the
    question's category. ``baseline_answers``: baseline model name → uid → answer."""
    prompts, meta = [], []
    for q in questions:
        base_name = _baseline_for(config, q["category"])
        if base_name not in baseline_answers:
            raise ArenaHardError(
                f"question {q['uid']} (category {q['category']!r}) needs answers of the baseline "
                f"{base_name!r}; pass --baseline-answers FILE with them."
            )
        if q["uid"] not in baseline_answers[base_name]:
            raise ArenaHardError(f"baseline {base_name!r} has no answer to question {q['uid']}.")
        if q["uid"] not in answers:
            raise ArenaHardError(f"model {model!r} has no answer to question {q['uid']}.")
        base, ans = baseline_answers[base_name][q["uid"]], answers[q["uid"]]
        prompts += [
            make_prompt(config, q["category"], q["prompt"], base, ans),  # game 1: baseline is A
            make_prompt(config, q["category"], q["prompt"], ans, base),
        ]  # game 2: model is A
        meta.append((q, base_name))
    verdicts = run_judge(judge, prompts, cache, retries=retries, show_progress=show_progress, stats=stats)
    records = []
    for i, (q, base_name) in enumerate(meta):
        games = []
        for g in (0, 1):
            v, p = verdicts[2 * i + g], prompts[2 * i + g]
            game = {
                "user_prompt": p.messages()[-1]["content"],
                "judgment": v.text if v else None,
                "score": v.label if v else None,
            }
            if v is not None and v.probs:
                game["probs"] = v.probs
            games.append(game)
        records.append(
            {
                "question_id": q["uid"],
                "uid": q["uid"],
                "category": q["category"],
                "model": model,
                "judge": judge.name,
                "baseline": base_name,
                "games": games,
            }
        )
    return records


def _baseline_for(config: dict, category: str) -> str:
    cats = config["categories"]
    return (cats.get(category) or next(iter(cats.values())))["baseline"]


def write_judgments(directory: str, judge_name: str, model: str, records: list[dict]) -> str:
    """``<directory>/<judge_name>/<model>.jsonl`` (names with ``/`` keep their last part, as the official loader)."""
    from treg.files import write_text_atomic

    path = os.path.join(directory, _safe(judge_name), f"{_safe(model)}.jsonl")
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name.rstrip("/").split("/")[-1]) or "model"


def judgment_files(path: str) -> list[str]:
    """The judgment files behind ``path``: a ``.jsonl`` file, a ``model_judgment/<judge>`` folder, a
    ``model_judgment`` folder with one judge, or the run folder ``treg eval arena-hard`` prints (which holds
    ``model_judgment/<judge>/``)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ArenaHardError(
            f"judgments {path!r} not found; pass the run folder printed by `treg eval arena-hard`, a "
            "model_judgment/<judge> folder or a .jsonl file."
        )
    files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
    if files:
        return files
    base = os.path.join(path, "model_judgment") if os.path.isdir(os.path.join(path, "model_judgment")) else path
    judges = sorted(
        d for d in os.listdir(base) if glob.glob(os.path.join(base, d, "*.jsonl")) and d != "judgment_cache"
    )
    if len(judges) == 1:
        return sorted(glob.glob(os.path.join(base, judges[0], "*.jsonl")))
    if judges:
        raise ArenaHardError(
            f"{base!r} holds the judgments of several judges ({', '.join(judges)}); pass --judgments "
            f"{os.path.join(base, '<judge>')} for one of them."
        )
    raise ArenaHardError(
        f"no judgment files (*.jsonl) in {path!r}; expected a run folder of `treg eval arena-hard` or "
        "model_judgment/<judge>/."
    )


def load_judgments(directory: str) -> list[dict]:
    """All records of the judgment files behind ``directory`` (see :func:`judgment_files`)."""
    records = []
    for path in judgment_files(directory):
        for n, row in enumerate(_read_jsonl(path), 1):
            if "games" not in row or "model" not in row:
                raise ArenaHardError(f"{path} line {n}: a judgment needs 'model' and 'games'.")
            row.setdefault("question_id", row.get("uid"))
            records.append(row)
    return records


# ---------------------------------------------------------------------------------------------------- battles
@dataclass
class Battles:
    """Battles (one row per counted outcome, ``>>`` already expanded ``weight`` times): model_a is the baseline."""

    model_a: list[str] = field(default_factory=list)
    model_b: list[str] = field(default_factory=list)
    winner: list[str] = field(default_factory=list)  # "model_a" | "model_b" | "tie"
    uid: list[str] = field(default_factory=list)
    invalid_games: dict[str, int] = field(default_factory=dict)  # model → games without a valid label

    def __len__(self):
        return len(self.winner)


def battles_from_judgments(
    records: Sequence[dict], baseline: str | None = None, weight: int = 3, first_game_only: bool = False
) -> Battles:
    """Official ``get_battles_from_row``: game 1 as judged (A = baseline), game 2 mirrored (A = model)."""
    out = Battles()
    for r in records:
        base = r.get("baseline") or baseline or "gpt-4-0314"
        model = r["model"]
        for g, game in enumerate(r["games"][: 1 if first_game_only else 2]):
            label = game.get("score") if isinstance(game, dict) else None
            if label not in LABEL_P_FIRST:
                out.invalid_games[model] = out.invalid_games.get(model, 0) + 1
                continue
            p_a = LABEL_P_FIRST[label] if g == 0 else 1.0 - LABEL_P_FIRST[label]  # P(baseline better)
            winner = "tie" if p_a == 0.5 else ("model_a" if p_a == 1.0 else "model_b")
            n = weight if label in STRONG_LABELS else 1
            out.model_a += [base] * n
            out.model_b += [model] * n
            out.winner += [winner] * n
            out.uid += [str(r.get("uid", r.get("question_id")))] * n
    return out


# -------------------------------------------------------------------------------------------- Bradley–Terry
def _newton_logistic(
    X: np.ndarray,
    y: np.ndarray,
    W: np.ndarray,
    ridge: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-10,
    bound: float = 12.0,
) -> np.ndarray:
    """argmin_β Σ_g W[r,g]·CE(y_g, σ(X_g·β)) + ridge/2·‖β‖² for every row r of W at once (Newton, step-capped).

    X: [G, d] distinct design rows; y: [G] soft targets in [0, 1]; W: [R, G] non-negative weights. Returns [R, d].
    Without ridge a separable problem has no finite optimum; β is then held within ±``bound`` (a win rate of
    σ(±12·ln 10) ≈ 1 − 1e-12, what "always wins" rounds to).
    """
    R, d = W.shape[0], X.shape[1]
    beta = np.zeros((R, d))
    eye = np.eye(d)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(beta @ X.T, -50, 50)))  # [R, G]
        grad = (W * (p - y)) @ X + ridge * beta  # [R, d]
        h = W * p * (1.0 - p)  # [R, G]
        H = np.einsum("rg,gi,gj->rij", h, X, X) + (ridge + 1e-9) * eye  # [R, d, d]
        step = np.linalg.solve(H, grad[..., None])[..., 0]
        step = np.clip(step, -2.0, 2.0)
        beta = np.clip(beta - step, -bound, bound)
        if np.max(np.abs(step)) < tol:
            break
    return beta


@dataclass
class BTResult:
    """Per model: Elo (baseline = 1000), win rate vs the baseline (%) and its bootstrap percentiles."""

    models: list[str]
    elo: np.ndarray
    boot_elo: np.ndarray  # [rounds, n_models]
    baseline: str
    style_coefs: dict[str, float] | None = None

    def win_rate(self, elo) -> np.ndarray:
        base = self.models.index(self.baseline)
        elo = np.asarray(elo, dtype=np.float64)
        return 100.0 / (1.0 + 10.0 ** ((elo[..., base : base + 1] - elo) / 400.0))

    def table(self) -> dict[str, dict[str, float]]:
        score = self.win_rate(self.elo)
        lower = self.win_rate(np.percentile(self.boot_elo, 2.5, axis=0))
        upper = self.win_rate(np.percentile(self.boot_elo, 97.5, axis=0))
        return {
            m: {"score": float(score[i]), "lower": float(lower[i]), "upper": float(upper[i]), "elo": float(self.elo[i])}
            for i, m in enumerate(self.models)
        }


def _design(battles: Battles, baseline: str):
    models = list(dict.fromkeys(battles.model_a + battles.model_b))
    if baseline not in models:
        raise ArenaHardError(f"baseline {baseline!r} is in no battle (models: {models}).")
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[m] for m in battles.model_a])
    b = np.array([index[m] for m in battles.model_b])
    y = np.array([{"model_a": 1.0, "model_b": 0.0, "tie": 0.5}[w] for w in battles.winner])
    return models, a, b, y


def fit_bt(
    battles: Battles,
    baseline: str,
    rounds: int = 100,
    seed: int = 42,
    style: str | None = None,
    features: dict[tuple[str, str], list[float]] | None = None,
) -> BTResult:
    """Bradley–Terry fit on all battles plus ``rounds`` bootstrap refits on battles resampled with replacement.

    Without ``style``: unregularised, baseline anchored at Elo 1000 (official ``compute_mle_elo``). With ``style`` in
    {"style", "length", "markdown"}: ``features`` maps (model, uid) → [token_len, headers, lists, bold] and the fit is
    the official style-controlled one (L2, C = 1, all models' coefficients free, then anchored).
    """
    if len(battles) == 0:
        raise ArenaHardError("no valid battles to fit (every game failed or had no verdict label).")
    models, a, b, y = _design(battles, baseline)
    n, p = len(y), len(models)
    base = models.index(baseline)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(np.float64) if rounds else np.zeros((0, n))
    if style is None:
        keys = a * (p * 3) + b * 3 + (y * 2).astype(int)  # distinct (a, b, outcome) groups
        uniq, inv = np.unique(keys, return_inverse=True)
        X = np.zeros((len(uniq), p))
        first = np.zeros(len(uniq), dtype=int)
        first[inv] = np.arange(n)
        X[np.arange(len(uniq)), a[first]] += LN10
        X[np.arange(len(uniq)), b[first]] -= LN10
        keep = [j for j in range(p) if j != base]  # anchor: β_baseline = 0
        W = np.zeros((1 + rounds, len(uniq)))
        np.add.at(W[0], inv, 1.0)
        if rounds:
            W[1:] = np.stack([np.bincount(inv, weights=c, minlength=len(uniq)) for c in counts])
        beta = np.zeros((1 + rounds, p))
        beta[:, keep] = _newton_logistic(X[:, keep], y[first], 2.0 * W)
        return BTResult(models, 400.0 * beta[0] + 1000.0, 400.0 * beta[1:] + 1000.0, baseline)
    if style not in STYLE_MODES or features is None:
        raise ArenaHardError(f"style must be one of {sorted(STYLE_MODES)} with features, got {style!r}.")
    cols = list(STYLE_MODES[style])
    fa = np.array([features[(m, u)] for m, u in zip(battles.model_a, battles.uid)])[:, cols]
    fb = np.array([features[(m, u)] for m, u in zip(battles.model_b, battles.uid)])[:, cols]
    diff, total = fa - fb, fa + fb + 1.0  # official: add_one, ratio on every control element
    diff = diff / total
    std, mean = diff.std(axis=0), diff.mean(axis=0)
    constant = std <= 1e-12 * (1.0 + np.abs(mean))  # a feature equal in every battle (rounding aside) explains nothing
    z = np.where(constant, 0.0, (diff - mean) / np.where(constant, 1.0, std))
    X = np.zeros((n, p + len(cols)))
    X[np.arange(n), a] += LN10
    X[np.arange(n), b] -= LN10
    X[:, p:] = z
    W = np.vstack([np.ones((1, n)), counts])
    beta = _newton_logistic(X, y, 2.0 * W, ridge=1.0)  # sklearn default C = 1 on the duplicated battles
    elo = 400.0 * beta[:, :p] + 1000.0
    elo -= elo[:, base : base + 1] - 1000.0
    names = [STYLE_FEATURES[c] for c in cols]
    return BTResult(models, elo[0], elo[1:], baseline, dict(zip(names, map(float, beta[0, p:]))))


# ------------------------------------------------------------------------------------------------------- show
class _Counter:
    """:func:`token_counter`, loaded on first use (tiktoken is imported only when some count is missing)."""

    def __init__(self):
        self.fn, self.name = None, None

    def __call__(self, text: str) -> int:
        if self.fn is None:
            self.fn, self.name = token_counter()
        return self.fn(text)


class _AnswerStats:
    """Token lengths and style counts of the answers: the ones the answer files store (``metadata``: model → uid →
    dict, :func:`load_answers`), counted from the text (``answers``: model → uid → text) only where not stored."""

    def __init__(self, answers: dict[str, dict[str, str]] | None, metadata: dict[str, dict[str, dict]] | None):
        self.answers, self.metadata, self.counter = answers or {}, metadata or {}, _Counter()

    def stored(self, model: str, uid: str) -> dict:
        return self.metadata.get(model, {}).get(uid) or {}

    def style_features(self, battles: Battles) -> dict[tuple[str, str], list[float]]:
        """(model, uid) → [token_len, headers, lists, bold] for every answer in a battle."""
        if not self.answers and not self.metadata:
            raise ArenaHardError(
                "style control needs the answers of every model and of the baseline "
                "(--answers-dir with model_answer/*.jsonl)."
            )
        features = {}
        for m, u in set(zip(battles.model_a + battles.model_b, battles.uid + battles.uid)):
            stored = self.stored(m, u)
            meta = {k: stored[k] for k in STYLE_FEATURES if stored.get(k) is not None}
            if len(meta) < len(STYLE_FEATURES):
                if u not in self.answers.get(m, {}):
                    raise ArenaHardError(f"style control: no answer of {m!r} to question {u}.")
                needed = self.counter if "token_len" not in meta else (lambda text: 0)  # count tokens only if absent
                counted = markdown_metadata(self.answers[m][u], needed)
                meta = {k: meta.get(k, counted[k]) for k in STYLE_FEATURES}
            features[(m, u)] = _feature_vector(meta)
        return features

    def average_tokens(self, model: str) -> tuple[float, str] | None:
        """(average token_len over the model's whole answer file, as the official table, and where the lengths came
        from), or None without answers."""
        if model in self.answers:
            lengths = []
            for uid, text in self.answers[model].items():
                length = self.stored(model, uid).get("token_len")
                lengths.append((float(length), True) if length is not None else (float(self.counter(text)), False))
        else:
            lengths = [(self.stored(model, u).get("token_len"), True) for u in self.metadata.get(model, {})]
        if not lengths or any(x is None for x, _ in lengths):
            return None
        n_stored = sum(1 for _, stored in lengths if stored)
        parts = ([f"stored token_len ({n_stored} answers)"] if n_stored else []) + (
            [f"counted with {self.counter.name} ({len(lengths) - n_stored} answers)"] if n_stored < len(lengths) else []
        )
        return float(np.mean([x for x, _ in lengths])), " + ".join(parts)


def score_judgments(
    records: Sequence[dict],
    baseline: str | None = None,
    *,
    weight: int = 3,
    rounds: int = 100,
    seed: int = 42,
    style: str | None = None,
    answers: dict[str, dict[str, str]] | None = None,
    metadata: dict[str, dict[str, dict]] | None = None,
    first_game_only: bool = False,
) -> dict:
    """Win rate vs the baseline with its 95% CI for every model in ``records``, plus counts of games without a valid
    verdict. ``answers`` (model → uid → text, baseline included) is needed for style control and average lengths;
    ``metadata`` (model → uid → the answer file's stored counts, :func:`load_answers`) supplies ``token_len`` and the
    markdown counts where stored, as the official scripts read them; only what is not stored is counted from the
    text, and each model's row says which (``token_len_source``; ``token_counter`` names the counter if one ran)."""
    baselines = {r.get("baseline") for r in records if r.get("baseline")}
    baseline = baseline or (baselines.pop() if len(baselines) == 1 else "gpt-4-0314")
    battles = battles_from_judgments(records, baseline, weight=weight, first_game_only=first_game_only)
    stats = _AnswerStats(answers, metadata)
    features = stats.style_features(battles) if style is not None else None
    result = fit_bt(battles, baseline, rounds=rounds, seed=seed, style=style, features=features)
    n_games: dict[str, int] = {}
    for r in records:
        n_games[r["model"]] = n_games.get(r["model"], 0) + len(r["games"][: 1 if first_game_only else 2])
    models, sources = {}, {}
    for m, row in result.table().items():
        row = dict(row)
        if m != baseline:
            row["n_games"] = n_games.get(m, 0)
            row["invalid_games"] = battles.invalid_games.get(m, 0)
            row["n_battles"] = sum(1 for x in battles.model_b if x == m)
        tokens = stats.average_tokens(m)
        if tokens:
            row["avg_tokens"], row["token_len_source"] = sources[m] = tokens
        models[m] = row
    distinct = {src for _, src in sources.values()}
    summary = "; ".join(f"{m}: {src}" for m, (_, src) in sorted(sources.items())) if len(distinct) > 1 else None
    return {
        "baseline": baseline,
        "weight": weight,
        "rounds": rounds,
        "style_control": style,
        "style_coefs": result.style_coefs,
        "token_counter": stats.counter.name,
        "token_len_source": distinct.pop() if len(distinct) == 1 else summary,
        "models": models,
    }


def format_table(scores: dict) -> str:
    """The official print-out: ``model | score | 95% CI | average #tokens`` sorted by score, plus invalid games."""
    lines = []
    for m, row in sorted(scores["models"].items(), key=lambda kv: -kv[1]["score"]):
        ci = f"({row['lower'] - row['score']:+.1f}, {row['upper'] - row['score']:+.1f})"
        tokens = f"{int(row['avg_tokens'])}" if "avg_tokens" in row else "-"
        invalid = f" | invalid games: {row['invalid_games']}/{row['n_games']}" if "n_games" in row else ""
        lines.append(f"{m:<30} | score: {row['score']:^5.1f} | 95% CI: {ci:^14} | average #tokens: {tokens}{invalid}")
    if scores.get("style_coefs"):
        lines.append("style coefficients: " + ", ".join(f"{k} {v:+.3f}" for k, v in scores["style_coefs"].items()))
    if scores.get("token_len_source"):
        lines.append(f"token lengths: {scores['token_len_source']}")
    return "\n".join(lines)


def show(
    judgments: str,
    baseline: str | None = None,
    *,
    answers_dir: str | None = None,
    style: str | None = None,
    weight: int = 3,
    rounds: int = 100,
    first_game_only: bool = False,
) -> dict:
    """Score existing judgment files in the official format: a run folder of ``treg eval arena-hard``, a
    ``model_judgment/<judge>`` directory or one file (:func:`judgment_files`). ``answers_dir``: model_answer files
    (their stored ``token_len`` and style counts are used; missing ones are counted)."""
    records = load_judgments(judgments)
    answers, metadata = None, None
    if answers_dir:
        files = sorted(glob.glob(os.path.join(answers_dir, "*.jsonl")))
        if not files:
            raise ArenaHardError(f"--answers-dir {answers_dir!r}: no model_answer files (*.jsonl).")
        answers, metadata = {}, {}
        for path in files:
            name, ans, meta = load_answers(path)
            answers[name], metadata[name] = ans, meta
    return score_judgments(
        records,
        baseline,
        weight=weight,
        rounds=rounds,
        style=style,
        answers=answers,
        metadata=metadata,
        first_game_only=first_game_only,
    )


def check_style(style: str | None) -> str | None:
    if style not in (None, *STYLE_MODES):
        raise JudgeError(f"--style-control must be one of {sorted(STYLE_MODES)}, got {style!r}.")
    return style
