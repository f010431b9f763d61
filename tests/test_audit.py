"""The reliability audit (../shared/audits/reliability-2026-12.md, Part B: 111 bad inputs) as tests, so it stays true.

Each case runs through ``treg.cli.main`` in-process, as a user would type it, and must end with exit status 2 and one
``treg: ...`` line on stderr naming what is wrong and where (file, line, row, field or key), no traceback. The cases
the audit found SILENT (accepted with a wrong or ignored value) and VAGUE (a raw library error, or one that does not
name the place) are all here; the CLEAR ones are sampled. The bad files are the audit's appendix (8 rows each), the
recipe is the tiny one with ``--max_steps 1``; almost every error fires before the model is loaded, and all before the
token-reward pass. Case numbers are the audit's.
"""

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import transformers  # noqa: F401  (imported at collection: see below)

from treg.cli import main

# transformers binds its log handler to sys.stderr when first imported; imported inside a test that captures stderr
# (capsys), the handler would write to that test's closed stream ever after, and a later transformers warning (e.g.
# #106's load report) would print "--- Logging error --- Traceback ..." into the next test's stderr.

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/treg-dpo.yaml")
TINY_SIMPO = str(ROOT / "recipes/tiny/treg-simpo.yaml")
TINY_EVAL = str(ROOT / "recipes/tiny/treg-dpo-eval.yaml")


# ------------------------------------------------------------------------------------- the audit's bad files (appendix)
def _std(i):
    return {"prompt": f"copy: {i} 2 3", "chosen": f"{i} 2 3", "rejected": f"{i} 2 4"}


def _conv(i):
    return {
        "prompt": [{"role": "user", "content": f"copy: {i} 2 3"}],
        "chosen": [{"role": "assistant", "content": f"{i} 2 3"}],
        "rejected": [{"role": "assistant", "content": f"{i} 2 4"}],
    }


def _token_rows(over):  # 4 completion tokens per row with the tiny tokenizer (3 digits + end token)
    rows = []
    for i in range(8):
        row = dict(_std(i), chosen_token_rewards=[0.1, -0.1, 0.2, 0.0], rejected_token_rewards=[0.1, -0.1, -0.3, 0.0])
        row.update(over.get(i, {}))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("audit")

    def w(name, rows):
        (d / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def mod(i, **kv):
        rows = [_std(j) for j in range(8)]
        rows[i].update(kv)
        return rows

    good = [_std(i) for i in range(8)]
    w("good.jsonl", good)
    w("no_prompt.jsonl", [{k: v for k, v in r.items() if k != "prompt"} for r in good])
    w("no_rejected.jsonl", [{k: v for k, v in r.items() if k != "rejected"} for r in good])
    w("empty_chosen.jsonl", mod(3, chosen=""))
    w("same.jsonl", mod(1, rejected="1 2 3"))
    w("long_completion.jsonl", mod(3, chosen=" ".join(["9"] * 200)))  # the audit's has 20,000; 200 > max_length 128
    lines = [json.dumps(r) for r in good]
    lines[4] = '{"prompt": "copy: 1", "chosen": "1", "rejected": '
    w("malformed_line.jsonl", lines)
    (d / "empty.jsonl").write_text("")
    cv = [_conv(i) for i in range(8)]
    cv[3]["prompt"][0]["role"] = "robot"
    w("conv_wrong_role.jsonl", cv)
    cv = [_conv(i) for i in range(8)]
    cv[2]["chosen"][0]["role"] = "user"
    w("conv_chosen_role_user.jsonl", cv)
    w("tr_null_value.jsonl", _token_rows({5: {"rejected_token_rewards": [0.1, None, 0.0, 0.0]}}))
    w("tr_strings.jsonl", _token_rows({1: {"chosen_token_rewards": "high"}}))
    w("tr_wrong_length.jsonl", _token_rows({3: {"chosen_token_rewards": [0.1, 0.2]}}))
    w("tr_only_chosen.jsonl", [{k: v for k, v in r.items() if k != "rejected_token_rewards"} for r in _token_rows({})])
    (d / "scalar.json").write_text("42\n")
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in good).encode())
    (d / "corrupt.jsonl.gz").write_bytes(data[: len(data) // 2])
    (d / "good.txt").write_text((d / "good.jsonl").read_text())
    (d / "emptydir").mkdir()
    recipe = Path(TINY).read_text()
    (d / "dup_key.yaml").write_text(recipe + "treg_alpha: 0.3\n")
    (d / "malformed.yaml").write_text("model_name_or_path: treg:tiny\nbeta: [0.1\nlearning_rate: 1e-5\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "bad_key.yaml").write_text(recipe.replace("treg_alpha:", "treg_alpah:"))
    (d / "ref_bad.json").write_text('[{"instruction": "hi", "output": "x"},')
    (d / "jt_garbage").mkdir()
    (d / "jt_garbage" / "m.jsonl").write_bytes(bytes(range(128, 256)) * 4)
    (d / "rl_bad_key.yaml").write_text((ROOT / "recipes/tiny/rl-relc.yaml").read_text() + "critic_alpah_in: 0.1\n")
    (d / "label_bad_key.yaml").write_text("model_name_or_path: treg:tiny\ndataset: x.jsonl\nmax_rowz: 3\n")
    return d


@pytest.fixture(scope="module")
def checkpoints(audit, tiny) -> Path:
    """#54 a model folder without tokenizer files, #55 one with a truncated model.safetensors."""
    model, tokenizer, _ = tiny
    good = audit / "ckpt"
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)
    (audit / "notok").mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (good / name).exists():
            shutil.copy(good / name, audit / "notok" / name)
    shutil.copytree(good, audit / "badw")
    os.truncate(audit / "badw" / "model.safetensors", 1000)
    return audit


def _train(audit, name, *extra):
    """The audit's ``T``: the tiny recipe on one file of ``audit`` (or a hub id), no eval split, one step."""
    dataset = name if name.startswith("hub:") else str(audit / name)
    return ["train", "--config", TINY, "--dataset_name", dataset.removeprefix("hub:"), "--max_steps", "1",
            "--eval_strategy", "no", "--dataset_test_split=", "--output_dir", str(audit / "runs" / name),
            "--disable_tqdm", "true", *extra]


def _pairs(audit, *flags):
    """``treg pairs`` on the toy prompts with the oracle scorer; ``flags`` override those settings."""
    settings = {"--model": "treg:tiny", "--prompts": "treg:toy", "--num-prompts": "4", "--scorer": "oracle",
                "--num-samples": "2", "--out": str(audit / "runs" / "pairs")}
    settings.update(zip(flags[::2], flags[1::2]))
    return ["pairs", *(x for kv in settings.items() for x in kv), "--no-progress"]


def clear(argv, capsys, *names):
    """Run ``treg ARGV``; assert exit 2 and one ``treg`` line that contains every one of ``names``; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    last = lines[-1] if lines else ""
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert last.startswith("treg"), err[-2000:]
    for name in names:
        assert name in last, f"{name!r} not in {last!r}"
    return last


# ------------------------------------------------------------------------------------------ SILENT and VAGUE: data
DATA_CASES = {
    # case: (file, extra flags, what the line must name)
    "1-no-prompt-column": ("no_prompt.jsonl", (), ("missing column 'prompt'",)),
    "14-malformed-jsonl-line": ("malformed_line.jsonl", (), ("malformed_line.jsonl", "line 5")),
    "15-empty-file": ("empty.jsonl", (), ("empty.jsonl", "empty")),
    "21-unknown-role": ("conv_wrong_role.jsonl", (), ("row 3", "'prompt'", "'robot'")),
    "22-user-role-response": ("conv_chosen_role_user.jsonl", (), ("row 2", "'chosen'", "'user'")),
    "33-token-reward-null": ("tr_null_value.jsonl", (), ("row 5", "rejected_token_rewards", "None")),
    "34-token-rewards-string": ("tr_strings.jsonl", (), ("row 1", "chosen_token_rewards", "str")),
    "35-one-of-a-pair": ("tr_only_chosen.jsonl", (), ("'chosen_token_rewards'", "'rejected_token_rewards'")),
    "36-bare-json-number": ("scalar.json", (), ("scalar.json", "bare JSON number")),
    "37-binary-garbage": ("binary.jsonl", (), ("binary.jsonl", "UTF-8")),
    "38-truncated-gzip": ("corrupt.jsonl.gz", (), ("corrupt.jsonl.gz", "gzip")),
    "59-batch-size-0": ("good.jsonl", ("--per_device_train_batch_size", "0"), ("per_device_train_batch_size",)),
    "50-negative-beta": ("good.jsonl", ("--beta=-0.1",), ("beta",)),
    "52-max-length-0": ("good.jsonl", ("--max_length", "0"), ("max_length",)),
    "73-negative-learning-rate": ("good.jsonl", ("--learning_rate=-0.01",), ("learning_rate",)),
    "70-resume-missing": ("good.jsonl", ("--resume_from_checkpoint", "nope-ckpt"), ("resume_from_checkpoint",)),
    "71-resume-true": ("good.jsonl", ("--resume_from_checkpoint", "true"), ("resume_from_checkpoint", "'true'")),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_and_settings_fail_before_the_model_loads(case, audit, capsys, monkeypatch):
    def no_model(*_):
        raise AssertionError("the model was loaded before the data and settings were checked")

    monkeypatch.setattr("treg.cli.load_model_and_tokenizer", no_model)
    name, extra, names = DATA_CASES[case]
    clear(_train(audit, name, *extra), capsys, *names)


def test_41_train_and_eval_on_the_same_file(audit, capsys, monkeypatch):
    monkeypatch.setattr("treg.cli.load_model_and_tokenizer", lambda *_: pytest.fail("model loaded"))
    argv = ["train", "--config", TINY, "--dataset_name", str(audit / "good.jsonl"), "--max_steps", "1",
            "--output_dir", str(audit / "runs" / "41")]  # the recipe's dataset_test_split: test
    clear(argv, capsys, "dataset_test_split='test'", "good.jsonl", "--dataset_test_split=")


def test_41_a_folder_with_train_and_test_files_is_fine(tmp_path):
    from treg.data import local_data_source

    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(_std(0)) + "\n")
    assert local_data_source(str(tmp_path), "train") != local_data_source(str(tmp_path), "test")
    (tmp_path / "test.jsonl").unlink()
    assert local_data_source(str(tmp_path), "train") == local_data_source(str(tmp_path), "test")


def test_42_max_train_rows_applies_to_the_toy_set():
    from treg.cli import parse_train_args
    from treg.recipes import load_datasets

    data_args, _, _ = parse_train_args(["--config", TINY, "--max_train_rows", "4", "--output_dir", "unused"])
    train, _ = load_datasets(data_args)
    assert len(train) == 4


def test_13_truncated_completions_are_counted(audit, capsys, caplog):
    assert main(_train(audit, "long_completion.jsonl")) == 0
    warned = [r.getMessage() for r in caplog.records if "cut to fit max_length" in r.getMessage()]
    assert warned and warned[0].startswith("train: 1 of 8 rows") and "row 3" in warned[0], warned


# ---------------------------------------------------------------------------------- SILENT and VAGUE: recipe, flags
def test_63_duplicate_yaml_key(audit, capsys):
    argv = ["train", "--config", str(audit / "dup_key.yaml"), "--dataset_name", str(audit / "good.jsonl"),
            "--dataset_test_split=", "--eval_strategy", "no", "--output_dir", str(audit / "runs" / "63")]
    clear(argv, capsys, "dup_key.yaml", "duplicate key 'treg_alpha'", "line")


def test_68_config_without_a_path(capsys):
    clear(["train", "--config"], capsys, "--config needs a recipe path")
    clear(["train", "--config", "--max_steps", "1"], capsys, "--config needs a recipe path")


def test_74_negative_simpo_gamma(audit, capsys):
    argv = ["train", "--config", TINY_SIMPO, "--simpo_gamma=-3", "--toy_num_pairs", "8", "--eval_strategy", "no",
            "--dataset_test_split=", "--output_dir", str(audit / "runs" / "74")]
    clear(argv, capsys, "simpo_gamma")


@pytest.mark.parametrize("spec", ["./nonexistent-judge", "openai:gpt4", "someorg/not-cached-judge"])
def test_72_a_mistyped_hook_judge_fails_before_anything_loads(spec, audit, capsys, monkeypatch):
    monkeypatch.setattr("treg.cli.load_model_and_tokenizer", lambda *_: pytest.fail("model loaded before the check"))
    argv = ["train", "--config", TINY_EVAL, "--max_steps", "1", "--eval_hook_max_instances", "2",
            "--eval_hook_judge", spec, "--output_dir", str(audit / "runs" / "72")]
    clear(argv, capsys, "eval_hook_judge", spec)


def test_72_a_hook_that_fails_after_training_leaves_the_saved_model(audit, capsys, monkeypatch, tmp_path):
    from test_eval_e2e import write_data_root

    from treg.evaluation.callback import EvalHookCallback
    from treg.evaluation.judges import JudgeError

    monkeypatch.setenv("TREG_EVAL_DATA", write_data_root(str(tmp_path / "data")))
    ran = []

    def failing_run(self, model, tokenizer, step):
        ran.append(step)
        assert (out / "model.safetensors").exists(), "the hook ran before the model was saved"
        raise JudgeError("judge endpoint http://127.0.0.1:9/v1 refused the connection")

    monkeypatch.setattr(EvalHookCallback, "run", failing_run)
    out = tmp_path / "run"
    argv = ["train", "--config", TINY_EVAL, "--toy_num_pairs", "8", "--max_steps", "1", "--eval_hook_max_instances",
            "2", "--output_dir", str(out), "--disable_tqdm", "true"]
    clear(argv, capsys, "judge endpoint")
    assert ran == [1]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


# ----------------------------------------------------------------------------------------- SILENT and VAGUE: models
@pytest.mark.parametrize(
    "case, spec, names",
    [
        ("53-missing-folder", "./nonexistent-model", ("nonexistent-model", "does not exist")),
        ("54-no-tokenizer-files", "notok", ("notok", "tokenizer files")),
        ("55-truncated-safetensors", "badw", ("model.safetensors", "truncated")),
    ],
)
def test_model_folders_that_cannot_load(case, spec, names, checkpoints, capsys):
    spec = spec if spec.startswith("./") else str(checkpoints / spec)
    clear(_train(checkpoints, "good.jsonl", "--model_name_or_path", spec), capsys, *names)


# --------------------------------------------------------------------------------- SILENT and VAGUE: other commands
def test_76_79_eval_model_and_judge_that_do_not_exist(capsys, tmp_path):
    clear(["eval", "arena-hard", "--model", "treg:tiny", "--judge", "./nonexistent-judge", "--max-instances", "2",
           "--out", str(tmp_path / "ah")], capsys, "nonexistent-judge")
    clear(["eval", "alpaca-eval", "--model", "./nope-model", "--judge", "treg:tiny", "--max-instances", "2",
           "--out", str(tmp_path / "ae")], capsys, "nope-model")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_80_81_max_instances_must_be_positive(n, capsys, tmp_path):
    clear(["eval", "alpaca-eval", "--model", "treg:tiny", "--judge", "treg:tiny", "--max-instances", n,
           "--out", str(tmp_path / "ae")], capsys, "--max-instances")


def test_86_malformed_reference_outputs(audit, capsys, tmp_path):
    clear(["eval", "alpaca-eval", "--model", "treg:tiny", "--judge", "treg:tiny", "--reference-outputs",
           str(audit / "ref_bad.json"), "--max-instances", "2", "--out", str(tmp_path / "ae")], capsys, "ref_bad.json")


def test_89_show_on_binary_garbage(audit, capsys):
    clear(["eval", "arena-hard", "show", "--judgments", str(audit / "jt_garbage")], capsys, "m.jsonl")


def test_111_viz_checkpoint_that_does_not_exist(capsys, tmp_path):
    clear(["viz", "--checkpoint", "out", "--ref-model", "treg:tiny", "--dataset", "treg:toy", "--rows", "0", "1",
           "--out", str(tmp_path / "heatmap.html")], capsys, "--checkpoint 'out'")


def test_106_reward_model_dataset_that_does_not_exist(capsys, tmp_path):
    clear(["reward-model", "--model", "treg:tiny", "--dataset", str(tmp_path / "out/labeled"), "--output_dir",
           str(tmp_path / "rm"), "--max_steps", "1"], capsys, "out/labeled", "not found")


def test_109_rl_reward_model_that_does_not_exist(capsys, tmp_path):
    clear(["rl", "--config", str(ROOT / "recipes/tiny/rl-rm.yaml"), "--reward_funcs", "rm:./nope-rm", "--max_steps",
           "1", "--output_dir", str(tmp_path / "rl")], capsys, "nope-rm")


# --------------------------------------------------------------------------------------------- a sample of CLEAR cases
CLEAR_CASES = {
    "2-no-rejected-column": (lambda a: _train(a, "no_rejected.jsonl"), ("missing column(s) 'rejected'",)),
    "4-empty-chosen": (lambda a: _train(a, "empty_chosen.jsonl"), ("row 3", "'chosen'", "empty string")),
    "11-chosen-equals-rejected": (lambda a: _train(a, "same.jsonl"), ("row 1", "identical")),
    "16-empty-folder": (lambda a: _train(a, "emptydir"), ("emptydir", "neither a saved dataset")),
    "18-wrong-extension": (lambda a: _train(a, "good.txt"), ("good.txt", "Unsupported")),
    "39-path-not-found": (lambda a: _train(a, "nope/prefs.jsonl"), ("nope/prefs.jsonl", "not found")),
    "40-hub-id-offline": (lambda a: _train(a, "hub:someorg/prefs"), ("someorg/prefs", "HF_HUB_OFFLINE")),
    "43-negative-max-train-rows": (lambda a: _train(a, "good.jsonl", "--max_train_rows=-5"), ("max_train_rows",)),
    "44-malformed-yaml": (lambda a: ["train", "--config", str(a / "malformed.yaml")], ("malformed.yaml", "line 3")),
    "46-unknown-recipe-key": (lambda a: ["train", "--config", str(a / "bad_key.yaml")], ("treg_alpah", "treg_alpha")),
    "47-alpha-not-a-number": (lambda a: _train(a, "good.jsonl", "--treg_alpha", "high"), ()),
    "51-negative-alpha": (lambda a: _train(a, "good.jsonl", "--treg_alpha=-1"), ("treg_alpha",)),
    "56-recipe-is-a-list": (lambda a: ["train", "--config", str(a / "list.yaml")], ("list.yaml", "mapping")),
    "58-unknown-base-loss": (lambda a: _train(a, "good.jsonl", "--base_loss", "orpo"), ("base_loss",)),
    "60-template-without-prompt": (
        lambda a: _train(a, "good.jsonl", "--contrastive_positive_template", "Write the best answer."),
        ("contrastive_positive_template",),
    ),
    "61-shard-size-0": (lambda a: _train(a, "good.jsonl", "--token_reward_shard_size", "0"),
                        ("token_reward_shard_size",)),
    "62-unknown-loss-type": (lambda a: _train(a, "good.jsonl", "--loss_type", "robust"), ("loss_type",)),
    "64-critic-without-model": (lambda a: _train(a, "good.jsonl", "--token_reward_source", "critic"),
                                ("critic_model",)),
    "65-unknown-eval-hook": (lambda a: _train(a, "good.jsonl", "--eval_hooks", "mmlu"), ("eval_hooks", "mmlu")),
    "66-unknown-flag": (lambda a: _train(a, "good.jsonl", "--treg_alpah", "0.1"), ("--treg_alpah", "--treg_alpha")),
    "67-missing-recipe": (lambda a: ["train", "--config", str(a / "nope.yaml")], ("nope.yaml", "does not exist")),
    "69-no-model": (lambda a: ["train", "--dataset_name", str(a / "good.jsonl"), "--output_dir", str(a / "r69")],
                    ("model_name_or_path",)),
    "77-judge-without-url": (lambda a: ["eval", "arena-hard", "--model", "treg:tiny", "--judge", "openai:gpt4",
                                        "--out", str(a / "r77")], ("openai:gpt4",)),
    "82-unknown-bench": (lambda a: ["eval", "arena-hard", "--model", "treg:tiny", "--bench", "v3"], ()),
    "90-show-missing-folder": (lambda a: ["eval", "arena-hard", "show", "--judgments", str(a / "nope-dir")],
                               ("nope-dir",)),
    "94-label-unknown-key": (lambda a: ["label", "--config", str(a / "label_bad_key.yaml")], ("max_rowz", "max_rows")),
    "95-label-max-rows-not-int": (lambda a: ["label", "--model_name_or_path", "treg:tiny", "--dataset", "x.jsonl",
                                             "--max_rows", "abc"], ("max_rows",)),
    "96-label-unknown-task": (lambda a: ["label", "--model_name_or_path", "treg:tiny", "--dataset", "x.jsonl",
                                         "--task", "poetry"], ("task", "'poetry'", "helpfulness")),
    "97-label-dataset-missing": (lambda a: ["label", "--model_name_or_path", "treg:tiny", "--dataset",
                                            str(a / "nope.jsonl"), "--output_dir", str(a / "r97")], ("nope.jsonl",)),
    "100-pairs-unknown-scorer": (lambda a: _pairs(a, "--scorer", "bogus"), ("--scorer", "'bogus'")),
    "101-pairs-prompts-without-prompt-field": (lambda a: _pairs(a, "--prompts", str(a / "no_prompt.jsonl")),
                                               ("no_prompt.jsonl:1", "no 'prompt' field")),
    "102-pairs-one-sample": (lambda a: _pairs(a, "--num-samples", "1"), ("--num-samples", "got 1")),
    "103-pairs-out-exists": (lambda a: _pairs(a, "--out", str(a / "emptydir")), ("emptydir", "--overwrite")),
    "108-rl-unknown-recipe-key": (lambda a: ["rl", "--config", str(a / "rl_bad_key.yaml")], ("critic_alpah_in",)),
    "110-viz-unsupported-extension": (lambda a: ["viz", "--checkpoint", "treg:tiny", "--dataset", "treg:toy", "--out",
                                                 str(a / "x.pdf")], ("unsupported extension '.pdf'",)),
}


@pytest.mark.parametrize("case", CLEAR_CASES)
def test_clear_cases_stay_clear(case, audit, capsys, monkeypatch):
    if case.startswith(("96-", "100-", "101-", "102-", "103-")):  # settings and inputs checked before any model loads
        monkeypatch.setattr("treg.models.load_causal_lm", lambda *_, **__: pytest.fail("model loaded"))
    argv, names = CLEAR_CASES[case]
    clear(argv(audit), capsys, *names)


def test_12_29_row_errors_found_after_tokenizing(audit, capsys):
    clear(_train(audit, "good.jsonl", "--max_length", "4"), capsys, "row 0", "'prompt'", "max_length=4")
    clear(_train(audit, "tr_wrong_length.jsonl"), capsys, "row 3", "'chosen_token_rewards'", "2 values")


def test_75_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- the error path
def test_debug_shows_the_traceback(audit, capsys, monkeypatch):
    from treg.files import UserError

    with pytest.raises(UserError, match="beta"):
        main(_train(audit, "good.jsonl", "--beta=-0.1", "--debug"))
    monkeypatch.setenv("TREG_DEBUG", "1")
    with pytest.raises(UserError, match="beta"):
        main(_train(audit, "good.jsonl", "--beta=-0.1"))


def test_every_treg_error_class_is_a_user_error():
    from treg.data import PreferenceDataError
    from treg.evaluation.arena_hard import ArenaHardError
    from treg.evaluation.data import DataNotFound
    from treg.evaluation.judges import JudgeError
    from treg.feedback.labels import LabelError
    from treg.feedback.onpolicy import PairsError
    from treg.files import UserError
    from treg.models import ModelSpecError
    from treg.recipes import RecipeError
    from treg.token_rewards import TokenRewardError
    from treg.viz import VizError

    for cls in (PreferenceDataError, ArenaHardError, DataNotFound, JudgeError, LabelError, ModelSpecError, PairsError,
                RecipeError, TokenRewardError, VizError):
        assert issubclass(cls, UserError), cls
    assert issubclass(DataNotFound, FileNotFoundError)  # callers that catch FileNotFoundError still do


def test_a_bug_keeps_its_traceback(audit, monkeypatch):
    def bug(*_):
        raise KeyError("not a user error")

    monkeypatch.setattr("treg.cli.check_train_settings", bug)
    with pytest.raises(KeyError):
        main(_train(audit, "good.jsonl"))
