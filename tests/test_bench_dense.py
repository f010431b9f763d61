"""bench/dense_rewards.py: the confidence interval by hand, and a seconds-long run that checks the JSON schema."""

import importlib.util
import json
import math
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "dense_rewards.py")
spec = importlib.util.spec_from_file_location("dense_rewards", _PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["dense_rewards"] = bench
spec.loader.exec_module(bench)


def test_t_ci_by_hand():
    """[1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2)·1/√3 = 4.3027/1.7321 = 2.4841."""
    stats = bench.t_ci([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["n"] == 3
    assert stats["ci95"] == pytest.approx([2 - 2.4841, 2 + 2.4841], abs=1e-3)
    assert math.isnan(bench.t_ci([0.7])["ci95"][0])  # one seed: no interval, never a made-up one


def test_smoke_run_writes_the_documented_json(tmp_path, tiny, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert (
        bench.main(
            [
                "--smoke",
                "--seeds",
                "0",
                "1",
                "--arms",
                "sparse",
                "rule",
                "--out",
                str(out),
                "--plot",
                str(png),
                "--work-dir",
                str(tmp_path / "work"),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert {"benchmark", "size", "setting", "seeds", "summary", "runs", "wall_s", "machine"} <= set(data)
    assert data["size"] == "smoke" and data["seeds"] == [0, 1] and len(data["runs"]) == 4
    arms = data["summary"]["arms"]
    assert set(arms) == {"sparse", "rule"}
    for res in arms.values():
        assert res["eval_steps"] == [0, 1, 2] and len(res["eval_curve"]) == 3 and len(res["train_reward_curve"]) == 2
        for key in ("final_exact", "auc_exact", "start_exact"):
            assert res[key]["n"] == 2 and 0.0 <= res[key]["mean"] <= 1.0 and len(res[key]["ci95"]) == 2
    assert arms["rule"]["critic_totals"]["queried"] > 0 and arms["rule"]["critic_totals"]["failures"] == 0
    assert arms["sparse"]["critic_totals"] == {}
    # same seed, same model, same held-out prompts: every arm starts from the same measurement
    assert arms["rule"]["start_exact"] == arms["sparse"]["start_exact"]
    assert set(data["summary"]["comparisons"]) == {"rule-sparse"}
    assert os.path.getsize(png) > 0 and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert "rule-sparse" in capsys.readouterr().out
