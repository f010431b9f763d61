"""Batched generation: order kept, greedy deterministic, sampling reproducible by seed, batching invisible."""

import pytest

from treg.generation import generate, render_prompt


def _prompts():
    return [[{"role": "user", "content": p}] for p in ("copy: 1 2 3", "sort: 9 1 5 3 2", "inc: 4")]


def test_greedy_is_deterministic_and_independent_of_batch_size(tiny):
    model, tokenizer, _ = tiny
    a = generate(model, tokenizer, _prompts(), max_new_tokens=12, batch_size=3, show_progress=False)
    b = generate(model, tokenizer, _prompts(), max_new_tokens=12, batch_size=1, show_progress=False)
    assert a == b and len(a) == 3 and all(len(x) == 1 for x in a)
    # prompts keep their order although batches are sorted by length
    assert a == [generate(model, tokenizer, [p], max_new_tokens=12, show_progress=False)[0] for p in _prompts()]


def test_sampling_is_reproducible_by_seed(tiny):
    model, tokenizer, _ = tiny
    kw = dict(num_samples=4, do_sample=True, max_new_tokens=12, show_progress=False)
    a = generate(model, tokenizer, _prompts(), seed=3, **kw)
    assert a == generate(model, tokenizer, _prompts(), seed=3, **kw)
    assert all(len(x) == 4 for x in a)


def test_multiple_samples_need_sampling(tiny):
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, tokenizer, _prompts(), num_samples=2)


def test_render_prompt_uses_the_chat_template(tiny):
    _, tokenizer, _ = tiny
    ids = render_prompt(tokenizer, [{"role": "user", "content": "copy: 1"}])
    assert tokenizer.decode(ids) == "<|user|>copy: 1<|end|><|assistant|>"
