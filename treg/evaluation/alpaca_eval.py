"""AlpacaEval 2 (Dubois et al. 2024, arXiv:2404.04475) through the installed ``alpaca_eval`` package.

What comes from the package: the judge prompt (``alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt``, the AlpacaEval 2
weighted GPT-4-turbo annotator's), the metrics (``alpaca_eval.metrics.get_winrate``: win rate and standard error;
``get_length_controlled_winrate``: the length-controlled win rate), the instance subset for ``--max-instances`` (the
same shuffle, seed 123, as ``alpaca_eval.evaluate``), and — for an endpoint judge run the official way — the whole
annotation pipeline (``alpaca_eval.evaluate`` with an annotator config from ``eval/alpaca_eval/``, local
``reference_outputs``, ``precomputed_leaderboard=None`` and a cache in the run directory).

What treg adds: a local log-prob judge or a treg endpoint judge reading the same prompt in both orders
(:mod:`treg.evaluation.judges`), written as AlpacaEval annotations (``preference`` 1 = reference better, 2 = model
better, fractional = weighted), then scored by the package's metric functions. A pair whose judgment failed has no
preference: it is left out of the metrics (a NaN preference makes ``get_winrate`` raise) and counted in
``n_failed``.

Length control: ``get_length_controlled_winrate`` fits its GLM with ``df_gamed.csv`` (instruction difficulty and the
annotations of deliberately verbose/concise baselines), a file only on the Hugging Face hub (dataset
``tatsu-lab/alpaca_eval``). When it is not in the local HF cache the LC win rate is reported as unavailable, with that
reason, rather than replaced by a number computed differently.
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

import yaml

from treg.evaluation.judges import JudgePrompt, JudgeStats, JudgmentCache, PairwiseJudge, judge_both_orders

logger = logging.getLogger(__name__)

CLF_TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
SUBSET_SEED = 123  # alpaca_eval.evaluate's shuffle before max_instances
LC_UNAVAILABLE = (
    "length-controlled win rate unavailable: alpaca_eval's GLM needs df_gamed.csv (instruction difficulty and the "
    "gamed baselines' annotations) from the Hugging Face hub dataset tatsu-lab/alpaca_eval, which is not in the local "
    "HF cache and cannot be downloaded here. Run once with hub access to cache it; then LC works offline."
)


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
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{instruction, output, generator}} rows.")
    for i, r in enumerate(rows):
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{path} row {i}: field {key!r} must be a string.")
    return rows


def load_model_outputs(path: str) -> list[dict]:
    """An AlpacaEval ``model_outputs.json`` (checked like the reference outputs)."""
    return load_reference(path)


def select_instances(n_rows: int, max_instances: int | None) -> list[int]:
    """Row indices to evaluate: all, or the first ``max_instances`` after alpaca_eval.evaluate's seeded shuffle."""
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
def length_controlled(annotations) -> tuple[dict | None, str | None]:
    """(LC metrics, None) from ``get_length_controlled_winrate``, or (None, reason) when its hub file is missing."""
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download("tatsu-lab/alpaca_eval", "df_gamed.csv", repo_type="dataset", local_files_only=True)
    except Exception:  # not in the cache (offline, or never downloaded)
        return None, LC_UNAVAILABLE
    import pandas as pd

    ae = import_alpaca_eval()
    df = pd.DataFrame(annotations)
    try:
        with _quiet_pkg_resources():
            out = ae.metrics.get_length_controlled_winrate(df, save_weights_dir=None)
    except Exception as e:  # noqa: BLE001 — report why, never a number computed another way
        return None, f"length-controlled win rate failed in alpaca_eval: {type(e).__name__}: {e}"
    return {k: float(out[k]) for k in ("length_controlled_winrate", "lc_standard_error")}, None


def compute_metrics(annotations: Sequence[dict]) -> dict:
    """Win rate ± standard error (and the discrete win rate, counts) from ``alpaca_eval.metrics.get_winrate`` on the
    annotations that have a preference; LC when its inputs are available; failures counted."""
    import pandas as pd

    ae = import_alpaca_eval()
    df = pd.DataFrame(list(annotations))
    valid = df[df["preference"].notna()].reset_index(drop=True) if len(df) else df
    out = {"n_instances": int(len(df)), "n_failed": int(len(df) - len(valid))}
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
    lc, reason = length_controlled(valid)
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
def annotator_config(config_dir: str, judge_model: str, base_url: str, out_dir: str) -> str:
    """A run-local copy of an annotator config from ``eval/alpaca_eval/<name>/configs.yaml`` with the judge model and
    endpoint filled in and the prompt template resolved inside the installed package. Returns its directory."""
    src = os.path.join(config_dir, "configs.yaml") if os.path.isdir(config_dir) else config_dir
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
) -> tuple[list[dict], dict]:
    """Run ``alpaca_eval.evaluate`` with an endpoint annotator config; returns (annotations, metrics). The API key
    goes to alpaca_eval's OpenAI client in memory only (``annotation_kwargs``); alpaca_eval filters keys from its
    logs."""
    import pandas as pd

    ae = import_alpaca_eval()
    config = annotator_config(config_dir, judge_model, base_url, out_dir)
    ref_df = pd.DataFrame([reference[i] for i in indices])
    out_df = pd.DataFrame(list(model_outputs))
    key = os.environ.get(api_key_env) or "EMPTY"  # a local server may need no key; the client needs a string
    captured: dict = {}

    def metric(annotations):
        df = ae.utils.convert_to_dataframe(annotations)
        captured["annotations"] = df.to_dict("records")
        m = compute_metrics(captured["annotations"])
        return {k: v for k, v in m.items() if v is not None and not isinstance(v, str)}

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
    return annotations, compute_metrics(annotations)
