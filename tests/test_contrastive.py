"""Contrastive self-generated token rewards (METHOD.md §2): r̂_t = σ(logp⁺_t − logp⁻_t) − 0.5, the per-token reference
log-probs computed in the same pass, their alignment with truncation, and the on-disk cache."""

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

import treg.token_rewards.contrastive as contrastive
from treg.synthetic import make_pairs
from treg.token_rewards import (
    CHOSEN_REWARDS,
    REF_CHOSEN,
    REF_CHOSEN_SUM,
    REF_REJECTED,
    REJECTED_REWARDS,
    TokenRewardError,
    check_token_columns,
    kept_completion_length,
)
from treg.token_rewards.contrastive import (
    DEFAULT_NEGATIVE_TEMPLATE,
    DEFAULT_POSITIVE_TEMPLATE,
    attach_contrastive_rewards,
    check_template,
    compute_columns,
    contrastive_rewards,
    render_prompt_ids,
)
from treg.trainer import TRegConfig, TRegTrainer

N_ROWS = 8


def _config(tmp, **overrides):
    kw = dict(
        output_dir=str(tmp / "out"), use_cpu=True, activation_checkpointing=False, report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=1, per_device_train_batch_size=4, max_steps=1,
        treg_alpha=0.5, token_reward_cache_dir=str(tmp / "cache"),
    )
    kw.update(overrides)
    return TRegConfig(**kw)


def naive_logps(model, context, completion):
    """log p(completion_t | context, completion_<t): one unpadded forward, plain log-softmax."""
    ids = torch.tensor([list(context) + list(completion)])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(context)
    return np.array([logps[n - 1 + t, tok].item() for t, tok in enumerate(completion)])


@pytest.fixture(scope="module")
def trainer(tiny, tmp_path_factory):
    """A T-REG trainer on 8 toy pairs: its train_dataset is tokenized the trainer's way and carries r̂ and ref logps."""
    model, tokenizer, _ = tiny
    tmp = tmp_path_factory.mktemp("contrastive")
    return TRegTrainer(
        copy.deepcopy(model), args=_config(tmp), train_dataset=make_pairs(N_ROWS, seed=11), processing_class=tokenizer
    )


@pytest.fixture(scope="module")
def prepared(trainer):
    return trainer.train_dataset


@pytest.fixture(scope="module")
def tokenized(prepared):
    """Only what attach_contrastive_rewards needs, 4 rows (keeps the cache tests cheap)."""
    return prepared.select(range(4)).select_columns(["prompt", "prompt_ids", "chosen_ids", "rejected_ids"])


# ------------------------------------------------------------------------------------------------ the r̂ formula
def test_compute_columns_matches_hand_computation(tiny, prepared):
    """For rows 0..2: r̂ = σ(lp⁺ − lp⁻) − 0.5 from naive forwards under render_prompt_ids(x⁺/x⁻); ref = lp under x."""
    model, tokenizer, _ = tiny
    rows = prepared.select(range(3))
    pos = [render_prompt_ids(tokenizer, p, DEFAULT_POSITIVE_TEMPLATE) for p in rows["prompt"]]
    neg = [render_prompt_ids(tokenizer, p, DEFAULT_NEGATIVE_TEMPLATE) for p in rows["prompt"]]
    cols = compute_columns(
        model, tokenizer, rows, positive_ids=pos, negative_ids=neg, max_length=None, batch_size=4, show_progress=False
    )
    for r in range(3):
        sides = (("chosen", CHOSEN_REWARDS, REF_CHOSEN), ("rejected", REJECTED_REWARDS, REF_REJECTED))
        for side, rew_col, ref_col in sides:
            y = rows[r][f"{side}_ids"]
            lp_pos, lp_neg = naive_logps(model, pos[r], y), naive_logps(model, neg[r], y)
            expected = 1 / (1 + np.exp(-(lp_pos - lp_neg))) - 0.5
            np.testing.assert_allclose(cols[rew_col][r], expected, rtol=0, atol=1e-5, err_msg=f"row {r} {side}")
            np.testing.assert_allclose(
                cols[ref_col][r], naive_logps(model, rows[r]["prompt_ids"], y), rtol=0, atol=1e-5
            )
            values = np.asarray(cols[rew_col][r])
            assert ((values > -0.5) & (values < 0.5)).all()
        assert cols[REF_CHOSEN_SUM][r] == pytest.approx(sum(cols[REF_CHOSEN][r]), abs=1e-4)
    # the rewards are not trivially zero: the tiny model does respond to x⁺ / x⁻
    assert max(abs(v) for row in cols[REJECTED_REWARDS] for v in row) > 0.05


def test_trainer_columns_equal_compute_columns(tiny, prepared):
    """What the trainer attached is what compute_columns gives for the same rows (no reordering, no mix-up)."""
    model, tokenizer, _ = tiny
    rows = prepared.select(range(N_ROWS))
    pos = [render_prompt_ids(tokenizer, p, DEFAULT_POSITIVE_TEMPLATE) for p in rows["prompt"]]
    neg = [render_prompt_ids(tokenizer, p, DEFAULT_NEGATIVE_TEMPLATE) for p in rows["prompt"]]
    cols = compute_columns(model, tokenizer, rows, positive_ids=pos, negative_ids=neg, max_length=None, batch_size=3,
                           show_progress=False)
    for col in (CHOSEN_REWARDS, REJECTED_REWARDS, REF_CHOSEN, REF_REJECTED):
        for r in range(N_ROWS):
            np.testing.assert_allclose(prepared[r][col], cols[col][r], rtol=0, atol=1e-5, err_msg=f"{col} row {r}")


def test_contrastive_rewards_stable_for_huge_differences():
    lp_pos = np.array([0.0, -1e4, 0.0, -3.0, -2.0], dtype=np.float32)
    lp_neg = np.array([-1e4, 0.0, 0.0, -1.0, -2.0 - 1e-6], dtype=np.float32)
    out = contrastive_rewards(lp_pos, lp_neg)
    assert out.dtype == np.float32 and out.shape == (5,)
    assert np.isfinite(out).all()
    assert ((out > -0.5) & (out < 0.5)).all()
    assert out[0] > 0.4999 and out[1] < -0.4999
    assert out[2] == 0.0
    assert out[3] == pytest.approx(1 / (1 + math.exp(2.0)) - 0.5, abs=1e-7)
    assert 0 < out[4] < 1e-6  # a tiny positive difference is not cancelled to 0 or made negative


# ---------------------------------------------------------------------------------------------- prompt rendering
def test_render_conversational_wraps_only_the_last_user_message(tiny):
    tokenizer = tiny[1]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "copy: 1 2"},
        {"role": "assistant", "content": "1 2"},
        {"role": "user", "content": "sort: 3 1"},
    ]
    snapshot = copy.deepcopy(messages)
    ids = render_prompt_ids(tokenizer, messages, "Q {prompt} END")
    expected = (
        "<|system|>Be brief.<|end|><|user|>copy: 1 2<|end|><|assistant|>1 2<|end|>"
        "<|user|>Q sort: 3 1 END<|end|><|assistant|>"
    )
    assert tokenizer.decode(ids) == expected
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # ends with the generation prompt
    assert messages == snapshot  # the caller's rows are not mutated


def test_render_plain_prompt_tokenizes_the_formatted_text(tiny):
    """The template wraps the prompt's text; its trailing whitespace (what separates it from the response) follows."""
    tokenizer = tiny[1]
    ids = render_prompt_ids(tokenizer, "sort: 3 1\n", "Please: {prompt}!")
    assert ids == tokenizer(text="Please: sort: 3 1!\n")["input_ids"]
    assert tokenizer.decode(ids) == "Please: sort: 3 1!\n"


@pytest.mark.parametrize("conversational", [True, False])
def test_identity_template_reproduces_the_trainers_prompt_ids(tiny, tmp_path, conversational):
    """With template "{prompt}", x⁺ is exactly the trainer's x: the three passes share the tokenization of x."""
    model, tokenizer, _ = tiny
    trainer = TRegTrainer(
        copy.deepcopy(model), args=_config(tmp_path, treg_alpha=0.0, token_reward_cache_dir="none"),
        train_dataset=make_pairs(4, seed=2, conversational=conversational), processing_class=tokenizer,
    )
    ds = trainer.train_dataset
    for r in range(4):
        assert render_prompt_ids(tokenizer, ds[r]["prompt"], "{prompt}") == ds[r]["prompt_ids"]


SHARED = next((p for p in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")) if p.is_dir()),
              None)


def test_d7_x_plus_leaves_out_what_trl_moved_into_the_response():
    """Qwen: a response starting with "\n" merges with the generation prompt's "\n" into one "\n\n" token, which
    TRL counts to the response. x⁺/x⁻ must not keep that "\n" as well: x⁺ ids + the response ids are exactly the
    tokens of x⁺ followed by the response, as x's are of x followed by it."""
    if SHARED is None or not (SHARED / "tokenizers" / "qwen2.5-instruct").is_dir():
        pytest.skip("the shared real tokenizers (../shared/tokenizers) are not present")
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5-instruct")

    def render(messages, **kw):
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    prompt = [{"role": "user", "content": "Say hello."}]
    for response in ("\nHello", " Hello", "Hello"):
        chosen = [{"role": "assistant", "content": response}]
        x, x_y = render(prompt, add_generation_prompt=True), render(prompt + chosen)
        cut = common_prefix_length(x, x_y)  # TRL's split of prompt and response
        prompt_ids, chosen_ids = x[:cut], x_y[cut:]
        assert (cut < len(x)) == response.startswith("\n")
        for template in (DEFAULT_POSITIVE_TEMPLATE, DEFAULT_NEGATIVE_TEMPLATE):
            plus = render_prompt_ids(tok, prompt, template, prompt_ids)
            wrapped = [{"role": "user", "content": template.format(prompt="Say hello.")}]
            assert plus + chosen_ids == render(wrapped + chosen), (response, template)
            start = tok.convert_tokens_to_ids("<|im_start|>")
            assert plus.count(start) == x.count(start) == 3  # Qwen's default system turn, the user, the assistant
    with pytest.raises(TokenRewardError, match="row 3"):
        render_prompt_ids(tok, prompt, DEFAULT_POSITIVE_TEMPLATE, [1, 2, 3], row=3)


def test_d8_plain_prompt_x_plus_ends_with_the_prompts_separator(tiny, tmp_path):
    """Plain strings: TRL joins x and the response as they are, so x ends with what separates them ("…\n"); x⁺
    must end with it too, not glue the response onto "…concise."."""
    model, tokenizer, _ = tiny
    trainer = TRegTrainer(
        copy.deepcopy(model), args=_config(tmp_path, treg_alpha=0.0, token_reward_cache_dir="none"),
        train_dataset=make_pairs(2, seed=2, conversational=False), processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    assert row["prompt"].endswith("\n")
    response = tokenizer.decode(row["chosen_ids"])
    assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == row["prompt"] + response
    for template in (DEFAULT_POSITIVE_TEMPLATE, DEFAULT_NEGATIVE_TEMPLATE):
        plus = render_prompt_ids(tokenizer, row["prompt"], template, row["prompt_ids"])
        expected = template.format(prompt=row["prompt"].rstrip()) + "\n" + response
        assert tokenizer.decode(plus + row["chosen_ids"]) == expected


# ------------------------------------------------------------------------------------ reference log-probs at init
def test_reference_logps_equal_policy_logps_at_init(trainer):
    """At step 0 the policy is the reference, so every DPO implicit token reward β(logp_θ − logp_ref) is ~0, measured on
    the trainer's own path (collator, right padding, fused LM head) against the scoring pass (left padding)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    mask = batch["completion_mask"][:, 1:]
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
                            fused_lm_head=True, use_cache=False)
        policy = out.log_probs[:, -mask.size(1):]
        ref = batch["ref_token_logps"][:, 1:]
        assert (ref[mask == 0] == 0).all() and (ref[mask == 1] < 0).all()
        implicit = trainer.args.beta * (policy - ref) * mask
        assert implicit.abs().max().item() < 1e-5
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert abs(metrics["rewards/chosen"][-1]) < 1e-5 and abs(metrics["rewards/margins"][-1]) < 1e-5


# ------------------------------------------------------------------------------------------------ truncation
def test_truncated_columns_have_one_value_per_kept_token(tiny, tmp_path, prepared):
    model, tokenizer, _ = tiny
    max_length = 14
    trainer = TRegTrainer(
        copy.deepcopy(model), args=_config(tmp_path, max_length=max_length),
        train_dataset=make_pairs(N_ROWS, seed=11), processing_class=tokenizer,
    )
    ds = trainer.train_dataset
    n_cut = 0
    for r in range(N_ROWS):
        p = len(ds[r]["prompt_ids"])
        for side, cols in (("chosen", (CHOSEN_REWARDS, REF_CHOSEN)), ("rejected", (REJECTED_REWARDS, REF_REJECTED))):
            c = len(ds[r][f"{side}_ids"])
            kept = kept_completion_length(p, c, max_length)
            n_cut += kept < c
            for col in cols:
                assert len(ds[r][col]) == kept, (r, col)
                # causal model: the kept values are the untruncated values' prefix
                np.testing.assert_allclose(ds[r][col], prepared[r][col][:kept], rtol=0, atol=1e-5)
    assert n_cut > 0  # max_length really cut some completions


# ------------------------------------------------------------------------------------------------------- cache
def _entries(cache_root):
    d = os.path.join(cache_root, "token_rewards")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _attach(tiny, ds, cache_dir, **overrides):
    model, tokenizer, _ = tiny
    kw = dict(model_hash="hash-a", max_length=None, cache_dir=cache_dir if cache_dir is None else str(cache_dir),
              batch_size=8, show_progress=False)
    kw.update(overrides)
    return attach_contrastive_rewards(ds, model, tokenizer, **kw)


def test_cache_hit_does_not_recompute(tiny, tokenized, tmp_path, monkeypatch):
    first = _attach(tiny, tokenized, tmp_path)
    assert len(_entries(tmp_path)) == 1

    def boom(*args, **kwargs):
        raise AssertionError("compute_columns called although the cache holds this entry")

    monkeypatch.setattr(contrastive, "compute_columns", boom)
    second = _attach(tiny, tokenized, tmp_path)
    for col in (CHOSEN_REWARDS, REJECTED_REWARDS, REF_CHOSEN, REF_REJECTED):
        assert second[col] == first[col]
    assert second["prompt_ids"] == tokenized["prompt_ids"]
    assert len(_entries(tmp_path)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"positive_template": "Better: {prompt}"},
        {"negative_template": "Worse: {prompt}"},
        {"max_length": 15},
        {"model_hash": "hash-b"},
        {"with_rewards": False},
    ],
    ids=lambda c: next(iter(c)),
)
def test_cache_key_covers_the_inputs(tiny, tokenized, tmp_path, change):
    _attach(tiny, tokenized, tmp_path)
    before = _entries(tmp_path)
    out = _attach(tiny, tokenized, tmp_path, **change)
    after = _entries(tmp_path)
    assert len(before) == 1 and len(after) == 2 and before[0] in after
    if "max_length" in change:
        assert [len(v) for v in out[REF_CHOSEN]] == [
            kept_completion_length(len(p), len(c), 15)
            for p, c in zip(tokenized["prompt_ids"], tokenized["chosen_ids"])
        ]


def test_cache_key_covers_the_data(tiny, tokenized, tmp_path):
    _attach(tiny, tokenized, tmp_path)
    _attach(tiny, tokenized.select([1, 0, 2, 3]), tmp_path)
    assert len(_entries(tmp_path)) == 2


def test_default_cache_dir_and_none(tiny, tokenized, tmp_path, monkeypatch):
    monkeypatch.setenv("TREG_CACHE_DIR", str(tmp_path / "default"))
    for off in ("none", "None"):
        out = _attach(tiny, tokenized, off)
        assert len(out[CHOSEN_REWARDS]) == 4
    assert not (tmp_path / "default").exists()
    assert list(tmp_path.iterdir()) == []
    _attach(tiny, tokenized, None)  # None → $TREG_CACHE_DIR
    assert len(_entries(tmp_path / "default")) == 1


def test_failed_compute_leaves_no_entry(tiny, tokenized, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(contrastive, "compute_columns", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        _attach(tiny, tokenized, tmp_path)
    monkeypatch.undo()
    assert _entries(tmp_path) == []
    out = _attach(tiny, tokenized, tmp_path)  # the next run computes normally
    assert len(out) == 4 and len(_entries(tmp_path)) == 1


def test_interrupted_write_leaves_no_entry_and_no_temp_dir(tiny, tokenized, tmp_path, monkeypatch):
    """The write fails after files were already written to the temporary directory: nothing may be left behind."""
    original = Dataset.save_to_disk
    written = []

    def save_then_fail(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        written.append(os.listdir(path))
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "save_to_disk", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _attach(tiny, tokenized, tmp_path)
    monkeypatch.undo()
    assert written and written[0]  # the failure did happen mid-write
    assert os.listdir(tmp_path / "token_rewards") == []  # no entry, no .tmp-* directory
    _attach(tiny, tokenized, tmp_path)
    assert len(_entries(tmp_path)) == 1


# ------------------------------------------------------------------------------------------ check_token_columns
def _columns_dataset(**override):
    """3 rows; prompt 2 tokens, chosen 3, rejected 2. Row 2 gets ``override`` for the named columns."""
    cols = {
        "prompt_ids": [[1, 2]] * 3,
        "chosen_ids": [[3, 4, 5]] * 3,
        "rejected_ids": [[6, 7]] * 3,
        CHOSEN_REWARDS: [[0.1, -0.2, 0.3]] * 3,
        REJECTED_REWARDS: [[-0.4, 0.49]] * 3,
        REF_CHOSEN: [[-1.0, -2.0, -3.0]] * 3,
        REF_REJECTED: [[-0.5, -7.0]] * 3,
    }
    for name, row2 in override.items():
        cols[name] = cols[name][:2] + [row2]
    return Dataset.from_dict(cols)


def test_check_token_columns_accepts_valid_rows():
    check_token_columns(_columns_dataset(), max_length=None)
    # log-probs far outside (-0.5, 0.5) are fine for the reference columns
    check_token_columns(_columns_dataset(**{REF_CHOSEN: [-30.0, -0.0001, -4.0]}), max_length=None)
    # with max_length=4 only 2 chosen and 2 rejected tokens are kept
    ds = _columns_dataset()
    ds = ds.map(lambda ex: {CHOSEN_REWARDS: ex[CHOSEN_REWARDS][:2], REF_CHOSEN: ex[REF_CHOSEN][:2]})
    check_token_columns(ds, max_length=4)
    with pytest.raises(TokenRewardError, match="row 0"):
        check_token_columns(ds, max_length=None)


@pytest.mark.parametrize(
    "column, row2, match",
    [
        (CHOSEN_REWARDS, [0.1, 0.2], "2 values but the trainer trains on 3 chosen tokens"),
        (REJECTED_REWARDS, [0.1, 0.2, 0.3], "3 values but the trainer trains on 2 rejected tokens"),
        (REF_REJECTED, [-1.0], "1 values"),
        (CHOSEN_REWARDS, [0.1, float("nan"), 0.3], "non-finite value nan"),
        (REF_CHOSEN, [-1.0, float("-inf"), -2.0], "non-finite value -inf"),
        (REJECTED_REWARDS, [float("inf"), 0.0], "non-finite value inf"),
        (CHOSEN_REWARDS, [0.1, 0.5, 0.3], r"\(-0.5, 0.5\)"),
        (REJECTED_REWARDS, [-0.7, 0.0], r"max \|r̂\| = 0.700"),
    ],
)
def test_check_token_columns_names_row_and_column(column, row2, match):
    with pytest.raises(TokenRewardError, match=match) as err:
        check_token_columns(_columns_dataset(**{column: row2}), max_length=None)
    assert "row 2" in str(err.value) and repr(column) in str(err.value)


# -------------------------------------------------------------------------------------------------- templates
def test_check_template():
    check_template("{prompt}", "t")
    check_template("Improve this: {prompt} {{json}}", "t")
    with pytest.raises(ValueError, match=r"contrastive_positive_template must contain the placeholder \{prompt\}"):
        check_template("no placeholder", "contrastive_positive_template")
    for bad in ("{prompt} and {other}", "{prompt} {", "} {prompt}", "{prompt} {0}"):
        with pytest.raises(ValueError, match="braces other than"):
            check_template(bad, "t")
    with pytest.raises(ValueError, match="contrastive_negative_template"):
        attach_contrastive_rewards(Dataset.from_dict({"prompt": []}), None, None, model_hash="h", max_length=None,
                                   negative_template="{prompt} {x}")
