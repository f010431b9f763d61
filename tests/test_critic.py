"""RELC critic token rewards (METHOD.md §3): the critic prompt and its output format, span → token mapping through the
tokenizer's offsets, failure handling, the toy rule critic against the ground truth, the cache, and a training run."""

import copy
import os

import pytest

import treg.token_rewards.critic as critic_lib
from treg.synthetic import build_tokenizer, make_pairs, rejected_token_defects
from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS, TokenRewardError
from treg.token_rewards.critic import (
    BAD,
    DEFAULT_FEW_SHOT,
    GOOD,
    RuleCritic,
    Span,
    attach_critic_rewards,
    build_critic_prompt,
    format_critic_answer,
    is_failure,
    map_spans_to_tokens,
    parse_critic_output,
    split_critic_prompt,
)
from treg.trainer import TRegConfig, TRegTrainer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _config(tmp, **kw):
    base = dict(
        output_dir=str(tmp / "out"),
        use_cpu=True,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
        max_steps=1,
        treg_alpha=0.5,
        token_reward_cache_dir=str(tmp / "cache"),
        token_reward_source="critic",
        critic_model="rule:toy",
        logging_steps=1,
    )
    base.update(kw)
    return TRegConfig(**base)


# ------------------------------------------------------------------------------------------------------ parsing
def test_parser_reads_its_own_few_shot_answers():
    prompt = build_critic_prompt("copy: 1 2", "1 3", 0.5)
    for ex in DEFAULT_FEW_SHOT:
        answer = format_critic_answer(ex["spans"])
        assert answer in prompt
        assert parse_critic_output(answer) == (list(ex["spans"]), 0)
    assert split_critic_prompt(prompt) == ("copy: 1 2", "1 3")
    assert split_critic_prompt(build_critic_prompt("a\n\nb", "x y", few_shot=())) == ("a\n\nb", "x y")
    assert format_critic_answer([]) == "NONE" and parse_critic_output("NONE") == ([], 0)
    assert not is_failure("NONE")


def test_parser_on_messy_text():
    text = """Here is my critique:
      - bad :   "Sydney"
    * GOOD: “The capital”
    1. BAD#2: '1'
    2) good = unquoted span here
    **BAD**: "x"
    GOOD: ""
    BAD#0: "y"

    Thanks!"""
    spans, unparsed = parse_critic_output(text)
    assert spans == [
        Span(BAD, "Sydney"),
        Span(GOOD, "The capital"),
        Span(BAD, "1", 2),
        Span(GOOD, "unquoted span here"),
    ]
    # preamble, "**BAD**" line (bold around the label only), empty span, occurrence 0, "Thanks!"
    assert unparsed == 5
    assert parse_critic_output(None) == ([], 0)
    assert is_failure(None) and is_failure("   ") and is_failure("I think it is fine.")
    assert not is_failure("blah\nBAD: 'x'")


# ------------------------------------------------------------------------------------------------------ mapping
def test_span_boundaries_inside_tokens(tok):
    text = "3 17 2"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tok.eos_token_id]
    # " 17" is one token (offsets 1..4) or " 1","7": either way the span "7" (3..4) lies inside a token that starts
    # before it (the leading space), so that token gets the value; the end-of-turn token never does
    values, stats = map_spans_to_tokens(tok, text, ids, [Span(BAD, "7")])
    expected = [-0.25 if a < 4 and 3 < b else 0.0 for a, b in enc["offset_mapping"]] + [0.0]
    assert values == expected and sum(v != 0 for v in values) == 1
    assert stats["found"] == 1 and stats["missing"] == 0 and stats["bad_tokens"] == 1
    # a span ending in the middle of a token marks that token; span starts on the space of " 2"
    values, _ = map_spans_to_tokens(tok, text, ids, [Span(GOOD, "3 1")], good_value=0.1)
    assert values[: len(enc["input_ids"])] == [0.1 if a < 3 and 0 < b else 0.0 for a, b in enc["offset_mapping"]]
    assert values[0] == 0.1 and values[1] == 0.1


def test_bad_wins_and_response_is_found_inside_the_completion(tok):
    text = "4 1 7 7"
    resp = list(tok(text, add_special_tokens=False)["input_ids"])
    assert len(resp) == 4
    completion = resp + [tok.eos_token_id]
    values, stats = map_spans_to_tokens(tok, text, completion, [Span(GOOD, "4 1 7"), Span(BAD, "1")])
    assert values == [0.25, -0.25, 0.25, 0.0, 0.0]
    assert stats["good_tokens"] == 2 and stats["bad_tokens"] == 1
    # the response run may sit after other completion tokens (e.g. a template's header): offsets shift with it
    values, _ = map_spans_to_tokens(tok, text, [tok.pad_token_id] + completion, [Span(BAD, "4")])
    assert values == [0.0, -0.25, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(TokenRewardError, match="row 7"):
        map_spans_to_tokens(tok, text, resp[:2] + [tok.eos_token_id], [Span(BAD, "4")], row="7")


def test_repeated_spans_and_absent_spans(tok):
    text = "7 1 7 7"
    completion = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    values, stats = map_spans_to_tokens(tok, text, completion, [Span(BAD, "7")])
    assert values == [-0.25, 0.0, -0.25, -0.25, 0.0]  # no occurrence index: every occurrence
    values, _ = map_spans_to_tokens(tok, text, completion, [Span(BAD, "7", 2)])
    assert values == [0.0, 0.0, -0.25, 0.0, 0.0]  # only the 2nd
    values, stats = map_spans_to_tokens(
        tok, text, completion, [Span(BAD, "7", 4), Span(GOOD, "9"), Span(BAD, "1 7 7 7"), ("GOOD", "1")]
    )
    assert values == [0.0, 0.25, 0.0, 0.0, 0.0]  # absent spans give no values, never a guess
    assert stats == {"spans": 4, "found": 1, "missing": 3, "bad_tokens": 0, "good_tokens": 1}


def test_values_are_validated(tok):
    for good, bad in ((0.5, -0.1), (-0.1, -0.1), (0.1, -0.5), (0.1, 0.2)):
        with pytest.raises(ValueError, match="critic"):
            map_spans_to_tokens(tok, "1", [24], [], good, bad)
    with pytest.raises(ValueError, match="critic_bad_value|bad_value"):
        _config(__import__("pathlib").Path("/tmp"), critic_bad_value=-0.6)
    with pytest.raises(ValueError, match="critic_model"):
        _config(__import__("pathlib").Path("/tmp"), critic_model=None)


# ----------------------------------------------------------------------------------------- dataset and critics
@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    """Toy pairs tokenized the trainer's way (α = 0: reference columns only)."""
    model, tokenizer, _ = tiny
    tmp = tmp_path_factory.mktemp("critic-prep")
    trainer = TRegTrainer(
        copy.deepcopy(model),
        args=_config(tmp, treg_alpha=0.0, token_reward_cache_dir="none"),
        train_dataset=make_pairs(8, seed=3),
        processing_class=tokenizer,
    )
    return trainer.train_dataset


def test_rule_critic_marks_exactly_the_defect_tokens(tiny, prepared, tmp_path):
    tokenizer = tiny[1]
    out, stats = attach_critic_rewards(
        prepared, RuleCritic(), tokenizer, critic_id="rule", max_length=None, cache_dir="none", return_stats=True
    )
    defects = rejected_token_defects(tokenizer, prepared)
    for r in range(len(out)):
        values = out[r][REJECTED_REWARDS]
        assert [v < 0 for v in values] == defects[r], r
        assert [v > 0 for v in values] == [not d for d in defects[r][:-1]] + [False], r  # end of turn: 0
        assert all(v > 0 for v in out[r][CHOSEN_REWARDS][:-1]) and out[r][CHOSEN_REWARDS][-1] == 0.0
    assert stats["failed"] == 0 and stats["missing"] == 0 and stats["unparsed"] == 0 and stats["found"] > 16


def test_rule_critic_repeated_words_use_occurrence_indices():
    prompt = build_critic_prompt("copy: 1 1 1", "2 1 1", few_shot=())
    (answer,) = RuleCritic()([prompt])
    assert parse_critic_output(answer)[0] == [Span(BAD, "2"), Span(GOOD, "1 1")]
    (answer,) = RuleCritic()([build_critic_prompt("copy: 1 1 1", "1 2 1", few_shot=())])
    assert parse_critic_output(answer)[0] == [Span(GOOD, "1", 1), Span(BAD, "2"), Span(GOOD, "1", 2)]
    (answer,) = RuleCritic()([build_critic_prompt("copy: 1 1 1", "1 1 1", few_shot=())])
    assert parse_critic_output(answer)[0] == [Span(GOOD, "1 1 1")]
    assert RuleCritic()(["not a critic prompt", build_critic_prompt("hello", "1")]) == [None, None]


def test_failures_give_zeros_and_are_counted(tiny, prepared):
    tokenizer = tiny[1]
    answers = iter([None, "no idea", 'BAD: "nowhere in the text"', "NONE"] * 4)

    def flaky(prompts):
        return [next(answers) for _ in prompts]

    out, stats = attach_critic_rewards(
        prepared,
        flaky,
        tokenizer,
        critic_id="flaky",
        max_length=None,
        cache_dir="none",
        return_stats=True,
        batch_size=3,
    )
    for col in (CHOSEN_REWARDS, REJECTED_REWARDS):
        assert all(v == 0.0 for row in out[col] for v in row)
    assert stats == {"failed": 8, "unparsed": 4, "spans": 4, "found": 0, "missing": 4, "responses": 16}


def test_truncation_keeps_values_of_kept_tokens(tiny, prepared):
    tokenizer = tiny[1]
    full = attach_critic_rewards(prepared, RuleCritic(), tokenizer, critic_id="r", max_length=None, cache_dir="none")
    cut = attach_critic_rewards(prepared, RuleCritic(), tokenizer, critic_id="r", max_length=14, cache_dir="none")
    n_cut = 0
    for r in range(len(full)):
        for col in (CHOSEN_REWARDS, REJECTED_REWARDS):
            assert cut[r][col] == full[r][col][: len(cut[r][col])]
            n_cut += len(cut[r][col]) < len(full[r][col])
    assert n_cut > 0


def test_plain_text_rows_strip_the_appended_eos(tiny, tmp_path):
    model, tokenizer, _ = tiny
    trainer = TRegTrainer(
        copy.deepcopy(model),
        args=_config(tmp_path, treg_alpha=0.0, token_reward_cache_dir="none"),
        train_dataset=make_pairs(4, seed=5, conversational=False),
        processing_class=tokenizer,
    )
    ds = trainer.train_dataset
    out = attach_critic_rewards(ds, RuleCritic(), tokenizer, critic_id="r", max_length=None, cache_dir="none")
    defects = rejected_token_defects(tokenizer, ds.map(lambda ex: {"rejected": ex["rejected"][: -len("<|end|>")]}))
    assert [[v < 0 for v in row] for row in out[REJECTED_REWARDS]] == defects


def test_cache_reused_and_keyed(tiny, prepared, tmp_path):
    tokenizer = tiny[1]
    calls = []

    def counting(prompts):
        calls.append(len(prompts))
        return RuleCritic()(prompts)

    kw = dict(critic_id="rule", max_length=None, cache_dir=str(tmp_path), show_progress=False)
    first = attach_critic_rewards(prepared, counting, tokenizer, **kw)
    assert sum(calls) == 2 * len(prepared)
    second = attach_critic_rewards(prepared, counting, tokenizer, **kw)
    assert sum(calls) == 2 * len(prepared)  # not called again
    assert second[REJECTED_REWARDS] == first[REJECTED_REWARDS]
    attach_critic_rewards(prepared, counting, tokenizer, **dict(kw, bad_value=-0.4))
    attach_critic_rewards(prepared, counting, tokenizer, **dict(kw, critic_id="other"))
    attach_critic_rewards(prepared, counting, tokenizer, **dict(kw, few_shot=()))
    assert sum(calls) == 8 * len(prepared)
    assert len(os.listdir(tmp_path / "token_rewards")) == 4


# ------------------------------------------------------------------------------------------------------ trainer
def test_trainer_with_rule_critic_trains_and_reuses_cache(tiny, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny
    data = make_pairs(8, seed=4)
    config = _config(tmp_path, max_steps=2)
    trainer = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=data, processing_class=tokenizer)
    ds = trainer.train_dataset
    defects = rejected_token_defects(tokenizer, ds)
    assert [[v < 0 for v in row] for row in ds[REJECTED_REWARDS]] == defects
    assert "ref_chosen_token_logps" in ds.column_names
    trainer.train()
    logs = [h for h in trainer.state.log_history if "treg/reg" in h]
    assert len(logs) == 2 and all(h["treg/reg"] == h["treg/reg"] for h in logs)

    def boom(self, prompts):
        raise AssertionError("critic called although the cache holds this entry")

    monkeypatch.setattr(critic_lib.RuleCritic, "__call__", boom)
    again = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=data, processing_class=tokenizer)
    assert again.train_dataset[REJECTED_REWARDS] == ds[REJECTED_REWARDS]


def test_hf_critic_leaves_the_callers_random_state_alone(tiny):
    """An RL step calls the critic between samplings: re-seeding the global RNG there would replay the same random
    stream at every step."""
    import torch

    from treg.token_rewards.critic import HFCritic

    model, tokenizer, _ = tiny
    torch.manual_seed(123)
    state = torch.get_rng_state()
    (answer,) = HFCritic(model, tokenizer, max_new_tokens=2)([build_critic_prompt("copy: 1", "1", few_shot=())])
    assert isinstance(answer, str) and torch.equal(torch.get_rng_state(), state)


def test_rule_critic_spans_never_cross_lines():
    (answer,) = RuleCritic()([build_critic_prompt("copy: 1 2 3 4", "1 2\n3 5", few_shot=())])
    spans, unparsed = parse_critic_output(answer)
    assert unparsed == 0 and all("\n" not in s.text for s in spans)
    assert Span(BAD, "5") in spans and {s.text for s in spans if s.label == GOOD} == {"1", "2", "3"}
    for separator in ("\u2028", "\x1c", "\x85"):  # str.splitlines breaks there too
        (answer,) = RuleCritic()([build_critic_prompt("copy: 1 2 3 4", f"1 2{separator}3 5", few_shot=())])
        assert parse_critic_output(answer)[1] == 0, separator


# ------------------------------------------------------------------------- real-tokenizer behaviours (issue 13)
def _token_ranges(tokenizer, ids):
    """Each completion token's character range in the completion text, from its SentencePiece piece ("▁" is a
    space; special tokens are empty): independent of the decoding the critic mapping uses."""
    ranges, pos = [], 0
    for piece in tokenizer.convert_ids_to_tokens(ids):
        n = 0 if piece in tokenizer.all_special_tokens else len(piece)
        ranges.append((pos, pos + n))
        pos += n
    return ranges


def test_d10_critic_rewards_on_plain_text_rows_with_a_sentencepiece_tokenizer(tmp_path):
    """Plain-string rows: TRL tokenizes prompt + response together, so a Llama-2/Mistral-style tokenizer gives
    "0 ▁0 …" in context but "▁0 ▁0 …" alone; the critic's spans were looked up as the ids of the response tokenized
    alone and row 0 failed. Spans are now placed on the trainer's own completion ids."""
    from test_generate import random_model, sentencepiece_tokenizer

    sp = sentencepiece_tokenizer()
    data = make_pairs(6, seed=5, conversational=False)
    assert sp(data[0]["rejected"], add_special_tokens=False)["input_ids"][0] not in [
        sp(data[0]["prompt"] + data[0]["rejected"])["input_ids"][len(sp(data[0]["prompt"])["input_ids"])]
    ]  # the premise: the response alone starts with another token than in context
    trainer = TRegTrainer(
        random_model(len(sp)), args=_config(tmp_path), train_dataset=data, processing_class=sp
    )
    ds = trainer.train_dataset
    for r in range(len(ds)):
        row = ds[r]
        for side in ("chosen", "rejected"):
            ids, values = row[f"{side}_ids"], row[f"{side}_token_rewards"]
            text = row[side][: -len(sp.eos_token)]  # TRL appended the EOS text
            assert sp.decode(ids, skip_special_tokens=True) == text and len(values) == len(ids)
            words, pos = [], 0
            for w in text.split():
                pos = text.index(w, pos)
                words.append((pos, pos + len(w)))
                pos += len(w)
            flags = row[f"{side}_defects"] if side == "rejected" else [False] * len(words)
            runs = []  # the rule critic names each run of defect (or correct) words as one span
            for (s, e), f in zip(words, flags):
                if runs and runs[-1][2] == f:
                    runs[-1][1] = e
                else:
                    runs.append([s, e, f])
            for (a, b), v in zip(_token_ranges(sp, ids), values):
                bad = any(a < e and s < b for s, e, f in runs if f)
                good = any(a < e and s < b for s, e, f in runs if not f)
                assert v == (-0.25 if bad else 0.25 if good else 0.0), (r, side, sp.convert_ids_to_tokens(ids))
            assert values[-1] == 0.0  # end of turn
    assert any(v < 0 for row in ds[REJECTED_REWARDS] for v in row)


def test_d10_spans_on_a_response_whose_leading_space_the_tokenizer_drops():
    """A fake critic's fixed spans on " the best answer" after "Context:": in context the response is
    ``▁the ▁best ▁answer`` and decodes to "the best answer" (the decoder drops the first token's space)."""
    from test_generate import sentencepiece_tokenizer

    sp = sentencepiece_tokenizer()
    prompt, response = "Context:", " the best answer"
    prompt_ids = sp(prompt)["input_ids"]
    ids = sp(prompt + response)["input_ids"][len(prompt_ids) :] + [sp.eos_token_id]
    assert sp.convert_ids_to_tokens(ids) == ["▁the", "▁best", "▁answer", "</s>"]
    values, stats = map_spans_to_tokens(sp, response, ids, [Span(GOOD, "the best"), Span(BAD, "answer")], 0.1, -0.2)
    assert values == [0.1, 0.1, -0.2, 0.0] and stats["found"] == 2 and stats["missing"] == 0
    # the end of a prompt merged into the first completion token: the span marks that token, nothing else moves
    values, _ = map_spans_to_tokens(sp, "answer", [sp.convert_tokens_to_ids("▁answer"), sp.eos_token_id],
                                    [Span(BAD, "answer")])
    assert values == [-0.25, 0.0]
    with pytest.raises(TokenRewardError, match="row 3.*does not hold the response"):
        map_spans_to_tokens(sp, "the worst answer", ids, [Span(BAD, "answer")], row="3")
    # no byte fallback: each run of characters the tokenizer does not know is one <unk>, which decodes to nothing;
    # the response is aligned with the decoded ids and the <unk> covers the characters it stands for
    prompt, response = "Human: hi\n\nAssistant:", " It is 4. Ça va? 😀 Sure"
    ids = sp(prompt + response)["input_ids"][len(sp(prompt)["input_ids"]) :] + [sp.eos_token_id]
    pieces = sp.convert_ids_to_tokens(ids)
    assert pieces.count("<unk>") == 2
    values, stats = map_spans_to_tokens(sp, response, ids, [Span(BAD, "Ça"), Span(GOOD, "😀"), Span(BAD, "4")], 0.1,
                                        -0.2)
    assert [(p, v) for p, v in zip(pieces, values) if v] == [("▁4", -0.2), ("<unk>", -0.2), ("a", -0.2), ("<unk>", 0.1)]
    assert stats["found"] == 3
    for other in (" It is 5. Ça va? 😀 Sure", response + " and more"):  # ids that do not spell the response
        with pytest.raises(TokenRewardError, match="does not hold the response"):
            map_spans_to_tokens(sp, other, ids, [], row="4")
