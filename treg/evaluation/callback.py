"""The training hook: a ``TrainerCallback`` that runs AlpacaEval 2 and/or Arena-Hard on a subset during or after
training and logs the headline numbers like any other metric (``eval_hooks/alpaca_eval/win_rate``, …).

Enabled from a recipe (``eval_hooks: [alpaca_eval, arena_hard]``, ``eval_hook_max_instances``, ``eval_hook_judge``,
``eval_hook_when``: "end", "eval" or a step interval). The policy and tokenizer come from the callback's keyword
arguments (``model``, ``processing_class``); the callback knows nothing of the trainer. ``log`` (e.g. the trainer's own
``log``) sends the metrics to every reporter; without it they are appended to ``state.log_history``. Only the main
process evaluates (``state.is_world_process_zero``).

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

from treg.models import full_tensors, is_partitioned

logger = logging.getLogger(__name__)

HOOKS = ("alpaca_eval", "arena_hard")


def parse_when(when) -> str | int:
    """ "end", "eval", or a positive step interval (int or digit string)."""
    if isinstance(when, int) or (isinstance(when, str) and when.isdigit()):
        if int(when) < 1:
            raise ValueError(f"eval_hook_when as a step interval must be ≥ 1, got {when}.")
        return int(when)
    if when not in ("end", "eval"):
        raise ValueError(f"eval_hook_when must be 'end', 'eval' or a step interval, got {when!r}.")
    return when


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
        unknown = [h for h in hooks if h not in HOOKS]
        if unknown or not hooks:
            raise ValueError(f"eval_hooks {list(hooks)}: choose from {list(HOOKS)}.")
        self.hooks, self.max_instances, self.judge_spec = list(hooks), max_instances, judge
        self.when, self.output_dir, self.bench, self.log = parse_when(when), output_dir, bench, log
        self.gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
        self.paths = {"reference": reference_path, "questions": questions_path, "baselines": baseline_paths}
        self._judge = None
        self.history: list[dict] = []
        self.no_partition = no_partition or contextlib.nullcontext

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
        if self.when == "end":
            self._fire(args, state, model, processing_class)
