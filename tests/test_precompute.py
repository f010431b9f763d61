"""The token-reward pass called directly (treg.token_rewards.precompute), with no trainer: the columns and the cache
entry TRegTrainer gets, reused on a second call; what it plans to compute; its settings."""

import copy
import dataclasses
import os

import pytest

from treg.synthetic import make_pairs
from treg.token_rewards import (
    CHOSEN_REWARDS,
    PER_TOKEN_COLUMNS,
    REF_CHOSEN,
    REF_CHOSEN_SUM,
    REF_REJECTED,
    REF_REJECTED_SUM,
    REF_TOKEN_COLUMNS,
    REJECTED_REWARDS,
    TOKEN_REWARD_COLUMNS,
    precompute,
)
from treg.token_rewards.precompute import Distributed, PassPlan, PassSettings, attach_token_columns
from treg.trainer import TRegConfig, TRegTrainer

N_PAIRS = 12
WRITTEN = PER_TOKEN_COLUMNS + (REF_CHOSEN_SUM, REF_REJECTED_SUM)


def entries(root):
    return sorted(os.listdir(os.path.join(root, "token_rewards")))


def test_the_pass_equals_the_trainers_and_reuses_its_cache(tiny, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny
    trainer_cache, direct_cache = str(tmp_path / "trainer-cache"), str(tmp_path / "direct-cache")
    args = TRegConfig(output_dir=str(tmp_path / "out"), use_cpu=True, activation_checkpointing=False,
                      report_to="none", disable_tqdm=True, treg_alpha=0.5, max_length=128,
                      token_reward_cache_dir=trainer_cache, token_reward_shard_size=5)
    trained = TRegTrainer(copy.deepcopy(model), args=args, train_dataset=make_pairs(N_PAIRS, seed=3),
                          processing_class=tokenizer).train_dataset
    assert set(WRITTEN) <= set(trained.column_names)
    tokenized = trained.remove_columns(list(WRITTEN))  # the rows as the trainer tokenized them, before the pass

    settings = dataclasses.replace(PassSettings.from_config(args), token_reward_cache_dir=direct_cache)
    direct = attach_token_columns(tokenized, copy.deepcopy(model), tokenizer, settings)
    for column in WRITTEN:
        assert direct[column] == trained[column], column
    assert entries(direct_cache) == entries(trainer_cache)  # the same key: the trainer's entries serve the pass

    def no_scoring(*args, **kwargs):
        raise AssertionError("the second call should load the cache entry, not score")

    monkeypatch.setattr(precompute, "score_rows", no_scoring)
    again = attach_token_columns(tokenized, copy.deepcopy(model), tokenizer, settings, Distributed(), name="again")
    for column in WRITTEN:
        assert again[column] == direct[column], column
    assert entries(direct_cache) == entries(trainer_cache)


def test_the_plan_computes_only_what_the_dataset_lacks():
    dpo = PassSettings()
    plan = PassPlan.for_dataset(dpo, ["prompt_ids"])
    assert plan.with_reference and plan.source == "contrastive" and plan.run_reference
    assert plan.written == (REF_CHOSEN, REF_REJECTED, REF_CHOSEN_SUM, REF_REJECTED_SUM) + TOKEN_REWARD_COLUMNS
    assert PassPlan.for_dataset(dpo, PER_TOKEN_COLUMNS) is None  # supplied columns are kept, nothing to compute
    plan = PassPlan.for_dataset(dpo, TOKEN_REWARD_COLUMNS)  # r̂ supplied: only the reference log-probs
    assert plan.source is None and plan.with_reference and plan.describe() == "reference log-probs"

    simpo = PassSettings(base_loss="simpo")
    plan = PassPlan.for_dataset(simpo, [])
    assert not plan.with_reference and plan.run_reference and plan.written == TOKEN_REWARD_COLUMNS
    assert PassPlan.for_dataset(dataclasses.replace(simpo, treg_alpha=0.0), []) is None

    derived = dataclasses.replace(simpo, token_reward_source="dpo_derived", token_reward_model="some/dpo")
    plan = PassPlan.for_dataset(derived, [])
    assert plan.with_reference, "DPO-derived r̂ needs the reference log-probs, even under SimPO"
    plan = PassPlan.for_dataset(derived, REF_TOKEN_COLUMNS)
    assert not plan.run_reference and plan.written == (CHOSEN_REWARDS, REJECTED_REWARDS)


def test_settings_default_and_check_as_the_config(tmp_path):
    args = TRegConfig(output_dir=str(tmp_path), use_cpu=True)
    assert PassSettings.from_config(args) == PassSettings(disable_tqdm=args.disable_tqdm)
    with pytest.raises(ValueError, match="token_reward_source"):
        PassSettings(token_reward_source="oracle")
    with pytest.raises(ValueError, match="critic_model"):
        PassSettings(token_reward_source="critic")
    assert PassSettings(token_reward_source="critic", treg_alpha=0.0).critic_model is None  # α = 0: no critic used
