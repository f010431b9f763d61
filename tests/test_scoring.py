"""treg.scoring.score_completions against a naive one-sequence-at-a-time forward on the tiny model."""

import random

import numpy as np
import pytest
import torch

import treg.scoring
from treg.scoring import score_completions


def naive_logps(model, context, completion):
    """log p(completion_t | context, completion_<t) from one unpadded forward and a plain log-softmax."""
    ids = torch.tensor([list(context) + list(completion)])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # [L, V]
    n = len(context)
    return np.array([logps[n - 1 + t, tok].item() for t, tok in enumerate(completion)])


@pytest.fixture(scope="module")
def items(tiny):
    """12 (context, completion) pairs of varied lengths (contexts 1..14, completions 1..9 tokens) over the vocab."""
    _, tokenizer, _ = tiny
    rng = random.Random(7)
    vocab = len(tokenizer)
    out = []
    for _ in range(12):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(1, 14))]
        comp = [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
        out.append((ctx, comp))
    return out


@pytest.fixture(scope="module")
def reference(tiny, items):
    model = tiny[0]
    model.eval()
    return [naive_logps(model, c, y) for c, y in items]


def _assert_matches(got, expected, atol=1e-5):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == np.float32, i
        assert g.shape == e.shape, (i, g.shape, e.shape)
        np.testing.assert_allclose(g, e, rtol=0, atol=atol, err_msg=f"item {i}")


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_matches_naive_forward_for_any_batch_size(tiny, items, reference, batch_size):
    got = score_completions(tiny[0], items, batch_size=batch_size, pad_token_id=tiny[1].pad_token_id)
    _assert_matches(got, reference)


def test_independent_of_item_order(tiny, items, reference):
    perm = list(range(len(items)))
    random.Random(3).shuffle(perm)
    got = score_completions(tiny[0], [items[i] for i in perm], batch_size=4)
    _assert_matches(got, [reference[i] for i in perm])


def test_max_batch_tokens_caps_each_forward_and_keeps_results(tiny, items, reference, monkeypatch):
    """Every forward holds ≤ 40 padded tokens (unless one row alone is wider), and the values do not change."""
    shapes = []
    original = treg.scoring._forward_completion_logps

    def spy(model, rows, pad_token_id, device):
        shapes.append((len(rows), max(len(c) + len(y) for c, y in rows)))
        return original(model, rows, pad_token_id, device)

    monkeypatch.setattr(treg.scoring, "_forward_completion_logps", spy)
    got = score_completions(tiny[0], items, batch_size=16, max_batch_tokens=40)
    _assert_matches(got, reference)
    assert sum(n for n, _ in shapes) == len(items)
    assert len(shapes) > 1  # the cap did split: 12 rows of up to 23 tokens do not fit in 40
    for n, width in shapes:
        assert n == 1 or n * width <= 40, shapes


def test_empty_completion_gives_empty_array(tiny, items, reference):
    mixed = [items[0], ([5, 6, 7], []), items[1]]
    got = score_completions(tiny[0], mixed, batch_size=3)
    assert got[1].shape == (0,) and got[1].dtype == np.float32
    _assert_matches([got[0], got[2]], [reference[0], reference[1]])
    # a batch of only empty completions too
    only_empty = score_completions(tiny[0], [([5], []), ([6, 7], [])], batch_size=2)
    assert [x.shape for x in only_empty] == [(0,), (0,)]


def test_empty_context_is_an_error_naming_the_item(tiny, items):
    bad = [items[0], items[1], ([], [4, 5])]
    with pytest.raises(ValueError, match=r"item 2: empty context"):
        score_completions(tiny[0], bad)


@pytest.mark.parametrize("training", [True, False])
def test_restores_training_mode(tiny, items, training):
    model = tiny[0]
    model.train(training)
    try:
        score_completions(model, items[:2], batch_size=2)
        assert model.training is training
    finally:
        model.eval()


def test_next_token_logprobs_match_score_completions(tiny):
    """One forward per context reads the same log-probs that scoring each candidate as a completion gives."""
    from treg.scoring import next_token_logprobs

    model, tokenizer, _ = tiny
    contexts = [tokenizer("copy: 1 2", add_special_tokens=False)["input_ids"],
                tokenizer("sort: 9 1 5 3 2 =>", add_special_tokens=False)["input_ids"]]
    candidates = [tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in ("1", " 2", " 9")]
    got = next_token_logprobs(model, contexts, candidates, batch_size=2, show_progress=False)
    want = score_completions(model, [(c, [t]) for c in contexts for t in candidates], batch_size=1,
                             show_progress=False)
    np.testing.assert_allclose(got.reshape(-1), np.concatenate(want), atol=1e-5)
    assert got.shape == (2, 3)
