"""What issue 15 added around r̂: the label-free check before training (agreement with the preference labels, by hand
and through the CLI) and the default x⁺ = x sharing the reference forward."""

import logging
import math
from pathlib import Path

import pytest

from treg.token_rewards import describe_agreement, rhat_preference_agreement, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def test_wilson_interval_by_hand():
    """8 of 10: p = 0.8, z = 1.96: centre (0.8 + 0.19208)/1.38416 = 0.71674, half 1.96/1.38416·√(0.016 + 0.0009604)
    = 0.22658 → [0.49016, 0.94332] (the textbook Wilson interval)."""
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_agreement_on_a_hand_made_dataset():
    """Means chosen/rejected: 0.2 > 0.1 (agree), 0.1 > −0.2 (agree), −0.1 < 0.0 (disagree), 0 = 0 (tie, half), and
    one pair with an empty rejected side (skipped): 2.5 of 4 pairs agree."""
    data = {
        "chosen_token_rewards": [[0.1, 0.3], [0.1], [-0.1, -0.1], [0.005, -0.005], [0.2]],
        "rejected_token_rewards": [[0.1], [-0.3, -0.1], [0.0], [0.0, 0.0], []],
    }
    stats = rhat_preference_agreement(data)
    assert (stats["pairs"], stats["agree"], stats["ties"], stats["skipped"]) == (4, 2, 1, 1)
    assert stats["agreement"] == pytest.approx(0.625)
    assert stats["ci95"] == pytest.approx(list(wilson_interval(2.5, 4)))
    tokens = [0.1, 0.3, 0.1, -0.1, -0.1, 0.005, -0.005, 0.2, 0.1, -0.3, -0.1, 0.0, 0.0, 0.0]
    mean = sum(tokens) / len(tokens)
    assert stats["mean"] == pytest.approx(mean)
    assert stats["std"] == pytest.approx(math.sqrt(sum((t - mean) ** 2 for t in tokens) / len(tokens)))
    assert stats["small_share"] == pytest.approx(5 / 14)  # ±0.005 twice and three exact zeros
    assert stats["chance"] is True  # 4 pairs: the CI holds 0.5
    line, warning = describe_agreement(stats)
    assert "62.5% of 4 pairs" in line and "indistinguishable from chance" in warning and "62.5%" in warning


def test_agreement_away_from_chance_gives_no_warning():
    data = {"chosen_token_rewards": [[0.2]] * 30, "rejected_token_rewards": [[-0.2]] * 30}
    stats = rhat_preference_agreement(data)
    assert stats["agreement"] == 1.0 and stats["chance"] is False
    assert describe_agreement(stats)[1] is None


def test_rewards_command_prints_the_agreement(tmp_path, tiny, capsys, caplog):
    from treg.cli import main

    argv = ["rewards", "--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--output_dir", str(tmp_path),
            "--toy_num_pairs", "16", "--disable_tqdm", "true"]
    with caplog.at_level(logging.WARNING, logger="treg"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "r̂ vs the preference labels: chosen has the higher mean r̂ in" in out and "of 16 pairs" in out
    # 16 pairs cannot separate much from chance; when they cannot, the warning names the numbers
    warned = [r.getMessage() for r in caplog.records if "indistinguishable from chance" in r.getMessage()]
    assert all("agreement with the preference labels" in w for w in warned)


def test_train_logs_the_agreement_with_the_first_metrics(tmp_path, tiny, capsys):
    from treg.cli import main

    out_dir = tmp_path / "run"
    argv = ["train", "--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--output_dir", str(out_dir),
            "--toy_num_pairs", "32", "--max_steps", "1", "--logging_steps", "1", "--eval_strategy", "no",
            "--disable_tqdm", "true"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "r̂ vs the preference labels" in out
    assert "treg/rhat_pair_agreement" in out and "treg/rhat_std" in out  # the first logged training metrics


def test_default_positive_template_shares_the_reference_forward(tiny, monkeypatch):
    """treg's default x⁺ is the plain prompt (chosen in bench/token_rewards_real.py): the pass scores x and x⁻ only,
    and r̂ = σ(log π(y|x) − log π(y|x⁻)) − 0.5 exactly as with x⁺ scored on its own."""
    import numpy as np
    from datasets import Dataset

    import treg.token_rewards.contrastive as contrastive

    assert contrastive.DEFAULT_POSITIVE_TEMPLATE == "{prompt}"
    model, tokenizer, _ = tiny
    data = Dataset.from_dict({"prompt_ids": [[1, 5, 7], [1, 4]], "chosen_ids": [[9, 2], [3, 3, 2]],
                              "rejected_ids": [[8], [6, 2]]})
    negative = [[1, 5, 7, 11, 12], [1, 4, 11, 12]]
    scored, real = [], contrastive.score_completions

    def spy(model_, items, **kwargs):
        scored.extend(items)
        return real(model_, items, **kwargs)

    monkeypatch.setattr(contrastive, "score_completions", spy)
    cols = contrastive.compute_columns(model, tokenizer, data, positive_ids=list(data["prompt_ids"]),
                                       negative_ids=negative, max_length=None, show_progress=False)
    assert len(scored) == 8  # 2 rows × 2 sides × (x, x⁻), not × 3
    for r in range(2):
        neg = real(model, [(negative[r], data["chosen_ids"][r])], show_progress=False)[0]
        expected = contrastive.contrastive_rewards(np.asarray(cols["ref_chosen_token_logps"][r]), neg)
        np.testing.assert_allclose(cols["chosen_token_rewards"][r], expected, atol=1e-5)
