"""The `treg` command and the recipes: every recipe loads, bad recipes fail with the file and key named."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treg.cli import main, parse_train_args
from treg.recipes import RecipeError, check_recipe

ROOT = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _command(recipe: Path) -> str:
    """The treg command a recipe's header comment launches (`train`, `label`, `rl`)."""
    import re

    header = "".join(line for line in recipe.read_text().splitlines(True) if line.startswith("#"))
    found = re.search(r"treg (train|label|rl) --config recipes/", header)
    assert found, f"{recipe}: the header comment must show the launch command"
    return found.group(1)


LABEL_RECIPES = [r for r in ALL_RECIPES if _command(r) == "label"]  # `treg label` recipes (tests/test_labels.py)
RL_RECIPES = [r for r in ALL_RECIPES if _command(r) == "rl"]  # `treg rl` recipes (tests/test_rl.py)
RECIPES = [r for r in ALL_RECIPES if _command(r) == "train"]  # training recipes


def test_recipes_are_found():
    names = {str(r.relative_to(ROOT / "recipes")) for r in RECIPES}
    assert {"tiny/dpo.yaml", "tiny/treg-dpo.yaml", "tiny/treg-simpo.yaml", "tiny/treg-critic.yaml"} <= names
    assert len(LABEL_RECIPES) == 1, [str(r) for r in LABEL_RECIPES]
    assert len(ALL_RECIPES) == len(RECIPES) + len(LABEL_RECIPES) + len(RL_RECIPES)


@pytest.mark.parametrize("recipe", LABEL_RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_label_recipes_have_a_header_and_known_keys(recipe):
    import yaml

    from treg.feedback.labels import LABEL_KEYS

    text = recipe.read_text()
    assert text.startswith("#") and "treg label --config recipes/" in text, "header with command"
    assert set(yaml.safe_load(text)) <= set(LABEL_KEYS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_parses_into_configs(recipe):
    data_args, config, model_args = parse_train_args(["--config", str(recipe), "--output_dir", "unused"])
    assert model_args.model_name_or_path
    assert config.base_loss in ("dpo", "simpo")
    text = recipe.read_text()
    assert text.startswith("#") and "treg train --config recipes/" in text.splitlines()[1], "header with command"
    if "dpo.yaml" == recipe.name:
        assert config.treg_alpha == 0.0


def test_command_line_overrides_the_recipe():
    _, config, _ = parse_train_args(["--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--treg_alpha", "0.1"])
    assert config.treg_alpha == 0.1


def test_unknown_recipe_key_names_file_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: treg:tiny\ntreg_alhpa: 0.5\n")
    with pytest.raises(RecipeError, match=r"unknown key 'treg_alhpa'.*Did you mean 'treg_alpha'"):
        parse_train_args(["--config", str(bad)])


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: treg:tiny\nbeta: [0.1\nlearning_rate: 1e-5\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d+"):
        check_recipe(str(bad), parser=__import__("treg.cli", fromlist=["_parser"])._parser())


def test_recipe_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        parse_train_args(["--config", str(bad)])


def test_main_reports_recipe_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key 'nonsense_key'" in capsys.readouterr().err


def test_python_dash_m_treg_works():
    out = subprocess.run([sys.executable, "-m", "treg", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "treg train --config" in out.stdout


def test_train_command_end_to_end(tmp_path, tiny):
    out_dir = tmp_path / "run"
    argv = [
        "train", "--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--output_dir", str(out_dir),
        "--toy_num_pairs", "32", "--max_steps", "2", "--eval_strategy", "no", "--disable_tqdm", "true",
    ]
    assert main(argv) == 0
    assert (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists()


def test_rewards_command_saves_columns(tmp_path, tiny, capsys):
    from datasets import load_from_disk

    argv = ["rewards", "--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--output_dir", str(tmp_path),
            "--toy_num_pairs", "16", "--disable_tqdm", "true"]
    assert main(argv) == 0
    saved = load_from_disk(str(tmp_path / "token_rewards"))
    assert len(saved) == 16 and "chosen_token_rewards" in saved.column_names
    assert "chosen_token_rewards: mean" in capsys.readouterr().out


def test_a_local_checkpoint_loads_through_the_recipe_model_config(tiny, tmp_path):
    """A model_name_or_path that is a folder (not treg:tiny) loads with ModelConfig's options (trl 1.16's ModelConfig
    has no trust_remote_code field: reading it used to raise AttributeError for every non-embedded model)."""
    from treg.recipes import load_model_and_tokenizer

    model, tokenizer, _ = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    _, _, model_args = parse_train_args(
        ["--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--model_name_or_path", str(tmp_path / "ckpt")]
    )
    loaded, loaded_tokenizer = load_model_and_tokenizer(model_args)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), name


def test_config_checks_become_recipe_errors_naming_the_recipe():
    """A ValueError from TRegConfig.__post_init__ (or TRL's) is a RecipeError: one line, exit 2, the recipe named."""
    recipe = str(ROOT / "recipes/tiny/treg-dpo.yaml")
    with pytest.raises(RecipeError, match=r"treg_alpha must be ≥ 0, got -1.0.*treg-dpo\.yaml"):
        parse_train_args(["--config", recipe, "--treg_alpha=-1"])
    with pytest.raises(RecipeError, match=r"unknown flag --treg_alpah\. Did you mean --treg_alpha\?"):
        parse_train_args(["--config", recipe, "--treg_alpah", "0.1"])


def test_config_equals_path_is_the_same_as_config_path():
    _, config, _ = parse_train_args([f"--config={ROOT / 'recipes/tiny/treg-dpo.yaml'}", "--output_dir", "unused"])
    assert config.treg_alpha == 0.5


def test_duplicate_keys_are_refused_in_train_and_label_recipes(tmp_path, capsys):
    train = tmp_path / "train.yaml"
    train.write_text("model_name_or_path: treg:tiny\nbeta: 0.1\nbeta: 0.2\n")
    with pytest.raises(RecipeError, match=r"line 3.*duplicate key 'beta' \(also at line 2\)"):
        parse_train_args(["--config", str(train)])
    label = tmp_path / "label.yaml"
    label.write_text("model_name_or_path: treg:tiny\ndataset: x.jsonl\nmax_rows: 3\nmax_rows: 4\n")
    assert main(["label", "--config", str(label)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("treg: ") and "duplicate key 'max_rows'" in err[0]


def test_argparse_errors_return_2_in_process(capsys):
    assert main(["train", "--treg_alpha", "high"]) == 2
    assert "treg train: error: argument --treg_alpha" in capsys.readouterr().err
