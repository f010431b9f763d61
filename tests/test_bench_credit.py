"""bench/credit_assignment.py: the statistics by hand, and a seconds-long end-to-end run of its plumbing."""

import importlib.util
import json
import math
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "credit_assignment.py")
spec = importlib.util.spec_from_file_location("credit_assignment", _PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["credit_assignment"] = bench  # dataclasses look their module up while the file executes
spec.loader.exec_module(bench)


def test_mean_ci_by_hand():
    """[1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2)·1/√3 = 4.303/1.732 = 2.484."""
    stats = bench.mean_ci([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0
    assert stats["ci95"] == pytest.approx([2 - 2.4844, 2 + 2.4844], abs=1e-3)
    assert math.isnan(bench.mean_ci([0.7])["ci95"][0])  # one seed: no interval, never a made-up one
    assert bench.t975(11) == 2.228  # between table entries: the wider (smaller df) quantile


def test_smoke_run_writes_the_documented_json(tmp_path, tiny, capsys):
    out = tmp_path / "r.json"
    bench.main(["--smoke", "--seeds", "0", "--methods", "dpo", "treg_dpo", "--workers", "1", "--out", str(out),
                "--report", str(tmp_path / "fig")])
    result = json.loads(out.read_text())
    assert 0.0 <= result["reward_auc"] <= 1.0
    assert set(result["methods"]) == {"dpo", "treg_dpo"}
    for entry in result["methods"].values():
        for metric in ("token_auc", "oracle_accuracy", "pair_accuracy"):
            assert 0.0 <= entry[metric] <= 1.0 and len(entry[f"{metric}_per_seed"]) == 1
    diff = result["differences"]["treg_dpo-dpo"]
    assert diff["token_auc"] == pytest.approx(
        result["methods"]["treg_dpo"]["token_auc"] - result["methods"]["dpo"]["token_auc"]
    )
    assert set(result["targets"]) == {
        "reward_auc>=0.8", "treg_dpo token_auc >= dpo + 0.1", "treg_dpo oracle_accuracy > dpo, CI excludes 0"
    }
    assert (tmp_path / "fig-metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig-heatmap.html").exists()
    assert "| treg_dpo |" in capsys.readouterr().out
