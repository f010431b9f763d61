"""One benchmark run from a loaded policy: generate (cached), judge (cached, resumable), score, write the files and
the report. Used by ``treg eval`` and by the training hook."""

from __future__ import annotations

import hashlib
import json
import logging
import os

from treg.evaluation import alpaca_eval as ae
from treg.evaluation import arena_hard as ah
from treg.evaluation import data
from treg.evaluation.judges import JudgeStats, JudgmentCache, PairwiseJudge
from treg.evaluation.report import write_report
from treg.files import UserError
from treg.generation import generate_answers, write_alpaca_eval_outputs, write_arena_hard_answers

logger = logging.getLogger(__name__)


def _model_hash(model) -> str:
    from trl.trainer.utils import hash_module

    return hash_module(model)


ANSWER_SHARD_SIZE = 32  # answers per saved shard: a killed run loses at most one shard of generations


def cached_answers(
    model, tokenizer, instructions: list[str], out_dir: str, gen: dict, show_progress: bool = True,
    shard_size: int = ANSWER_SHARD_SIZE,
) -> list[str]:
    """Answers to ``instructions``; reused from ``<out_dir>/.answers-<key>.json`` when the model weights, prompts and
    generation settings are the same. Written atomically with a sidecar checksum (``.sha256``) and verified on
    read: a corrupt file (checksum mismatch, truncated or unreadable JSON, wrong length) is moved aside with a
    warning and the answers generated again (a file from before checksums only has to parse). Two runs wanting the
    same answers at once generate them once: the second waits on the file's lock, then reads them.

    Answers are generated ``shard_size`` instructions at a time, each shard saved (atomically, checksummed) in
    ``.answers-<key>.shards/`` as soon as it is done: a run killed midway reuses the shards it finished (logged with
    their count) and generates only the rest; the shards are removed once the whole file is written. The shards are
    the same with or without a kill, so a resumed run's answers equal an uninterrupted run's."""
    from treg.files import file_lock, write_text_atomic

    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}.")
    key = hashlib.sha256(json.dumps(
        {"model": _model_hash(model), "instructions": instructions, "gen": gen, "shard": shard_size}, sort_keys=True
    ).encode()).hexdigest()[:16]
    path = os.path.join(out_dir, f".answers-{key}.json")
    answers = _load_answers(path, len(instructions), discard=False)
    if answers is None:
        with file_lock(path, remove=True):
            answers = _load_answers(path, len(instructions), discard=True)
            if answers is None:
                answers = _sharded_answers(model, tokenizer, instructions, path[: -len(".json")] + ".shards", gen,
                                           show_progress, shard_size)
                write_text_atomic(path, json.dumps(answers), checksum=True)
                _remove_shards(path[: -len(".json")] + ".shards")
    return answers


def _sharded_answers(model, tokenizer, instructions, folder, gen, show_progress, shard_size) -> list[str]:
    from tqdm.auto import tqdm

    from treg.files import write_text_atomic

    os.makedirs(folder, exist_ok=True)
    answers: list[str] = []
    reused = 0
    bar = tqdm(total=len(instructions), desc="Answering", unit="answer", disable=not show_progress)
    for start in range(0, len(instructions), shard_size):
        part = instructions[start : start + shard_size]
        shard = os.path.join(folder, f"{start:06d}-{start + len(part):06d}.json")
        done = _load_answers(shard, len(part), discard=True)
        if done is None:
            done = generate_answers(model, tokenizer, part, show_progress=False, **gen)
            write_text_atomic(shard, json.dumps(done), checksum=True)
        else:
            reused += len(done)
        answers.extend(done)
        bar.update(len(part))
    bar.close()
    if reused:
        logger.warning("answers: reused %d of %d from the shards of an earlier run in %s; generated %d.", reused,
                       len(instructions), folder, len(instructions) - reused)
    return answers


def _remove_shards(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _load_answers(path: str, n: int, *, discard: bool) -> list[str] | None:
    """The ``n`` cached answers at ``path``, or None when absent or corrupt (moved aside when ``discard``; the
    caller holds the file's lock then)."""
    from treg.files import CorruptCacheError, move_aside, verify_file_checksum

    if not os.path.isfile(path):
        return None
    try:
        verify_file_checksum(path)
        try:
            with open(path, encoding="utf-8") as f:
                answers = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptCacheError(path, f"unreadable JSON ({e})") from e
        if not (isinstance(answers, list) and len(answers) == n and all(isinstance(a, str) for a in answers)):
            raise CorruptCacheError(path, f"not a JSON list of {n} answers")
    except CorruptCacheError as e:
        if discard:
            move_aside(path, e.reason, what="eval answers cache")
        return None
    logger.debug("answers loaded from %s", path)
    return answers


def check_max_instances(max_instances: int | None, flag: str = "--max-instances") -> int | None:
    """``None`` (all instances) or a positive int; anything else is an error naming ``flag``."""
    if max_instances is None:
        return None
    if isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 1:
        raise UserError(f"{flag} must be a positive integer (or left out for all instances), got {max_instances!r}.")
    return max_instances


def _stats_dict(stats: JudgeStats) -> dict:
    return {
        "judged": stats.judged,
        "cached": stats.cached,
        "failed_prompts": stats.failed_prompts,
        "failed_pairs": stats.failed_pairs,
        "truncated_prompts": stats.truncated_prompts,
        "retried": stats.retries,
    }


def run_alpaca_eval(
    model,
    tokenizer,
    *,
    generator: str,
    judge: PairwiseJudge | None,
    out_dir: str,
    reference_path: str | None = None,
    max_instances: int | None = None,
    gen: dict | None = None,
    retries: int = 1,
    show_progress: bool = True,
    annotator: dict | None = None,
    lc_data: str | None = None,
    answer_shard_size: int = ANSWER_SHARD_SIZE,
) -> dict:
    """AlpacaEval 2 for a policy. ``annotator`` = {config_dir, judge_model, base_url, api_key_env} runs the official
    ``alpaca_eval.evaluate`` pipeline instead of ``judge``. ``lc_data``: a folder (or the file) with alpaca_eval's
    ``df_gamed.csv`` for the length-controlled win rate offline."""
    check_max_instances(max_instances)
    lc_file = ae.lc_data_file(lc_data)
    os.makedirs(out_dir, exist_ok=True)
    reference = ae.load_reference(data.alpaca_reference(reference_path))
    indices = ae.select_instances(len(reference), max_instances)
    instructions = [reference[i]["instruction"] for i in indices]
    answers = cached_answers(model, tokenizer, instructions, out_dir, dict(gen or {}), show_progress,
                             answer_shard_size)
    extra = [{"dataset": reference[i].get("dataset")} for i in indices]
    write_alpaca_eval_outputs(os.path.join(out_dir, "model_outputs.json"), instructions, answers, generator, extra)
    outputs = [{"instruction": q, "output": a, "generator": generator} for q, a in zip(instructions, answers)]
    stats = JudgeStats()
    if annotator:
        annotations, metrics = ae.evaluate_with_annotator(
            outputs, reference, indices, out_dir=out_dir, lc_data=lc_file, **annotator
        )
        judge_name = (
            f"alpaca_eval:{os.path.basename(os.path.normpath(annotator['config_dir']))}:{annotator['judge_model']}"
        )
    else:
        cache = JudgmentCache(os.path.join(out_dir, "judgment_cache"))
        annotations = ae.annotate(
            judge,
            reference,
            outputs,
            indices,
            generator=generator,
            cache=cache,
            retries=retries,
            show_progress=show_progress,
            stats=stats,
        )
        metrics = ae.compute_metrics(annotations, lc_data=lc_file)
        judge_name = judge.name
    from treg.files import write_text_atomic

    write_text_atomic(  # both paths: every annotation with its instruction index
        os.path.join(out_dir, "annotations.json"),
        json.dumps(annotations, indent=2, default=str, allow_nan=True) + "\n",
    )
    results = {
        "benchmark": "alpaca_eval",
        "model": generator,
        "judge": judge_name,
        "out_dir": out_dir,
        "max_instances": max_instances,
        "metrics": metrics,
        "judge_stats": _stats_dict(stats),
    }
    write_report(out_dir, results)
    return results


def run_arena_hard(
    model,
    tokenizer,
    *,
    model_name: str,
    judge: PairwiseJudge,
    out_dir: str,
    bench: str = "v0.1",
    questions_path: str | None = None,
    baseline_paths: list[str] | None = None,
    max_instances: int | None = None,
    judge_config: str | None = None,
    style: str | None = None,
    rounds: int = 100,
    gen: dict | None = None,
    retries: int = 1,
    show_progress: bool = True,
    answer_shard_size: int = ANSWER_SHARD_SIZE,
) -> dict:
    """Arena-Hard for a policy: answers → ``model_answer/``, judgments → ``model_judgment/<judge>/``, scores.
    The baselines' stored ``token_len`` and style counts are used where their answer files carry them."""
    check_max_instances(max_instances)
    ah.check_style(style)
    config = ah.load_judge_config(bench, judge_config)
    questions = ah.load_questions(data.arena_questions(bench, questions_path))
    if max_instances is not None:
        questions = questions[:max_instances]
    baselines, baseline_meta = _baselines(bench, baseline_paths)
    texts = cached_answers(model, tokenizer, [q["prompt"] for q in questions], out_dir, dict(gen or {}), show_progress,
                           answer_shard_size)
    counter, _ = ah.token_counter()
    write_arena_hard_answers(
        os.path.join(out_dir, "model_answer", f"{ah._safe(model_name)}.jsonl"),
        model_name,
        [q["uid"] for q in questions],
        [q["prompt"] for q in questions],
        texts,
        metadata=[ah.markdown_metadata(t, counter) for t in texts],
    )
    answers = {q["uid"]: t for q, t in zip(questions, texts)}
    stats = JudgeStats()
    cache = JudgmentCache(os.path.join(out_dir, "judgment_cache"))
    records = ah.judge_model(
        judge,
        config,
        questions,
        answers,
        model_name,
        baselines,
        cache,
        retries=retries,
        show_progress=show_progress,
        stats=stats,
    )
    path = ah.write_judgments(os.path.join(out_dir, "model_judgment"), judge.name, model_name, records)
    scoring = {"style": style, "rounds": rounds, "weight": config.get("weight", 3)}
    metrics = _scores_by_category(records, dict(baselines) | {model_name: answers}, baseline_meta, scoring)
    results = {
        "benchmark": "arena_hard",
        "bench": bench,
        "model": model_name,
        "judge": judge.name,
        "out_dir": out_dir,
        "judgments": path,
        "max_instances": max_instances,
        "metrics": metrics,
        "judge_stats": _stats_dict(stats),
    }
    write_report(out_dir, results)
    return results


def _baselines(bench: str, paths: list[str] | None) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, dict]]]:
    """Baseline model → uid → answer, and → uid → the metadata its answer file stores (``token_len``, style)."""
    answers, metadata = {}, {}
    for path in data.arena_baselines(bench, paths):
        name, ans, meta = ah.load_answers(path)
        answers[name], metadata[name] = ans, meta
    return answers, metadata


def _scores_by_category(records: list[dict], answers: dict, metadata: dict, scoring: dict) -> dict:
    """Scores of each question category against its baseline: one category's scores as they are; with several
    (v2.0), ``per_category`` plus every row under ``models`` as ``"<model> [<category>]"``."""
    metrics = {}
    for category in sorted({r["category"] for r in records}):
        recs = [r for r in records if r["category"] == category]
        metrics[category] = ah.score_judgments(recs, answers=answers, metadata=metadata, **scoring)
    if len(metrics) == 1:
        return next(iter(metrics.values()))
    models = {f"{name} [{c}]": row for c, m in metrics.items() for name, row in m["models"].items()}
    return {"models": models, "per_category": metrics}


def flat_metrics(results: dict, prefix: str = "eval_hooks") -> dict[str, float]:
    """The headline numbers as flat ``{name: float}`` for a trainer log."""
    m, out = results["metrics"], {}
    if results["benchmark"] == "alpaca_eval":
        for k in ("win_rate", "standard_error", "length_controlled_winrate", "n_failed"):
            if m.get(k) is not None:
                out[f"{prefix}/alpaca_eval/{k}"] = float(m[k])
        return out
    row = m["models"].get(results["model"])
    if row is None:  # several categories (v2.0)
        for name, r in m["models"].items():
            if name.startswith(results["model"] + " ["):
                out[f"{prefix}/arena_hard/{name[len(results['model']) + 2 : -1]}/win_rate"] = r["score"]
        return out
    out[f"{prefix}/arena_hard/win_rate"] = row["score"]
    out[f"{prefix}/arena_hard/ci_lower"] = row["lower"]
    out[f"{prefix}/arena_hard/ci_upper"] = row["upper"]
    out[f"{prefix}/arena_hard/invalid_games"] = float(row.get("invalid_games", 0))
    return out
