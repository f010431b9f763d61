"""TRegTrainer invariants on the tiny model (CPU): the collator contract, α=0 parity with TRL's DPOTrainer, determinism,
gradient accumulation, resume, SimPO, logged metrics and the configuration / data errors."""

import copy
import math

import pytest
import torch
from torch.testing import assert_close
from trl import DPOConfig, DPOTrainer

from treg.data import PreferenceDataError
from treg.synthetic import make_pairs
from treg.token_rewards import (
    CHOSEN_REWARDS,
    PER_TOKEN_COLUMNS,
    REF_CHOSEN,
    REF_REJECTED,
    REJECTED_REWARDS,
    TokenRewardError,
    precompute,
)
from treg.trainer import DataCollatorForTReg, TRegConfig, TRegTrainer

N_PAIRS = 32
LR = 1e-3  # large enough that 2-4 steps move the weights far beyond the tolerances below


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Token-reward cache shared by the runs of this module: every run starts from the same weights, so the pass runs
    once per setting and later trainers load it (the cache itself is tested in test_contrastive.py)."""
    return str(tmp_path_factory.mktemp("treg-cache"))


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(N_PAIRS, seed=0)


def treg_config(out, cache_dir, **overrides):
    kw = dict(
        output_dir=str(out), use_cpu=True, activation_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1, per_device_train_batch_size=4, max_steps=3, learning_rate=LR, seed=0,
        treg_alpha=0.5, token_reward_cache_dir=cache_dir,
    )
    kw.update(overrides)
    return TRegConfig(**kw)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def record_batches(trainer):
    """Wrap the trainer's collator to record each batch's input_ids (the data order actually trained on)."""
    seen, collate = [], trainer.data_collator

    def recording(examples):
        batch = collate(examples)
        seen.append(batch["input_ids"].clone())
        return batch

    trainer.data_collator = recording
    return seen


def train_treg(tiny, pairs, out, cache_dir, resume=None, **overrides):
    model, tokenizer, _ = tiny
    trainer = TRegTrainer(
        copy.deepcopy(model), args=treg_config(out, cache_dir, **overrides), train_dataset=pairs,
        processing_class=tokenizer,
    )
    batches = record_batches(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return {"weights": weights(trainer.model), "logs": trainer.state.log_history, "batches": batches,
            "trainer": trainer}


@pytest.fixture(scope="module")
def run_alpha05(tiny, pairs, cache_dir, tmp_path_factory):
    return train_treg(tiny, pairs, tmp_path_factory.mktemp("a05"), cache_dir)


# ------------------------------------------------------------------------------------------------------ collator
def test_collator_docstring_example():
    c = DataCollatorForTReg(pad_token_id=0)
    out = c([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5],
              "chosen_token_rewards": [0.2], "rejected_token_rewards": [-0.1, 0.3]}])
    assert_close(out["token_rewards"], torch.tensor([[0.0, 0.0, 0.2, 0.0], [0.0, 0.0, -0.1, 0.3]]), rtol=0, atol=0)
    assert torch.equal(out["input_ids"], torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5]]))
    assert torch.equal(out["completion_mask"], torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]]))
    assert "ref_token_logps" not in out  # only added when the examples carry the columns


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_collator_truncation_lines_up_with_completion_mask(pad_to_multiple_of):
    """max_length=6: row 0 (prompt 3, chosen 5, rejected 2) keeps 3 chosen and 2 rejected tokens; row 1 (prompt 2,
    chosen 1, rejected 6) keeps 1 and 4. Values are nonzero exactly where completion_mask == 1."""
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6, 7, 8], "rejected_ids": [9, 10],
         "chosen_token_rewards": [0.1, 0.2, 0.3], "rejected_token_rewards": [-0.1, -0.2],
         "ref_chosen_token_logps": [-1.0, -2.0, -3.0], "ref_rejected_token_logps": [-4.0, -5.0]},
        {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [14, 15, 16, 17, 18, 19],
         "chosen_token_rewards": [0.4], "rejected_token_rewards": [0.11, 0.12, 0.13, 0.14],
         "ref_chosen_token_logps": [-6.0], "ref_rejected_token_logps": [-7.0, -8.0, -9.0, -1.5]},
    ]
    out = DataCollatorForTReg(pad_token_id=0, max_length=6, pad_to_multiple_of=pad_to_multiple_of)(examples)
    width = 6 if pad_to_multiple_of is None else 8
    for key in ("input_ids", "completion_mask", "token_rewards", "ref_token_logps"):
        assert out[key].shape == (4, width), key
    mask = out["completion_mask"]
    assert mask.sum(-1).tolist() == [3, 1, 2, 4]
    for key in ("token_rewards", "ref_token_logps"):
        assert torch.equal(out[key] != 0, mask == 1), key
    assert out["token_rewards"][0, 3:6].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert out["ref_token_logps"][3, 2:6].tolist() == pytest.approx([-7.0, -8.0, -9.0, -1.5])
    # a value count that does not match the kept tokens is an error naming the batch item
    examples[1]["rejected_token_rewards"] = [0.11, 0.12, 0.13, 0.14, 0.15, 0.16]
    with pytest.raises(TokenRewardError, match="batch item 1, column 'rejected_token_rewards': 6 values for 4"):
        DataCollatorForTReg(pad_token_id=0, max_length=6)(examples)


# --------------------------------------------------------------------------------------------- parity with TRL
def test_alpha_zero_matches_trl_dpo_trainer(tiny, pairs, cache_dir, tmp_path):
    """T-REG with α=0 is DPO: the same loss at every step (ln 2 at step 1) and the same weights after 3 steps as TRL's
    own DPOTrainer with a live reference model, given the same weights, data, seed, lr and batch size.

    Not bit-exact: TRL's reference log-probs come from a forward of the reference copy on each right-padded batch
    (fused LM head), ours from the precomputed left-padded scoring pass; they differ by float32 rounding (~1e-7 per
    token), as do the summation orders of the loss, so the gradients differ by ~1e-6 relative. The weights are
    compared after plain SGD at lr 0.5, where they move by up to ~4e-2 and agree to ~1e-6 (atol 5e-6 below). AdamW
    would also pass at 1e-5 but only just (8.9e-6 observed): it normalises away the gradient scale, which would hide
    a loss off by a constant factor, and amplifies rounding noise on coordinates whose gradient is ~0."""
    model, tokenizer, _ = tiny
    sgd = dict(optim="sgd", learning_rate=0.5, max_steps=3, per_device_train_batch_size=4, seed=0)
    ours = train_treg(tiny, pairs, tmp_path / "treg", cache_dir, treg_alpha=0.0, base_loss="dpo",
                      loss_type=["sigmoid"], **sgd)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, activation_checkpointing=False,
        precompute_ref_log_probs=False, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        **sgd,
    )
    trl = DPOTrainer(copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args, train_dataset=pairs,
                     processing_class=tokenizer)
    batches = record_batches(trl)
    trl.train()

    # same data order: both use the Trainer's RandomSampler seeded with args.seed (accelerate's loader collates one
    # batch ahead, so a run of n steps records n + 1 batches)
    assert len(batches) >= 3 and len(ours["batches"]) >= 3
    for a, b in zip(ours["batches"][:3], batches[:3]):
        assert torch.equal(a, b)

    assert ours["logs"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for step in range(3):  # later steps too, once the policy has moved away from the reference
        theirs = trl.state.log_history[step]
        assert ours["logs"][step]["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        for name in ("rewards/margins", "rewards/chosen"):
            assert ours["logs"][step][name] == pytest.approx(theirs[name], abs=1e-5), name
        assert ours["logs"][step]["logps/rejected"] == pytest.approx(theirs["logps/rejected"], rel=1e-5)

    final = weights(trl.model)
    assert max_diff(final, weights(model)) > 1e-2  # the comparison below is not vacuous
    assert_close(ours["weights"], final, rtol=0, atol=5e-6)


# -------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_weights(tiny, pairs, cache_dir, run_alpha05, tmp_path):
    again = train_treg(tiny, pairs, tmp_path, cache_dir)
    assert max_diff(run_alpha05["weights"], weights(tiny[0])) > 1e-3
    assert_close(again["weights"], run_alpha05["weights"], rtol=0, atol=0)


def test_different_seed_or_alpha_gives_different_weights(tiny, pairs, cache_dir, run_alpha05, tmp_path):
    other_seed = train_treg(tiny, pairs, tmp_path, cache_dir, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(other_seed["batches"], run_alpha05["batches"]))
    assert max_diff(other_seed["weights"], run_alpha05["weights"]) > 1e-4
    # same data order, only α differs: the regularizer changes the update
    run_alpha0 = train_treg(tiny, pairs, tmp_path / "a0", cache_dir, treg_alpha=0.0)
    assert all(torch.equal(a, b) for a, b in zip(run_alpha0["batches"], run_alpha05["batches"]))
    assert max_diff(run_alpha0["weights"], run_alpha05["weights"]) > 1e-4


def test_gradient_accumulation_equivalence(tiny, pairs, cache_dir, tmp_path):
    """Batch 8 × accumulation 1 ≡ batch 4 × accumulation 2: the DPO loss and the per-pair regularizer are both means
    over pairs, and the Trainer averages the two micro-batch means.

    Plain SGD, on purpose: Adam's update is invariant to a constant gradient scale, so it would hide an accumulation
    bug that doubles or halves the gradient, and it amplifies float32 rounding on coordinates whose gradient is ~0
    (with AdamW at lr 1e-3 one coordinate in 1e5 differs by ~2e-5 here). With SGD the runs agree to ~1e-7."""
    sgd = dict(optim="sgd", learning_rate=0.5, max_steps=2)
    big = train_treg(tiny, pairs, tmp_path / "big", cache_dir, per_device_train_batch_size=8, **sgd)
    acc = train_treg(tiny, pairs, tmp_path / "acc", cache_dir, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, **sgd)
    assert max_diff(big["weights"], weights(tiny[0])) > 1e-2
    for step in (0, 1):
        assert big["logs"][step]["loss"] == pytest.approx(acc["logs"][step]["loss"], abs=1e-6)
        assert big["logs"][step]["grad_norm"] == pytest.approx(acc["logs"][step]["grad_norm"], rel=1e-5)
    assert_close(acc["weights"], big["weights"], rtol=0, atol=1e-6)


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny, pairs, cache_dir, tmp_path):
    full = train_treg(tiny, pairs, tmp_path / "full", cache_dir, max_steps=4, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert ckpt.is_dir()
    resumed = train_treg(tiny, pairs, tmp_path / "resumed", cache_dir, max_steps=4, save_strategy="no",
                         resume=str(ckpt))
    assert resumed["trainer"].state.global_step == 4
    # steps 3 and 4 are trained on the batches of the uninterrupted run (skipped batches are not collated)
    for a, b in zip(resumed["batches"][:2], full["batches"][2:4], strict=True):
        assert torch.equal(a, b)
    assert max_diff(full["weights"], weights(tiny[0])) > 1e-3
    # bit-exact: weights, AdamW moments, scheduler and data position are restored, and the ops run in the same order
    assert_close(resumed["weights"], full["weights"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- SimPO
def test_simpo_alpha_zero_trains_and_needs_no_reference(tiny, pairs, cache_dir, tmp_path, monkeypatch):
    """SimPO is reference-free: at α = 0 there is nothing to precompute, and the loss reads no reference log-probs."""

    def no_pass(*args, **kwargs):
        raise AssertionError("SimPO at α = 0 needs neither reference log-probs nor token rewards")

    monkeypatch.setattr(precompute, "attach_contrastive_rewards", no_pass)
    run = train_treg(tiny, pairs, tmp_path, cache_dir, base_loss="simpo", beta=2.0, simpo_gamma=0.5, treg_alpha=0.0,
                     max_steps=2)
    assert not set(PER_TOKEN_COLUMNS) & set(run["trainer"].train_dataset.column_names)
    logs = run["logs"][:2]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["treg/base_loss"], abs=1e-6)  # α = 0: nothing else in the loss
    assert logs[0]["treg/reg"] == 0.0
    assert "treg/token_agreement" not in logs[0]  # no r̂ in the batch at α = 0
    assert max_diff(run["weights"], weights(tiny[0])) > 1e-4

    # the trainer's SimPO loss on 4 rows equals mean −log σ(r_w − r_l − γ), r = (β/|y|)·Σ_t logp, from naive forwards
    trainer = run["trainer"]
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = DataCollatorForTReg(pad_token_id=tiny[1].pad_token_id)(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        expected = []
        for row in rows:
            r_w, r_l = (2.0 / len(row[k]) * naive_sum_logp(trainer.model, row["prompt_ids"], row[k])
                        for k in ("chosen_ids", "rejected_ids"))
            expected.append(-torch.nn.functional.logsigmoid(torch.tensor(r_w - r_l - 0.5, dtype=torch.float64)))
    assert loss == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)


def naive_sum_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    return sum(logps[n - 1 + t, tok].item() for t, tok in enumerate(completion_ids))


# ------------------------------------------------------------------------------------------------------ metrics
def test_logged_metric_names(run_alpha05):
    first = run_alpha05["logs"][0]
    expected = {
        "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "treg/reg", "treg/weight", "treg/base_loss", "treg/token_agreement",
    }
    assert expected <= set(first), expected - set(first)
    assert 0.0 <= first["treg/token_agreement"] <= 1.0
    assert first["treg/weight"] == pytest.approx(0.5, abs=1e-4)  # w = σ(r_l − r_w) with r ≈ 0 at step 0
    # at later steps the regularizer is live: L = L_base + α·reg
    later = run_alpha05["logs"][2]
    assert later["loss"] == pytest.approx(later["treg/base_loss"] + 0.5 * later["treg/reg"], abs=1e-6)
    assert later["treg/reg"] != 0.0


# ----------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"truncation_mode": "keep_end"}, "truncation_mode must be 'keep_start'"),
        ({"loss_type": ["kto_pair"]}, r"loss_type=\['kto_pair'\]"),
        ({"loss_type": ["sigmoid", "hinge"]}, "supports one of"),
        ({"precompute_ref_log_probs": False}, "precompute_ref_log_probs=False is not supported"),
        ({"treg_alpha": -0.1}, "treg_alpha must be ≥ 0"),
        ({"base_loss": "orpo"}, r"base_loss='orpo': choose one of \['dpo', 'simpo'\]"),
        ({"contrastive_positive_template": "no placeholder"}, "must contain the placeholder"),
    ],
)
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        TRegConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_simpo_accepts_any_loss_type_field(tmp_path):
    TRegConfig(output_dir=str(tmp_path), use_cpu=True, base_loss="simpo", loss_type=["sigmoid"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default of bf16")
def test_default_config_on_cpu_does_not_raise_bf16_error():
    with pytest.raises(ValueError, match="bf16"):  # the stock DPOConfig default fails here ...
        DPOConfig()
    config = TRegConfig()  # ... TRegConfig's does not
    assert config.bf16 is False


# ------------------------------------------------------------------------------------------------- data errors
def test_prompt_filling_max_length_names_the_row(tiny, pairs, tmp_path):
    def long_prompt(row, idx):
        if idx == 3:
            row["prompt"] = [{"role": "user", "content": "copy: " + " ".join("7" * 40)}]
        return row

    data = pairs.select(range(6)).map(long_prompt, with_indices=True)
    with pytest.raises(PreferenceDataError) as err:
        TRegTrainer(copy.deepcopy(tiny[0]), args=treg_config(tmp_path, "none", max_length=32), train_dataset=data,
                    processing_class=tiny[1])
    message = str(err.value)
    assert "row 3" in message and "prompt" in message and "max_length=32" in message


@pytest.fixture(scope="module")
def supplied(tiny, pairs, cache_dir, tmp_path_factory):
    """8 raw pairs plus correct per-token columns (taken from a trainer that computed them)."""
    raw = pairs.select(range(8))
    trainer = TRegTrainer(copy.deepcopy(tiny[0]), args=treg_config(tmp_path_factory.mktemp("sup"), cache_dir),
                          train_dataset=raw, processing_class=tiny[1])
    cols = {c: trainer.train_dataset[c] for c in (CHOSEN_REWARDS, REJECTED_REWARDS, REF_CHOSEN, REF_REJECTED)}
    return raw, cols


def _with_columns(raw, cols):
    out = raw
    for name, values in cols.items():
        out = out.add_column(name, values)
    return out


def test_user_supplied_columns_skip_the_token_pass(tiny, supplied, tmp_path, monkeypatch):
    raw, cols = supplied

    def no_pass(*args, **kwargs):
        raise AssertionError("the token-reward pass ran although the columns were supplied")

    monkeypatch.setattr(precompute, "attach_contrastive_rewards", no_pass)
    trainer = TRegTrainer(copy.deepcopy(tiny[0]), args=treg_config(tmp_path, "none"),
                          train_dataset=_with_columns(raw, cols), processing_class=tiny[1])
    assert trainer.train_dataset[CHOSEN_REWARDS] == cols[CHOSEN_REWARDS]


def test_user_supplied_columns_with_wrong_length_name_the_row(tiny, supplied, tmp_path):
    raw, cols = supplied
    bad = dict(cols)
    bad[CHOSEN_REWARDS] = [list(v) + ([0.1] if r == 1 else []) for r, v in enumerate(cols[CHOSEN_REWARDS])]
    with pytest.raises(TokenRewardError) as err:
        TRegTrainer(copy.deepcopy(tiny[0]), args=treg_config(tmp_path, "none"),
                    train_dataset=_with_columns(raw, bad), processing_class=tiny[1])
    assert "row 1" in str(err.value) and CHOSEN_REWARDS in str(err.value)


def test_user_supplied_token_rewards_are_kept_when_only_reference_is_computed(tiny, supplied, tmp_path):
    """r̂ from another source (critic, DPO-derived) without reference log-probs: the trainer computes the reference
    columns and trains on the user's r̂, never silently replacing them by contrastive ones."""
    raw, cols = supplied
    mine = {c: [[0.3 if (r + t) % 2 else -0.2 for t in range(len(v))] for r, v in enumerate(cols[c])]
            for c in (CHOSEN_REWARDS, REJECTED_REWARDS)}
    trainer = TRegTrainer(copy.deepcopy(tiny[0]), args=treg_config(tmp_path, "none"),
                          train_dataset=_with_columns(raw, mine), processing_class=tiny[1])
    ds = trainer.train_dataset
    for c in (CHOSEN_REWARDS, REJECTED_REWARDS):
        assert [[round(x, 6) for x in row] for row in ds[c]] == mine[c]
    for c in (REF_CHOSEN, REF_REJECTED):
        for got, expected in zip(ds[c], cols[c]):
            assert got == pytest.approx(expected, abs=1e-5)

