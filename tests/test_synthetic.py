"""The embedded toy task: the oracle, defect flags aligned with tokens, and a tiny model whose r̂ means something."""

import random

import pytest

from treg.synthetic import (
    Task,
    build_tokenizer,
    corrupt,
    make_pairs,
    oracle,
    parse_prompt,
    roc_auc,
    word_flags_to_token_flags,
)


def test_task_answers():
    assert Task("reverse", ("3", "1", "4", "1")).answer == ["1", "4", "1", "3"]
    assert Task("sort", ("3", "1", "4")).answer == ["1", "3", "4"]
    assert parse_prompt("copy: 1 2").answer == ["1", "2"]


def test_oracle_marks_defects_and_extra_words():
    assert oracle("reverse: 3 1 4 1", "1 7 1 3") == (0.75, [False, True, False, False])
    score, flags = oracle("copy: 1 2", "1 2 9")
    assert flags == [False, False, True] and score == pytest.approx(2 / 3)


def test_corrupt_changes_exactly_the_flagged_positions():
    rng = random.Random(0)
    answer = list("123456")
    words, flags = corrupt(answer, rng, 2)
    assert sum(flags) == 2
    assert [w != a for w, a in zip(words, answer)] == flags


def test_tokenizer_is_deterministic_and_digits_are_single_tokens():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert len(a("4 1 3", add_special_tokens=False)["input_ids"]) == 3
    assert word_flags_to_token_flags(a, "1 7 1 3", [False, True, False, False]) == [False, True, False, False]


def test_pairs_have_a_defective_rejected():
    ds = make_pairs(20, seed=3)
    for row in ds:
        score, flags = oracle(row["prompt"][0]["content"], row["rejected"][0]["content"])
        assert flags == row["rejected_defects"] and any(flags) and score < 1
        assert oracle(row["prompt"][0]["content"], row["chosen"][0]["content"])[0] == 1.0


def test_roc_auc_by_hand():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert roc_auc([1, 1], [True, False]) == 0.5
