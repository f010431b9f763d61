"""Recipes written for other trainers, read with the meaning their keys have there.

Users arrive with recipes for alignment-handbook (its first format, ``dataset_mixer`` + ``dataset_splits``, and its
current one, ``dataset_mixture``), the SimPO and WPO repositories (both built on the handbook's first format) and
TRL's ``trl dpo --config`` (with its ``datasets`` mixture list). :func:`translate_recipe` turns such a mapping into
treg's keys before TRL's parser reads it:

* renamed keys are mapped (:data:`RENAMED`: ``torch_dtype`` → ``dtype``, ``evaluation_strategy`` →
  ``eval_strategy``, ``max_seq_length`` → ``max_length``, ``padding_free`` → ``pack_pairs``,
  ``preprocessing_num_workers`` → ``dataset_num_proc``, …);
* SimPO's keys select treg's SimPO base (``gamma_beta_ratio`` stays: treg reads it as SimPO does, γ = ratio × β;
  ``loss_type: simpo`` and ``trainer_type: simpo`` become ``base_loss: simpo``);
* the three mixture formats become one ``dataset_mixture`` value (a JSON string that
  :func:`treg.mixtures.load_mixture` reads);
* keys with no meaning in treg are dropped with a one-line warning that says so (:data:`IGNORED`); settings this
  machine cannot honour (FlashAttention or bitsandbytes without a CUDA GPU, a missing ``report_to`` integration, TF32
  on a CPU) fall back with a one-line warning naming what was done; ``push_to_hub`` with no hub to reach, ORPO and
  SFT recipes, and values that would change what is trained are :class:`~treg.recipes.RecipeError` before anything
  loads.

Everything here reads the mapping and the environment only; nothing loads a model or data.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field

from treg.files import UserError

logger = logging.getLogger(__name__)


class CompatError(UserError):
    """A foreign recipe key or value treg cannot honour; the message names the file and the key."""


# Keys other trainers spell differently, and treg's name for them (same meaning).
RENAMED = {
    "torch_dtype": "dtype",  # transformers renamed it; trl 1.16's ModelConfig has dtype
    "evaluation_strategy": "eval_strategy",  # the old TrainingArguments name
    "max_seq_length": "max_length",  # the SFT-style name some DPO recipes carry
    "padding_free": "pack_pairs",  # TRL's padding-free batches; treg packs each pair as one sequence instead
    "preprocessing_num_workers": "dataset_num_proc",  # alignment-handbook's first format
    "hub_model_revision": "hub_revision",  # alignment-handbook: the hub branch pushed to
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",  # transformers 5's name
}

# Keys with no meaning in treg: dropped with this explanation (what treg does instead).
IGNORED = {
    "overwrite_output_dir": "transformers 5 removed it; treg writes into output_dir whether or not it exists",
    "use_liger_kernel": "treg computes its own loss from one policy forward through TRL's fused LM head "
    "(no logits are materialised), so Liger's fused loss is not used",
    "num_processes": "the number of processes is a launcher setting: run `accelerate launch --num_processes N -m "
    "treg train --config ...`",
    "auto_insert_empty_system_msg": "treg renders prompts with the tokenizer's chat template as they are",
    "dataset_kwargs": "treg reads the datasets itself",
    "truncation_side": "treg keeps the start of each sequence (truncation_mode keep_start) and cuts prompts from "
    "their start with max_prompt_length",
    "text_column": "an SFT setting; preference pairs have prompt, chosen and rejected",
    "streaming": "treg needs map-style datasets (token rewards are precomputed); the datasets are read whole",
}

# Keys SFT recipes carry and preference recipes do not.
SFT_KEYS = ("packing", "packing_strategy", "dataset_text_field", "assistant_only_loss", "completion_only_loss",
            "eos_token", "max_seq_length", "text_column")
# Keys only a preference (DPO-family) recipe carries.
PREFERENCE_KEYS = ("beta", "loss_type", "max_prompt_length", "gamma_beta_ratio", "label_smoothing", "base_loss",
                   "treg_alpha", "simpo_gamma", "rpo_alpha", "reference_free")
# bitsandbytes optimizers, which need the package and a CUDA GPU.
_BNB_OPTIMIZERS = ("8bit", "bnb", "paged_", "lion_32bit", "ademamix")
# report_to integrations and the module each needs.
_REPORTERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
              "neptune": "neptune", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio",
              "swanlab": "swanlab", "codecarbon": "codecarbon", "aim": "aim", "azure_ml": "azureml"}


@dataclass
class Translation:
    """A recipe in treg's keys, where it came from, and the one-line notes to log."""

    config: dict
    source: str
    notes: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)


def detect_source(config: dict, path: str = "") -> str:
    """Which project's format the recipe follows: ``alignment-handbook`` (``dataset_mixture``),
    ``alignment-handbook-v0`` (``dataset_mixer``; the SimPO and WPO repositories use it too), ``simpo``
    (``gamma_beta_ratio``), ``trl`` (``datasets``) or ``treg``."""
    if "gamma_beta_ratio" in config or "gamma" in config or str(config.get("loss_type", "")).lower() == "simpo":
        return "simpo"
    if "dataset_mixture" in config and isinstance(config["dataset_mixture"], dict):
        return "alignment-handbook"
    if "dataset_mixer" in config:
        return "alignment-handbook-v0"
    if "datasets" in config:
        return "trl"
    return "treg"


def translate_recipe(config: dict, path: str, *, cuda: bool | None = None) -> Translation:
    """``config`` (a recipe's mapping) in treg's keys; raises :class:`CompatError` (naming ``path`` and the key) for
    what cannot be honoured. ``cuda`` defaults to this machine's (tests pass it)."""
    if cuda is None:
        cuda = _cuda_available()
    where = f"recipe {path!r}"
    out = dict(config)
    notes: list[str] = []
    source = detect_source(config, path)
    _refuse_other_trainers(out, path, where)

    env = out.pop("env", None) or {}
    if not isinstance(env, dict):
        raise CompatError(f"{where}: 'env' must be a mapping of variable names to values.")
    for key in ("wandb_entity", "wandb_project", "wandb_run_group"):
        if key in out:
            value = out.pop(key)
            env.setdefault(key.upper(), str(value))
            notes.append(f"{where}: {key} set as ${key.upper()} for the wandb integration.")

    for old, new in RENAMED.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise CompatError(f"{where}: both {old!r} ({value!r}) and {new!r} ({out[new]!r}) are set; they mean the "
                              f"same in treg ({new}), keep one.")
        out[new] = value
    if "warmup_ratio" in out:  # transformers 5 reads a warmup_steps below 1 as the ratio
        ratio = out.pop("warmup_ratio")
        if out.get("warmup_steps"):
            notes.append(f"{where}: warmup_ratio {ratio} ignored: warmup_steps {out['warmup_steps']} is set and wins, "
                         "as in transformers 4.")
        elif ratio is not None:
            if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
                raise CompatError(f"{where}: warmup_ratio must be in [0, 1), got {ratio!r}.")
            out["warmup_steps"] = ratio
    if "gamma" in out:  # the SimPO repository's first recipes: γ itself (absolute), before gamma_beta_ratio
        if "simpo_gamma" in out or "gamma_beta_ratio" in out:
            raise CompatError(f"{where}: gamma (SimPO's γ) and simpo_gamma/gamma_beta_ratio are both set; keep one.")
        out["simpo_gamma"] = out.pop("gamma")
        _set_base(out, "simpo", where, "gamma (SimPO's target margin)")
        notes.append(f"{where}: gamma {out['simpo_gamma']} read as SimPO's γ: base_loss simpo, simpo_gamma "
                     f"{out['simpo_gamma']}.")
    if out.get("use_flash_attention_2") is not None:
        if out.pop("use_flash_attention_2"):
            out.setdefault("attn_implementation", "flash_attention_2")
    if out.get("dtype") is None and "dtype" in out:
        out.pop("dtype")  # null: the loader's default, as in the handbook

    for key, why in IGNORED.items():
        if key in out:
            value = out.pop(key)
            if key == "streaming" and value:
                raise CompatError(f"{where}: streaming: true is not supported: {why}. Set streaming: false.")
            if value not in (None, False, 0, {}, []) or key == "num_processes":
                notes.append(f"{where}: {key} ignored: {why}.")

    _simpo_keys(out, where, notes)
    _mixtures(out, where, notes)
    _machine_fallbacks(out, where, notes, cuda=cuda)
    return Translation(config=out, source=source, notes=notes, env={k: str(v) for k, v in env.items()})


def translate_flags(argv: list[str]) -> list[str]:
    """Command-line flags with other trainers' names (``--torch_dtype``, ``--evaluation_strategy``, …) renamed."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name in RENAMED:
                arg = f"--{RENAMED[name]}{eq}{value}"
        out.append(arg)
    return out


# ----------------------------------------------------------------------------------------------------- the parts
def _refuse_other_trainers(config: dict, path: str, where: str) -> None:
    """ORPO and SFT recipes: one error saying what treg trains instead."""
    loss = config.get("loss_type")
    losses = [str(x).lower() for x in (loss if isinstance(loss, list) else [loss]) if x is not None]
    parts = [p.lower() for p in os.path.normpath(path).split(os.sep)]
    stem = os.path.splitext(parts[-1])[0] if parts else ""
    orpo = "orpo" in losses or "orpo_alpha" in config or "orpo" in parts[:-1] or "orpo" in stem.split("_")
    if orpo:
        raise CompatError(
            f"{where} is an ORPO recipe (reference-free odds-ratio loss with an SFT term); treg trains DPO or SimPO "
            "with T-REG's token-level regularizer. For a reference-free objective set base_loss: simpo (with "
            "simpo_gamma or gamma_beta_ratio) in a copy of the recipe; keep its data, model and optimizer keys."
        )
    preference = any(k in config for k in PREFERENCE_KEYS)
    sft = [k for k in SFT_KEYS if k in config]
    words = stem.replace("-", "_").split("_")
    if not preference and (sft or {"sft", "cpt"} & set(parts[:-1] + words)):
        what = f" (it sets {', '.join(sft)} and no preference key)" if sft else ""
        raise CompatError(
            f"{where} is a supervised fine-tuning (SFT) or continued-pretraining recipe{what}; treg trains "
            "preference pairs (prompt, chosen, rejected) with DPO or SimPO plus T-REG, starting from an SFT model. "
            "Train the SFT model with that recipe's own trainer (e.g. `trl sft`), then point a DPO recipe's "
            "model_name_or_path at it."
        )


def _simpo_keys(config: dict, where: str, notes: list[str]) -> None:
    trainer = config.pop("trainer_type", None) or config.pop("trainer", None)
    if trainer is not None:
        name = str(trainer).lower()
        if name not in ("dpo", "simpo"):
            raise CompatError(f"{where}: trainer_type {trainer!r}: treg trains dpo or simpo (base_loss).")
        _set_base(config, name, where, f"trainer_type: {trainer}")
    loss = config.get("loss_type")
    if isinstance(loss, list) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, str) and loss.lower() == "simpo":
        config.pop("loss_type")
        _set_base(config, "simpo", where, "loss_type: simpo")
    if config.get("gamma_beta_ratio") is not None:
        if config.get("base_loss", "simpo") != "simpo":
            raise CompatError(f"{where}: gamma_beta_ratio is SimPO's γ/β, but base_loss is {config['base_loss']!r}; "
                              "set base_loss: simpo or remove gamma_beta_ratio.")
        if "base_loss" not in config:
            config["base_loss"] = "simpo"
            notes.append(f"{where}: gamma_beta_ratio given: base_loss simpo (SimPO), γ = gamma_beta_ratio × beta.")
        if "simpo_gamma" in config:
            raise CompatError(f"{where}: both gamma_beta_ratio and simpo_gamma are set; keep one (γ = ratio × β).")
    elif config.get("base_loss") == "simpo" and str(config.get("loss_type", "sigmoid")) in ("sigmoid", "['sigmoid']"):
        config.pop("loss_type", None)  # SimPO's own default; treg's SimPO is the sigmoid form
    sft_weight = config.pop("sft_weight", None)
    if sft_weight:
        raise CompatError(f"{where}: sft_weight {sft_weight} (CPO-SimPO's SFT term) is not supported; set it to 0.")


def _set_base(config: dict, base: str, where: str, said: str) -> None:
    if config.get("base_loss", base) != base:
        raise CompatError(f"{where}: {said} contradicts base_loss: {config['base_loss']}; keep one.")
    config["base_loss"] = base


def _mixtures(config: dict, where: str, notes: list[str]) -> None:
    """alignment-handbook's two mixture formats and TRL's ``datasets`` list → one ``dataset_mixture`` JSON value."""
    mixture = None
    if "dataset_mixer" in config:
        mixer = config.pop("dataset_mixer")
        splits = config.pop("dataset_splits", None) or ["train", "test"]
        configs = config.pop("dataset_configs", None)
        if not isinstance(mixer, dict) or not mixer:
            raise CompatError(f"{where}: dataset_mixer must map dataset ids or paths to fractions, e.g. "
                              "{HuggingFaceH4/ultrafeedback_binarized: 1.0}.")
        if isinstance(splits, str):
            splits = [splits]
        if configs is not None and len(configs) != len(mixer):
            raise CompatError(f"{where}: dataset_configs has {len(configs)} entries for {len(mixer)} datasets in "
                              "dataset_mixer; give one per dataset.")
        entries = []
        for i, (name, frac) in enumerate(mixer.items()):
            for split in splits:
                role = "train" if "train" in split else "test" if "test" in split else None
                if role is None:
                    raise CompatError(f"{where}: dataset_splits entry {split!r} names neither a train nor a test "
                                      "split (alignment-handbook reads splits containing 'train' or 'test').")
                entries.append({"path": str(name), "config": configs[i] if configs else None, "split": split,
                                "role": role, "weight": _fraction(frac, where, f"dataset_mixer[{name!r}]")})
        mixture = {"format": "alignment-handbook-v0", "datasets": entries}
    elif "dataset_mixture" in config and isinstance(config["dataset_mixture"], dict):
        spec = config.pop("dataset_mixture")
        items = spec.get("datasets")
        if not isinstance(items, list) or not items:
            raise CompatError(f"{where}: dataset_mixture.datasets must be a non-empty list of {{id, config, split, "
                              "columns, weight}}.")
        unknown = set(spec) - {"datasets", "seed", "test_split_size"}
        if unknown:
            raise CompatError(f"{where}: dataset_mixture has unknown keys {sorted(unknown)}; it takes datasets, seed, "
                              "test_split_size.")
        entries = []
        for i, item in enumerate(items):
            item = _entry(item, where, f"dataset_mixture.datasets[{i}]", {"id", "config", "split", "columns",
                                                                            "weight"})
            entries.append({"path": str(item["id"]), "config": item.get("config"), "split": item.get("split", "train"),
                            "columns": item.get("columns"),
                            "weight": None if item.get("weight") is None else _fraction(
                                item["weight"], where, f"dataset_mixture.datasets[{i}].weight")})
        mixture = {"format": "alignment-handbook", "datasets": entries, "seed": int(spec.get("seed", 0)),
                   "test_split_size": spec.get("test_split_size")}
    elif "datasets" in config:
        items = config.pop("datasets")
        if not isinstance(items, list) or not items:
            raise CompatError(f"{where}: datasets must be a non-empty list of {{path, name, split, columns, "
                              "fraction, data_files, data_dir}} (TRL's dataset mixture).")
        entries = []
        for i, item in enumerate(items):
            item = _entry(item, where, f"datasets[{i}]", {"path", "name", "data_dir", "data_files", "split",
                                                           "columns", "fraction"})
            entries.append({"path": str(item["path"]), "config": item.get("name"), "split": item.get("split", "train"),
                            "columns": item.get("columns"), "data_files": item.get("data_files"),
                            "data_dir": item.get("data_dir"),
                            "fraction": None if item.get("fraction") is None else _fraction(
                                item["fraction"], where, f"datasets[{i}].fraction", upper=None)})
        given = [e["fraction"] is not None for e in entries]
        if any(given) and not all(given):
            raise CompatError(f"{where}: datasets: fraction must be set for every dataset of the mixture or none.")
        mixture = {"format": "trl", "datasets": entries, "test_split_size": config.pop("test_split_size", None)}
    for key in ("dataset_splits", "dataset_configs"):
        if key in config:
            raise CompatError(f"{where}: {key} belongs with dataset_mixer, which the recipe does not set.")
    if mixture is None:
        return
    size = mixture.get("test_split_size")
    if size is not None and (not isinstance(size, (int, float)) or isinstance(size, bool) or size <= 0):
        raise CompatError(f"{where}: test_split_size must be a fraction in (0, 1) or a row count ≥ 1, got {size!r}.")
    if config.get("dataset_name") not in (None, "treg:toy"):
        raise CompatError(f"{where}: both dataset_name and a dataset mixture are set; keep one.")
    config.pop("dataset_name", None)
    config["dataset_mixture"] = json.dumps(mixture)
    names = ", ".join(f"{e['path']} [{e['split']}]" for e in mixture["datasets"])
    notes.append(f"{where}: {mixture['format']} dataset mixture of {len(mixture['datasets'])}: {names}.")


def _entry(item, where: str, name: str, keys: set[str]) -> dict:
    if not isinstance(item, dict):
        raise CompatError(f"{where}: {name} must be a mapping with keys {sorted(keys)}, got {item!r}.")
    unknown = set(item) - keys
    if unknown:
        raise CompatError(f"{where}: {name} has unknown keys {sorted(unknown)}; it takes {sorted(keys)}.")
    first = "id" if "id" in keys else "path"
    if not item.get(first):
        raise CompatError(f"{where}: {name} needs {first!r} (a hub id or a local file or folder).")
    columns = item.get("columns")
    if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
        raise CompatError(f"{where}: {name}.columns must be a list of column names.")
    return item


def _fraction(value, where: str, name: str, upper: float | None = 1.0) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CompatError(f"{where}: {name} must be a number, got {value!r}.") from None
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else "≥ 0"
        raise CompatError(f"{where}: {name} must be {bound} (the share of the dataset's rows kept), got {value}.")
    return value


def _machine_fallbacks(config: dict, where: str, notes: list[str], *, cuda: bool) -> None:
    """Settings that need a CUDA GPU or a package this machine lacks: the nearest setting, with a note."""
    attn = config.get("attn_implementation")
    if isinstance(attn, str) and attn.startswith("flash_attention"):
        package = "flash_attn_interface" if attn == "flash_attention_3" else "flash_attn"
        if not cuda or not _installed(package):
            config["attn_implementation"] = "sdpa"
            why = "no CUDA GPU" if not cuda else f"{package} is not installed"
            notes.append(f"{where}: attn_implementation {attn} needs a CUDA GPU and {package} ({why}): using sdpa, "
                         "the same attention computed by torch.")
    quant = [k for k in ("load_in_4bit", "load_in_8bit") if config.get(k)]
    if quant and (not cuda or not _installed("bitsandbytes")):
        for key in quant:
            config.pop(key)
        why = "no CUDA GPU" if not cuda else "bitsandbytes is not installed"
        notes.append(f"{where}: {'/'.join(quant)} (bitsandbytes quantization) needs a CUDA GPU and bitsandbytes "
                     f"({why}): the model loads unquantized, in {config.get('dtype') or 'its default dtype'}.")
    optim = str(config.get("optim", ""))
    if any(tag in optim for tag in _BNB_OPTIMIZERS) and (not cuda or not _installed("bitsandbytes")):
        config["optim"] = "adamw_torch"
        why = "no CUDA GPU" if not cuda else "bitsandbytes is not installed"
        notes.append(f"{where}: optim {optim} is a bitsandbytes optimizer ({why}): using adamw_torch.")
    for key in ("bf16", "fp16"):
        if config.get(key) and not cuda and not config.get("use_cpu"):
            config.pop(key)
            notes.append(f"{where}: {key} mixed precision needs a CUDA GPU (none here): float32 on the CPU.")
    if config.get("tf32") and not cuda:
        config.pop("tf32")
        notes.append(f"{where}: tf32 needs an Ampere or newer CUDA GPU (none here): left off.")
    reporters = config.get("report_to")
    if reporters is not None:
        listed = [reporters] if isinstance(reporters, str) else list(reporters)
        missing = [r for r in listed if r in _REPORTERS and not _installed(_REPORTERS[r])]
        if missing:
            kept = [r for r in listed if r not in missing] or ["none"]
            config["report_to"] = kept if len(kept) > 1 else kept[0]
            notes.append(f"{where}: report_to {', '.join(missing)} not installed (pip install {' '.join(missing)}): "
                         f"reporting to {', '.join(kept)}.")


def check_push_to_hub(push_to_hub: bool, hub_token: str | None = None, *, offline: bool | None = None) -> None:
    """``push_to_hub: true`` where no hub can be reached is an error in the first seconds (TRL would fail only when
    it first pushes, after training); with a hub and a token, the Trainer pushes after saving, as in TRL."""
    if not push_to_hub:
        return
    where = "push_to_hub"
    if offline is None:
        offline = _hub_offline()
    if offline:
        raise CompatError(f"{where}: true needs the Hugging Face hub, but HF_HUB_OFFLINE is set; pass "
                          "--push_to_hub false to train and save locally only.")
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        get_token = None
    if get_token is not None and not get_token() and not hub_token:
        raise CompatError(f"{where}: true needs a Hugging Face token (none is set: run `hf auth login` "
                          "or set HF_TOKEN), or pass --push_to_hub false to save locally only.")
    if not _hub_reachable():
        raise CompatError(f"{where}: true, but huggingface.co cannot be reached from this machine; pass "
                          "--push_to_hub false to train and save locally only.")


# -------------------------------------------------------------------------------------------------- environment
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 5.0) -> bool:
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False
