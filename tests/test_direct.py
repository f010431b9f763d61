"""Direct RLAIF 1–10 scoring: bounds, the multi-token "10", and a hand computation on a fake distribution."""

import math
from types import SimpleNamespace

import pytest
import torch

from treg.feedback.direct import (
    DIRECT_ENDING,
    DIRECT_TEMPLATE,
    candidate_ids,
    direct_score_details,
    direct_scores,
    judge_context,
    normalise,
)
from treg.synthetic import build_tokenizer, new_tiny_model


class BigramModel(torch.nn.Module):
    """The next-token distribution depends only on the current token: logits = table[token]."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.full((vocab_size, vocab_size), -30.0))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def set_next(self, token: int, probs: dict[int, float]):
        """Put the next-token distribution after ``token`` to ``probs`` (the rest gets ~e⁻³⁰ each)."""
        with torch.no_grad():
            self.table[token] = -30.0
            for t, p in probs.items():
                self.table[token, t] = math.log(p)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _id(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _ending_token(tok):
    return tok(DIRECT_ENDING, add_special_tokens=False)["input_ids"][-1]


def test_tiny_tokenizer_splits_ten(tok):
    cands = dict((tuple(ids), s) for s, ids in candidate_ids(tok))
    one, sp_one, zero = _id(tok, "1"), _id(tok, " 1"), _id(tok, "0")
    assert cands[(sp_one, zero)] == 10 and cands[(one, zero)] == 10  # "10" is two tokens, with or without the space
    assert cands[(sp_one,)] == 1 and cands[(one,)] == 1
    assert len(cands) == 20


def test_judge_context_ends_with_ending(tok):
    ctx = judge_context(tok, [{"role": "user", "content": "sort: 3 1 2"}], "1 2 3")
    assert ctx[-1] == _ending_token(tok)
    assert "sort: 3 1 2" in tok.decode(ctx) and "1 2 3" in tok.decode(ctx)


def test_all_mass_on_ten_gives_plus_one(tok):
    model = BigramModel(len(tok))
    sp_one, zero = _id(tok, " 1"), _id(tok, "0")
    model.set_next(_ending_token(tok), {sp_one: 1.0})
    model.set_next(sp_one, {zero: 1.0})  # " 1" is always followed by "0": the answer is 10
    (d,) = direct_score_details(model, tok, ["copy: 1"], ["1"], show_progress=False)
    assert d.score == pytest.approx(1.0, abs=1e-6) and d.expected == pytest.approx(10.0, abs=1e-5)
    assert d.probs[0] == pytest.approx(0.0, abs=1e-6)  # "1" must not count when "0" follows


def test_all_mass_on_one_gives_minus_one(tok):
    model = BigramModel(len(tok))
    sp_one = _id(tok, " 1")
    model.set_next(_ending_token(tok), {sp_one: 1.0})
    model.set_next(sp_one, {tok.eos_token_id: 1.0})  # "1" then end of answer
    assert direct_scores(model, tok, ["copy: 1"], ["1"], show_progress=False)[0] == pytest.approx(-1.0, abs=1e-6)


def test_hand_computation(tok):
    """After "Score:": " 1" 0.4, " 7" 0.3, "3" 0.1, " 3" 0.1, "x" 0.1; after " 1": "0" 0.25 (so " 10" = 0.1)."""
    model = BigramModel(len(tok))
    sp_one, zero = _id(tok, " 1"), _id(tok, "0")
    filler = _id(tok, "x")  # 0.1 of the mass goes to a non-score token
    model.set_next(
        _ending_token(tok), {sp_one: 0.4, _id(tok, " 7"): 0.3, _id(tok, "3"): 0.1, _id(tok, " 3"): 0.1, filler: 0.1}
    )
    model.set_next(sp_one, {zero: 0.25, tok.eos_token_id: 0.75})
    # P(1) = 0.4 · 0.75 = 0.3, P(10) = 0.4 · 0.25 = 0.1, P(7) = 0.3, P(3) = 0.1 + 0.1 = 0.2; total 0.9
    p = {1: 0.3 / 0.9, 3: 0.2 / 0.9, 7: 0.3 / 0.9, 10: 0.1 / 0.9}
    expected = sum(k * v for k, v in p.items())
    (d,) = direct_score_details(model, tok, ["copy: 1"], ["1"], show_progress=False)
    assert d.mass == pytest.approx(0.9, abs=1e-4)
    assert d.expected == pytest.approx(expected, abs=1e-4)
    assert d.score == pytest.approx((expected - 1) / 9 * 2 - 1, abs=1e-4)
    for k, v in p.items():
        assert d.probs[k - 1] == pytest.approx(v, abs=1e-4)


def test_bounds_random_models(tok):
    torch.manual_seed(0)
    model = BigramModel(len(tok))
    prompts, responses = ["copy: 1 2", "sort: 3 1"] * 3, ["1 2", "", "1 3", "x", "1", "3 1"]
    for scale in (0.1, 3.0, 30.0):
        with torch.no_grad():
            model.table.copy_(torch.randn_like(model.table) * scale)
        for d in direct_score_details(model, tok, prompts, responses, batch_size=2, show_progress=False):
            assert -1.0 <= d.score <= 1.0 and 1.0 <= d.expected <= 10.0
            assert sum(d.probs) == pytest.approx(1.0, abs=1e-6)
    assert normalise(1.0) == -1.0 and normalise(10.0) == 1.0 and normalise(5.5) == pytest.approx(0.0)


def test_random_llama_batching_invariant(tok):
    model = new_tiny_model(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts, responses = ["sort: 3 1 2", "copy: 4 4", "inc: 1 9"], ["1 2 3", "4 5", "2 0"]
    one = [direct_scores(model, tok, [p], [r], show_progress=False)[0] for p, r in zip(prompts, responses)]
    batched = direct_scores(model, tok, prompts, responses, batch_size=3, show_progress=False)
    assert batched == pytest.approx(one, abs=1e-4)
    assert all(-1 <= s <= 1 for s in batched)


def test_judge_context_tokenizes_the_ending_in_context(tok):
    """The ending after the chat template is tokenized as part of the joined text (as D5/D6): a Llama-2/Mistral-style
    tokenizer reads "Score:" alone as "▁Score:", a space the judge prompt does not have."""
    from test_generate import sentencepiece_tokenizer

    prompt, response = [{"role": "user", "content": "sort: 3 1 2"}], "1 2 3"
    question = [{"role": "user", "content": DIRECT_TEMPLATE.format(prompt="sort: 3 1 2", response=response)}]
    sp = sentencepiece_tokenizer()
    ctx = judge_context(sp, prompt, response)
    rendered = sp.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert ctx == sp(rendered + DIRECT_ENDING, add_special_tokens=False)["input_ids"]
    assert sp.decode(ctx).endswith("[/INST]" + DIRECT_ENDING) and ctx.count(sp.bos_token_id) == 1
    lone = sp(DIRECT_ENDING, add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(lone)[0].startswith("▁") and ctx[-len(lone) :] != lone  # the old flaw
    # a tokenizer without a prefix space gets the ids it got before: the chat template's ids, then the ending's
    head = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ending = tok(DIRECT_ENDING, add_special_tokens=False)["input_ids"]
    assert judge_context(tok, prompt, response) == list(head) + ending
