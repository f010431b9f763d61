"""treg.rl: dense critic advantages (by hand), gating, critic failures, parity with TRL's GRPO at α2 = 0, and
`treg rl` end to end from the tiny recipes with every reward source."""

import copy
import glob
import os
import textwrap
import time

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from treg.cli import main as cli_main
from treg.recipes import RecipeError
from treg.rl import (
    CriticTokenRewards,
    ToyReward,
    TRegGRPOConfig,
    TRegGRPOTrainer,
    critic_gate,
    dense_advantages,
    parse_rl_args,
    reward_to_go,
)
from treg.token_rewards.critic import (
    RuleCritic,
    call_critic,
    decode_with_offsets,
    map_spans_to_completion_ids,
    split_critic_prompt,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_KW = dict(
    use_cpu=True,
    bf16=False,
    report_to="none",
    activation_checkpointing=False,
    save_strategy="no",
    disable_tqdm=True,
    logging_steps=1,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=12,
    max_steps=1,
    seed=0,
    temperature=1.0,
    beta=0.0,
)


# ----------------------------------------------------------------------------------------- the formula, by hand
def test_reward_to_go_and_dense_advantages_by_hand():
    """Row 0: r_in = [0, −.25, 0, −.25 | masked .5], Â = 2, α1 = .5, α2 = 2.
    γ = 1:  G = [−.5, −.5, −.25, −.25, 0]
    γ = .5: G3 = −.25; G2 = 0 + .5·(−.25) = −.125; G1 = −.25 + .5·(−.125) = −.3125; G0 = .5·(−.3125) = −.15625
            A = .5·2 + 2·G = [.6875, .375, .75, .5, 1.0 (masked: α1·Â)]
    Row 1: r_in = [.25, 0, 0, 0, 0] with one token, Â = −1: A = −.5 + 2·.25 = 0 on the token, −.5 elsewhere."""
    r_in = torch.tensor([[0.0, -0.25, 0.0, -0.25, 0.5], [0.25, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    torch.testing.assert_close(reward_to_go(r_in, mask, 1.0)[0], torch.tensor([-0.5, -0.5, -0.25, -0.25, 0.0]))
    torch.testing.assert_close(reward_to_go(r_in, mask, 0.5)[0], torch.tensor([-0.15625, -0.3125, -0.125, -0.25, 0.0]))
    torch.testing.assert_close(reward_to_go(r_in, mask, 0.0), r_in * mask)  # γ = 0: each token's own reward
    adv = dense_advantages(torch.tensor([2.0, -1.0]), r_in, mask, alpha_ex=0.5, alpha_in=2.0, gamma=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.6875, 0.375, 0.75, 0.5, 1.0], [0.0, -0.5, -0.5, -0.5, -0.5]]))
    # α2 = 0 is the stock advantage broadcast over the tokens, whatever r_in is
    stock = torch.tensor([2.0, -1.0])
    assert torch.equal(dense_advantages(stock, r_in, mask, 1.0, 0.0), stock.unsqueeze(1).expand(2, 5))
    with pytest.raises(ValueError, match="shapes"):
        dense_advantages(stock, r_in[:, :3], mask)


def test_gate_sends_only_samples_at_or_below_tau(tiny):
    tokenizer = tiny[1]
    assert critic_gate([0.0, 1.0, 0.5, float("nan")], 0.5) == [True, False, True, False]
    assert critic_gate([0.0, 1.0, float("nan")], None) == [True, True, False]
    seen = []

    def spy(prompts):
        seen.extend(split_critic_prompt(p)[1] for p in prompts)
        return ["NONE"] * len(prompts)

    texts = ["1 2 3", "4 5 6", "7 8 9", "0 0 0"]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] for t in texts]
    prompts = [[{"role": "user", "content": "copy: 1 2 3"}]] * 4
    rewards = CriticTokenRewards(spy, "spy", tokenizer, cache_dir="none")
    values, stats = rewards(prompts, ids, [0.0, 1.0, 0.5, float("nan")], threshold=0.5)
    assert seen == ["1 2 3", "7 8 9"] and stats["queried"] == 2 and stats["failures"] == 0
    assert [len(v) for v in values] == [len(i) for i in ids] and all(x == 0.0 for v in values for x in v)
    seen.clear()
    _, stats = rewards(prompts, ids, [0.0, 1.0, 0.5, 0.2], threshold=None)
    assert stats["queried"] == 4 and seen == ["4 5 6", "0 0 0"]  # the two answers of the first call are memoised


# ------------------------------------------------------------------------------------------ spans → sampled ids
def test_spans_map_onto_sampled_ids_even_when_not_canonical(tiny):
    tokenizer = tiny[1]
    # "3 17" sampled as "3", " 1", "7" (the tokenizer may spell " 17" differently): values follow the sampled ids
    pieces = ["3", " 1", "7"]
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(p))[0] for p in pieces] + [tokenizer.eos_token_id]
    text, offsets = decode_with_offsets(tokenizer, ids)
    assert text == "3 17" and offsets == [(0, 1), (1, 3), (3, 4), (4, 4)]
    values, stats = map_spans_to_completion_ids(tokenizer, ids, [("BAD", "7"), ("GOOD", "3")], 0.1, -0.2)
    assert values == [0.1, 0.0, -0.2, 0.0] and stats["found"] == 2  # end of turn never marked
    values, stats = map_spans_to_completion_ids(tokenizer, ids, [("BAD", "9")])
    assert values == [0.0] * 4 and stats["missing"] == 1
    # a multi-byte character split over byte-level tokens: every token that carries its bytes is marked
    ids = list(tokenizer("5 é 6", add_special_tokens=False)["input_ids"])
    text, offsets = decode_with_offsets(tokenizer, ids)
    assert text == "5 é 6"
    values, _ = map_spans_to_completion_ids(tokenizer, ids, [("BAD", "é")])
    marked = [i for i, v in enumerate(values) if v < 0]
    assert marked == list(range(marked[0], marked[-1] + 1))
    assert tokenizer.decode([ids[i] for i in marked]).strip() == "é"
    assert all(offsets[i][0] <= 2 < offsets[i][1] for i in marked)


# ------------------------------------------------------------------------------------------------- failures
def test_critic_failures_give_zero_reward_and_are_counted(tiny):
    tokenizer = tiny[1]
    texts = ["1 2 3", "4 5 6", "7 8 9"]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] for t in texts]
    prompts = ["copy: 1 2 3"] * 3

    def boom(prompts):
        raise RuntimeError("critic server down")

    def short(prompts):
        return ["NONE"] * (len(prompts) - 1)

    answers = iter(["I cannot say.", None, 'BAD: "8"'])

    def mixed(prompts):
        return [next(answers) for _ in prompts]

    def slow(prompts):
        time.sleep(0.6)
        return ['BAD: "1"'] * len(prompts)

    for critic, key in ((boom, "errors"), (short, "errors"), (slow, "timeouts")):
        rewards = CriticTokenRewards(critic, key, tokenizer, cache_dir="none", timeout_s=0.15, batch_size=2)
        values, stats = rewards(prompts, ids, [0.0, 0.0, 0.0])
        assert all(v == 0.0 for row in values for v in row), key
        assert stats[key] == 3 and stats["failures"] == 3 and stats["queried"] == 3, (key, stats)
    values, stats = CriticTokenRewards(mixed, "mixed", tokenizer, cache_dir="none")(prompts, ids, [0.0] * 3)
    assert stats["failures"] == 2 and stats["unparsed_lines"] == 1 and stats["bad_tokens"] == 1
    assert values[0] == [0.0] * 4 and values[1] == [0.0] * 4 and values[2] == [0.0, -0.25, 0.0, 0.0]
    answers, call_stats = call_critic(boom, ["a", "b", "c"], batch_size=2)
    assert answers == [None] * 3 and call_stats.errors == 3 and call_stats.failed_calls == 3
    time.sleep(0.5)  # let the timed-out call finish before other tests use the critic thread


# ---------------------------------------------------------------------------------------- parity with TRL GRPO
def _rows(n=2):
    return [{"prompt": [{"role": "user", "content": p}]} for p in ("copy: 1 2 3", "reverse: 4 5 6 7")[:n]]


def _scored(trainer, seed=0):
    inputs = [row for row in _rows() for _ in range(trainer.num_generations)]
    torch.manual_seed(seed)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by the loss
    return trainer._generate_and_score_completions(copy.deepcopy(inputs))


def _trainers(tiny, tmp_path, critic, **kw):
    from datasets import Dataset

    model, tokenizer, _ = tiny
    data = Dataset.from_list(_rows())
    stock = GRPOTrainer(
        copy.deepcopy(model),
        reward_funcs=[ToyReward("score")],
        train_dataset=data,
        processing_class=tokenizer,
        args=GRPOConfig(output_dir=str(tmp_path / "a"), **TRAINER_KW),
    )
    ours = TRegGRPOTrainer(
        copy.deepcopy(model),
        reward_funcs=[ToyReward("score")],
        train_dataset=data,
        processing_class=tokenizer,
        critic_rewards=critic,
        args=TRegGRPOConfig(output_dir=str(tmp_path / "b"), critic_cache_dir="none", **TRAINER_KW, **kw),
    )
    return stock, ours


def test_alpha_in_zero_reproduces_the_stock_grpo_loss(tiny, tmp_path):
    def must_not_run(prompts):
        raise AssertionError("the critic is called although α2 = 0")

    stock, ours = _trainers(
        tiny,
        tmp_path,
        CriticTokenRewards(must_not_run, "x", tiny[1], cache_dir="none"),
        critic_model="rule:toy",
        critic_alpha_in=0.0,
    )
    a, b = _scored(stock), _scored(ours)
    assert torch.equal(a["completion_ids"], b["completion_ids"]) and torch.equal(a["advantages"], b["advantages"])
    assert a["advantages"].abs().sum() > 0  # a batch with signal, so the comparison can fail
    loss_a = stock.compute_loss(stock.model, a)
    loss_b = ours.compute_loss(ours.model, b)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_dense_path_with_zero_intrinsic_reward_is_the_stock_loss(tiny, tmp_path):
    """The [B, T] path itself: a critic that finds nothing (NONE) gives r_in = 0, so A_t = Â on every token."""
    critic = CriticTokenRewards(lambda prompts: ["NONE"] * len(prompts), "none", tiny[1], cache_dir="none")
    stock, ours = _trainers(tiny, tmp_path, critic, critic_model="rule:toy", critic_alpha_in=3.0)
    a, b = _scored(stock), _scored(ours)
    assert b["advantages"].shape == b["completion_mask"].shape
    torch.testing.assert_close(b["advantages"], a["advantages"].unsqueeze(1).expand_as(b["advantages"]))
    torch.testing.assert_close(ours.compute_loss(ours.model, b), stock.compute_loss(stock.model, a), rtol=0, atol=0)
    assert ours._metrics["train"]["critic/queried_frac"] == [1.0]


def test_dense_advantages_on_a_real_batch_follow_the_formula(tiny, tmp_path):
    """Rule critic (BAD = the oracle's defect words), τ = 0.5 on toy:score, α2 = 2, γ = 1: the advantage minus the
    stock one equals 2 · reward-to-go of −0.25 on the defect tokens of the samples scoring ≤ 0.5."""
    from treg.synthetic import oracle

    tokenizer = tiny[1]
    critic = CriticTokenRewards(RuleCritic(good=False), "rule", tokenizer, cache_dir="none", good_value=0.0)
    stock, ours = _trainers(tiny, tmp_path, critic, critic_model="rule:toy", critic_alpha_in=2.0, critic_threshold=0.5)
    for seed in range(6):  # find a batch where some sample is both gated in and defective
        a, b = _scored(stock, seed), _scored(ours, seed)
        diff = b["advantages"] - a["advantages"].unsqueeze(1)
        if diff.abs().sum() > 0:
            break
    assert diff.abs().sum() > 0
    prompts = [row["prompt"][0]["content"] for row in _rows() for _ in range(stock.num_generations)]
    mask = b["completion_mask"]
    expected = torch.zeros(mask.shape)
    for i, prompt in enumerate(prompts):
        ids = b["completion_ids"][i][mask[i].bool()].tolist()
        text, offsets = decode_with_offsets(tokenizer, ids)
        score, flags = oracle(prompt, text.strip())
        if score > 0.5:
            continue
        words, pos = [], 0
        for w in text.split():
            start = text.index(w, pos)
            words.append((start, start + len(w)))
            pos = start + len(w)
        for t, (s, e) in enumerate(offsets):
            if any(f and s < we and ws < e for (ws, we), f in zip(words, flags)):
                expected[i, t] = -0.25
    torch.testing.assert_close(diff * mask, 2.0 * reward_to_go(expected, mask, 1.0))
    assert ours._metrics["train"]["critic/bad_tokens"][0] == int((expected < 0).sum())


def test_a_raising_critic_never_stops_training(tiny, tmp_path):
    def boom(prompts):
        raise RuntimeError("critic crashed")

    critic = CriticTokenRewards(boom, "boom", tiny[1], cache_dir="none")
    stock, ours = _trainers(tiny, tmp_path, critic, critic_model="rule:toy")
    b = _scored(ours)
    assert torch.equal(b["advantages"], _scored(stock)["advantages"].unsqueeze(1).expand_as(b["advantages"]))
    assert ours._metrics["train"]["critic/errors"] == [8.0] and ours._metrics["train"]["critic/failures"] == [8.0]
    assert ours.critic_totals["failures"] == 8


# ------------------------------------------------------------------------------------------------------ recipes
def _rl_recipes():
    return sorted(glob.glob(os.path.join(REPO, "recipes", "**", "rl-*.yaml"), recursive=True))


def test_rl_recipes_parse_and_carry_their_launch_command():
    recipes = _rl_recipes()
    assert len(recipes) == 4, recipes
    for path in recipes:
        rel = os.path.relpath(path, REPO)
        with open(path) as f:
            header = "".join(line for line in f if line.startswith("#"))
        assert f"treg rl --config {rel}" in header, rel
        script, config, model = parse_rl_args(["--config", path, "--bf16", "false", "--use_cpu", "true"])
        assert model.model_name_or_path and script.reward_funcs, rel
        assert (script.rl_algorithm == "grpo") == isinstance(config, TRegGRPOConfig), rel


def test_bad_recipes_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: treg:tiny\ncritic_alpah_in: 1.0\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*'critic_alpah_in'.*critic_alpha_in.*TRegGRPOConfig"):
        parse_rl_args(["--config", str(bad)])
    rloo = tmp_path / "rloo.yaml"
    rloo.write_text("model_name_or_path: treg:tiny\nrl_algorithm: rloo\ncritic_model: rule:toy\n")
    with pytest.raises(RecipeError, match=r"rloo\.yaml.*'critic_model' needs rl_algorithm: grpo"):
        parse_rl_args(["--config", str(rloo)])
    assert cli_main(["rl", "--config", str(bad)]) == 2
    with pytest.raises(ValueError, match="critic_gamma"):
        TRegGRPOConfig(output_dir=str(tmp_path), critic_gamma=1.5, **TRAINER_KW)


# ---------------------------------------------------------------------------------------------- end to end
def _run(tmp_path, recipe, *overrides):
    out = tmp_path / "out"
    argv = [
        "rl",
        "--config",
        os.path.join(REPO, "recipes", "tiny", recipe),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--toy_num_prompts",
        "8",
        "--per_device_train_batch_size",
        "8",
        "--num_generations",
        "4",
        "--max_completion_length",
        "12",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        *overrides,
    ]
    assert cli_main(argv) == 0
    assert os.path.isfile(out / "config.json")
    return out


def test_treg_rl_relc_rule_critic_end_to_end(tmp_path, capsys):
    _run(tmp_path, "rl-relc.yaml")
    printed = capsys.readouterr().out
    assert "critic/bad_tokens" in printed and "critic: " in printed and "queried" in printed


def test_treg_rl_tiny_llm_critic_end_to_end(tmp_path, capsys):
    _run(
        tmp_path,
        "rl-relc.yaml",
        "--critic_model",
        "treg:tiny",
        "--critic_max_new_tokens",
        "8",
        "--critic_few_shot",
        "1",
        "--critic_threshold",
        "1.0",
    )
    printed = capsys.readouterr().out
    assert "critic/failures" in printed  # the tiny model is no critic: its unparseable answers are counted


def test_treg_rl_direct_rlaif_end_to_end(tmp_path, capsys):
    _run(tmp_path, "rl-direct.yaml")
    assert "rewards/direct/mean" in capsys.readouterr().out


def test_treg_rl_reward_model_rloo_end_to_end(tiny, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny[1]
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=256,
        )
    )
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    _run(tmp_path, "rl-rm.yaml", "--reward_funcs", f"rm:{tmp_path / 'rm'}")
    printed = capsys.readouterr().out
    assert "rewards/rm/mean" in printed and "critic/" not in printed


def test_treg_rl_python_callable_end_to_end(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        def short_answers(prompts, completions, **kwargs):
            return [-len(c[-1]["content"]) / 10 for c in completions]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _run(tmp_path, "rl-relc.yaml", "--reward_funcs", "my_rewards:short_answers", "toy:exact", "--critic_alpha_in", "0")
    printed = capsys.readouterr().out
    assert "rewards/short_answers/mean" in printed and "rewards/toy_exact/mean" in printed
    assert "critic/" not in printed
