"""Arena-Hard: battles from games (mirrored game 2, ``>>`` weighted 3), the Bradley–Terry fit against hand arithmetic
and against sklearn set up as the official code, bootstrap speed, style control, the official prompt, and ``show`` on
judgment files written in the official v0.1 format."""

import json
import math
import time

import numpy as np
import pytest

from treg.evaluation import arena_hard as ah
from treg.evaluation.cli import main as eval_main
from treg.evaluation.judges import JudgeStats, Verdict


def _record(uid, model, s1, s2, judge="gpt-4-1106-preview"):
    """One judgment line in the official v0.1 format (gen_judgment.py): no baseline/category/uid keys."""
    return {
        "question_id": uid,
        "model": model,
        "judge": judge,
        "games": [
            {"user_prompt": f"<|User Prompt|>\nq{uid}", "judgment": f"... [[{s1}]]", "score": s1},
            {"user_prompt": f"<|User Prompt|>\nq{uid}", "judgment": f"... [[{s2}]]", "score": s2},
        ],
    }


def test_battles_mirror_game_two_and_weight_strong_verdicts():
    b = ah.battles_from_judgments([_record("q1", "m", "B>>A", "A>B")], baseline="gpt-4-0314")
    # game 1 (baseline = A): B>>A → model wins, 3 rows; game 2 (model = A): A>B → model wins, 1 row
    assert b.winner == ["model_b"] * 4 and b.model_a == ["gpt-4-0314"] * 4 and b.model_b == ["m"] * 4
    b = ah.battles_from_judgments([_record("q1", "m", "A=B", "A>>B")], baseline="gpt-4-0314")
    assert b.winner == ["tie", "model_b", "model_b", "model_b"]
    b = ah.battles_from_judgments([_record("q1", "m", None, "AB")], baseline="gpt-4-0314")
    assert len(b) == 0 and b.invalid_games == {"m": 2}  # counted, not silently dropped


def test_bradley_terry_win_rate_by_hand():
    """Two players: the BT maximum-likelihood win probability is the (weighted) share of points.

    Games: q1 (B>>A, A>B) → model 3 + 1 wins; q2 (A>B, B>A) → baseline 1 + 1 wins; q3 (A=B, A=B) → 2 ties.
    Rows: 4 model wins, 2 baseline wins, 2 ties → share = (4 + 2·0.5) / 8 = 0.625 → win rate 62.5%, Elo 1000 +
    400·log10(0.625/0.375) = 1088.74.
    """
    recs = [_record("q1", "m", "B>>A", "A>B"), _record("q2", "m", "A>B", "B>A"), _record("q3", "m", "A=B", "A=B")]
    res = ah.fit_bt(ah.battles_from_judgments(recs, "gpt-4-0314"), "gpt-4-0314", rounds=0)
    elo = dict(zip(res.models, res.elo))
    assert elo["gpt-4-0314"] == pytest.approx(1000.0)
    assert elo["m"] == pytest.approx(1000 + 400 * math.log10(0.625 / 0.375), abs=1e-6)
    assert res.win_rate(res.elo)[res.models.index("m")] == pytest.approx(62.5, abs=1e-6)


def _random_battles(rng, models, n, ties=0.2):
    b = ah.Battles()
    for k in range(n):
        a, c = rng.choice(len(models), size=2, replace=False)
        r = rng.random()
        b.model_a.append(models[a])
        b.model_b.append(models[c])
        b.winner.append("tie" if r < ties else ("model_a" if r < ties + (1 - ties) * (0.3 + 0.2 * a) else "model_b"))
        b.uid.append(f"u{k % 50}")
    return b


def _official_design(b, models, features=None):
    """X, Y as arena-hard-auto's compute_mle_elo / construct_style_matrices build them (duplicated battles)."""
    idx = {m: i for i, m in enumerate(models)}
    n = len(b)
    a = np.array([idx[m] for m in b.model_a] * 2)
    c = np.array([idx[m] for m in b.model_b] * 2)
    w = np.array(b.winner * 2)
    X = np.zeros((2 * n, len(models) + (0 if features is None else features.shape[1])))
    X[np.arange(2 * n), a] = math.log(10)
    X[np.arange(2 * n), c] = -math.log(10)
    if features is not None:
        X[:, len(models) :] = np.vstack([features, features])
    Y = np.zeros(2 * n)
    Y[w == "model_a"] = 1.0
    tie = w == "tie"
    tie[n:] = False
    Y[tie] = 1.0
    return X, Y


def test_bradley_terry_matches_sklearn_as_the_official_code_fits_it():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    models = ["gpt-4-0314", "m1", "m2", "m3"]
    b = _random_battles(rng, models, 400)
    ours = ah.fit_bt(b, "gpt-4-0314", rounds=0)
    order = ours.models
    X, Y = _official_design(b, order)
    lr = LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8).fit(X, Y)
    elo = 400 * lr.coef_[0] + 1000
    elo += 1000 - elo[order.index("gpt-4-0314")]
    assert ours.elo == pytest.approx(elo, abs=0.05)


def test_style_control_matches_sklearn_as_the_official_code_fits_it():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    models = ["gpt-4-0314", "m1", "m2"]
    b = _random_battles(rng, models, 300)
    feats = {
        (m, u): [
            float(rng.integers(50, 900)),
            float(rng.integers(0, 5)),
            float(rng.integers(0, 9)),
            float(rng.integers(0, 6)),
        ]
        for m in models
        for u in set(b.uid)
    }
    ours = ah.fit_bt(b, "gpt-4-0314", rounds=0, style="style", features=feats)
    fa = np.array([feats[(m, u)] for m, u in zip(b.model_a, b.uid)])
    fb = np.array([feats[(m, u)] for m, u in zip(b.model_b, b.uid)])
    diff = (fa - fb) / (fa + fb + 1)
    z = (diff - diff.mean(0)) / diff.std(0)
    X, Y = _official_design(b, ours.models, z)
    lr = LogisticRegression(fit_intercept=False, tol=1e-10, max_iter=1000).fit(X, Y)  # official fit_bt: C = 1, L2
    p = len(ours.models)
    elo = 400 * lr.coef_[0][:p] + 1000
    elo -= elo[ours.models.index("gpt-4-0314")] - 1000
    assert ours.elo == pytest.approx(elo, abs=0.05)
    assert list(ours.style_coefs.values()) == pytest.approx(lr.coef_[0][p:], abs=1e-4)


def test_bootstrap_on_500_questions_is_fast_and_brackets_the_score():
    rng = np.random.default_rng(0)
    labels = ["A>>B", "A>B", "A=B", "B>A", "B>>A"]
    recs = [_record(f"q{i}", "m", labels[rng.integers(5)], labels[rng.integers(5)]) for i in range(500)]
    t0 = time.perf_counter()
    scores = ah.score_judgments(recs, "gpt-4-0314", rounds=100)
    elapsed = time.perf_counter() - t0
    row = scores["models"]["m"]
    assert elapsed < 2.0, f"bootstrap took {elapsed:.2f}s"
    assert row["lower"] < row["score"] < row["upper"] and row["upper"] - row["lower"] < 15
    assert scores["models"]["gpt-4-0314"]["score"] == pytest.approx(50.0)
    # bootstrap is reproducible by seed
    assert ah.score_judgments(recs, "gpt-4-0314", rounds=100)["models"]["m"] == row


def test_markdown_metadata_counts_like_the_official_script():
    text = "# Title\n## Sub\n1. one\n2. two\n- a\n* b\n**bold** and __also__\n```\n# not a header\n- no\n```"
    meta = ah.markdown_metadata(text, lambda t: len(t.split()))
    assert meta["header_count"]["h1"] == 1 and meta["header_count"]["h2"] == 1
    assert meta["list_count"] == {"ordered": 2, "unordered": 2}
    assert meta["bold_count"] == {"**": 1, "__": 1}


def test_official_prompt_and_games():
    cfg = ah.load_judge_config("v0.1")
    system = cfg["categories"]["arena-hard-v0.1"]["system_prompt"]
    assert system.startswith("Please act as an impartial judge") and system.endswith('[[A=B]]".')
    assert cfg["regex_pattern"] == r"\[\[([AB<>=]+)\]\]" and cfg["weight"] == 3
    p = ah.make_prompt(cfg, "arena-hard-v0.1", "Q?", "base answer", "model answer")
    user = p.messages()[-1]["content"]
    assert user == (
        "<|User Prompt|>\nQ?\n\n<|The Start of Assistant A's Answer|>\nbase answer\n<|The End of Assistant "
        "A's Answer|>\n\n<|The Start of Assistant B's Answer|>\nmodel answer\n<|The End of Assistant B's "
        "Answer|>"
    )
    v2 = ah.load_judge_config("v2.0")
    assert v2["categories"]["creative_writing"]["baseline"] == "gemini-2.0-flash-001"


def test_judge_model_plays_both_games_and_writes_the_official_format(tmp_path):
    class AlwaysA:
        name = cache_id = "always-a"

        def judge(self, prompts):
            return [Verdict(p_first=1.0, label="A>B", text="[[A>B]]") for _ in prompts]

    cfg = ah.load_judge_config("v0.1")
    qs = [{"uid": f"u{i}", "category": "arena-hard-v0.1", "prompt": f"question {i}"} for i in range(3)]
    base = {"gpt-4-0314": {q["uid"]: "base" for q in qs}}
    stats = JudgeStats()
    recs = ah.judge_model(AlwaysA(), cfg, qs, {q["uid"]: "mine" for q in qs}, "m", base, stats=stats)
    g1, g2 = recs[0]["games"]
    assert (
        "Assistant A's Answer|>\nbase\n" in g1["user_prompt"] and "Assistant A's Answer|>\nmine\n" in g2["user_prompt"]
    )
    path = ah.write_judgments(str(tmp_path), "always-a", "m", recs)
    scores = ah.score_judgments(ah.load_judgments(path))
    assert scores["models"]["m"]["score"] == pytest.approx(50.0)  # a position-biased judge: one game each way
    assert scores["models"]["m"]["invalid_games"] == 0 and stats.failed_prompts == 0


def test_show_scores_official_v01_judgment_files(tmp_path, capsys):
    d = tmp_path / "model_judgment" / "gpt-4-1106-preview"
    d.mkdir(parents=True)
    rows_a = [
        _record("q1", "model-a", "B>>A", "A>B"),
        _record("q2", "model-a", "A>B", "B>A"),
        _record("q3", "model-a", "A=B", "A=B"),
    ]
    rows_b = [_record("q1", "model-b", "A>>B", "B>>A"), _record("q2", "model-b", "A>B", None)]
    for name, rows in (("model-a", rows_a), ("model-b", rows_b)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = ah.show(str(d), rounds=20)
    assert scores["baseline"] == "gpt-4-0314"
    assert scores["models"]["model-a"]["score"] == pytest.approx(62.5, abs=1e-6)  # as in the hand computation above
    assert scores["models"]["model-b"]["score"] == pytest.approx(100 * 1e-12, abs=1e-6)  # lost every counted battle
    assert scores["models"]["model-b"]["invalid_games"] == 1 and scores["models"]["model-b"]["n_games"] == 4
    out_json = tmp_path / "scores.json"
    assert eval_main(["arena-hard", "show", "--judgments", str(d), "--rounds", "20", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "model-a" in printed and "62.5" in printed and "invalid games: 1/4" in printed
    assert json.loads(out_json.read_text())["models"]["model-a"]["score"] == pytest.approx(62.5, abs=1e-6)


def test_show_with_style_control_needs_and_uses_answers(tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    rng = np.random.default_rng(2)
    labels = ["A>B", "B>A", "A=B", "B>>A"]
    recs = [_record(f"q{i}", "m", labels[rng.integers(4)], labels[rng.integers(4)]) for i in range(40)]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    answers = tmp_path / "model_answer"
    answers.mkdir()
    for model, text in (("m", "# Head\n- a\n- b\n**x** " + "word " * 50), ("gpt-4-0314", "plain " * 30)):
        rows = [
            {
                "uid": f"q{i}",
                "model": model,
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": {"answer": text + str(i) * (i % 7)}},
                ],
            }
            for i in range(40)
        ]
        (answers / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ah.ArenaHardError, match="answers"):
        ah.show(str(d), style="style", rounds=5)
    scores = ah.show(str(d), answers_dir=str(answers), style="length", rounds=10)
    assert set(scores["style_coefs"]) == {"token_len"} and 0 < scores["models"]["m"]["score"] < 100


def _answer_rows(model, n, text, meta=None, old_format=False):
    """model_answer rows: v2.0 format (``metadata``) or the original v0.1 one (``choices[0].turns[0].token_len``)."""
    rows = []
    for i in range(n):
        if old_format:
            turn = {"content": text(i)} | ({"token_len": meta(i)["token_len"]} if meta else {})
            rows.append({"question_id": f"q{i}", "model_id": model, "choices": [{"index": 0, "turns": [turn]}]})
        else:
            row = {"uid": f"q{i}", "model": model, "messages": [{"role": "user", "content": "q"}]}
            row["messages"].append({"role": "assistant", "content": {"answer": text(i)}})
            if meta:
                row["metadata"] = meta(i)
            rows.append(row)
    return "".join(json.dumps(r) + "\n" for r in rows)


def _style(token_len):
    return {
        "token_len": token_len,
        "header_count": {f"h{k}": 0 for k in range(1, 7)},
        "list_count": {"ordered": 0, "unordered": 0},
        "bold_count": {"**": 0, "__": 0},
    }


def test_stored_token_len_is_used_and_its_source_reported(tmp_path, capsys):
    """The answer files' own token_len (v2.0 metadata; v0.1 choices[0].turns[0]) is what the average and the length
    control use; it is counted only where absent, and the scores say which. All answers here are the same text, so
    a recount would give equal lengths (no length effect); the stored lengths follow the verdicts."""
    rng = np.random.default_rng(3)
    n = 60
    wins = rng.integers(0, 2, n)
    recs = [_record(f"q{i}", "m", "B>A" if wins[i] else "A>B", "A>B" if wins[i] else "B>A") for i in range(n)]
    d = tmp_path / "judgments"
    d.mkdir()
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    answers = tmp_path / "model_answer"
    answers.mkdir()
    same = lambda i: "same text"  # noqa: E731
    (answers / "m.jsonl").write_text(_answer_rows("m", n, same, lambda i: _style(300 + 200 * int(wins[i]))))
    (answers / "gpt-4-0314.jsonl").write_text(_answer_rows("gpt-4-0314", n, same, lambda i: _style(350), True))
    scores = ah.show(str(d), answers_dir=str(answers), style="length", rounds=5)
    assert scores["models"]["m"]["avg_tokens"] == pytest.approx(300 + 200 * wins.mean())
    assert scores["models"]["gpt-4-0314"]["avg_tokens"] == 350.0
    assert scores["token_len_source"] == f"stored token_len ({n} answers)" and scores["token_counter"] is None
    assert scores["style_coefs"]["token_len"] > 0.5  # the stored lengths explain the verdicts
    # without stored lengths: counted (equal for equal texts), and the counter is named
    (answers / "m.jsonl").write_text(_answer_rows("m", n, same))
    counted = ah.show(str(d), answers_dir=str(answers), style="length", rounds=5)
    assert counted["models"]["m"]["token_len_source"] == f"counted with {counted['token_counter']} ({n} answers)"
    assert counted["models"]["gpt-4-0314"]["token_len_source"] == f"stored token_len ({n} answers)"
    assert "gpt-4-0314: stored" in counted["token_len_source"] and "m: counted" in counted["token_len_source"]
    assert abs(counted["style_coefs"]["token_len"]) < 1e-6
    assert eval_main(["arena-hard", "show", "--judgments", str(d), "--answers-dir", str(answers), "--rounds", "5"]) == 0
    assert "token lengths: " in capsys.readouterr().out


def test_a_malformed_stored_token_len_names_the_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(_answer_rows("m", 2, lambda i: "x", lambda i: _style("long" if i else 3)))
    with pytest.raises(ah.ArenaHardError, match=r"a\.jsonl line 2: token_len must be a non-negative number"):
        ah.load_answers(str(path))


def test_show_accepts_the_run_folder_that_treg_eval_prints(tmp_path, capsys):
    run = tmp_path / "eval_results" / "arena_hard_v0.1" / "tiny"
    recs = [_record("q1", "tiny", "B>A", "A>B"), _record("q2", "tiny", "A>B", "A=B")]
    ah.write_judgments(str(run / "model_judgment"), "treg:tiny", "tiny", recs)
    (run / "judgment_cache").mkdir()
    (run / "judgment_cache" / "shard.jsonl").write_text("{}\n")  # never read as judgments
    expected = ah.show(str(run / "model_judgment" / "treg_tiny"), rounds=5)
    for path in (run, run / "model_judgment"):
        assert ah.show(str(path), rounds=5) == expected
    assert eval_main(["arena-hard", "show", "--judgments", str(run), "--rounds", "5"]) == 0
    assert "tiny" in capsys.readouterr().out
    ah.write_judgments(str(run / "model_judgment"), "other-judge", "tiny", recs)
    with pytest.raises(ah.ArenaHardError, match="several judges .*other-judge, treg_tiny.*model_judgment/<judge>"):
        ah.show(str(run), rounds=5)
    with pytest.raises(ah.ArenaHardError, match="not found; pass the run folder"):
        ah.show(str(tmp_path / "nope"), rounds=5)


def test_a_binary_judgment_file_is_named(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b"\xf0\x28\x8c\x28" * 50)
    with pytest.raises(ah.ArenaHardError, match=r"m\.jsonl: not UTF-8 text"):
        ah.show(str(tmp_path))


def test_max_instances_must_be_positive(capsys):
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            eval_main(["arena-hard", "--model", "treg:tiny", "--max-instances", bad])
        assert e.value.code == 2 and "argument --max-instances: must be a positive integer" in capsys.readouterr().err
