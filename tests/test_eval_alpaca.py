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


def _df_gamed(folder, n=40):
    """A df_gamed.csv shaped like alpaca_eval's (two gamed baselines; instruction difficulty varying by index)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [
        {
            "model": model,
            "index": i,
            "instruction_difficulty": float(np.linspace(-2, 2, n)[i]),
            "preference": float(rng.uniform()),
            "std_delta_len": float(rng.normal()),
            "not_gamed_baseline": False,
        }
        for model in ("gpt4_verbose", "gpt4_concise")
        for i in range(n)
    ]
    os.makedirs(folder, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(folder, "df_gamed.csv"), index=False)
    return str(folder)


def test_lc_data_is_checked_and_the_unavailable_reason_is_exact(tmp_path):
    m = ae.compute_metrics([_ann(2.0, 0), _ann(1.0, 1)])
    if m["length_controlled_winrate"] is None:  # no --lc-data, and not in the local HF cache
        assert m["lc_unavailable_reason"] == ae.LC_UNAVAILABLE
        assert "--lc-data DIR" in ae.LC_UNAVAILABLE and "df_gamed.csv" in ae.LC_UNAVAILABLE
    with pytest.raises(ae.AlpacaEvalError, match=r"--lc-data .*no df_gamed.csv"):
        ae.lc_data_file(str(tmp_path))
    (tmp_path / "df_gamed.csv").write_text("model,index,preference\nx,0,0.5\n")
    with pytest.raises(ae.AlpacaEvalError, match="missing column"):
        ae.lc_data_file(str(tmp_path))
    good = _df_gamed(tmp_path / "good")
    assert ae.lc_data_file(good) == os.path.join(good, "df_gamed.csv")


def test_lc_keeps_each_instructions_index_when_failed_judgments_are_dropped(tmp_path, caplog):
    """Annotations without `index` in the official order, row 3 failed: the difficulty of every later row is still
    that of its own instruction (before, rows were renumbered after the drop: row 4 got instruction 3's)."""
    lc = ae.lc_data_file(_df_gamed(tmp_path / "lc"))
    full = [_ann(1.0 + 1 / (1 + math.exp(-(i - 20) / 5)), i) for i in range(40)]
    for a in full:
        del a["index"]
    full[3]["preference"] = math.nan
    with caplog.at_level("WARNING"):
        m = ae.compute_metrics(full, lc_data=lc)
    assert m["n_failed"] == 1 and m["n_total"] == 39 and "1 of 40 judgments failed" in caplog.text
    assert m["lc_unavailable_reason"] is None and m["length_controlled_winrate"] is not None
    indexed = [dict(a, index=i) for i, a in enumerate(full) if not math.isnan(a["preference"])]
    assert m["length_controlled_winrate"] == pytest.approx(
        ae.compute_metrics(indexed, lc_data=lc)["length_controlled_winrate"]
    )
    renumbered = [dict(a, index=k) for k, a in enumerate(indexed)]  # the old behaviour
    shifted = ae.compute_metrics(renumbered, lc_data=lc)["length_controlled_winrate"]
    assert abs(shifted - m["length_controlled_winrate"]) > 1e-3


def test_max_instances_must_be_positive(capsys):
    from treg.evaluation.cli import main as eval_main
    from treg.evaluation.runs import check_max_instances

    for bad in (0, -1):
        with pytest.raises(ae.AlpacaEvalError, match="--max-instances must be a positive integer"):
            ae.select_instances(805, bad)
        with pytest.raises(ValueError, match="--max-instances must be a positive integer"):
            check_max_instances(bad)
        with pytest.raises(SystemExit) as e:
            eval_main(["alpaca-eval", "--model", "treg:tiny", "--max-instances", str(bad)])
        assert e.value.code == 2 and "argument --max-instances: must be a positive integer" in capsys.readouterr().err
    assert check_max_instances(None) is None and check_max_instances(3) == 3


def test_bad_lc_data_and_annotator_config_fail_before_any_model_loads(tmp_path, capsys):
    from treg.evaluation.cli import main as eval_main

    assert eval_main(["alpaca-eval", "--model", "no/such-model", "--lc-data", str(tmp_path)]) == 2
    assert "--lc-data" in capsys.readouterr().err
    argv = ["alpaca-eval", "--model", "no/such-model", "--judge", "openai:m@http://127.0.0.1:9/v1"]
    assert eval_main([*argv, "--annotator-config", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "treg_weighted_endpoint" in err  # names the configs shipped with treg
    assert ae.find_annotator_config("treg_weighted_endpoint").endswith(
        os.path.join("alpaca_eval", "treg_weighted_endpoint", "configs.yaml")
    )


def test_malformed_reference_outputs_name_the_file(tmp_path):
    bad = tmp_path / "ref.json"
    bad.write_text('[{"instruction": "hi", "output": "x"},')
    with pytest.raises(ae.AlpacaEvalError, match=r"ref\.json line 1 column \d+: not JSON"):
        ae.load_reference(str(bad))
