"""On-policy pair building: best/worst selection with ties, determinism, the reward-model scorer, main()."""

import functools
import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import LlamaConfig, LlamaForSequenceClassification

import treg.synthetic
from treg.data import PreferenceDataError
from treg.feedback.onpolicy import (
    RewardModelScorer,
    build_onpolicy_pairs,
    main,
    pairs_from_samples,
    sample_responses,
    score_all,
)
from treg.synthetic import TinyModelRecipe, build_tokenizer, new_tiny_model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    """A random (untrained) tiny Llama: samples are noise, but sampling and plumbing are real."""
    return new_tiny_model(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


KNOWN = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 3.0, "e": -1.0, "f": 0.5, "g": 0.5}


def known_scorer(prompt, response):
    return KNOWN[response]


def test_selection_with_ties():
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    samples = [
        ["a", "b", "c", "d"],  # best b (first of the tied 3.0s), worst a
        ["f", "g", "f"],  # all tie -> dropped
        ["c", "f", "g", "e"],  # ties among non-extreme values are fine: best c, worst e
        ["", "  ", "a"],  # one non-empty response -> dropped as empty
        [" b ", "e\n"],  # stripped
    ]
    rows, counts = pairs_from_samples(prompts, samples, known_scorer)
    assert counts == {"dropped_ties": 1, "dropped_empty": 1, "scored": 13}
    got = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"],
            r["chosen_score"], r["rejected_score"]) for r in rows]
    assert got == [("p0", "b", "a", 3.0, 1.0), ("p2", "c", "e", 2.0, -1.0), ("p4", "b", "e", 3.0, -1.0)]
    assert rows[0]["prompt"] == [{"role": "user", "content": "p0"}] and rows[0]["chosen"][0]["role"] == "assistant"


def test_batched_scorer_is_used_and_checked():
    class Batched:
        calls = 0

        def score_batch(self, prompts, responses):
            Batched.calls += 1
            return [KNOWN[r] for r in responses]

    rows, _ = pairs_from_samples(["p"], [["a", "b"]], Batched())
    assert Batched.calls == 1 and rows[0]["chosen"][0]["content"] == "b"
    with pytest.raises(ValueError, match="non-finite"):
        score_all(lambda p, r: float("nan"), ["p"], ["a"])


def test_sampling_is_deterministic(policy, tok):
    prompts = ["copy: 1 2", "sort: 3 1 2", "inc: 4 5"]
    kw = dict(num_samples=3, temperature=1.0, max_new_tokens=6, batch_size=4, show_progress=False)
    a = sample_responses(policy, tok, prompts, seed=3, **kw)
    b = sample_responses(policy, tok, prompts, seed=3, **kw)
    c = sample_responses(policy, tok, prompts, seed=4, **kw)
    assert a == b and a != c and [len(x) for x in a] == [3, 3, 3]
    length = lambda p, r: float(len(r))  # noqa: E731
    d1, s1 = build_onpolicy_pairs(policy, tok, prompts, length, seed=3, **kw)
    d2, s2 = build_onpolicy_pairs(policy, tok, prompts, length, seed=3, **kw)
    assert d1.to_list() == d2.to_list() and s1["pairs"] == s2["pairs"]
    assert s1["pairs"] + s1["dropped_ties"] + s1["dropped_empty"] == 3


def test_vllm_backend_missing_is_clear(tok):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="vLLM"):
            sample_responses("some/path", tok, ["p"], num_samples=2, temperature=1.0, max_new_tokens=4, seed=0,
                             batch_size=1, show_progress=False, backend="vllm")
    else:
        pytest.skip("vllm installed")


def test_reward_model_scorer(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=None)
    rm = LlamaForSequenceClassification(config)
    scorer = RewardModelScorer(rm, tok, batch_size=2)
    assert rm.config.pad_token_id == tok.pad_token_id
    prompts = ["copy: 1 2", [{"role": "user", "content": "sort: 3 1 2"}], "inc: 4"]
    responses = ["1 2", "1 2 3 3 3 3", "5"]
    batched = scorer.score_batch(prompts, responses)
    single = [scorer(p, r) for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)  # padding does not change the score
    ids = tok.apply_chat_template([{"role": "user", "content": "copy: 1 2"}, {"role": "assistant", "content": "1 2"}],
                                  tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        direct = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert batched[0] == pytest.approx(direct, abs=1e-5)
    rows, _ = pairs_from_samples(["copy: 1 2"], [["1 2", "1 2 3 3 3 3", "5"]], scorer)
    scores = scorer.score_batch(["copy: 1 2"] * 3, ["1 2", "1 2 3 3 3 3", "5"])
    assert rows[0]["chosen_score"] == pytest.approx(max(scores)) and rows[0]["rejected_score"] == pytest.approx(
        min(scores))


def test_main_toy_oracle(tmp_path, monkeypatch, capsys):
    small = TinyModelRecipe(pretrain_steps=40, sft_steps=30, batch_size=8)  # a briefly trained tiny model, ~2 s
    monkeypatch.setattr(treg.synthetic, "load_tiny_model", functools.partial(treg.synthetic.load_tiny_model, small,
                                                                             show_progress=False))
    out = tmp_path / "pairs"
    argv = ["--model", "treg:tiny", "--prompts", "treg:toy", "--num-prompts", "8", "--scorer", "oracle",
            "--num-samples", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 8 and stats["pairs"] + stats["dropped_ties"] + stats["dropped_empty"] == 8
    assert stats["pairs"] >= 1 and stats["pairs_per_s"] > 0
    ds = load_from_disk(str(out))
    assert len(ds) == stats["pairs"]
    assert {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} <= set(ds.column_names)
    for row in ds:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] == treg.synthetic.oracle(row["prompt"][0]["content"], row["chosen"][0]["content"])[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # temp folder renamed away
    with pytest.raises(FileExistsError):
        main(argv)


# ------------------------------------------------------------------------------ bad prompt rows (issue 13, D9)
HH = next((p / "data" / "hh-rlhf-harmless-base-test.jsonl.gz" for p in
           (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")) if p.is_dir()), None)


def test_d9_bad_prompt_rows_fail_naming_the_row_or_are_dropped_and_counted(tmp_path, monkeypatch, capsys):
    small = TinyModelRecipe(pretrain_steps=40, sft_steps=30, batch_size=8)
    monkeypatch.setattr(treg.synthetic, "load_tiny_model", functools.partial(treg.synthetic.load_tiny_model, small,
                                                                             show_progress=False))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "copy: 1 2"}, {"prompt": "  "}, {"prompt": [{"role": "user", "content": "sort: 2 1"}]},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, {"text": "no prompt"},
    ]))
    argv = ["--model", "treg:tiny", "--prompts", str(prompts), "--scorer", "oracle", "--num-samples", "2",
            "--max-new-tokens", "6", "--no-progress", "--out"]
    with pytest.raises(PreferenceDataError, match=r"prompts.jsonl:2, field 'prompt': whitespace-only.*--drop-inv"):
        main([*argv, str(tmp_path / "a")])
    assert main([*argv, str(tmp_path / "b"), "--drop-invalid-rows"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 2 and stats["invalid_prompts_dropped"] == 3
    if HH is None or not HH.is_file():
        pytest.skip("the shared HH-RLHF file is not present")
    hh = ["--model", "treg:tiny", "--prompts", str(HH), "--scorer", "direct:treg:tiny", "--num-samples", "2",
          "--max-new-tokens", "4", "--no-progress", "--out"]
    with pytest.raises(PreferenceDataError, match="row 1254, field 'rejected'.*--drop-invalid-rows"):
        main([*hh, str(tmp_path / "c")])
    assert main([*hh, str(tmp_path / "d"), "--num-prompts", "2", "--drop-invalid-rows"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 2 and stats["invalid_prompts_dropped"] == 13
