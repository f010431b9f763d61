"""The embedded toy task: the oracle, defect flags aligned with tokens, and a tiny model whose r̂ means something."""

import random

import pytest

from treg.feedback.onpolicy import greedy_oracle_score, make_onpolicy_pairs
from treg.synthetic import (
    NEGATIVE_TEMPLATE,
    POSITIVE_TEMPLATE,
    Task,
    build_tokenizer,
    corrupt,
    defect_auc,
    make_pairs,
    oracle,
    parse_prompt,
    roc_auc,
    task_prompts,
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


def test_inc_task_wraps_nine_to_zero():
    assert Task("inc", ("3", "9", "0")).answer == ["4", "0", "1"]
    assert parse_prompt("inc: 9").answer == ["0"]


def test_task_prompts_are_distinct_and_exclude_given_ones():
    first = task_prompts(50, seed=1)
    assert len(set(first)) == 50
    second = task_prompts(50, seed=1, exclude=set(first))
    assert not set(first) & set(second)
    assert task_prompts(50, seed=1) == first  # deterministic


def test_defect_auc_excludes_the_end_of_turn_token():
    # rows: answer tokens then the end-of-turn token (last), which must be ignored even when its score is extreme
    scores = [[0.3, -0.4, 9.0], [0.2, 0.1, -9.0]]
    flags = [[False, True, False], [False, False, False]]
    # defect -0.4 is below all three correct answer tokens (0.3, 0.2, 0.1): AUC 1
    assert defect_auc(scores, flags) == 1.0
    assert defect_auc([[0.3, 0.5, 0.0]], [[False, True, False]]) == 0.0


def test_onpolicy_pairs_pick_best_and_worst_and_drop_ties(tiny):
    model, tokenizer, _ = tiny
    prompts = task_prompts(24, seed=5)
    ds, stats = make_onpolicy_pairs(model, tokenizer, prompts, num_samples=4, seed=0, show_progress=False)
    assert stats["pairs"] == len(ds) and stats["pairs"] + stats["dropped_ties"] + stats["dropped_empty"] == 24
    assert len(ds) > 0
    for row in ds:
        prompt = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert oracle(prompt, chosen) == (row["chosen_score"], row["chosen_defects"])
        assert oracle(prompt, rejected) == (row["rejected_score"], row["rejected_defects"])
        assert row["chosen_score"] > row["rejected_score"]
    again, _ = make_onpolicy_pairs(model, tokenizer, prompts, num_samples=4, seed=0, show_progress=False)
    assert again["rejected"] == ds["rejected"]  # same seed, same samples


def test_tiny_model_is_imperfect_but_competent_and_follows_quality_instructions(tiny):
    """Greedy plain answers are mostly right; sampled under x⁻ the model answers far worse than under x⁺ (greedy
    decoding would hide it: under x⁻ each position is right about half the time, still the single likeliest digit)."""
    model, tokenizer, _ = tiny
    prompts = task_prompts(48, seed=9)
    plain = greedy_oracle_score(model, tokenizer, prompts, show_progress=False)["oracle_accuracy"]
    assert plain > 0.8
    from treg.generation import generate

    def score(template):
        msgs = [[{"role": "user", "content": template.format(prompt=p)}] for p in prompts]
        texts = generate(model, tokenizer, msgs, num_samples=2, do_sample=True, max_new_tokens=24, seed=0,
                         show_progress=False)
        return sum(oracle(p, s.strip())[0] for p, t in zip(prompts, texts) for s in t) / (2 * len(prompts))

    # the wording the tiny model was tuned on (treg's defaults are chosen for real models)
    assert score(POSITIVE_TEMPLATE) > score(NEGATIVE_TEMPLATE) + 0.3


def test_concurrent_processes_build_the_tiny_model_once(tmp_path):
    """Two processes asking for an uncached model at once (as `accelerate launch` does): one builds under the lock,
    the other waits and loads it; both succeed and get the same weights."""
    import subprocess
    import sys

    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from treg.synthetic import TinyModelRecipe, load_tiny_model\n"
        "m, _, path = load_tiny_model(TinyModelRecipe(pretrain_steps=3, sft_steps=3), cache_dir=sys.argv[1],"
        " show_progress=False)\n"
        "print(path, float(sum(p.double().sum() for p in m.parameters())))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    last = [out.strip().splitlines()[-1] for out, _ in outs]
    assert last[0] == last[1]  # same path, same weights
    built = [d for d in (tmp_path / "models").iterdir() if d.is_dir()]
    assert len(built) == 1 and not [d for d in built if d.name.startswith(".tmp-")]
