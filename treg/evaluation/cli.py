"""``treg eval``: AlpacaEval 2 and Arena-Hard from a checkpoint, offline with a local judge or with an endpoint.

    treg eval alpaca-eval --model CKPT [--judge JUDGE] [--reference-outputs FILE] [--max-instances N] [--out DIR]
                          [--lc-data DIR]
    treg eval arena-hard --model CKPT [--judge JUDGE] [--bench v0.1|v2.0] [--max-instances N] [--style-control style]
    treg eval arena-hard show --judgments RUN_DIR [--baseline gpt-4-0314] [--answers-dir DIR] [--style-control style]
    treg eval compare RUN_DIR_OR_RESULTS_JSON ... --out DIR

JUDGE: ``treg:tiny`` (mechanics only), a local path or hub id of an HF causal LM (log-prob judge), or
``openai:MODEL@BASE_URL`` (an OpenAI-compatible endpoint; the key from ``--api-key-env``). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (leave it out for all instances), got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint: a local path, a hub id, or treg:tiny")
    p.add_argument("--name", help="model name in the output files (default: the checkpoint's folder name)")
    p.add_argument(
        "--judge",
        default=None,
        help="treg:tiny | PATH/hub id (local log-prob judge) | openai:MODEL@URL "
        "(default: the policy itself judges, mechanics only)",
    )
    p.add_argument(
        "--judge-mode",
        choices=("logprob", "generate"),
        default="logprob",
        help="local judge on Arena-Hard: score the five labels (logprob) or write a judgment (generate)",
    )
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint key")
    p.add_argument("--parallel", type=int, default=8, help="concurrent requests to an endpoint judge")
    p.add_argument("--judge-max-tokens", type=int, default=4096, help="endpoint judge's judgment budget (Arena-Hard)")
    p.add_argument("--max-instances", type=positive_int, default=None, help="evaluate a subset of this size (≥ 1)")
    p.add_argument("--out", default=None, help="run directory (default: eval_results/<benchmark>/<name>)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation backend")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16, help="generation and local-judge batch size")
    p.add_argument("--answer-shard-size", type=positive_int, default=32,
                   help="answers saved per shard as they are generated (a killed run resumes from them)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the policy's answers")
    p.add_argument("--retries", type=int, default=1, help="re-judge failed judgments this many more times")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treg eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("alpaca-eval", help="AlpacaEval 2 win rate (LC with --lc-data or its cached hub file)")
    _common(a)
    a.add_argument("--reference-outputs", default=None, help="reference outputs JSON (default: eval/data.yaml)")
    a.add_argument(
        "--annotator-config",
        default=None,
        help="run alpaca_eval.evaluate with this annotator config: treg_weighted_endpoint or treg_text_endpoint "
        "(shipped with treg) or a folder with configs.yaml; needs --judge openai:MODEL@URL",
    )
    a.add_argument(
        "--lc-data",
        default=None,
        metavar="DIR",
        help="folder with alpaca_eval's df_gamed.csv (instruction difficulty and the verbose/concise baselines' "
        "annotations, from the hub dataset tatsu-lab/alpaca_eval): enables the length-controlled win rate offline",
    )
    h = sub.add_parser("arena-hard", help="Arena-Hard win rate vs the baseline (or `arena-hard show`)")
    _common(h)
    h.add_argument("--bench", choices=("v0.1", "v2.0"), default="v0.1")
    h.add_argument("--questions", default=None, help="question.jsonl (default: eval/data.yaml)")
    h.add_argument("--baseline-answers", nargs="+", default=None, help="baseline model_answer jsonl file(s)")
    h.add_argument("--judge-config", default=None, help="judge settings YAML (default: eval/arena_hard/)")
    h.add_argument("--style-control", choices=("style", "length", "markdown"), default=None)
    h.add_argument("--rounds", type=int, default=100, help="bootstrap rounds")
    c = sub.add_parser("compare", help="table and plot over several runs")
    c.add_argument("runs", nargs="+", help="run directories or results.json files")
    c.add_argument("--out", required=True)
    return parser


def show_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treg eval arena-hard show", description="Score existing Arena-Hard judgment files (official v0.1 format)."
    )
    p.add_argument(
        "--judgments",
        required=True,
        help="the run folder `treg eval arena-hard` prints, a model_judgment/<judge> folder, or one .jsonl file",
    )
    p.add_argument("--baseline", default=None, help="baseline model (default: from the files, else gpt-4-0314)")
    p.add_argument("--answers-dir", default=None, help="model_answer directory (style control, average lengths)")
    p.add_argument("--style-control", choices=("style", "length", "markdown"), default=None)
    p.add_argument("--weight", type=int, default=3, help="count of a >> verdict")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--first-game-only", action="store_true")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    return p


def _policy_and_judge(args):
    from treg.evaluation.judges import build_judge
    from treg.models import load_causal_lm

    model, tokenizer = load_causal_lm(args.model, device=args.device, inference=True)
    name = args.name or ("tiny" if args.model == "treg:tiny" else os.path.basename(os.path.normpath(args.model)))
    judge = None
    if not getattr(args, "annotator_config", None):
        spec = args.judge or args.model
        same = spec == args.model
        judge = build_judge(
            spec,
            device=args.device,
            batch_size=args.batch_size,
            mode=args.judge_mode,
            api_key_env=args.api_key_env,
            max_tokens=args.judge_max_tokens,
            parallel=args.parallel,
            show_progress=not args.quiet,
            judge_model=(model, tokenizer) if same else None,
        )
    gen = {
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "system_prompt": args.system_prompt,
    }
    return model, tokenizer, name, judge, gen


def _print_results(results: dict) -> None:
    from treg.evaluation.report import markdown

    print(markdown(results))
    stats = results.get("judge_stats") or {}
    if stats:
        print(
            f"judgments: {stats['judged']} new, {stats['cached']} from cache, {stats['failed_prompts']} failed "
            f"after retries ({stats['failed_pairs']} pairs/questions affected), {stats['truncated_prompts']} "
            "with answers shortened to fit the judge's context"
        )
    print(f"files in {results['out_dir']}")


def cmd_alpaca_eval(args) -> int:
    from treg.evaluation import alpaca_eval as ae
    from treg.evaluation.runs import run_alpaca_eval

    try:  # flags that name files: checked before any model is loaded
        lc_file = ae.lc_data_file(args.lc_data)
        if args.annotator_config:
            ae.find_annotator_config(args.annotator_config)
    except ae.AlpacaEvalError as e:
        print(f"treg eval: {e}", file=sys.stderr)
        return 2
    annotator = None
    if args.annotator_config:
        if not (args.judge or "").startswith("openai:"):
            print(
                "--annotator-config needs --judge openai:MODEL@BASE_URL (the endpoint the config is pointed at).",
                file=sys.stderr,
            )
            return 2
        judge_model, url = args.judge[len("openai:") :].rsplit("@", 1)
        annotator = {
            "config_dir": args.annotator_config,
            "judge_model": judge_model,
            "base_url": url,
            "api_key_env": args.api_key_env,
        }
    model, tokenizer, name, judge, gen = _policy_and_judge(args)
    out = args.out or os.path.join("eval_results", "alpaca_eval", name)
    results = run_alpaca_eval(
        model,
        tokenizer,
        generator=name,
        judge=judge,
        out_dir=out,
        reference_path=args.reference_outputs,
        max_instances=args.max_instances,
        gen=gen,
        retries=args.retries,
        show_progress=not args.quiet,
        annotator=annotator,
        lc_data=lc_file,
        answer_shard_size=args.answer_shard_size,
    )
    _print_results(results)
    return 0


def cmd_arena_hard(args) -> int:
    from treg.evaluation.runs import run_arena_hard

    model, tokenizer, name, judge, gen = _policy_and_judge(args)
    out = args.out or os.path.join("eval_results", f"arena_hard_{args.bench}", name)
    results = run_arena_hard(
        model,
        tokenizer,
        model_name=name,
        judge=judge,
        out_dir=out,
        bench=args.bench,
        questions_path=args.questions,
        baseline_paths=args.baseline_answers,
        max_instances=args.max_instances,
        judge_config=args.judge_config,
        style=args.style_control,
        rounds=args.rounds,
        gen=gen,
        retries=args.retries,
        show_progress=not args.quiet,
        answer_shard_size=args.answer_shard_size,
    )
    _print_results(results)
    print(f"re-score: treg eval arena-hard show --judgments {results['out_dir']}")
    return 0


def cmd_show(argv: list[str]) -> int:
    from treg.evaluation.arena_hard import format_table, show

    args = show_parser().parse_args(argv)
    scores = show(
        args.judgments,
        args.baseline,
        answers_dir=args.answers_dir,
        style=args.style_control,
        weight=args.weight,
        rounds=args.rounds,
        first_game_only=args.first_game_only,
    )
    print(format_table(scores))
    if args.json:
        from treg.files import write_text_atomic

        write_text_atomic(args.json, json.dumps(scores, indent=2) + "\n")
    return 0


def cmd_compare(args) -> int:
    from treg.evaluation.report import compare

    md, png = compare(args.runs, args.out)
    with open(md) as f:
        print(f.read())
    print(f"table: {md}" + (f"\nplot: {png}" if png else "\n(no plot: matplotlib is not installed)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[:2] == ["arena-hard", "show"]:
        return cmd_show(argv[2:])
    args = build_parser().parse_args(argv)
    return {"alpaca-eval": cmd_alpaca_eval, "arena-hard": cmd_arena_hard, "compare": cmd_compare}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
