"""A few training steps on real HH-RLHF rows with the tiny model (its byte-level tokenizer covers any text)."""

import copy
from pathlib import Path

import pytest

from treg.data import load_preference_dataset
from treg.trainer import TRegConfig, TRegTrainer

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH.exists(), reason="shared/data not present")
def test_trains_on_hh_rlhf_rows(tmp_path, tiny):
    model, tokenizer, _ = tiny
    rows = load_preference_dataset(str(HH), max_rows=200, drop_invalid=True)  # 4 of these rows are bad
    # keep rows whose prompt fits max_length (longer ones are an error naming the row, tested elsewhere)
    rows = rows.filter(lambda r: sum(len(m["content"]) for m in r["prompt"]) < 600).select(range(24))
    config = TRegConfig(
        output_dir=str(tmp_path), treg_alpha=0.25, max_length=768, per_device_train_batch_size=4, max_steps=3,
        learning_rate=1e-4, use_cpu=True, activation_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1, token_reward_cache_dir=str(tmp_path / "cache"),
    )
    trainer = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=rows, processing_class=tokenizer)
    ds = trainer.train_dataset
    assert len(ds) == 24
    assert any(len(p) > 1 for p in ds["prompt"]), "multi-turn dialogues rendered through the chat template"
    assert all(len(c) == len(r) for c, r in zip(ds["chosen_ids"], ds["chosen_token_rewards"]))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
