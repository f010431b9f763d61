"""Pair packing (treg.packing): the layout by hand, and exactness against the padded forward it replaces — per-token
log-probs (float32, ≤ 1e-5) on the tiny model and on a random Llama with Llama-3.1's real tokenizer, eager and SDPA,
the trainer's loss and gradients, the token-reward pass's columns — plus the fallback where a model cannot pack."""

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from treg import packing
from treg.packing import pack_groups, pack_pairs, packed_pair_logps, packing_support, score_groups, use_packing
from treg.scoring import score_completions
from treg.synthetic import make_pairs
from treg.token_rewards.contrastive import compute_columns
from treg.trainer import DataCollatorForTReg, TRegConfig, TRegTrainer

LLAMA_TOKENIZER = Path("/work/shared/tokenizers/llama-3.1-8b-instruct")
ATOL = 1e-5  # float32: the packed and padded forwards differ only in reduction order (~2e-6 seen)


# ------------------------------------------------------------------------------------------------------- layout
def test_docstring_example_and_hand_layout():
    b = pack_pairs([[1, 2, 3]], [[4, 5]], [[6]])
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 3]]  # context [1, 2], branch [3, 4] (chosen), branch [3] (rejected)
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # both branches start at len(prompt) - 1
    assert b.labels.tolist() == [[-100, -100, 4, 5, 6]]
    assert b.branch_ids.tolist() == [[0, 0, 1, 1, 2]]
    assert b.index.tolist() == [[[2, 3], [4, 0]]] and b.mask.tolist() == [[[True, True], [True, False]]]
    allowed = b.attention_mask()[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # rejected sees the context and itself, never chosen
    ]
    additive = b.attention_mask(torch.float32)[0, 0]
    assert torch.equal(additive == 0, torch.tensor(allowed, dtype=torch.bool))
    assert (additive[additive != 0] == torch.finfo(torch.float32).min).all()


def test_groups_share_rows_block_diagonally_with_left_padding_only():
    """Group sizes 5 (pair 0: 2 context + 2 + 1), 3 and 2 in rows of width 5: first-fit decreasing gives rows [0] and
    [1, 2]; a row holds its contexts first, then its branches, so the scored positions end the row."""
    b = pack_pairs([[1, 2, 3], [7, 8], [9]], [[4, 5], [10], [11]], [[6], [12], [13]])
    assert b.input_ids.shape == (2, 5)
    assert b.input_ids[1].tolist() == [7, 8, 8, 9, 9]  # context [7] (pair 2's is empty), then branches
    assert b.group_ids[1].tolist() == [1, 1, 1, 2, 2]
    assert b.position_ids[1].tolist() == [0, 1, 1, 0, 0]
    assert b.labels[1].tolist() == [-100, 10, 12, 11, 13]
    short = pack_pairs([[1, 2, 3], [7, 8]], [[4, 5], [10]], [[6], [12]])
    assert short.input_ids[1].tolist() == [0, 0, 7, 8, 8] and short.group_ids[1].tolist()[:2] == [-1, -1]
    wide = pack_pairs([[1, 2, 3], [7, 8], [9]], [[4, 5], [10], [11]], [[6], [12], [13]], max_tokens=10)
    assert wide.input_ids.shape == (1, 10) and (wide.group_ids >= 0).all()  # one row, no padding at all
    mask = wide.attention_mask()[0, 0]
    groups = wide.group_ids[0]
    assert not (mask & (groups[:, None] != groups[None, :])).any()  # block-diagonal over pairs


def test_empty_context_and_mismatched_lists_are_errors():
    with pytest.raises(ValueError, match="group 1: empty context"):
        pack_groups([([1], [[2]]), ([], [[3]])])
    with pytest.raises(ValueError, match="2 prompts, 1 chosen"):
        pack_pairs([[1], [2]], [[3]], [[4], [5]])


# -------------------------------------------------------------------------------------- exactness of log-probs
def _random_llama(tokenizer, attn: str):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = attn
    return model


def _real_pairs(tokenizer):
    """Prompts through the chat template, answers as plain text ids: real token ids and lengths."""
    texts = [("What is the capital of France?", "Paris.", "It is Lyon, I believe, or maybe Marseille."),
             ("Write one word.", "Hello", "Sure! Here is a word: banana. Let me know if you need more."),
             ("2+2?", "4", "5"),
             ("Name three colours, please, separated by commas.", "Red, green, blue.", "Red.")]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q, _, _ in texts]
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731
    return prompts, [encode(c) for _, c, _ in texts], [encode(r) for _, _, r in texts]


def _toy_pairs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(5, 4, 7), (17, 2, 3), (9, 11, 1), (1, 6, 9), (30, 1, 12)]
    return [draw(p) for p, _, _ in lengths], [draw(c) for _, c, _ in lengths], [draw(r) for _, _, r in lengths]


@pytest.fixture(scope="module", params=["tiny", "llama-3.1-tokenizer"])
def case(request, tiny):
    if request.param == "tiny":
        model = copy.deepcopy(tiny[0]).float().eval()
        return model, _toy_pairs(model.config.vocab_size)
    if not LLAMA_TOKENIZER.is_dir():
        pytest.skip(f"{LLAMA_TOKENIZER} is not on this machine")
    tokenizer = AutoTokenizer.from_pretrained(str(LLAMA_TOKENIZER))
    return _random_llama(tokenizer, "sdpa"), _real_pairs(tokenizer)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_equal_padded(case, attn):
    """Per token, packed (logits path and TRL's fused head) = left-padded scoring = TRL's right-padded fused head."""
    model, (prompts, chosen, rejected) = case
    model = copy.deepcopy(model)
    model.config._attn_implementation = attn
    padded = score_completions(model, list(zip(prompts + prompts, chosen + rejected)), batch_size=8,
                               show_progress=False)
    batch = pack_pairs(prompts, chosen, rejected)
    with torch.no_grad():
        got_logits = packed_pair_logps(model, batch, fused_lm_head=False)
        add_fused_lm_head(model)
        got_fused = packed_pair_logps(model, batch)  # auto-detects the fused head
    for c_lp, c_mask, r_lp, r_mask in (got_logits, got_fused):
        for i in range(len(prompts)):
            np.testing.assert_allclose(c_lp[i][c_mask[i]].numpy(), padded[i], atol=ATOL, rtol=0)
            np.testing.assert_allclose(r_lp[i][r_mask[i]].numpy(), padded[len(prompts) + i], atol=ATOL, rtol=0)
            assert not c_lp[i][~c_mask[i]].any() and not r_lp[i][~r_mask[i]].any()


def test_score_groups_equal_score_completions_whatever_the_batching(tiny):
    model = tiny[0]
    prompts, chosen, rejected = _toy_pairs(model.config.vocab_size, seed=1)
    groups = [(p, [c, r]) for p, c, r in zip(prompts, chosen, rejected)]
    groups += [([5, 6, 7], [[8], [], [9, 10, 11]]), ([4], [[3, 3]])]  # an empty completion, 3 and 1 completions
    items = [(ctx, comp) for ctx, comps in groups for comp in comps]
    want = score_completions(model, items, batch_size=4, show_progress=False)
    for batch_size in (1, 3, 16):
        got = score_groups(model, groups, batch_size=batch_size, show_progress=False)
        flat = [lp for per_group in got for lp in per_group]
        assert [len(x) for x in flat] == [len(x) for x in want]
        for a, b in zip(flat, want):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    model.train()
    score_groups(model, groups[:1], show_progress=False)
    assert model.training  # the mode it had is restored
    model.eval()


# ---------------------------------------------------------------------------------------- trainer: loss, grads
@pytest.fixture(scope="module")
def trainer(tiny, tmp_path_factory):
    args = TRegConfig(output_dir=str(tmp_path_factory.mktemp("pack")), use_cpu=True, activation_checkpointing=False,
                      report_to="none", save_strategy="no", disable_tqdm=True, per_device_train_batch_size=8,
                      max_steps=1, treg_alpha=0.5, token_reward_cache_dir="none", max_length=14)
    return TRegTrainer(copy.deepcopy(tiny[0]), args=args, train_dataset=make_pairs(16, seed=0),
                       processing_class=tiny[1])


@pytest.mark.parametrize("base", ["dpo", "simpo"])
def test_trainer_loss_and_gradients_equal_padded(trainer, tiny, base):
    """max_length=14 truncates some completions: the packed batch truncates them as TRL's collator does."""
    assert trainer.data_collator.pack_pairs  # the tiny Llama packs (SDPA)
    rows = [trainer.train_dataset[i] for i in range(8)]
    assert any(len(r["prompt_ids"]) + len(r["rejected_ids"]) > 14 for r in rows)  # truncation is exercised
    args = trainer.args
    args.base_loss = base
    results = {}
    try:
        for pack in (False, True):
            batch = DataCollatorForTReg(pad_token_id=tiny[1].pad_token_id, max_length=14, pack_pairs=pack)(rows)
            assert ("packed_input_ids" in batch) == pack
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            results[pack] = loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
            _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            assert outputs.logits.shape[:2] == batch["input_ids"].shape  # return_outputs still works
    finally:
        args.base_loss = "dpo"
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-6)
    for name, grad in results[False][1].items():
        scale = grad.abs().max().item()
        assert (results[True][1][name] - grad).abs().max().item() <= 1e-5 * scale + 1e-8, name
    assert max(g.abs().max().item() for g in results[True][1].values()) > 1e-4  # gradients are not all zero


def test_training_packed_equals_padded(tiny, tmp_path):
    """Three SGD steps (lr 0.5, so the weights move by ~1e-2; AdamW would amplify rounding on ~0 gradients) with
    activation checkpointing and an evaluation: the same losses and weights packed and padded."""
    runs = {}
    for pack in (True, False):
        args = TRegConfig(output_dir=str(tmp_path / str(pack)), use_cpu=True, activation_checkpointing=True,
                          report_to="none", save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
                          per_device_eval_batch_size=4, max_steps=3, logging_steps=1, eval_strategy="steps",
                          eval_steps=3, optim="sgd", learning_rate=0.5, treg_alpha=0.5, token_reward_cache_dir="none",
                          pack_pairs=pack)
        trainer = TRegTrainer(copy.deepcopy(tiny[0]), args=args, train_dataset=make_pairs(16, seed=0),
                              eval_dataset=make_pairs(8, seed=1), processing_class=tiny[1])
        assert trainer.data_collator.pack_pairs is pack
        trainer.train()
        history = trainer.state.log_history
        losses = [h.get("loss", h.get("eval_loss")) for h in history if {"loss", "eval_loss"} & set(h)]
        runs[pack] = losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert len(runs[True][0]) == 4  # 3 training steps and 1 evaluation
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-5)
    moved = max((runs[False][1][n] - p).abs().max().item() for n, p in tiny[0].named_parameters())
    assert moved > 1e-2
    for name, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weight, rtol=0, atol=5e-6)


# ------------------------------------------------------------------------------------------- token-reward pass
def test_pass_columns_equal_unpacked(tiny):
    """x, x⁺ = x (deduplicated), x⁻; a duplicated row; completions truncated by max_length."""
    model, tokenizer, _ = tiny
    data = Dataset.from_dict({
        "prompt_ids": [[1, 5, 7], [1, 4], [1, 5, 7], [1, 9, 9, 9]],
        "chosen_ids": [[9, 2], [3, 3, 2], [9, 2], [8, 8, 8, 8, 8]],
        "rejected_ids": [[8], [6, 2], [8], [7, 6, 5, 4]],
    })
    negative = [[1, 5, 7, 11, 12], [1, 4, 11, 12], [1, 5, 7, 11, 12], [1, 9, 9, 9, 11]]
    kwargs = dict(positive_ids=list(data["prompt_ids"]), negative_ids=negative, max_length=7, show_progress=False)
    plain = compute_columns(model, tokenizer, data, **kwargs, batch_size=3)
    packed = compute_columns(model, tokenizer, data, **kwargs, batch_size=3, pack_pairs=True)
    assert sorted(packed) == sorted(plain)
    for column, rows in plain.items():
        for a, b in zip(packed[column], rows):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=column)
    assert [len(v) for v in packed["chosen_token_rewards"]] == [2, 3, 2, 3]  # kept tokens only


def test_dpo_derived_rewards_equal_unpacked(trainer, tiny):
    from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS
    from treg.token_rewards.dpo_derived import attach_dpo_derived_rewards

    dpo = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for p in dpo.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    data = trainer.train_dataset.select(range(6))
    out = {pack: attach_dpo_derived_rewards(data, dpo, tiny[1], max_length=14, batch_size=4, show_progress=False,
                                            pack_pairs=pack) for pack in (False, True)}
    for column in (CHOSEN_REWARDS, REJECTED_REWARDS):
        assert any(any(abs(v) > 1e-3 for v in row) for row in out[False][column])  # not vacuous
        for a, b in zip(out[True][column], out[False][column]):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=column)


def test_pass_scores_each_context_once_per_pair(tiny, monkeypatch):
    """With x⁺ = x the packed pass forwards 2 groups per row (x, x⁻), each holding chosen and rejected."""
    seen = []
    real = packing.score_groups

    def spy(model, groups, **kwargs):
        seen.extend(groups)
        return real(model, groups, **kwargs)

    import treg.token_rewards.contrastive as contrastive

    monkeypatch.setattr(contrastive, "score_groups", spy)
    data = Dataset.from_dict({"prompt_ids": [[1, 5, 7], [1, 4]], "chosen_ids": [[9, 2], [3]],
                              "rejected_ids": [[8], [6, 2]]})
    compute_columns(tiny[0], tiny[1], data, positive_ids=[[1, 5, 7], [1, 4]], negative_ids=[[1, 5, 7, 11], [1, 4, 11]],
                    max_length=None, show_progress=False, pack_pairs=True)
    assert len(seen) == 4 and all(len(completions) == 2 for _, completions in seen)


# ---------------------------------------------------------------------------------------------------- fallback
def test_support_reasons(tiny):
    model = copy.deepcopy(tiny[0])
    assert packing_support(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in packing_support(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 64
    assert "sliding-window" in packing_support(model)
    assert "no transformers config" in packing_support(object())


def test_unsupported_model_trains_padded_and_says_so_once(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(packing, "packing_support", lambda model: "a reason for the test")
    monkeypatch.setattr(packing, "_logged", set())
    args = TRegConfig(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing=False, report_to="none",
                      save_strategy="no", disable_tqdm=True, base_loss="simpo", treg_alpha=0.0, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="treg.packing"):
        for _ in range(2):
            trainer = TRegTrainer(copy.deepcopy(tiny[0]), args=args, train_dataset=make_pairs(4, seed=0),
                                  processing_class=tiny[1])
            assert trainer.data_collator.pack_pairs is False
    said = [r.getMessage() for r in caplog.records if "a reason for the test" in r.getMessage()]
    assert len(said) == 1 and "padded forward" in said[0]
    assert use_packing(tiny[0], False) is False  # pack_pairs: false asks for nothing and says nothing


def test_recipe_key_turns_packing_off(tmp_path):
    """``pack_pairs: false`` is a known recipe key (TRegConfig's field) and reaches the config."""
    from treg.cli import _parser
    from treg.recipes import check_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text((Path(__file__).resolve().parents[1] / "recipes/tiny/treg-dpo.yaml").read_text()
                      + "pack_pairs: false\n")
    assert check_recipe(str(recipe), _parser())["pack_pairs"] is False
    assert TRegConfig(output_dir=str(tmp_path), use_cpu=True).pack_pairs is True  # the default
    assert TRegConfig(output_dir=str(tmp_path), use_cpu=True, pack_pairs=False).pack_pairs is False
