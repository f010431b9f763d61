"""Arena-Hard scoring speed: Bradley–Terry fit + 100 bootstrap rounds on 500 questions (1000 games), treg's batched
Newton solver vs the official approach (sklearn LogisticRegression refit per round on the duplicated battle matrix),
with and without style control. The issue's target: under 2 s for the plain bootstrap.

    python bench/arena_hard_bootstrap.py [--questions 500] [--rounds 100]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

from treg.evaluation import arena_hard as ah

LABELS = ["A>>B", "A>B", "A=B", "B>A", "B>>A"]


def synthetic_records(n: int, seed: int = 0) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    recs = [
        {
            "question_id": f"q{i}",
            "model": "model",
            "judge": "bench",
            "games": [{"score": LABELS[rng.integers(5)]}, {"score": LABELS[rng.integers(5)]}],
        }
        for i in range(n)
    ]
    answers = {
        m: {
            f"q{i}": ("# h\n- item\n**b** " if m == "model" else "") + "word " * int(rng.integers(20, 400))
            for i in range(n)
        }
        for m in ("model", "gpt-4-0314")
    }
    return recs, answers


def official_like(battles: ah.Battles, rounds: int, seed: int = 42) -> float:
    """The official loop: for each round resample battles and refit sklearn's LogisticRegression (penalty None)."""
    from sklearn.linear_model import LogisticRegression

    models = list(dict.fromkeys(battles.model_a + battles.model_b))
    idx = {m: i for i, m in enumerate(models)}
    a = np.array([idx[m] for m in battles.model_a])
    b = np.array([idx[m] for m in battles.model_b])
    w = np.array(battles.winner)
    rng = np.random.default_rng(seed)
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn ≥ 1.8 deprecates penalty=None
    t0 = time.perf_counter()
    for _ in range(rounds + 1):
        s = rng.integers(0, len(w), len(w))
        n = 2 * len(s)
        X = np.zeros((n, len(models)))
        X[np.arange(n), np.concatenate([a[s], a[s]])] = math.log(10)
        X[np.arange(n), np.concatenate([b[s], b[s]])] = -math.log(10)
        ws = np.concatenate([w[s], w[s]])
        Y = (ws == "model_a").astype(float)
        tie = ws == "tie"
        tie[n // 2 :] = False
        Y[tie] = 1.0
        LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8).fit(X, Y)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    recs, answers = synthetic_records(args.questions)
    battles = ah.battles_from_judgments(recs, "gpt-4-0314")
    ah.score_judgments(recs[:10], "gpt-4-0314", rounds=2)  # warm-up (imports)
    t0 = time.perf_counter()
    plain = ah.score_judgments(recs, "gpt-4-0314", rounds=args.rounds)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    styled = ah.score_judgments(recs, "gpt-4-0314", rounds=args.rounds, style="style", answers=answers)
    t_style = time.perf_counter() - t0
    t_official = official_like(battles, args.rounds)
    row, srow = plain["models"]["model"], styled["models"]["model"]
    print(f"{args.questions} questions, {len(battles)} battles, {args.rounds} bootstrap rounds")
    print(
        f"treg plain BT + bootstrap:      {t_plain:6.3f} s  (win rate {row['score']:.1f}, "
        f"95% CI {row['lower']:.1f}–{row['upper']:.1f})"
    )
    print(
        f"treg style control + bootstrap: {t_style:6.3f} s  (win rate {srow['score']:.1f}, "
        f"95% CI {srow['lower']:.1f}–{srow['upper']:.1f})"
    )
    print(f"official-style sklearn loop:    {t_official:6.3f} s  (ratio {t_official / t_plain:.1f}x)")
    print("target (issue 4): plain bootstrap < 2 s:", "OK" if t_plain < 2.0 else "MISSED")


if __name__ == "__main__":
    main()
