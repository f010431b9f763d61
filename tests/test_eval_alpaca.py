"""AlpacaEval 2 through the alpaca_eval package: metrics on treg annotations (failures counted, never crashing
get_winrate), LC reported as unavailable offline, the official subset and prompt; the real data when present."""

import json
import math
import os

import pytest

from treg.evaluation import alpaca_eval as ae
from treg.evaluation.data import data_roots


def _ann(pref, i=0):
    return {
        "instruction": f"q{i}",
        "output_1": "r" * 10,
        "generator_1": "ref",
        "output_2": "m" * (5 + i),
        "generator_2": "mine",
        "annotator": "judge",
        "preference": pref,
        "index": i,
    }


def test_metrics_come_from_alpaca_eval_and_failures_are_counted(monkeypatch):
    """preferences 2, 1, 1.5, 1.75 and one failure: win rate = mean(1, 0, 0.5, 0.75) = 56.25%, SE = sd/√4."""
    anns = [_ann(2.0, 0), _ann(1.0, 1), _ann(1.5, 2), _ann(1.75, 3), _ann(math.nan, 4)]
    m = ae.compute_metrics(anns)
    assert m["win_rate"] == pytest.approx(56.25)
    sd = math.sqrt(sum((x - 0.5625) ** 2 for x in (1, 0, 0.5, 0.75)) / 3)
    assert m["standard_error"] == pytest.approx(100 * sd / 2)
    assert m["n_failed"] == 1 and m["n_instances"] == 5 and m["n_total"] == 4


def test_length_controlled_is_unavailable_offline_and_says_why():
    m = ae.compute_metrics([_ann(2.0, 0), _ann(1.0, 1)])
    if m["length_controlled_winrate"] is None:  # the hub file is not cached (always the case in CI)
        assert "df_gamed.csv" in m["lc_unavailable_reason"] and "hub" in m["lc_unavailable_reason"]
    else:
        assert m["lc_unavailable_reason"] is None


def test_all_failed_gives_no_numbers():
    m = ae.compute_metrics([_ann(math.nan)])
    assert m["win_rate"] is None and m["n_failed"] == 1


def test_subset_is_alpaca_evals_own_shuffle():
    import pandas as pd

    df = pd.DataFrame({"instruction": [f"q{i}" for i in range(50)]})
    expected = df.sample(frac=1, random_state=123)[:7].index.tolist()  # alpaca_eval.main.evaluate, max_instances
    assert ae.select_instances(50, 7) == expected
    assert ae.select_instances(50, None) == list(range(50))


def test_judge_prompt_is_the_packages_alpaca_eval_2_prompt():
    system, user = ae.judge_template()
    assert "leaderboard" in system
    assert "{instruction}" in user and "{output_1}" in user and "{output_2}" in user and "m or M" in user
    p = ae.make_prompt((system, user), "do X", "first", "second")
    text = p.messages()[-1]["content"]
    assert '"""first"""' in text and '"""second"""' in text and p.choices == ("m", "M")


def _real(path):
    for root in data_roots():
        if os.path.isfile(os.path.join(root, path)):
            return os.path.join(root, path)
    return None


@pytest.mark.skipif(_real("alpaca-eval/gpt4_1106_preview-outputs.json") is None, reason="shared data not present")
def test_real_reference_outputs_load():
    rows = ae.load_reference(_real("alpaca-eval/gpt4_1106_preview-outputs.json"))
    assert len(rows) == 805 and rows[0]["generator"] == "gpt4_1106_preview"


@pytest.mark.skipif(_real("arena-hard/v0.1-question.jsonl") is None, reason="shared data not present")
def test_real_arena_hard_files_load():
    from treg.evaluation import arena_hard as ah

    qs = ah.load_questions(_real("arena-hard/v0.1-question.jsonl"))
    name, answers, _ = ah.load_answers(_real("arena-hard/v0.1-gpt-4-0314.jsonl"))
    assert len(qs) == 500 and name == "gpt-4-0314" and {q["uid"] for q in qs} == set(answers)
    v2 = ah.load_questions(_real("arena-hard/v2.0-question.jsonl"))
    assert len(v2) == 750 and {q["category"] for q in v2} == {"hard_prompt", "creative_writing"}
    assert json.dumps(ah.load_judge_config("v2.0")["categories"]["hard_prompt"]["baseline"]) == '"o3-mini-2025-01-31"'
