"""AlpacaEval 2 (Dubois et al. 2024, arXiv:2404.04475) through the installed ``alpaca_eval`` package.

What comes from the package: the judge prompt (``alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt``, the AlpacaEval 2
weighted GPT-4-turbo annotator's), the metrics (``alpaca_eval.metrics.get_winrate``: win rate and standard error;
``get_length_controlled_winrate``: the length-controlled win rate), the instance subset for ``--max-instances`` (the
same shuffle, seed 123, as ``alpaca_eval.evaluate``), and — for an endpoint judge run the official way — the whole
annotation pipeline (``alpaca_eval.evaluate`` with an annotator config from ``eval/alpaca_eval/``, shipped with treg,
local ``reference_outputs``, ``precomputed_leaderboard=None`` and a cache in the run directory).

What treg adds: a local log-prob judge or a treg endpoint judge reading the same prompt in both orders
(:mod:`treg.evaluation.judges`), written as AlpacaEval annotations (``preference`` 1 = reference better, 2 = model
better, fractional = weighted), then scored by the package's metric functions. A pair whose judgment failed has a
NaN preference (``get_winrate`` would drop it with only an INFO log line): treg drops it itself before scoring,
counts it in ``n_failed``, warns, and the report shows the count; it never counts as a tie or a loss.

Instruction indices: every annotation carries ``index``, the instruction's row in the full 805-row reference, on
every path (treg's judges set it; on the ``--annotator-config`` path it is attached by instruction), and it is set
before failed rows are dropped. The LC GLM looks up each instruction's difficulty by that index; an annotation list
without it is taken to be the full list in the official order (what ``alpaca_eval`` itself assumes).

Length control: ``get_length_controlled_winrate`` fits its GLM with ``df_gamed.csv`` (instruction difficulty and the
annotations of deliberately verbose/concise baselines), a file only on the Hugging Face hub (dataset
``tatsu-lab/alpaca_eval``). treg uses it from ``--lc-data DIR`` (a folder holding that file), else from the local HF
cache; when neither has it the LC win rate is reported as unavailable with that reason, never replaced by a number
computed differently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from unittest import mock

import yaml

from treg.evaluation import data
from treg.evaluation.judges import JudgePrompt, JudgeStats, JudgmentCache, PairwiseJudge, judge_both_orders
from treg.files import UserError

logger = logging.getLogger(__name__)

CLF_TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
SUBSET_SEED = 123  # alpaca_eval.evaluate's shuffle before max_instances
LC_FILE = "df_gamed.csv"
LC_COLUMNS = ("model", "index", "instruction_difficulty", "preference", "std_delta_len", "not_gamed_baseline")
LC_UNAVAILABLE = (
    "length-controlled win rate unavailable: alpaca_eval's GLM needs df_gamed.csv (the instructions' difficulty and "
    "the annotations of the deliberately verbose/concise baselines; Hugging Face hub dataset tatsu-lab/alpaca_eval); "
    "no --lc-data DIR was given and the file is not in the local HF cache. Pass --lc-data DIR with df_gamed.csv "
    "(downloaded once from the hub) to compute it offline."
)


class AlpacaEvalError(UserError):
    """Malformed AlpacaEval files or settings; the message names the file, row or flag."""


@contextlib.contextmanager
def _quiet_pkg_resources():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*", category=UserWarning)
        yield


def import_alpaca_eval():
    """The ``alpaca_eval`` package (its import warns about pkg_resources; silenced here only)."""
    with _quiet_pkg_resources():
        import alpaca_eval
        import alpaca_eval.metrics
        import alpaca_eval.utils
    return alpaca_eval


def package_dir() -> str:
    return os.path.dirname(import_alpaca_eval().__file__)


# ------------------------------------------------------------------------------------------------------- data
def load_reference(path: str) -> list[dict]:
    """The reference outputs (``[{"instruction", "output", "generator", ...}]``) in the official order."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise AlpacaEvalError(f"{path} line {e.lineno} column {e.colno}: not JSON ({e.msg}).") from e
    except UnicodeDecodeError as e:
        raise AlpacaEvalError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON list.") from e
    if not isinstance(rows, list) or not rows:
        raise AlpacaEvalError(f"{path}: expected a non-empty JSON list of {{instruction, output, generator}} rows.")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise AlpacaEvalError(f"{path} row {i}: expected an object with 'instruction' and 'output'.")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise AlpacaEvalError(f"{path} row {i}: field {key!r} must be a string.")
    return rows


def load_model_outputs(path: str) -> list[dict]:
    """An AlpacaEval ``model_outputs.json`` (checked like the reference outputs)."""
    return load_reference(path)


def select_instances(n_rows: int, max_instances: int | None) -> list[int]:
    """Row indices to evaluate: all, or the first ``max_instances`` (a positive int) after alpaca_eval.evaluate's
    seeded shuffle."""
    if max_instances is not None and (isinstance(max_instances, bool) or not isinstance(max_instances, int)):
        raise AlpacaEvalError(f"--max-instances must be a positive integer, got {max_instances!r}.")
    if max_instances is not None and max_instances < 1:
        raise AlpacaEvalError(f"--max-instances must be a positive integer (or left out for all), got {max_instances}.")
    if max_instances is None or max_instances >= n_rows:
        return list(range(n_rows))
    import pandas as pd

    order = pd.RangeIndex(n_rows).to_frame().sample(frac=1, random_state=SUBSET_SEED).index
    return [int(i) for i in order[:max_instances]]


# ----------------------------------------------------------------------------------------------------- judging
def judge_template() -> tuple[str | None, str]:
    """(system, user template) of AlpacaEval 2's classifier prompt, read from the package and split from ChatML."""
    with open(os.path.join(package_dir(), "evaluators_configs", CLF_TEMPLATE), encoding="utf-8") as f:
        text = f.read()
    messages = import_alpaca_eval().utils.prompt_to_chatml(text)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system") or None
    user = [m["content"] for m in messages if m["role"] == "user"]
    if len(user) != 1:
        raise ValueError(f"unexpected AlpacaEval judge template: {len(user)} user messages.")
    return system, user[0]


def make_prompt(template: tuple[str | None, str], instruction: str, output_1: str, output_2: str) -> JudgePrompt:
    system, user = template
    return JudgePrompt(
        user_template=user,
        system=system,
        kind="choice",
        choices=("m", "M"),
        fields=(("instruction", instruction), ("output_1", output_1), ("output_2", output_2)),
    )


def annotate(
    judge: PairwiseJudge,
    reference: Sequence[dict],
    model_outputs: Sequence[dict],
    indices: Sequence[int],
    *,
    generator: str,
    cache: JudgmentCache | None = None,
    retries: int = 1,
    show_progress: bool = True,
    stats: JudgeStats | None = None,
) -> list[dict]:
    """AlpacaEval annotations of ``model_outputs[k]`` (row ``indices[k]`` of the reference) by a treg judge, both
    orders. ``preference`` = 1 + P(model better) (NaN when the judgment failed)."""
    template = judge_template()
    pairs = []
    for k, i in enumerate(indices):
        ref, out = reference[i], model_outputs[k]
        if out["instruction"] != ref["instruction"]:
            raise ValueError(
                f"model output {k} answers {out['instruction'][:60]!r}, not reference row {i} "
                f"{ref['instruction'][:60]!r}; outputs must follow the reference order."
            )
        pairs.append((ref["instruction"], ref["output"], out["output"]))
    results = judge_both_orders(
        judge, make_prompt_from_item(template), pairs, cache, retries=retries, show_progress=show_progress, stats=stats
    )
    annotations = []
    for k, (i, r) in enumerate(zip(indices, results)):
        ref, out = reference[i], model_outputs[k]
        annotations.append(
            {
                "instruction": ref["instruction"],
                "output_1": ref["output"],
                "generator_1": ref.get("generator", "ref"),
                "output_2": out["output"],
                "generator_2": generator,
                "annotator": judge.name,
                "preference": math.nan if r.p is None else 2.0 - r.p,  # r.p = P(reference better)
                "index": int(i),
                "dataset": ref.get("dataset"),
                "treg_verdict_reference_first": asdict(r.forward) if r.forward else None,
                "treg_verdict_model_first": asdict(r.backward) if r.backward else None,
                "treg_position_biased": r.position_biased,
            }
        )
    return annotations


def make_prompt_from_item(template):
    return lambda instruction, x, y: make_prompt(template, instruction, x, y)


# ----------------------------------------------------------------------------------------------------- metrics
def lc_data_file(lc_data: str | None) -> str | None:
    """``df_gamed.csv`` from ``--lc-data`` (a folder holding it, or the file), checked for the columns alpaca_eval's
    GLM reads; ``None`` when not given."""
    if lc_data is None:
        return None
    path = os.path.join(lc_data, LC_FILE) if os.path.isdir(lc_data) else lc_data
    if not os.path.isfile(path):
        raise AlpacaEvalError(
            f"--lc-data {lc_data}: no {LC_FILE} there; it holds the instructions' difficulty and the verbose/concise "
            "baselines' annotations (hub dataset tatsu-lab/alpaca_eval, file df_gamed.csv)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
    except UnicodeDecodeError as e:
        raise AlpacaEvalError(f"--lc-data {path}: not a CSV text file ({e.reason}).") from e
    missing = [c for c in LC_COLUMNS if c not in header]
    if missing:
        raise AlpacaEvalError(f"--lc-data {path}: missing column(s) {missing}; expected alpaca_eval's {LC_FILE}.")
    return path


def _lc_source(lc_file: str | None):
    """(a context that makes alpaca_eval read ``df_gamed.csv`` from ``lc_file``, None) or (None, reason)."""
    if lc_file is not None:
        import alpaca_eval.metrics.glm_winrate as glm

        original = glm.hf_hub_download

        def local(*args, filename=None, **kwargs):
            if filename == LC_FILE:
                return lc_file
            return original(*args, filename=filename, **kwargs)

        return mock.patch.object(glm, "hf_hub_download", local), None
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download("tatsu-lab/alpaca_eval", LC_FILE, repo_type="dataset", local_files_only=True)
    except Exception:  # not in the cache (offline, or never downloaded)
        return None, LC_UNAVAILABLE
    return contextlib.nullcontext(), None


def length_controlled(annotations, lc_data: str | None = None) -> tuple[dict | None, str | None]:
    """(LC metrics, None) from ``get_length_controlled_winrate``, or (None, reason) when ``df_gamed.csv`` is neither
    in ``lc_data`` (a checked file path, :func:`lc_data_file`) nor in the local HF cache. ``annotations`` need their
    ``index`` (the instruction's row in the full reference)."""
    source, reason = _lc_source(lc_data)
    if source is None:
        return None, reason
    import pandas as pd

    ae = import_alpaca_eval()
    df = annotations.copy() if isinstance(annotations, pd.DataFrame) else pd.DataFrame(list(annotations))
    try:
        with _quiet_pkg_resources(), source:
            out = ae.metrics.get_length_controlled_winrate(df, save_weights_dir=None)
    except Exception as e:  # noqa: BLE001 — report why, never a number computed another way
        return None, f"length-controlled win rate failed in alpaca_eval: {type(e).__name__}: {e}"
    return {k: float(out[k]) for k in ("length_controlled_winrate", "lc_standard_error")}, None


def compute_metrics(annotations: Sequence[dict], lc_data: str | None = None) -> dict:
    """Win rate ± standard error (and the discrete win rate, counts) from ``alpaca_eval.metrics.get_winrate`` on the
    annotations that have a preference; LC when its inputs are available (``lc_data``: a checked ``df_gamed.csv``).
    Failed judgments (NaN preference) are dropped here, counted in ``n_failed`` and warned about; each row keeps its
    instruction ``index`` (rows without one are numbered by position first, i.e. taken to be the full official
    list)."""
    import pandas as pd

    ae = import_alpaca_eval()
    df = pd.DataFrame(list(annotations))
    if len(df) and "index" not in df.columns:
        df["index"] = range(len(df))  # position in the full list, before any row is dropped
    valid = df[df["preference"].notna()].reset_index(drop=True) if len(df) else df
    out = {"n_instances": int(len(df)), "n_failed": int(len(df) - len(valid))}
    if out["n_failed"]:
        logger.warning(
            "AlpacaEval: %d of %d judgments failed (no preference); left out of the win rate and counted in n_failed.",
            out["n_failed"],
            out["n_instances"],
        )
    if len(valid) == 0:
        out.update(
            win_rate=None,
            standard_error=None,
            length_controlled_winrate=None,
            lc_unavailable_reason="no successful judgments",
        )
        return out
    with _quiet_pkg_resources():
        metrics = ae.metrics.get_winrate(valid)
    out.update({k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in metrics.items()})
    lc, reason = length_controlled(valid, lc_data)
    out["length_controlled_winrate"] = lc["length_controlled_winrate"] if lc else None
    out["lc_standard_error"] = lc["lc_standard_error"] if lc else None
    out["lc_unavailable_reason"] = reason
    if "treg_position_biased" in df:
        biased = df["treg_position_biased"].dropna()
        out["position_biased_fraction"] = float(biased.mean()) if len(biased) else None
    avg = df["output_2"].str.len().mean() if len(df) else None
    out["avg_length"] = float(avg) if avg is not None else None
    return out


# ------------------------------------------------------------------------------------ official annotator path
def find_annotator_config(config: str) -> str:
    """The ``configs.yaml`` of ``--annotator-config``: a folder or file that exists, else the config of that name
    shipped with treg (``treg_weighted_endpoint``, ``treg_text_endpoint``; ``eval/alpaca_eval/NAME`` works too)."""
    if os.path.exists(config):
        path = os.path.join(config, "configs.yaml") if os.path.isdir(config) else config
    else:
        path = data.asset("alpaca_eval", os.path.basename(os.path.normpath(config)), "configs.yaml")
    if not os.path.isfile(path):
        shipped = sorted(
            d
            for d in os.listdir(data.asset("alpaca_eval"))
            if os.path.isfile(data.asset("alpaca_eval", d, "configs.yaml"))
        )
        raise AlpacaEvalError(
            f"--annotator-config {config}: no annotator config ({path} not found); pass a folder with configs.yaml or "
            f"one shipped with treg: {', '.join(shipped)}."
        )
    return path


def annotator_config(config_dir: str, judge_model: str, base_url: str, out_dir: str) -> str:
    """A run-local copy of an annotator config (:func:`find_annotator_config`) with the judge model and endpoint
    filled in and the prompt template resolved inside the installed package. Returns its directory."""
    src = find_annotator_config(config_dir)
    with open(src) as f:
        configs = yaml.safe_load(f)
    ((name, cfg),) = configs.items()
    cfg = dict(cfg)
    template = cfg["prompt_template"]
    if not os.path.isabs(template):
        cfg["prompt_template"] = os.path.join(package_dir(), "evaluators_configs", template)
    kwargs = dict(cfg["completions_kwargs"])
    kwargs["model_name"] = judge_model
    kwargs["openai_api_base"] = base_url
    cfg["completions_kwargs"] = kwargs
    target = os.path.join(out_dir, "annotator", name)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "configs.yaml"), "w") as f:
        yaml.safe_dump({name: cfg}, f, sort_keys=False)
    return target


def evaluate_with_annotator(
    model_outputs: Sequence[dict],
    reference: Sequence[dict],
    indices: Sequence[int],
    *,
    config_dir: str,
    judge_model: str,
    base_url: str,
    out_dir: str,
    api_key_env: str = "OPENAI_API_KEY",
    lc_data: str | None = None,
) -> tuple[list[dict], dict]:
    """Run ``alpaca_eval.evaluate`` with an endpoint annotator config; returns (annotations, metrics). Each
    annotation gets the ``index`` of its instruction in ``reference`` (matched by instruction, before failed
    judgments are dropped). The API key goes to alpaca_eval's OpenAI client in memory only (``annotation_kwargs``);
    alpaca_eval filters keys from its logs."""
    import pandas as pd

    ae = import_alpaca_eval()
    config = annotator_config(config_dir, judge_model, base_url, out_dir)
    ref_df = pd.DataFrame([reference[i] for i in indices])
    out_df = pd.DataFrame(list(model_outputs))
    key = os.environ.get(api_key_env) or "EMPTY"  # a local server may need no key; the client needs a string
    captured: dict = {}

    index_of = {reference[i]["instruction"]: int(i) for i in indices}

    def metric(annotations):
        records = ae.utils.convert_to_dataframe(annotations).to_dict("records")
        for r in records:
            if r.get("instruction") not in index_of:
                raise AlpacaEvalError(f"alpaca_eval returned an annotation for an unknown instruction: {r!r:.120}")
            r["index"] = index_of[r["instruction"]]
        captured["annotations"] = records
        captured["metrics"] = compute_metrics(records, lc_data)
        return {k: v for k, v in captured["metrics"].items() if v is not None and not isinstance(v, str)}

    with _quiet_pkg_resources():
        ae.evaluate(
            model_outputs=out_df,
            reference_outputs=ref_df,
            annotators_config=os.path.join(config, "configs.yaml"),
            output_path=out_dir,
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            fn_metric=metric,
            sort_by="win_rate",
            caching_path=os.path.join(out_dir, "annotator_cache.json"),
            annotation_kwargs={"openai_api_keys": [key]},
        )
    annotations = captured.get("annotations", [])
    return annotations, captured.get("metrics") or compute_metrics(annotations, lc_data)
