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
    contexts = [
        tokenizer("copy: 1 2", add_special_tokens=False)["input_ids"],
        tokenizer("sort: 9 1 5 3 2 =>", add_special_tokens=False)["input_ids"],
    ]
    candidates = [tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in ("1", " 2", " 9")]
    got = next_token_logprobs(model, contexts, candidates, batch_size=2, show_progress=False)
    want = score_completions(model, [(c, [t]) for c in contexts for t in candidates], batch_size=1, show_progress=False)
    np.testing.assert_allclose(got.reshape(-1), np.concatenate(want), atol=1e-5)
    assert got.shape == (2, 3)


# ---------------------------------------------------------------------------------------------------- vLLM backend
# vLLM cannot be installed on the CPU CI machine. A fake module with vLLM's interface (LLM.generate over TokensPrompt
# with SamplingParams(prompt_logprobs=...), RequestOutput.prompt_logprobs as [None, {token_id: Logprob}, ...]) checks
# the request we build and the conversion of its outputs; its log-probs come from naive forwards of the tiny model.
class _Logprob:
    def __init__(self, logprob, rank=1):
        self.logprob, self.rank = logprob, rank


def _fake_vllm(model, calls):
    import types

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def generate(self, prompts, params, use_tqdm=True):
            calls.append(("generate", len(prompts), params.kw))
            assert params.kw["prompt_logprobs"] == 0 and params.kw["max_tokens"] == 1
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                with torch.no_grad():
                    logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                alt = (ids[0] + 1) % logps.shape[-1]  # vLLM also returns top-k alternatives; they must be ignored
                plp = [None] + [
                    {ids[p]: _Logprob(logps[p - 1, ids[p]].item()), alt: _Logprob(0.0)} for p in range(1, len(ids))
                ]
                outs.append(types.SimpleNamespace(prompt_logprobs=plp))
            return outs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    vllm.inputs = inputs
    return {"vllm": vllm, "vllm.inputs": inputs}


def test_vllm_backend_equals_hf_backend_through_score_completions(tiny, items, reference, monkeypatch):
    import sys

    calls = []
    for name, module in _fake_vllm(tiny[0], calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    scorer = treg.scoring.VLLMScorer.from_pretrained("some/model", dtype="float32", gpu_memory_utilization=0.3)
    assert calls[0] == (
        "init",
        {
            "model": "some/model",
            "dtype": "float32",
            "gpu_memory_utilization": 0.3,
            "seed": 0,
            "skip_tokenizer_init": True,
        },
    )
    with_empty = list(items) + [(items[0][0], [])]
    got = score_completions(scorer, with_empty, batch_size=4)  # dispatches to the scorer
    assert calls[1][:2] == ("generate", len(items))  # one request per non-empty item, all in one call
    _assert_matches(got[:-1], reference)
    hf = score_completions(tiny[0], items, batch_size=4)
    _assert_matches(got[:-1], hf)  # tolerance 1e-5 in float32 (docs/scale-out.md)
    assert got[-1].shape == (0,)


def test_prompt_logprobs_conversion_names_the_item_and_position():
    seq = [5, 6, 7]
    plp = [None, {6: _Logprob(-1.5)}, {7: -0.25}]  # Logprob objects or plain floats
    np.testing.assert_array_equal(treg.scoring.prompt_logprobs_to_array(plp, seq, 1), np.float32([-1.5, -0.25]))
    with pytest.raises(ValueError, match=r"item 3, position 2: .*lack the prompt token 7"):
        treg.scoring.prompt_logprobs_to_array([None, {6: -1.0}, {8: -0.1}], seq, 1, item=3)
    with pytest.raises(ValueError, match=r"item 0: vLLM returned None of prompt_logprobs"):
        treg.scoring.prompt_logprobs_to_array(None, seq, 1)


@pytest.mark.parametrize(
    "requested, installed, gpu, processes, path, expected",
    [
        ("auto", True, True, 1, "m", "vllm"),
        ("auto", False, True, 1, "m", "hf"),  # not installed
        ("auto", True, False, 1, "m", "hf"),  # no GPU
        ("auto", True, True, 8, "m", "hf"),  # multi-process run: HF (vLLM runs in `treg rewards` on one GPU)
        ("auto", True, True, 1, None, "hf"),  # weights only in memory
        ("hf", True, True, 1, "m", "hf"),
        ("vllm", True, True, 1, "m", "vllm"),
    ],
)
def test_choose_backend(monkeypatch, requested, installed, gpu, processes, path, expected):
    monkeypatch.setattr(treg.scoring, "vllm_available", lambda: installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert treg.scoring.choose_backend(requested, num_processes=processes, model_path=path) == expected


def test_choose_backend_vllm_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(treg.scoring, "vllm_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"vLLM is not installed.*no GPU is visible"):
        treg.scoring.choose_backend("vllm", model_path="m")
    with pytest.raises(ValueError, match="choose one of"):
        treg.scoring.choose_backend("onnx")
