"""DPO-derived token rewards (METHOD.md §3): r̂_t = σ(s·(log π_dpo − log π_ref)) − 0.5, as a trainer source."""

import copy
import math

import numpy as np
import pytest
import torch

from treg.synthetic import make_pairs
from treg.token_rewards import CHOSEN_REWARDS, REF_CHOSEN, REF_REJECTED, REJECTED_REWARDS, TokenRewardError
from treg.token_rewards.dpo_derived import attach_dpo_derived_rewards, dpo_derived_rewards
from treg.trainer import TRegConfig, TRegTrainer


def test_squashing_by_hand():
    """log-ratios 0, ln 3, −ln 3 → σ = 0.5, 0.75, 0.25 → r̂ = 0, 0.25, −0.25; scale 2 on ln 3 → σ(ln 9) = 0.9."""
    got = dpo_derived_rewards([0.0, math.log(3), -math.log(3)], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(got, [0.0, 0.25, -0.25], atol=1e-6)
    np.testing.assert_allclose(dpo_derived_rewards([math.log(3)], [0.0], scale=2.0), [0.4], atol=1e-6)
    assert np.all(np.abs(dpo_derived_rewards([100.0, -100.0], [0.0, 0.0])) < 0.5)


def _config(tmp, **kw):
    base = dict(
        output_dir=str(tmp / "out"), use_cpu=True, activation_checkpointing=False, report_to="none",
        save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4, max_steps=1, treg_alpha=0.5,
        token_reward_cache_dir="none",
    )
    base.update(kw)
    return TRegConfig(**base)


def test_config_needs_the_dpo_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="token_reward_model"):
        _config(tmp_path, token_reward_source="dpo_derived")


def test_trainer_source_matches_the_hand_formula(tiny, tmp_path):
    model, tokenizer, _ = tiny
    dpo = copy.deepcopy(model)
    with torch.no_grad():  # a "trained" DPO model: the reference with perturbed weights
        for p in dpo.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dpo.save_pretrained(tmp_path / "dpo")
    config = _config(tmp_path, token_reward_source="dpo_derived", token_reward_model=str(tmp_path / "dpo"),
                     token_reward_scale=2.0)
    trainer = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=make_pairs(4, seed=1),
                          processing_class=tokenizer)
    ds = trainer.train_dataset
    for row in range(len(ds)):
        sides = (("chosen", REF_CHOSEN, CHOSEN_REWARDS), ("rejected", REF_REJECTED, REJECTED_REWARDS))
        for side, ref_col, col in sides:
            ids = torch.tensor([ds[row]["prompt_ids"] + ds[row][f"{side}_ids"]])
            n = len(ds[row]["prompt_ids"])
            with torch.no_grad():
                logps = torch.log_softmax(dpo(input_ids=ids).logits[0].double(), -1)
            lp = np.array([logps[n - 1 + t, tok].item() for t, tok in enumerate(ds[row][f"{side}_ids"])])
            expected = 1 / (1 + np.exp(-2.0 * (lp - np.asarray(ds[row][ref_col])))) - 0.5
            np.testing.assert_allclose(ds[row][col], expected, atol=1e-4)
    assert trainer.train()  # trains on them


def test_same_model_gives_zero_rewards_and_missing_ref_columns_error(tiny, tmp_path):
    model, tokenizer, _ = tiny
    trainer = TRegTrainer(copy.deepcopy(model), args=_config(tmp_path, treg_alpha=0.0),
                          train_dataset=make_pairs(3, seed=2), processing_class=tokenizer)
    ds = attach_dpo_derived_rewards(trainer.train_dataset, model, tokenizer, max_length=1024, show_progress=False)
    assert max(abs(v) for row in list(ds[CHOSEN_REWARDS]) + list(ds[REJECTED_REWARDS]) for v in row) < 1e-4
    with pytest.raises(TokenRewardError, match="reference"):
        attach_dpo_derived_rewards(ds.remove_columns([REF_CHOSEN]), model, tokenizer, max_length=None)


def test_the_dpo_checkpoint_may_be_any_model_spec_and_a_lora_adapter_folder(tiny, tmp_path):
    """token_reward_model loads as treg loads any model: ``treg:tiny`` (the policy itself: r̂ = 0), and the adapter
    folder a LoRA DPO run saves (merged into its base, so r̂ follows the adapted weights)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer, _ = tiny
    config = _config(tmp_path, token_reward_source="dpo_derived", token_reward_model="treg:tiny")
    trainer = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=make_pairs(3, seed=2),
                          processing_class=tokenizer)
    rewards = list(trainer.train_dataset[CHOSEN_REWARDS]) + list(trainer.train_dataset[REJECTED_REWARDS])
    assert max(abs(v) for row in rewards for v in row) < 1e-4

    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "dpo-lora")
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    config = _config(tmp_path, token_reward_source="dpo_derived", token_reward_model=str(tmp_path / "dpo-lora"))
    ds = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=make_pairs(3, seed=2),
                     processing_class=tokenizer).train_dataset
    expected = attach_dpo_derived_rewards(ds.remove_columns([CHOSEN_REWARDS, REJECTED_REWARDS]), merged, tokenizer,
                                          max_length=1024, show_progress=False)
    assert max(abs(v) for row in ds[CHOSEN_REWARDS] for v in row) > 1e-3, "the adapter changes the model"
    for col in (CHOSEN_REWARDS, REJECTED_REWARDS):
        for got, want in zip(ds[col], expected[col], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)

