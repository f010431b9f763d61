"""Judges: verdict parsing on every form and on garbage, both-order debiasing, failures counted (never a tie), retries,
the resumable judgment cache, and the local log-prob judge on the tiny model."""

import math

import pytest

from treg.evaluation.judges import (
    LABEL_P_FIRST,
    VERDICT_LABELS,
    JudgePrompt,
    JudgeStats,
    JudgmentCache,
    LocalLogprobJudge,
    PairwiseJudge,
    Verdict,
    combine_orders,
    fill_template,
    judge_both_orders,
    parse_verdict,
    run_judge,
)


@pytest.mark.parametrize("label", VERDICT_LABELS)
def test_every_official_label_parses(label):
    assert parse_verdict(f"Explanation...\n\nMy final verdict is: [[{label}]]") == (label, False)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Assistant A is better.", (None, True)),  # no label: re-prompt
        ("", (None, True)),
        ("[[]]", (None, True)),  # the regex needs one character at least
        ("[[C>D]]", (None, True)),
        ("[A>B]", (None, True)),  # single brackets are not a verdict
        ("[[A>B]] ... final: [[A>B]]", ("A>B", False)),  # the same label twice is that label
        ("[[A>B]] no wait [[B>A]]", (None, False)),  # two different labels: no verdict, no re-prompt (official)
        ("[[AB]]", ("AB", False)),  # matches the regex but is no label: parsed, later counted invalid
    ],
)
def test_garbage_and_ambiguous_verdicts(text, expected):
    assert parse_verdict(text) == expected
    label, _ = expected
    if label is not None and label not in VERDICT_LABELS:
        assert label not in LABEL_P_FIRST


def test_fill_template_is_single_pass_and_keeps_other_braces():
    out = fill_template('{"x": """{instruction}"""} {output_1}', {"instruction": "{output_1}", "output_1": "B"})
    assert out == '{"x": """{output_1}"""} B'


def _prompt(x, y, kind="choice"):
    return JudgePrompt(user_template="Q\n1: {X}\n2: {Y}", fields=(("X", x), ("Y", y)), kind=kind)


class FirstPositionJudge:
    """Always prefers the answer shown first (the extreme position bias)."""

    name = cache_id = "first-position"

    def __init__(self):
        self.calls = 0

    def judge(self, prompts):
        self.calls += len(prompts)
        return [Verdict(p_first=1.0, label="A>B" if p.kind == "verdict" else "m") for p in prompts]


class LongerWinsJudge:
    """Prefers the longer answer, whatever its position; fails on answers containing 'FAIL'."""

    name = cache_id = "longer-wins"

    def __init__(self):
        self.calls = 0

    def judge(self, prompts):
        self.calls += len(prompts)
        out = []
        for p in prompts:
            x, y = dict(p.fields)["X"], dict(p.fields)["Y"]
            out.append(None if "FAIL" in x + y else Verdict(p_first=float(len(x) > len(y))))
        return out


def test_protocol_is_structural():
    assert isinstance(FirstPositionJudge(), PairwiseJudge)


@pytest.mark.parametrize("kind", ["choice", "verdict"])
def test_position_biased_judge_gives_exactly_half_and_no_failures(kind):
    stats = JudgeStats()
    pairs = [(i, f"answer {i}", f"other answer {i}!") for i in range(6)]
    res = judge_both_orders(FirstPositionJudge(), lambda _, x, y: _prompt(x, y, kind), pairs, stats=stats)
    assert [r.p for r in res] == [0.5] * 6  # (1 + 1 − 1) / 2
    assert all(r.position_biased for r in res)
    assert stats.failed_pairs == 0 and stats.failed_prompts == 0


def test_unbiased_judge_keeps_its_preference_in_both_orders():
    res = judge_both_orders(LongerWinsJudge(), lambda _, x, y: _prompt(x, y), [(0, "long answer", "short")])
    assert res[0].p == 1.0 and res[0].position_biased is False


def test_a_failure_is_counted_never_a_tie_or_a_win():
    stats = JudgeStats()
    pairs = [(0, "fine!", "ok"), (1, "FAIL", "x")]
    res = judge_both_orders(LongerWinsJudge(), lambda _, x, y: _prompt(x, y), pairs, retries=2, stats=stats)
    assert res[0].p == 1.0
    assert res[1].p is None and res[1].forward is None and res[1].backward is None
    assert stats.failed_pairs == 1 and stats.failed_prompts == 2
    assert stats.retries == 4  # two prompts, re-judged twice each
    assert combine_orders(Verdict(p_first=1.0), None) is None


def test_flaky_failures_are_retried():
    class Flaky:
        name = cache_id = "flaky"

        def __init__(self):
            self.seen = set()

        def judge(self, prompts):
            out = []
            for p in prompts:
                out.append(Verdict(p_first=0.25) if p.key() in self.seen else None)
                self.seen.add(p.key())
            return out

    stats = JudgeStats()
    res = run_judge(Flaky(), [_prompt("a", "b"), _prompt("c", "d")], retries=1, stats=stats)
    assert [v.p_first for v in res] == [0.25, 0.25] and stats.failed_prompts == 0 and stats.retries == 2


def test_non_finite_verdicts_are_failures():
    class NaNJudge:
        name = cache_id = "nan"

        def judge(self, prompts):
            return [Verdict(p_first=math.nan) for _ in prompts]

    stats = JudgeStats()
    assert run_judge(NaNJudge(), [_prompt("a", "b")], retries=0, stats=stats) == [None]
    assert stats.failed_prompts == 1


def test_cache_resumes_an_interrupted_run(tmp_path):
    prompts = [_prompt(f"a{i}", f"b{i}!") for i in range(10)]

    class Interrupted(LongerWinsJudge):
        def judge(self, ps):
            if self.calls >= 4:
                raise KeyboardInterrupt
            return super().judge(ps)

    with pytest.raises(KeyboardInterrupt):
        run_judge(Interrupted(), prompts, JudgmentCache(str(tmp_path)), chunk_size=4)
    assert len(JudgmentCache(str(tmp_path)).entries) == 4  # the first chunk was saved before the interruption
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no half-written shard left
    judge, stats = LongerWinsJudge(), JudgeStats()
    out = run_judge(judge, prompts, JudgmentCache(str(tmp_path)), chunk_size=4, stats=stats)
    assert judge.calls == 6 and stats.cached == 4 and all(v.p_first == 0.0 for v in out)
    judge2 = LongerWinsJudge()
    run_judge(judge2, prompts, JudgmentCache(str(tmp_path)))
    assert judge2.calls == 0


def test_failures_are_not_cached(tmp_path):
    run_judge(LongerWinsJudge(), [_prompt("FAIL", "x")], JudgmentCache(str(tmp_path)), retries=0)
    assert JudgmentCache(str(tmp_path)).entries == {}


# ------------------------------------------------------------------------------------------ local judge (tiny)
def test_local_logprob_judge_choice_and_verdict(tiny):
    model, tokenizer, _ = tiny
    judge = LocalLogprobJudge(model, tokenizer, name="tiny", show_progress=False)
    choice = JudgePrompt(
        user_template="Which is better? m: {X} M: {Y}. Answer m or M.", fields=(("X", "1 2"), ("Y", "2 1"))
    )
    verdict = JudgePrompt(
        user_template="Question: sort 2 1\nA: {X}\nB: {Y}", fields=(("X", "1 2"), ("Y", "2 1")), kind="verdict"
    )
    v_choice, v_verdict = judge.judge([choice, verdict])
    assert 0.0 <= v_choice.p_first <= 1.0 and math.isclose(sum(v_choice.probs.values()), 1.0, rel_tol=1e-6)
    assert v_choice.label in ("m", "M") and not v_choice.truncated
    assert v_verdict.label in VERDICT_LABELS and math.isclose(sum(v_verdict.probs.values()), 1.0, rel_tol=1e-6)
    assert v_verdict.label == max(v_verdict.probs, key=v_verdict.probs.get)
    assert v_verdict.p_first == LABEL_P_FIRST[v_verdict.label]
    # batching is invisible: the same prompt alone gives the same probabilities
    alone = judge.judge([choice])[0]
    assert alone.probs == pytest.approx(v_choice.probs, abs=1e-5)


def test_local_judge_shortens_answers_that_do_not_fit(tiny):
    model, tokenizer, _ = tiny
    judge = LocalLogprobJudge(model, tokenizer, max_length=96, show_progress=False)
    long = " ".join(["7"] * 300)
    v = judge.judge([JudgePrompt(user_template="m: {X} M: {Y}", fields=(("X", long), ("Y", long)))])[0]
    assert v is not None and v.truncated


def test_local_generate_mode_parses_or_fails_honestly(tiny):
    model, tokenizer, _ = tiny
    judge = LocalLogprobJudge(model, tokenizer, mode="generate", max_new_tokens=8, show_progress=False)
    stats = JudgeStats()
    out = run_judge(judge, [_prompt("1 2", "2 1", "verdict")], retries=0, stats=stats)
    # the tiny model never writes "[[A>B]]": a failure, counted; a parsed label would be one of the official ones
    assert (out[0] is None and stats.failed_prompts == 1) or out[0].label in LABEL_P_FIRST


# ------------------------------------------------------------------------- real-tokenizer behaviours (issue 13)
def _sp_judge(monkeypatch):
    """A local judge with a Llama-2/Mistral-style tokenizer (no system role, "▁" before every lone text); the
    scoring calls are recorded."""
    from test_generate import random_model, sentencepiece_tokenizer

    import treg.scoring

    sp = sentencepiece_tokenizer()
    calls = {}
    for name in ("score_completions", "next_token_logprobs"):
        real = getattr(treg.scoring, name)

        def spy(model, items, *args, _real=real, _name=name, **kw):
            calls[_name] = items
            return _real(model, items, *args, **kw)

        monkeypatch.setattr(treg.scoring, name, spy)
    return LocalLogprobJudge(random_model(len(sp)), sp, name="sp", show_progress=False), sp, calls


def test_d1_judge_with_a_template_without_system_role(monkeypatch):
    """Gemma's template raises on a system turn; the judge folds the system prompt into the user turn instead."""
    judge, sp, calls = _sp_judge(monkeypatch)
    prompt = JudgePrompt(system="You are a fair judge.", user_template="m: {X} M: {Y}", fields=(("X", "1"), ("Y", "2")))
    verdict = judge.judge([prompt])[0]
    assert verdict is not None and verdict.label in ("m", "M")
    assert sp.decode(calls["next_token_logprobs"][0]) == "<s>[INST] You are a fair judge.\n\nm: 1 M: 2 [/INST]"


def test_d6_verdict_labels_are_scored_as_they_follow_the_prefix(monkeypatch):
    """Each label is scored as the tokens the joined text "…My final verdict is: [[A>>B]]" has, not "▁A>>B]]"."""
    from treg.evaluation.judges import VERDICT_PREFIX

    judge, sp, calls = _sp_judge(monkeypatch)
    prompt = JudgePrompt(user_template="A: {X}\nB: {Y}", fields=(("X", "1 2"), ("Y", "2 1")), kind="verdict")
    assert judge.judge([prompt])[0].label in VERDICT_LABELS
    text = sp.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False) + VERDICT_PREFIX
    items = calls["score_completions"]
    assert len(items) == len(VERDICT_LABELS)
    for (context, label_ids), label in zip(items, VERDICT_LABELS):
        assert list(context) + list(label_ids) == sp(text + label + "]]", add_special_tokens=False)["input_ids"]
        assert not sp.convert_ids_to_tokens(label_ids)[0].startswith("▁")
    alone = sp.convert_ids_to_tokens(sp("A>>B]]", add_special_tokens=False)["input_ids"])
    assert alone[0].startswith("▁")  # what scoring the label tokenized alone would have read
