"""Distilled RLAIF: the soft-label loss by hand, and a few RewardTrainer steps that really use the soft labels."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

from treg.feedback.reward_model import SoftLabelRewardTrainer, load_label_dataset, main, soft_label_loss
from treg.synthetic import build_tokenizer


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_soft_label_loss_by_hand():
    r1, r2 = torch.tensor([2.0, 0.5, -1.0, 30.0]), torch.tensor([1.0, 0.5, 2.0, -30.0])
    p = torch.tensor([0.8, 0.3, 1.0, 0.0])
    got = soft_label_loss(r1, r2, p)
    want = [-(pi * math.log(_sig(a - b)) + (1 - pi) * math.log(_sig(b - a))) for a, b, pi in
            zip(r1.tolist(), r2.tolist(), p.tolist())]
    assert got.shape == (4,) and got.tolist() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(soft_label_loss(torch.tensor([1e4]), torch.tensor([-1e4]), torch.tensor([0.0]))).all()
    # p = 1: the Bradley–Terry loss
    bt = -torch.nn.functional.logsigmoid(r1 - r2)
    assert soft_label_loss(r1, r2, torch.ones(4)).tolist() == pytest.approx(bt.tolist(), rel=1e-6)
    # p = 0.5: symmetric in the two responses, zero gradient in the margin at a zero margin
    half = torch.full((4,), 0.5)
    assert soft_label_loss(r1, r2, half).tolist() == pytest.approx(soft_label_loss(r2, r1, half).tolist(), rel=1e-6)
    m = torch.zeros(3, requires_grad=True)
    soft_label_loss(m, torch.zeros(3), torch.full((3,), 0.5)).sum().backward()
    assert m.grad.abs().max().item() == 0.0
    # gradient in the margin is σ(margin) − p
    m = torch.tensor([0.7], requires_grad=True)
    soft_label_loss(m, torch.zeros(1), torch.tensor([0.9])).sum().backward()
    assert m.grad.item() == pytest.approx(_sig(0.7) - 0.9, rel=1e-5)


ROWS = [
    ("copy: 1 2", "1 2", "1 3", 0.9),
    ("sort: 3 1 2", "1 2 3", "3 2 1", 0.2),
    ("inc: 4 5", "5 6", "5 7", 0.5),
    ("reverse: 1 2 3", "3 2 1", "1 2 3", 1.0),
]


def _dataset():
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}], "ai_preference": q} for p, c, r, q in ROWS
    ])


def _rm(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    return LlamaForSequenceClassification(config)


def _rewards(model, tok, side):
    out = []
    with torch.no_grad():
        for p, c, r, _ in ROWS:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": c if side == "chosen" else r}]
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
            out.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return torch.tensor(out)


def test_trainer_uses_soft_labels(tmp_path):
    from trl import RewardConfig

    tok = build_tokenizer()
    model = _rm(tok)
    with torch.no_grad():
        model.score.weight.mul_(100.0)  # margins of order 1, so the soft and hard losses differ clearly
    r1, r2 = _rewards(model, tok, "chosen"), _rewards(model, tok, "rejected")
    p = torch.tensor([q for *_, q in ROWS])
    expected = soft_label_loss(r1, r2, p).mean().item()
    bradley_terry = soft_label_loss(r1, r2, torch.ones(4)).mean().item()
    config = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=3, per_device_train_batch_size=4,
                          learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                          use_cpu=True, disable_tqdm=True)
    trainer = SoftLabelRewardTrainer(model=model, args=config, train_dataset=_dataset(), processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    assert losses[0] == pytest.approx(expected, abs=1e-3)  # the whole dataset is the first batch
    assert abs(expected - bradley_terry) > 1e-2  # so the check above tells the two losses apart
    assert losses[-1] < losses[0]


def test_main_trains_and_saves(tmp_path, capsys, monkeypatch):
    import treg.feedback.reward_model as rmod

    tok = build_tokenizer()
    monkeypatch.setattr(rmod, "load_reward_model", lambda name: (_rm(tok), tok))
    data = tmp_path / "labels"
    _dataset().save_to_disk(str(data))
    assert load_label_dataset(str(data)).column_names == ["prompt", "chosen", "rejected", "ai_preference"]
    out = tmp_path / "rm"
    assert main(["--model", "treg:tiny", "--dataset", str(data), "--output_dir", str(out), "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["steps"] == 2 and stats["seconds_per_step"] > 0
    assert LlamaForSequenceClassification.from_pretrained(str(out)).config.num_labels == 1


def test_label_output_orientation(tmp_path):
    """`treg label` output: ai_preference = P(response_1 better), chosen/rejected oriented by the AI label."""
    ds = Dataset.from_list([
        {"prompt": "q", "response_1": "a", "response_2": "b", "chosen": "b", "rejected": "a", "ai_preference": 0.2},
    ])
    ds.save_to_disk(str(tmp_path / "lab"))
    row = load_label_dataset(str(tmp_path / "lab"))[0]
    assert (row["chosen"], row["rejected"], row["ai_preference"]) == ("a", "b", 0.2)


def test_bad_labels_rejected(tmp_path):
    ds = _dataset().map(lambda r: {"ai_preference": 1.5})
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="not a probability"):
        load_label_dataset(str(tmp_path / "bad"))
