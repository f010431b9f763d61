"""Recipes: YAML files read by TRL's parser (``TrlParser``) plus treg's keys, checked before anything runs.

:func:`check_recipe` fails on malformed YAML (naming the line) and on unknown keys (naming the closest known key);
:class:`DataArguments` are the keys that say where the preference pairs come from; :func:`load_model_and_tokenizer`
and :func:`load_datasets` turn a parsed recipe into a model and datasets. ``treg train``, ``treg rewards`` and
``treg rl`` share them.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field


class RecipeError(ValueError):
    """A recipe that cannot be read; the message names the file and the key."""


@dataclass
class DataArguments:
    """Where the preference pairs come from.

    dataset_name: a hub id, a local file/folder (jsonl, json, parquet; standard, conversational or HH-RLHF
        dialogues), or ``treg:toy`` for the embedded toy task.
    """

    dataset_name: str = field(default="treg:toy", metadata={"help": "Hub id, local path, or treg:toy."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Keep the first N evaluation rows."})
    drop_invalid_rows: bool = field(default=False, metadata={"help": "Drop bad rows (logged) instead of failing."})
    toy_num_pairs: int = field(default=512, metadata={"help": "treg:toy: number of training pairs."})
    toy_seed: int = field(default=0, metadata={"help": "treg:toy: seed of the generated pairs."})


TRAIN_KEYS_HINT = (
    "Keys are the fields of TRegConfig (DPOConfig), ModelConfig and DataArguments; see `treg train --help`."
)


def check_recipe(path: str, parser, keys_hint: str = TRAIN_KEYS_HINT) -> dict:
    """Load a recipe YAML, failing with the file, line and key on malformed YAML or unknown keys (``keys_hint`` says
    where the known keys are listed)."""
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"recipe {path!r} does not exist.")
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {path!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(config, dict):
        raise RecipeError(f"recipe {path!r} must be a mapping of keys to values, got {type(config).__name__}.")
    known = {a.dest for a in parser._actions} | {"env"}
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"recipe {path!r}: unknown key {key!r}.{hint} {keys_hint}")
    return config


def load_model_and_tokenizer(model_args):
    """The recipe's model: ``treg:tiny`` builds (or loads the cached) embedded tiny model, in the default cache
    ($TREG_CACHE_DIR or ~/.cache/treg) whatever the recipe's token_reward_cache_dir; anything else is a hub id or local
    path loaded with ModelConfig's dtype, attention implementation and revision."""
    from treg.models import load_causal_lm

    name = model_args.model_name_or_path
    if name is None:
        raise RecipeError("model_name_or_path is required (a hub id, a local path, or treg:tiny).")
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        import torch

        dtype = getattr(torch, dtype)
    return load_causal_lm(
        name,
        revision=model_args.model_revision,
        trust_remote_code=getattr(model_args, "trust_remote_code", False),  # not a ModelConfig field in trl 1.16
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )


def load_datasets(data_args):
    """(train, eval or None) in TRL's preference format."""
    if data_args.dataset_name == "treg:toy":
        from treg.synthetic import make_pairs

        train = make_pairs(data_args.toy_num_pairs, seed=data_args.toy_seed)
        eval_ = make_pairs(data_args.max_eval_rows or 128, seed=data_args.toy_seed + 10_000)
        return train, (eval_ if data_args.dataset_test_split else None)
    from treg.data import load_preference_dataset

    def load(split, max_rows):
        return load_preference_dataset(
            data_args.dataset_name,
            split=split,
            config_name=data_args.dataset_config,
            max_rows=max_rows,
            drop_invalid=data_args.drop_invalid_rows,
        )

    train = load(data_args.dataset_train_split, data_args.max_train_rows)
    eval_ = load(data_args.dataset_test_split, data_args.max_eval_rows) if data_args.dataset_test_split else None
    return train, eval_
