"""Recipes and data written for other trainers (alignment-handbook's two formats, SimPO, WPO, TRL): each key keeps the
meaning it has there (treg.compat), mixtures read as their projects read them (treg.mixtures), columns training does
not read never reach TRL, other layouts are converted or refused in one line, and every recipe in recipes/compat
trains 2 steps on treg:tiny."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers  # noqa: F401  (bind transformers' log handler before any capsys test; see tests/test_audit.py)

from treg.cli import main, parse_train_args
from treg.compat import CompatError, check_push_to_hub, translate_flags, translate_recipe
from treg.data import PreferenceDataError, cut_prompts, keep_training_columns, prompt_length, to_preference_format
from treg.losses import dpo_loss
from treg.mixtures import load_mixture

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "recipes" / "compat"
COMPAT_RECIPES = sorted(COMPAT.glob("*.yaml"))
UF = "recipes/compat/data/ultrafeedback"


@pytest.fixture
def at_root(monkeypatch):
    """The compat recipes name their data relative to the repository root, as README's commands run them."""
    monkeypatch.chdir(ROOT)


def _translate(config, path="recipe.yaml", cuda=False):
    return translate_recipe(dict(config), path, cuda=cuda)


# ------------------------------------------------------------------------------------------------- key translation
def test_renamed_keys_keep_their_meaning():
    t = _translate({"torch_dtype": "bfloat16", "evaluation_strategy": "steps", "max_seq_length": 256,
                    "padding_free": True, "preprocessing_num_workers": 3, "hub_model_revision": "v1",
                    "gradient_checkpointing_kwargs": {"use_reentrant": False}, "warmup_ratio": 0.1, "beta": 0.1})
    assert t.config == {"dtype": "bfloat16", "eval_strategy": "steps", "max_length": 256, "pack_pairs": True,
                        "dataset_num_proc": 3, "hub_revision": "v1",
                        "activation_checkpointing_kwargs": {"use_reentrant": False}, "warmup_steps": 0.1, "beta": 0.1}


def test_a_renamed_key_given_twice_with_different_values_is_refused():
    with pytest.raises(CompatError, match="'evaluation_strategy'.*'eval_strategy'.*keep one"):
        _translate({"evaluation_strategy": "steps", "eval_strategy": "epoch"})
    assert _translate({"evaluation_strategy": "steps", "eval_strategy": "steps"}).config == {"eval_strategy": "steps"}


def test_warmup_ratio_and_warmup_steps_as_transformers_4_read_them():
    assert _translate({"warmup_ratio": 0.05}).config["warmup_steps"] == 0.05
    t = _translate({"warmup_ratio": 0.1, "warmup_steps": 100})
    assert t.config["warmup_steps"] == 100 and any("warmup_ratio 0.1 ignored" in n for n in t.notes)
    with pytest.raises(CompatError, match="warmup_ratio must be in"):
        _translate({"warmup_ratio": 1.5})


def test_keys_without_meaning_are_dropped_with_one_line_each():
    t = _translate({"overwrite_output_dir": True, "use_liger_kernel": True, "num_processes": 4, "beta": 0.1})
    assert t.config == {"beta": 0.1}
    assert len(t.notes) == 3 and all("\n" not in n for n in t.notes)
    assert any("num_processes ignored" in n and "accelerate launch" in n for n in t.notes)
    with pytest.raises(CompatError, match="streaming: true is not supported"):
        _translate({"datasets": [{"path": "x"}], "streaming": True})


def test_command_line_flags_with_foreign_names_are_renamed():
    assert translate_flags(["--torch_dtype", "float32", "--evaluation_strategy=no", "--beta", "0.2"]) == [
        "--dtype", "float32", "--eval_strategy=no", "--beta", "0.2"]


def test_machine_fallbacks_without_a_gpu_say_what_was_done():
    t = _translate({"attn_implementation": "flash_attention_2", "load_in_4bit": True, "optim": "paged_adamw_32bit",
                    "tf32": True, "bf16": True, "report_to": ["wandb", "none"], "use_flash_attention_2": True},
                   cuda=False)
    assert t.config["attn_implementation"] == "sdpa"
    assert "load_in_4bit" not in t.config and "tf32" not in t.config and "bf16" not in t.config
    assert t.config["optim"] == "adamw_torch"
    if importlib_missing("wandb"):
        assert t.config["report_to"] == "none"
    assert len(t.notes) >= 5
    kept = _translate({"attn_implementation": "eager", "optim": "rmsprop", "bf16": True}, cuda=True).config
    assert kept == {"attn_implementation": "eager", "optim": "rmsprop", "bf16": True}


def importlib_missing(module):
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_push_to_hub_without_a_hub_fails_in_the_first_second():
    with pytest.raises(CompatError, match="HF_HUB_OFFLINE.*--push_to_hub false"):
        check_push_to_hub(True, offline=True)
    check_push_to_hub(False, offline=True)  # nothing to push: nothing to check


def test_push_to_hub_recipe_stops_before_the_model_loads(at_root, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("treg.cli.load_model_and_tokenizer", lambda *_: pytest.fail("model loaded"))
    monkeypatch.setattr("treg.cli.load_datasets", lambda *_, **__: pytest.fail("data loaded"))
    assert main(["train", "--config", str(COMPAT / "alignment-handbook-dpo.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("treg: push_to_hub") and "--push_to_hub false" in err[-1]
    assert not any("Traceback" in line for line in err)


# ------------------------------------------------------------------------------------------------------------ SimPO
def test_gamma_beta_ratio_selects_simpo_and_sets_gamma_from_the_final_beta(at_root):
    _, config, _ = parse_train_args(["--config", str(COMPAT / "simpo.yaml"), "--output_dir", "unused"])
    assert config.base_loss == "simpo" and config.beta == 10 and config.simpo_gamma == pytest.approx(5.0)
    _, config, _ = parse_train_args(["--config", str(COMPAT / "simpo.yaml"), "--output_dir", "unused",
                                     "--beta", "2.5"])
    assert config.simpo_gamma == pytest.approx(1.25)  # γ = ratio × β with the β that trains


def test_simpo_loss_type_trainer_type_and_absolute_gamma():
    assert _translate({"loss_type": "simpo", "beta": 2}).config == {"base_loss": "simpo", "beta": 2}
    assert _translate({"trainer_type": "simpo"}).config == {"base_loss": "simpo"}
    t = _translate({"gamma": 1.4, "beta": 2.5})  # the SimPO repository's first recipes: γ itself
    assert t.config == {"simpo_gamma": 1.4, "base_loss": "simpo", "beta": 2.5}
    with pytest.raises(CompatError, match="gamma_beta_ratio is SimPO's"):
        _translate({"gamma_beta_ratio": 0.5, "base_loss": "dpo"})
    with pytest.raises(CompatError, match="sft_weight"):
        _translate({"gamma_beta_ratio": 0.5, "sft_weight": 0.1})


# ------------------------------------------------------------------------------------------ trainers treg does not run
def test_orpo_and_sft_recipes_get_one_error_saying_what_treg_trains(tmp_path, capsys):
    orpo = tmp_path / "orpo" / "config_full.yaml"
    orpo.parent.mkdir()
    orpo.write_text("model_name_or_path: treg:tiny\ndataset_name: x\nbeta: 0.05\nmax_prompt_length: 1792\n")
    sft = tmp_path / "sft.yaml"
    sft.write_text("model_name_or_path: treg:tiny\ndataset_name: x\nmax_seq_length: 2048\npacking: true\n")
    for path, what in ((orpo, "ORPO recipe"), (sft, "supervised fine-tuning (SFT) or continued-pretraining recipe")):
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "treg trains" in err[0], err
    with pytest.raises(CompatError, match="ORPO"):
        _translate({"loss_type": "orpo", "beta": 0.1})


# --------------------------------------------------------------------------------------------------------- mixtures
def _spec(config, seed=42):
    return json.loads(_translate(config).config["dataset_mixture"])


def test_handbook_dataset_mixture_counts_weights_and_test_split(at_root):
    config = {"dataset_mixture": {"datasets": [
        {"id": UF, "config": "default", "split": "train_prefs", "columns": ["chosen", "rejected"], "weight": 1.0},
        {"id": UF, "config": "default", "split": "test_prefs", "columns": ["chosen", "rejected"], "weight": 0.5}],
        "test_split_size": 8, "seed": 0}}
    train, test, report = load_mixture(_spec(config))
    assert [p["rows"] for p in report["parts"]] == [48, 16] and [p["weight"] for p in report["parts"]] == [1.0, 0.5]
    assert (len(train), len(test)) == (48 + 8 - 8, 8)  # 48 + int(16 × 0.5), then 8 carved off
    assert sorted(train.column_names) == ["chosen", "prompt", "rejected"]  # the prompt extracted from the dialogues
    again, _, _ = load_mixture(_spec(config))
    assert again["chosen"] == train["chosen"]  # the mixture's own seed: same order every run
    config["dataset_mixture"]["seed"] = 1
    other, _, _ = load_mixture(_spec(config))
    assert other["chosen"] != train["chosen"]


def test_handbook_v0_mixer_fractions_apply_to_train_splits_only(at_root):
    config = {"dataset_mixer": {UF: 0.5}, "dataset_splits": ["train_prefs", "test_prefs"]}
    train, test, report = load_mixture(_spec(config), seed=42)
    assert (len(train), len(test)) == (24, 16)
    assert {p["role"] for p in report["parts"]} == {"train", "test"}
    first_half = load_mixture(_spec({"dataset_mixer": {UF: 1.0}, "dataset_splits": ["train_prefs"]}), seed=42)[0]
    assert set(train["chosen"] and [str(c) for c in train["chosen"]]) < {str(c) for c in first_half["chosen"]}
    with pytest.raises(CompatError, match="neither a train nor a test split"):
        _translate({"dataset_mixer": {UF: 1.0}, "dataset_splits": ["validation"]})


def test_trl_datasets_fractions_cap_the_mixture_so_none_is_oversampled(at_root):
    orca = "recipes/compat/data/orca/train.jsonl"
    config = {"datasets": [{"path": UF, "split": "train_prefs", "fraction": 3},
                           {"path": "json", "data_files": orca, "split": "train", "fraction": 1}]}
    train, test, report = load_mixture(_spec(config))
    assert test is None and [p["rows"] for p in report["parts"]] == [48, 32]
    assert len(train) == 48 + 16  # shares 3/4, 1/4: N = min(48/0.75, 32/0.25) = 64
    whole, _, _ = load_mixture(_spec({"datasets": [{"path": UF, "split": "train_prefs"},
                                                   {"path": "json", "data_files": orca}], "test_split_size": 0.25}))
    assert len(whole) == 60  # 80 rows, a quarter carved off as the test split
    with pytest.raises(CompatError, match="every dataset of the mixture or none"):
        _translate({"datasets": [{"path": UF, "fraction": 0.5}, {"path": UF}]})


def test_a_bad_row_in_a_mixture_names_the_dataset_split_and_row(tmp_path):
    good = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    bad = good + [{"prompt": "p", "chosen": "", "rejected": "b"}]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    config = {"dataset_mixture": {"datasets": [{"id": str(tmp_path / "good.jsonl")},
                                               {"id": str(tmp_path / "bad.jsonl"), "split": "train"}]}}
    with pytest.raises(PreferenceDataError, match=r"dataset 1 of the mixture \(.*bad.jsonl, split train\): row 3, "
                                                  r"field 'chosen'"):
        load_mixture(_spec(config))
    assert len(load_mixture(_spec(config), drop_invalid=True)[0]) == 6
    config = {"dataset_mixture": {"datasets": [{"id": str(tmp_path / "good.jsonl"), "columns": ["prompt", "score"]}]}}
    with pytest.raises(PreferenceDataError, match=r"no column\(s\) \['score'\]"):
        load_mixture(_spec(config))


def test_plain_and_chat_datasets_cannot_mix_and_the_error_says_why(tmp_path, at_root):
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    parts = [{"id": UF, "split": "train_prefs"}, {"id": str(tmp_path / "plain.jsonl")}]
    config = {"dataset_mixture": {"datasets": parts}}
    with pytest.raises(PreferenceDataError, match="plain-text rows .* conversational rows"):
        load_mixture(_spec(config))


def test_the_token_reward_pass_covers_the_mixture_in_one_cache_entry(at_root, tmp_path, tiny):
    argv = ["train", "--config", str(COMPAT / "wpo.yaml"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--save_strategy", "no", "--treg_alpha", "0.5", "--token_reward_cache_dir", str(tmp_path / "cache")]

    def entries():
        root = tmp_path / "cache" / "token_rewards"
        return sorted(p.name for p in root.iterdir() if not p.name.endswith(".shards") and not p.name.startswith("."))

    assert main(argv) == 0
    assert len(entries()) == 2, entries()  # the mixture's training rows (both datasets) in one entry; its test split
    first = entries()
    assert main(argv) == 0  # the same mixture again: the same entries, reused
    assert entries() == first


# ---------------------------------------------------------------------------------------------- columns and layouts
def test_only_training_columns_reach_trl():
    from trl.data_utils import is_conversational

    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}], "messages": [], "prompt_id": "x", "completion": "c",
           "score_chosen": 8.0}
    kept = keep_training_columns(datasets.Dataset.from_list([row]))
    assert kept.column_names == ["prompt", "chosen", "rejected", "score_chosen"]
    assert is_conversational(kept[0])


@pytest.mark.parametrize("hash_seed", ["4", "7"])  # seeds under which TRL sniffed the empty 'messages' (IndexError)
def test_an_empty_extra_column_trains_under_any_hash_seed(hash_seed, tmp_path):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1", TREG_CACHE_DIR=os.environ["TREG_CACHE_DIR"])
    result = subprocess.run(
        [sys.executable, "-m", "treg", "train", "--config", str(ROOT / "recipes/tiny/dpo.yaml"), "--max_steps", "1",
         "--dataset_name", str(COMPAT / "data/ultrafeedback/train_prefs.jsonl"), "--dataset_test_split=",
         "--eval_strategy", "no", "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_orca_pairs_become_conversational_rows():
    rows = [{"system": "Be brief.", "question": "2+2?", "chosen": "4", "rejected": "5"},
            {"system": "", "question": "3+3?", "chosen": "6", "rejected": "7"}]
    out = to_preference_format(datasets.Dataset.from_list(rows))
    assert out[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert out[1]["prompt"] == [{"role": "user", "content": "3+3?"}]
    assert out[0]["chosen"] == [{"role": "assistant", "content": "4"}]
    assert keep_training_columns(out).column_names == ["chosen", "rejected", "prompt"]


def test_sft_messages_given_as_preference_data_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n")
    argv = ["train", "--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--dataset_name", str(path),
            "--dataset_test_split=", "--eval_strategy", "no", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "looks like SFT data" in err[0] and "'messages'" in err[0]


# -------------------------------------------------------------------------------------------------- max_prompt_length
def test_max_prompt_length_cuts_prompts_from_their_start(tiny):
    _, tokenizer, _ = tiny
    long_text = "copy: " + " ".join(str(i % 10) for i in range(60))
    turns = [{"role": "system", "content": "sys"},
             {"role": "user", "content": "copy: 1 2 3"}, {"role": "assistant", "content": "1 2 3"},
             {"role": "user", "content": "copy: 4 5 6"}, {"role": "assistant", "content": "4 5 6"},
             {"role": "user", "content": "copy: 7 8 9"}]
    short = [{"role": "user", "content": "copy: 1"}]
    ds = datasets.Dataset.from_list([
        {"prompt": turns, "chosen": [{"role": "assistant", "content": "7 8 9"}],
         "rejected": [{"role": "assistant", "content": "7 8 8"}]},
        {"prompt": short, "chosen": [{"role": "assistant", "content": "1"}],
         "rejected": [{"role": "assistant", "content": "2"}]},
    ])
    budget = prompt_length(tokenizer, [turns[0], *turns[3:]])  # room for the system turn and the last exchange
    out = cut_prompts(ds, tokenizer, budget)
    assert out[0]["prompt"] == [turns[0], *turns[3:]]  # oldest exchange dropped, system kept, starts at a user turn
    assert out[1]["prompt"] == short  # fits: unchanged
    tight = cut_prompts(ds, tokenizer, prompt_length(tokenizer, [turns[0], turns[5]]) - 3)
    last = tight[0]["prompt"]
    assert [m["role"] for m in last] == ["system", "user"] and "copy: 7 8 9".endswith(last[1]["content"])
    assert len(last[1]["content"]) < len("copy: 7 8 9")
    plain = datasets.Dataset.from_list([{"prompt": long_text, "chosen": "1", "rejected": "2"}])
    cut = cut_prompts(plain, tokenizer, 20)[0]["prompt"]
    assert long_text.endswith(cut) and prompt_length(tokenizer, cut) <= 20 < prompt_length(tokenizer, "x" + cut)


def test_max_prompt_length_reaches_training(at_root, tmp_path, caplog):
    from treg.cli import build_trainer

    data_args, config, model_args = parse_train_args([
        "--config", str(COMPAT / "wpo.yaml"), "--output_dir", str(tmp_path), "--max_prompt_length", "6",
        "--eval_strategy", "no", "--treg_alpha", "0"])
    trainer = build_trainer(data_args, config, model_args)
    lengths = [len(p) for p in trainer.train_dataset["prompt_ids"]]
    assert max(lengths) <= 6 + 2, lengths  # the chat template's own tokens at the cut may differ by a token or two
    assert "max_prompt_length=6 cut" in caplog.text


# ------------------------------------------------------------------------------------------------------------ APO
def test_apo_losses_by_hand():
    chosen, rejected = torch.tensor([0.3, -0.2]), torch.tensor([-0.1, 0.4])
    sig = torch.sigmoid
    zero = dpo_loss(chosen, rejected, beta=0.1, loss_type="apo_zero")
    down = dpo_loss(chosen, rejected, beta=0.1, loss_type="apo_down")
    torch.testing.assert_close(zero, (1 - sig(chosen)) + sig(rejected))
    torch.testing.assert_close(down, sig(chosen) + 1 - sig(chosen - rejected))


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("recipe", COMPAT_RECIPES, ids=lambda p: p.stem)
def test_every_compat_recipe_trains_two_steps(recipe, at_root, tmp_path, monkeypatch, tiny):
    monkeypatch.setattr("treg.compat._cuda_available", lambda: False)  # the CPU path, also on a GPU machine
    argv = ["train", "--config", str(recipe), "--max_steps", "2", "--push_to_hub", "false",
            "--output_dir", str(tmp_path / "out"), "--save_strategy", "no"]
    assert main(argv) == 0
    weights = "adapter_model.safetensors" if "qlora" in recipe.stem else "model.safetensors"
    assert (tmp_path / "out" / weights).is_file()


def test_compat_recipes_map_their_keys(at_root, monkeypatch):
    monkeypatch.setattr("treg.compat._cuda_available", lambda: False)

    def parse(name, *extra):
        return parse_train_args(["--config", str(COMPAT / f"{name}.yaml"), "--output_dir", "unused", *extra])

    data_args, config, model_args = parse("alignment-handbook-v0-dpo")
    assert config.eval_strategy.value == "steps" and config.max_prompt_length == 512 and config.dataset_num_proc == 2
    assert json.loads(data_args.dataset_mixture)["format"] == "alignment-handbook-v0" and not config.bf16
    assert config.warmup_steps == pytest.approx(0.1)
    data_args, config, model_args = parse("alignment-handbook-apo")
    assert model_args.dtype == "bfloat16" and model_args.model_revision == "main"
    assert model_args.attn_implementation == "sdpa" and config.loss_type == ["apo_zero"] and config.pack_pairs
    assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and config.hub_strategy.value == "every_save"
    data_args, config, model_args = parse("alignment-handbook-qlora")
    assert model_args.use_peft and not model_args.load_in_4bit and config.optim.value == "adamw_torch"
    data_args, config, _ = parse("simpo")
    assert data_args.chat_template.startswith("{% for message") and config.base_loss == "simpo"
    data_args, config, _ = parse("trl-dpo")
    assert [e["fraction"] for e in json.loads(data_args.dataset_mixture)["datasets"]] == [0.6, 0.4]
