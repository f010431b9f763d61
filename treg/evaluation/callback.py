"""The training hook: a ``TrainerCallback`` that runs AlpacaEval 2 and/or Arena-Hard on a subset during or after
training and logs the headline numbers like any other metric (``eval_hooks/alpaca_eval/win_rate``, …).

Enabled from a recipe (``eval_hooks: [alpaca_eval, arena_hard]``, ``eval_hook_max_instances``, ``eval_hook_judge``,
``eval_hook_when``: "end", "eval" or a step interval). The policy and tokenizer come from the callback's keyword
arguments (``model``, ``processing_class``); the callback knows nothing of the trainer. ``log`` (e.g. the trainer's own
``log``) sends the metrics to every reporter; without it they are appended to ``state.log_history``. Only the main
process evaluates (``state.is_world_process_zero``).

Everything a hook needs that can be wrong (benchmark names, schedule, judge spec, data files) is checked when the
callback is built (:func:`check_hook_settings`; ``treg train`` calls it before loading anything), so a typo fails in the
first second rather than after training. A caller that saves the model first sets ``defer_train_end`` and calls
:meth:`EvalHookCallback.run_train_end` after saving (``treg train`` does), so a hook that fails cannot lose the run.

Under DeepSpeed ZeRO-3 the policy's weights are partitioned and only all processes together can run it, so a main
process generating alone would wait forever. There every process first takes part in gathering the weights, one
tensor at a time, and the main process evaluates an unpartitioned copy (the whole model in its memory while the hook
runs), with ZeRO-3's ``zero.Init`` switched off by ``no_partition`` (the trainer passes its own) so that a judge
loaded from a checkpoint is not partitioned either.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable

from transformers import TrainerCallback

from treg.evaluation.judges import JudgeError
from treg.files import UserError
from treg.models import check_model_spec, full_tensors, is_partitioned

logger = logging.getLogger(__name__)

HOOKS = ("alpaca_eval", "arena_hard")
BENCHES = ("v0.1", "v2.0")


def parse_when(when) -> str | int:
    """ "end", "eval", or a positive step interval (int or digit string)."""
    if isinstance(when, int) or (isinstance(when, str) and when.isdigit()):
        if int(when) < 1:
            raise UserError(f"eval_hook_when as a step interval must be ≥ 1, got {when}.")
        return int(when)
    if when not in ("end", "eval"):
        raise UserError(f"eval_hook_when must be 'end', 'eval' or a step interval, got {when!r}.")
    return when


def check_judge_spec(spec: str | None, setting: str = "eval_hook_judge") -> None:
    """Raise :class:`JudgeError` (a treg user error naming ``setting``) for a judge spec that cannot work, without
    loading a model: ``openai:MODEL@URL`` needs both parts and an http(s) URL; a local path must be a model folder; a
    hub id must be in the local hub cache when offline (:func:`treg.models.check_model_spec`). None = the policy."""
    if spec is None:
        return
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeError(f"{setting}: empty judge spec; give treg:tiny, a model folder or hub id, or openai:MODEL@URL.")
    if spec.startswith("openai:"):
        model, at, url = spec[len("openai:") :].rpartition("@")
        if not at or not model or not url.startswith(("http://", "https://")):
            raise JudgeError(
                f"{setting} {spec!r}: write openai:MODEL@BASE_URL with an http(s) URL, e.g. "
                "openai:gpt-4-1106-preview@https://api.openai.com/v1 or openai:my-judge@http://localhost:8000/v1."
            )
        return
    try:
        check_model_spec(spec[3:] if spec.startswith("hf:") else spec, setting=setting)
    except ValueError as e:
        raise JudgeError(f"{e} Judges: treg:tiny, a model folder or hub id, or openai:MODEL@URL.") from e


def check_hook_settings(
    hooks,
    *,
    judge: str | None = None,
    when="end",
    bench: str = "v0.1",
    reference_path: str | None = None,
    questions_path: str | None = None,
    baseline_paths: list[str] | None = None,
) -> None:
    """Check what :class:`EvalHookCallback` will need, without loading anything: known benchmarks, the schedule, the
    judge spec (:func:`check_judge_spec`) and the benchmark files (explicit paths or found through eval/data.yaml).
    Raises a :class:`treg.files.UserError` (JudgeError, DataNotFound) naming the setting or file."""
    from treg.evaluation import data

    unknown = [h for h in hooks or () if h not in HOOKS]
    if unknown or not hooks:
        raise UserError(f"eval_hooks {list(hooks or ())}: choose from {list(HOOKS)}.")
    parse_when(when)
    if "arena_hard" in hooks and bench not in BENCHES:
        raise UserError(f"eval_hook_arena_bench {bench!r}: choose from {list(BENCHES)}.")
    check_judge_spec(judge)
    files = []
    if "alpaca_eval" in hooks:
        files.append(("--reference-outputs", data.alpaca_reference(reference_path)))
    if "arena_hard" in hooks:
        files.append(("--questions", data.arena_questions(bench, questions_path)))
        files += [("--baseline-answers", p) for p in data.arena_baselines(bench, baseline_paths)]
        files.append(("the Arena-Hard judge config", data.asset("arena_hard", f"arena-hard-{bench}.yaml")))
    for flag, path in files:
        if not os.path.isfile(path):
            raise data.DataNotFound(f"eval hooks: {flag} file {path!r} does not exist; check the path.")


class EvalHookCallback(TrainerCallback):
    """Run the named benchmarks (``hooks`` ⊆ {"alpaca_eval", "arena_hard"}) at ``when``.

    Args:
        hooks: benchmarks to run. max_instances: subset size (None = all). judge: judge spec for
            :func:`treg.evaluation.judges.build_judge`; None lets the policy judge itself (mechanics only).
        when: "end" (after training), "eval" (after each evaluation) or N (every N optimizer steps).
        output_dir: run directories go to ``<output_dir>/eval_hooks/<benchmark>/step-<k>``.
        max_new_tokens, batch_size: generation settings. bench: Arena-Hard version. log: a ``log(dict)`` function.
        reference_path, questions_path, baseline_paths: explicit data paths (default: eval/data.yaml).
    """

    def __init__(
        self,
        hooks,
        *,
        max_instances: int | None = 32,
        judge: str | None = None,
        when="end",
        output_dir: str = "treg-output",
        max_new_tokens: int = 256,
        batch_size: int = 16,
        bench: str = "v0.1",
        log: Callable[[dict], None] | None = None,
        reference_path: str | None = None,
        questions_path: str | None = None,
        baseline_paths: list[str] | None = None,
        no_partition: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        check_hook_settings(
            hooks, judge=judge, when=when, bench=bench, reference_path=reference_path,
            questions_path=questions_path, baseline_paths=baseline_paths,
        )
        self.hooks, self.max_instances, self.judge_spec = list(hooks), max_instances, judge
        self.when, self.output_dir, self.bench, self.log = parse_when(when), output_dir, bench, log
        self.gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
        self.paths = {"reference": reference_path, "questions": questions_path, "baselines": baseline_paths}
        self._judge = None
        self.history: list[dict] = []
        self.defer_train_end = False  # set by a caller that saves the model first, then calls run_train_end
        self.no_partition = no_partition or contextlib.nullcontext

    @classmethod
    def for_trainer(cls, trainer) -> EvalHookCallback:
        """The callback a :class:`treg.trainer.TRegTrainer`'s ``eval_hook*`` settings describe."""
        from treg.token_rewards.precompute import Distributed

        args = trainer.args
        return cls(
            args.eval_hooks, max_instances=args.eval_hook_max_instances, judge=args.eval_hook_judge,
            when=args.eval_hook_when, output_dir=args.output_dir, max_new_tokens=args.eval_hook_max_new_tokens,
            batch_size=args.per_device_eval_batch_size, bench=args.eval_hook_arena_bench, log=trainer.log,
            no_partition=Distributed.from_accelerator(trainer.accelerator).no_partition,
        )

    def _judge_for(self, model, tokenizer):
        from treg.evaluation.judges import build_judge

        if self.judge_spec is None:  # the policy judges itself: rebuilt each time (its weights change)
            return build_judge(
                "policy", judge_model=(model, tokenizer), batch_size=self.gen["batch_size"], show_progress=False
            )
        if self._judge is None:
            self._judge = build_judge(self.judge_spec, batch_size=self.gen["batch_size"], show_progress=False)
        return self._judge

    def run(self, model, tokenizer, step: int) -> dict[str, float]:
        from treg.evaluation.runs import flat_metrics, run_alpaca_eval, run_arena_hard

        judge = self._judge_for(model, tokenizer)
        metrics: dict[str, float] = {}
        name = f"step-{step}"
        for hook in self.hooks:
            out = os.path.join(self.output_dir, "eval_hooks", hook, name)
            if hook == "alpaca_eval":
                res = run_alpaca_eval(
                    model,
                    tokenizer,
                    generator=name,
                    judge=judge,
                    out_dir=out,
                    reference_path=self.paths["reference"],
                    max_instances=self.max_instances,
                    gen=self.gen,
                    show_progress=False,
                )
            else:
                res = run_arena_hard(
                    model,
                    tokenizer,
                    model_name=name,
                    judge=judge,
                    out_dir=out,
                    bench=self.bench,
                    questions_path=self.paths["questions"],
                    baseline_paths=self.paths["baselines"],
                    max_instances=self.max_instances,
                    gen=self.gen,
                    show_progress=False,
                )
            metrics.update(flat_metrics(res))
        return metrics

    def _fire(self, args, state, model, tokenizer):
        if model is None or tokenizer is None:
            return
        if is_partitioned(model):  # ZeRO-3: every process helps gather the weights, the main one evaluates them
            model = self._gather_whole(model, keep=state.is_world_process_zero)
        if not state.is_world_process_zero:
            return
        with self.no_partition():
            metrics = self.run(model, tokenizer, state.global_step)
        del model
        self.history.append({"step": state.global_step, **metrics})
        if self.log is not None:
            self.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})
        logger.info("eval hooks at step %d: %s", state.global_step, metrics)

    def _gather_whole(self, model, keep: bool):
        """An unpartitioned copy of a ZeRO-3 model on the main process (``keep``), None elsewhere. Collective: every
        process calls it, and gathers the same tensors in the same order."""
        full = {name: tensor.clone() for name, tensor in full_tensors(model) if keep}
        if not keep:
            return None
        with self.no_partition():
            whole = type(model)(copy.deepcopy(model.config))
        first = next(iter(full.values()))
        whole.to(dtype=first.dtype, device=first.device)
        whole.load_state_dict(full, strict=True)
        whole.generation_config = copy.deepcopy(model.generation_config)
        return whole.eval()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if isinstance(self.when, int) and state.global_step % self.when == 0:
            self._fire(args, state, model, processing_class)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.when == "eval":
            self._fire(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.when == "end" and not self.defer_train_end:
            self._fire(args, state, model, processing_class)

    def run_train_end(self, trainer) -> None:
        """The end-of-training hooks, for a caller that set ``defer_train_end`` and has saved the model. Collective
        under ZeRO-3, like training: every process calls it."""
        if self.when == "end":
            self._fire(trainer.args, trainer.state, trainer.model, trainer.processing_class)
