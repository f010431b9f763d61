"""The ``treg`` command (also ``python -m treg``): ``train``, ``rewards``, ``label``, ``pairs``, ``reward-model``,
``quickstart``, ``viz``, ``rl`` and ``eval``.

    treg train --config recipes/tiny/treg-dpo.yaml [--treg_alpha 0.5 ...]
    treg rewards --config recipes/tiny/treg-dpo.yaml
    treg label --config recipes/label/hh-harmless-tiny.yaml [--max_rows 50 ...]
    treg pairs --model CKPT --prompts DATA --scorer rm:PATH|direct:MODEL|oracle --num-samples 5 --out DIR
    treg reward-model --model CKPT --dataset LABELED --output_dir DIR
    treg quickstart [--output_dir DIR]
    treg viz --checkpoint CKPT [--ref-model REF] --dataset DATA [--rows 0 1 2] [--out heatmap.html|.png]
    treg rl --config recipes/tiny/rl-relc.yaml
    treg eval alpaca-eval|arena-hard --model CKPT [--judge JUDGE] ...   (treg eval --help)

``train`` and ``rewards`` read the same YAML keys as TRL's parser (ModelConfig, DPOConfig fields) plus treg's own
(TRegConfig, :class:`DataArguments`). Command-line flags override the YAML. ``label`` writes RLAIF AI preference
labels (treg.feedback.labels) and a report; its YAML keys are listed in ``treg label --help``.

An error in the input or environment (recipe, flags, data, model, cache, judge, evaluation files) prints one line,
``treg: <what>, <where>, <what to do>``, and exits with status 2; ``--debug`` (or ``TREG_DEBUG=1``) shows its
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from treg.files import UserError
from treg.recipes import (
    DataArguments,
    RecipeError,
    check_recipe,
    check_train_settings,
    load_datasets,
    load_model_and_tokenizer,
    parse_recipe_args,
    warn_truncated_rows,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("treg")


# ------------------------------------------------------------------------------------------------ config parsing
def _parser():
    from trl import ModelConfig, TrlParser

    from treg.trainer import TRegConfig

    return TrlParser((DataArguments, TRegConfig, ModelConfig), prog="treg train")


def parse_train_args(argv: list[str]):
    """(DataArguments, TRegConfig, ModelConfig) from a recipe and flags; every error in them is a RecipeError."""
    data_args, config, model_args = parse_recipe_args(_parser(), argv, foreign=True)
    return data_args, config, model_args


# ------------------------------------------------------------------------------------------------------- building
def build_trainer(data_args, config, model_args):
    """The trainer, after every setting that can be checked without loading is checked (so a typo fails in the first
    second, not after the token-reward pass); warns about completions cut to fit max_length."""
    import importlib.util

    from trl import get_peft_config

    from treg.trainer import TRegTrainer

    check_train_settings(config, data_args)
    if model_args.use_peft and importlib.util.find_spec("peft") is None:
        raise RecipeError("use_peft: true (LoRA) needs peft: pip install 'treg[peft]' (from a checkout: '.[peft]').")
    train, eval_ = load_datasets(data_args, seed=config.seed)  # before the model: a bad file fails in a second
    model, tokenizer = load_model_and_tokenizer(model_args, data_args)
    if model_args.use_peft and os.path.isdir(model.name_or_path):  # adapter_config.json records it: make it absolute
        model.name_or_path = os.path.abspath(model.name_or_path)
    trainer = TRegTrainer(
        model,
        args=config,
        train_dataset=train,
        eval_dataset=eval_,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    if trainer.accelerator.is_main_process:
        warn_truncated_rows(trainer.train_dataset, config.max_length, "train")
        if isinstance(trainer.eval_dataset, type(trainer.train_dataset)):
            warn_truncated_rows(trainer.eval_dataset, config.max_length, "eval")
    return trainer


# ------------------------------------------------------------------------------------------------------- commands
def cmd_train(argv: list[str]) -> int:
    """Train, save, then run the end-of-training eval hooks: a hook that fails cannot lose the trained model."""
    from treg.evaluation.callback import EvalHookCallback
    from treg.token_rewards import AGREEMENT_METRICS, TOKEN_REWARD_COLUMNS, print_agreement, rhat_preference_agreement

    data_args, config, model_args = parse_train_args(argv)
    trainer = build_trainer(data_args, config, model_args)
    if set(TOKEN_REWARD_COLUMNS) <= set(trainer.train_dataset.column_names):  # r̂ vs the labels, before training
        agreement = rhat_preference_agreement(trainer.train_dataset)
        for key, metric in AGREEMENT_METRICS.items():  # TRL adds these to the first logged training metrics
            trainer._metrics["train"][metric].append(agreement[key])
        if trainer.accelerator.is_main_process:
            print_agreement(agreement)
    end_hooks = [c for c in trainer.callback_handler.callbacks if isinstance(c, EvalHookCallback)]
    for hook in end_hooks:
        hook.defer_train_end = True
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"saved to {config.output_dir}")
    for hook in end_hooks:
        hook.run_train_end(trainer)
    return 0


def cmd_rewards(argv: list[str]) -> int:
    """Run the token-reward pass alone (it is cached, so a later `treg train` with the same recipe reuses it)."""
    from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS, print_agreement, rhat_preference_agreement
    from treg.token_rewards.contrastive import summarize

    data_args, config, model_args = parse_train_args(argv)
    trainer = build_trainer(data_args, config, model_args)
    dataset = trainer.train_dataset
    if trainer.accelerator.is_main_process:
        out = os.path.join(config.output_dir, "token_rewards")
        dataset.save_to_disk(out)
        print(f"{len(dataset)} rows with per-token columns saved to {out}")
        for col in (CHOSEN_REWARDS, REJECTED_REWARDS):
            if col in dataset.column_names:
                stats = summarize(dataset[col])
                mean, std, pos = stats["mean"], stats["std"], stats["frac_positive"]
                print(f"{col}: mean {mean:+.4f}  std {std:.4f}  positive {pos:.1%}")
        if {CHOSEN_REWARDS, REJECTED_REWARDS} <= set(dataset.column_names):
            print_agreement(rhat_preference_agreement(dataset))
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    from treg.quickstart import run

    parser = argparse.ArgumentParser(prog="treg quickstart", description="T-REG end to end on the embedded tiny model.")
    parser.add_argument("--output_dir", default="treg-quickstart", help="where the checkpoint is saved")
    parser.add_argument("--train_prompts", type=int, default=512, help="prompts to build training pairs from")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="T-REG α")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(
        output_dir=args.output_dir, train_prompts=args.train_prompts, epochs=args.epochs, alpha=args.alpha,
        seed=args.seed,
    )
    return 0


def cmd_viz(argv: list[str]) -> int:
    """Token heatmaps (r̂, the checkpoint's implicit token rewards, true defects) of dataset rows, as HTML or PNG."""
    parser = argparse.ArgumentParser(
        prog="treg viz",
        description="Per-token heatmaps of responses: the reference model's contrastive rewards r̂, the checkpoint's "
        "implicit token rewards β·log π/π_ref (with --ref-model) and the known defect tokens, as HTML or PNG.",
    )
    parser.add_argument("--checkpoint", required=True, help="trained model: local path, hub id, or treg:tiny")
    parser.add_argument("--ref-model", default=None, help="reference model (path, hub id, treg:tiny); r̂ comes from it")
    parser.add_argument("--dataset", required=True, help="preference data: local file/folder, hub id, or treg:toy")
    parser.add_argument("--split", default="train", help="dataset split (hub datasets and folders)")
    parser.add_argument("--rows", type=int, nargs="+", default=[0], help="row indices to show")
    parser.add_argument("--side", choices=["rejected", "chosen", "both"], default="rejected")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit token reward")
    parser.add_argument("--max-length", type=int, default=None, help="the training max_length (truncation)")
    parser.add_argument("--positive-template", default=None, help="x⁺ template (default: TRegConfig's)")
    parser.add_argument("--negative-template", default=None, help="x⁻ template (default: TRegConfig's)")
    parser.add_argument("--out", default="token-heatmap.html", help="output file, .html/.htm or .png")
    args = parser.parse_args(argv)
    from treg.models import check_model_spec
    from treg.viz import visualize

    check_model_spec(args.checkpoint, "--checkpoint", tokenizer=False)
    if args.ref_model is not None:
        check_model_spec(args.ref_model, "--ref-model", tokenizer=False)
    try:
        path = visualize(
            args.checkpoint,
            args.dataset,
            ref_model=args.ref_model,
            rows=args.rows,
            side=args.side,
            beta=args.beta,
            out=args.out,
            max_length=args.max_length,
            split=args.split,
            positive_template=args.positive_template,
            negative_template=args.negative_template,
        )
    except ImportError as e:
        if "treg[viz]" not in str(e):
            raise
        print(f"treg viz: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _label_settings(argv: list[str]) -> dict:
    """Read the `treg label` settings: defaults, then the recipe, then the flags; typed and checked."""
    from treg.feedback.labels import LABEL_KEYS, parse_bool

    parser = argparse.ArgumentParser(prog="treg label", description="Label preference pairs with an AI labeler.")
    parser.add_argument("--config", default=None, help="YAML recipe with the keys below; flags override it")
    for key, (_, default, help_) in LABEL_KEYS.items():
        parser.add_argument(f"--{key}", default=None, help=f"{help_} (default: {default})")
    args = parser.parse_args(argv)
    values = {k: d for k, (_, d, _) in LABEL_KEYS.items()}
    if args.config:
        known = argparse.ArgumentParser(add_help=False)  # check_recipe's known keys: exactly LABEL_KEYS
        for key in LABEL_KEYS:
            known.add_argument(f"--{key}")
        values.update(check_recipe(args.config, known, keys_hint="See `treg label --help`."))
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    for key, (typ, _, _) in LABEL_KEYS.items():
        v = values[key]
        if v is None or (isinstance(v, str) and v.lower() == "none" and key != "task"):
            values[key] = None
            continue
        try:
            values[key] = parse_bool(v) if typ is bool else typ(v)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{key}: {e}") from e
    for key in ("model_name_or_path", "dataset"):
        if not values[key]:
            raise RecipeError(f"{key} is required (in the recipe or as --{key}).")
    if values["output_format"] not in ("disk", "jsonl"):
        raise RecipeError(f"output_format must be disk or jsonl, got {values['output_format']!r}.")
    return values


def _write_labels(labeled, report: dict, out_dir: str, output_format: str) -> str:
    """Write the labeled dataset and report.json into ``out_dir`` atomically; returns the dataset's path."""
    import json
    import shutil
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "labeled" if output_format == "disk" else "labeled.jsonl")
    tmp = tempfile.mkdtemp(prefix=".tmp-label-", dir=out_dir)
    try:  # atomic: write into a temp dir, then rename into place
        if output_format == "disk":
            labeled.save_to_disk(os.path.join(tmp, "labeled"))
        else:
            labeled.to_json(os.path.join(tmp, "labeled.jsonl"), lines=True, force_ascii=False)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=".old-label-", dir=out_dir)
            os.rename(final, os.path.join(old, "x"))
        os.rename(os.path.join(tmp, os.path.basename(final)), final)
        os.replace(os.path.join(tmp, "report.json"), os.path.join(out_dir, "report.json"))
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cmd_label(argv: list[str]) -> int:
    """RLAIF pairwise AI preference labels (METHOD.md §4): labeled dataset + report.json under output_dir."""
    import json

    values = _label_settings(argv)

    from treg.feedback.labels import label_dataset, load_label_dataset
    from treg.models import load_causal_lm

    name = values["model_name_or_path"]
    model, tokenizer = load_causal_lm(name)
    dataset = load_label_dataset(values)
    labeled, report = label_dataset(
        model, tokenizer, dataset, task=values["task"], chain_of_thought=values["chain_of_thought"],
        both_orders=values["both_orders"], batch_size=values["batch_size"],
        max_rationale_tokens=values["max_rationale_tokens"], max_length=values["max_length"],
    )
    report.update(model=name, dataset=values["dataset"])
    final = _write_labels(labeled, report, values["output_dir"], values["output_format"])
    print(json.dumps(report, indent=2))
    print(f"labeled {report['n_pairs']} pairs -> {final}")
    return 0


def cmd_pairs(argv: list[str]) -> int:
    """On-policy preference pairs: sample N answers per prompt, score them, keep best and worst."""
    from treg.feedback.onpolicy import main as pairs_main

    return pairs_main(argv)


def cmd_reward_model(argv: list[str]) -> int:
    """Distilled RLAIF: train a reward model on soft AI labels."""
    from treg.feedback.reward_model import main as rm_main

    return rm_main(argv)


def cmd_rl(argv: list[str]) -> int:
    """Online RL (RLOO/GRPO) with reward-model, direct-RLAIF, callable and RELC critic rewards."""
    from treg.rl import main as rl_main

    return rl_main(argv)


def cmd_eval(argv: list[str]) -> int:
    """AlpacaEval 2 and Arena-Hard from a checkpoint, offline with a local judge or with an endpoint judge."""
    from treg.evaluation.cli import main as eval_main

    return eval_main(argv)


COMMANDS = {
    "train": cmd_train,
    "rewards": cmd_rewards,
    "label": cmd_label,
    "pairs": cmd_pairs,
    "reward-model": cmd_reward_model,
    "quickstart": cmd_quickstart,
    "viz": cmd_viz,
    "rl": cmd_rl,
    "eval": cmd_eval,
}


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error in the user's input or environment (:class:`treg.files.UserError`) prints one line
    ``treg: ...`` and returns 2 (the traceback only with ``--debug`` or ``TREG_DEBUG=1``); argparse errors return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TREG_DEBUG", "").lower() not in ("", "0", "false", "no")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except UserError as e:
        if debug:
            raise
        print(f"treg: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: its message is printed; 2 for a usage error, 0 for --help
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        raise


if __name__ == "__main__":
    sys.exit(main())
