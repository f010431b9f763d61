"""Recipes: YAML files read by TRL's parser (``TrlParser``) plus treg's keys, checked before anything runs.

:func:`check_recipe` fails on malformed YAML (naming the line), duplicate keys and unknown keys (naming the closest
known key); :func:`parse_recipe_args` turns every error of the recipe, the flags and the config's own checks into a
:class:`RecipeError`; :func:`check_train_settings` checks the values that would fail (or train wrongly) only later;
:class:`DataArguments` are the keys that say where the preference pairs come from; :func:`load_model_and_tokenizer`
and :func:`load_datasets` turn a parsed recipe into a model and datasets. ``treg train``, ``treg rewards`` and
``treg rl`` share them.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
from dataclasses import dataclass, field

from treg.files import UserError

logger = logging.getLogger(__name__)


class RecipeError(UserError):
    """A recipe, flag or setting that cannot be used; the message names the file and the key."""


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
    dataset_mixture: str | None = field(default=None, metadata={
        "help": "Several datasets as one (JSON; written from alignment-handbook's dataset_mixture or dataset_mixer "
        "+ dataset_splits, or TRL's datasets list, see treg.mixtures)."})
    chat_template: str | None = field(default=None, metadata={
        "help": "A Jinja chat template set on the tokenizer before any prompt is rendered."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Load the tokenizer from here instead of from the model (hub id or folder)."})


TRAIN_KEYS_HINT = (
    "Keys are the fields of TRegConfig (DPOConfig), ModelConfig and DataArguments; see `treg train --help`."
)


def check_recipe(path: str, parser, keys_hint: str = TRAIN_KEYS_HINT) -> dict:
    """Load a recipe YAML, failing with the file, line and key on malformed YAML or unknown keys (``keys_hint`` says
    where the known keys are listed)."""
    config = _read_recipe(path)
    _check_keys(config, path, parser, keys_hint)
    return config


def _read_recipe(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"recipe {path!r} does not exist.")
    try:
        config = load_yaml(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {path!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(config, dict):
        raise RecipeError(f"recipe {path!r} must be a mapping of keys to values, got {type(config).__name__}.")
    return config


def _check_keys(config: dict, path: str, parser, keys_hint: str) -> None:
    known = {a.dest for a in parser._actions} | {"env"}
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"recipe {path!r}: unknown key {key!r}.{hint} {keys_hint}")


def load_yaml(path: str):
    """``yaml.safe_load`` of a file, except that a key given twice in one mapping is an error (PyYAML keeps the last
    silently) that names the line of both."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (also at line {seen[key] + 1}); keep one of them",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    with open(path) as f:
        return yaml.load(f, Loader=UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass


def recipe_path(argv: list[str]) -> str | None:
    """The ``--config`` path of a command line (None without one); ``--config`` with no path is an error."""
    if "--config" not in argv:
        return None
    i = argv.index("--config")
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise RecipeError("--config needs a recipe path, e.g. --config recipes/tiny/treg-dpo.yaml.")
    return argv[i + 1]


def parse_recipe_args(parser, argv: list[str], keys_hint: str = TRAIN_KEYS_HINT, foreign: bool = False):
    """``parser.parse_args_and_config(argv)`` (a ``TrlParser``) after :func:`check_recipe`; a ValueError from the
    flags or from the configs' own checks (``__post_init__``) becomes a :class:`RecipeError` naming the recipe, and an
    unknown flag names the closest known one. ``foreign=True`` (``treg train`` / ``treg rewards``): recipes and flags
    written for alignment-handbook, SimPO, WPO or TRL are first translated into treg's keys
    (:func:`treg.compat.translate_recipe`), each translation logged in one line."""
    argv = [a for arg in argv for a in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    path = recipe_path(argv)
    if not foreign:
        if path is not None:
            check_recipe(path, parser, keys_hint=keys_hint)
        try:
            return parser.parse_args_and_config(argv)
        except RecipeError:
            raise
        except ValueError as e:
            raise RecipeError(_config_error(e, path, parser, keys_hint)) from e

    from treg.compat import translate_flags, translate_recipe

    argv = translate_flags(argv)
    if path is not None:
        i = argv.index("--config")
        argv = argv[:i] + argv[i + 2:]
        config = _read_recipe(path)
        translated = translate_recipe(config, path)
        _check_keys(translated.config, path, parser, keys_hint)
        for note in translated.notes:
            logger.warning(note)
        for key, value in translated.env.items():
            os.environ[key] = value
        parser.set_defaults_with_config(**translated.config)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(_config_error(e, path, parser, keys_hint)) from e


def _config_error(err: ValueError, path: str | None, parser, keys_hint: str) -> str:
    message = " ".join(str(err).split())
    unused = re.search(r"not used by the HfArgumentParser: (\[.*\])", message)
    if unused:
        args = [str(a) for a in ast.literal_eval(unused.group(1))] or ["?"]
        flag = next((a for a in args if a.startswith("-")), args[0])
        close = difflib.get_close_matches(flag, [o for a in parser._actions for o in a.option_strings], n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"unknown flag {flag}.{hint} {keys_hint}"
    where = f"recipe {path!r} or the command line" if path else "the command line"
    return f"{message} (setting from {where}; fix the value there)"


def check_train_settings(config, data_args) -> None:
    """Settings that TRL or torch would reject only after the token-reward pass, or would accept and train wrongly;
    raise :class:`RecipeError` naming the field. Called by ``treg train``/``treg rewards`` before loading anything."""
    if config.beta <= 0:
        raise RecipeError(
            f"beta must be > 0, got {config.beta}: with β < 0 the loss prefers the rejected responses and β = 0 learns "
            "nothing. Typical: 0.01-0.5 for DPO, 2-10 for SimPO."
        )
    if config.treg_alpha < 0:
        raise RecipeError(f"treg_alpha must be ≥ 0, got {config.treg_alpha}.")
    if config.base_loss == "simpo" and config.simpo_gamma < 0:
        raise RecipeError(
            f"simpo_gamma must be ≥ 0 with base_loss simpo, got {config.simpo_gamma}: a negative target margin "
            "rewards the rejected response. The SimPO paper uses γ = 0.3-1.6 × β."
        )
    if config.learning_rate < 0:
        raise RecipeError(f"learning_rate must be ≥ 0, got {config.learning_rate}.")
    if config.max_length is not None and config.max_length < 1:
        raise RecipeError(f"max_length must be ≥ 1 (or None for no truncation), got {config.max_length}.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "precompute_ref_batch_size"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            raise RecipeError(f"{name} must be ≥ 1, got {value}.")
    for name in ("max_train_rows", "max_eval_rows", "toy_num_pairs"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise RecipeError(f"{name} must be ≥ 1 (leave it out for all rows), got {value}.")
    mixture_test = bool(data_args.dataset_mixture) and _mixture_has_test(data_args.dataset_mixture)
    if config.eval_strategy not in (None, "no") and data_args.dataset_mixture and not mixture_test:
        raise RecipeError(
            f"eval_strategy={getattr(config.eval_strategy, 'value', config.eval_strategy)!r} needs an evaluation set, "
            "but the dataset mixture gives none (no test split, no test_split_size); add one, or --eval_strategy no."
        )
    if config.eval_strategy not in (None, "no") and not data_args.dataset_test_split and not mixture_test:
        raise RecipeError(
            f"eval_strategy={getattr(config.eval_strategy, 'value', config.eval_strategy)!r} needs an evaluation set, "
            "but dataset_test_split is empty; set dataset_test_split, or --eval_strategy no."
        )
    _check_resume(config.resume_from_checkpoint)
    from treg.compat import check_push_to_hub

    check_push_to_hub(config.push_to_hub, config.hub_token)
    if config.eval_hooks:
        from treg.evaluation.callback import check_hook_settings

        check_hook_settings(
            config.eval_hooks, judge=config.eval_hook_judge, when=config.eval_hook_when,
            bench=config.eval_hook_arena_bench,
        )


def _mixture_has_test(spec: str) -> bool:
    import json

    try:
        mixture = json.loads(spec)
    except json.JSONDecodeError as e:
        raise RecipeError(f"dataset_mixture is not valid JSON: {e}") from e
    if not isinstance(mixture, dict):
        raise RecipeError("dataset_mixture must be a JSON object (see treg.mixtures).")
    return mixture.get("test_split_size") is not None or any(
        e.get("role") == "test" for e in mixture.get("datasets") or [])


def check_config_values(config) -> None:
    """``TRegConfig.__post_init__``'s checks: a ValueError for each setting TRegTrainer cannot train with (TrlParser
    turns it into a :class:`RecipeError` naming the recipe); sets ``simpo_gamma`` from ``gamma_beta_ratio``."""
    from treg.losses import BASE_LOSSES, DPO_VARIANTS
    from treg.token_rewards.precompute import PassSettings

    if config.base_loss not in BASE_LOSSES:
        raise ValueError(f"base_loss={config.base_loss!r}: choose one of {list(BASE_LOSSES)}.")
    if config.gamma_beta_ratio is not None:
        if config.base_loss != "simpo" or config.gamma_beta_ratio < 0:
            raise ValueError(f"gamma_beta_ratio={config.gamma_beta_ratio} is SimPO's γ/β (≥ 0, base_loss: simpo), "
                             f"but base_loss={config.base_loss!r}; set base_loss: simpo, or remove gamma_beta_ratio.")
        config.simpo_gamma = config.gamma_beta_ratio * config.beta
    if config.max_prompt_length is not None and config.max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be ≥ 1 (or unset), got {config.max_prompt_length}.")
    PassSettings.from_config(config)  # checks the token-reward settings
    if config.treg_alpha < 0:
        raise ValueError(f"treg_alpha must be ≥ 0, got {config.treg_alpha}.")
    if not config.precompute_ref_log_probs:
        raise ValueError("precompute_ref_log_probs=False is not supported: treg computes per-token reference "
                         "log-probs in its token-reward pass and keeps no reference model in memory. "
                         "Remove the setting.")
    if config.truncation_mode != "keep_start":
        raise ValueError("truncation_mode must be 'keep_start' ('keep_end' is deprecated in TRL).")
    if config.base_loss == "dpo" and (len(config.loss_type) != 1 or config.loss_type[0] not in DPO_VARIANTS):
        raise ValueError(f"loss_type={config.loss_type}: with base_loss='dpo' treg supports one of "
                         f"{list(DPO_VARIANTS)}. For SimPO set base_loss: simpo.")
    unsupported = {"ld_alpha": config.ld_alpha is not None,
                   "f_divergence_type": config.f_divergence_type != "reverse_kl",
                   "use_weighting": config.use_weighting, "sync_ref_model": config.sync_ref_model}
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"{name} is not supported by TRegTrainer's loss; leave it at its default.")


def _check_resume(checkpoint) -> None:
    if checkpoint is None or isinstance(checkpoint, bool):
        return
    if not os.path.isdir(checkpoint):
        raise RecipeError(
            f"resume_from_checkpoint {checkpoint!r}: no such folder; pass a checkpoint folder such as "
            "runs/my-run/checkpoint-500 (written when save_strategy is not 'no')."
        )
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        raise RecipeError(
            f"resume_from_checkpoint {checkpoint!r}: the folder has no trainer_state.json, so it is not a complete "
            "checkpoint (a run killed while saving leaves one like it); resume from an earlier checkpoint-N."
        )


def warn_truncated_rows(dataset, max_length: int | None, name: str = "train") -> int:
    """Log a warning with the number of rows whose completion is cut to fit ``max_length`` (prompt tokens are kept,
    completions lose their end: training sees only the kept tokens); returns that number. ``dataset`` is tokenized
    (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
    if max_length is None or dataset is None or "prompt_ids" not in dataset.column_names:
        return 0
    import pyarrow.compute as pc

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    lengths: dict[str, list[int]] = {c: [] for c in columns}
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=10_000):
        for c in columns:  # lengths only: the token lists stay in Arrow
            lengths[c].extend(pc.list_value_length(batch[c]).to_pylist())
    cut = []
    for row, (p, c, r) in enumerate(zip(*(lengths[c] for c in columns))):
        if p + max(c, r) > max_length:
            cut.append((row, max(c, r), max(0, max_length - p)))
    if cut:
        row, longest, kept = cut[0]
        logger.warning(
            "%s: %d of %d rows have a completion cut to fit max_length=%d (first: row %d, %d completion tokens, %d "
            "kept); training sees only the kept tokens. Raise max_length, or shorten or drop those rows.",
            name, len(cut), len(dataset), max_length, row, longest, kept,
        )
    return len(cut)


def load_model_and_tokenizer(model_args, data_args=None):
    """The recipe's model: ``treg:tiny`` builds (or loads the cached) embedded tiny model, in the default cache
    ($TREG_CACHE_DIR or ~/.cache/treg) whatever the recipe's token_reward_cache_dir; anything else is a hub id or local
    path loaded with ModelConfig's dtype, attention implementation, revision and (on a CUDA GPU with bitsandbytes)
    4/8-bit quantization. ``data_args`` may give the tokenizer's source (``tokenizer_name_or_path``) and a
    ``chat_template`` to set on it."""
    model, tokenizer = _load_model(model_args)
    tokenizer_source = getattr(data_args, "tokenizer_name_or_path", None)
    if tokenizer_source and tokenizer_source != model_args.model_name_or_path:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, revision=model_args.model_revision)
        except (OSError, ValueError) as e:
            raise RecipeError(f"tokenizer_name_or_path {tokenizer_source!r} cannot be loaded: "
                              f"{' '.join(str(e).split())[:300]}") from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    template = getattr(data_args, "chat_template", None)
    if template:
        tokenizer.chat_template = template
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
        except Exception as e:  # jinja2 errors: the template the recipe gave cannot render a plain user turn
            raise RecipeError(f"chat_template cannot render a user message: {type(e).__name__}: {e}") from e
        logger.info("chat_template from the recipe set on the tokenizer.")
    return model, tokenizer


def _load_model(model_args):
    from treg.models import load_causal_lm

    name = model_args.model_name_or_path
    if name is None:
        raise RecipeError("model_name_or_path is required (a hub id, a local path, or treg:tiny).")
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        import torch

        dtype = getattr(torch, dtype)
    extra = {}
    if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        from trl import get_kbit_device_map, get_quantization_config

        extra = {"quantization_config": get_quantization_config(model_args), "device_map": get_kbit_device_map()}
    return load_causal_lm(
        name,
        revision=model_args.model_revision,
        trust_remote_code=getattr(model_args, "trust_remote_code", False),  # not a ModelConfig field in trl 1.16
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        **extra,
    )


def load_datasets(data_args, seed: int = 42):
    """(train, eval or None) in TRL's preference format, with only the columns training reads. ``seed`` (the recipe's)
    shuffles a dataset mixture whose format has no seed of its own."""
    from treg.data import keep_training_columns

    train, eval_ = _load_datasets(data_args, seed)
    return keep_training_columns(train), (keep_training_columns(eval_) if eval_ is not None else None)


def _load_datasets(data_args, seed: int):
    if data_args.dataset_mixture:
        from treg.mixtures import load_mixture

        train, test, _ = load_mixture(data_args.dataset_mixture, seed=seed, drop_invalid=data_args.drop_invalid_rows)
        if data_args.max_train_rows is not None:
            train = train.select(range(min(data_args.max_train_rows, len(train))))
        if test is not None and data_args.max_eval_rows is not None:
            test = test.select(range(min(data_args.max_eval_rows, len(test))))
        return train, test
    if data_args.dataset_name == "treg:toy":
        from treg.synthetic import make_pairs

        train = make_pairs(data_args.toy_num_pairs, seed=data_args.toy_seed)
        if data_args.max_train_rows is not None:
            train = train.select(range(min(data_args.max_train_rows, len(train))))
        eval_ = make_pairs(data_args.max_eval_rows or 128, seed=data_args.toy_seed + 10_000)
        return train, (eval_ if data_args.dataset_test_split else None)
    from treg.data import load_preference_dataset, local_data_source

    test_split = data_args.dataset_test_split
    source = local_data_source(data_args.dataset_name, data_args.dataset_train_split)
    if test_split and source is not None and source == local_data_source(data_args.dataset_name, test_split):
        raise RecipeError(
            f"dataset_test_split={test_split!r} reads the same data as the training split from dataset_name "
            f"{data_args.dataset_name!r} (a file has no splits; a folder gives a split the files whose name starts "
            "with it, else all), so eval_loss would be measured on training rows. Evaluate on other data (a folder "
            "holding train*.jsonl and test*.jsonl), or pass --dataset_test_split= --eval_strategy no."
        )

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
