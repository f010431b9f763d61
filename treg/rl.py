"""Online RL with AI feedback on TRL's GRPO and RLOO trainers: ``treg rl --config recipe.yaml``.

Two systems of the T-REG line of work are online:

* **RLAIF** (Lee et al. 2023, arXiv 2309.00267) trains the policy with RL against AI feedback: a reward model
  distilled from AI labels (``rm:PATH``) or the LLM's 1–10 score used directly (``direct:MODEL``, *direct RLAIF*,
  :mod:`treg.feedback.direct`).
* **RELC** (Cao et al. 2024, arXiv 2401.07382) adds a critic LLM's span-level intrinsic rewards to the sparse
  extrinsic reward, ``r_t = α1·r_ex·[t = last] + α2·r_in,t``, and only asks the critic about samples whose
  extrinsic reward is at most a threshold τ.

TRL's trainers take sequence-level reward functions only. :class:`TRegGRPOTrainer` subclasses ``GRPOTrainer`` and
overrides two methods: ``_calculate_rewards`` (call the parent, keep what it scored) and
``_generate_and_score_completions`` (call the parent, then replace its per-sequence advantages with per-token ones).
TRL's loss already accepts advantages of shape ``[B, T]``; nothing in the loss is rewritten.

**Dense advantage (choice; docs/rl.md).** For completion i with tokens t = 1..T_i (``completion_mask``), stock
advantage Â_i (GRPO's group-baselined, optionally scaled, sequence advantage of r_ex) and intrinsic rewards r_in,i,t
(0 unless the sample was sent to the critic):

    A_i,t = α1 · Â_i  +  α2 · Σ_{t' = t}^{T_i} γ^(t' − t) · r_in,i,t'

that is, the extrinsic reward sits on the last token and is baselined by the trainer as usual; the dense part is
its discounted reward-to-go, not baselined. With α2 = 0 (or no critic) and α1 = 1 the trainer's batch is returned
untouched, so the loss is exactly the stock trainer's (tested); the critic is then not called at all.

**Gating.** A sample goes to the critic iff r_ex ≤ τ, where r_ex = Σ_k w_k r_k is the weighted sum of the sequence
rewards (TRL's ``reward_weights``) and τ = ``critic_threshold`` (``None``: every sample). Others get r_in = 0.

**Failures.** A critic call that raises or times out, an answer that is None, blank or has no parseable line gives
that sample r_in = 0; all are counted and logged (``critic/failures``, ``critic/timeouts``, ``critic/errors``) and
never end the run. Spans not found in the completion are dropped and counted (``critic/missing_spans``).

Reward sources (``reward_funcs`` in the recipe, any mix, weighted by ``reward_weights``):

    toy:exact          1 if a toy-task answer is entirely correct else 0 (sparse; :func:`treg.synthetic.oracle`)
    toy:score          fraction of correct positions of a toy-task answer
    rm:PATH            a sequence-classification reward model (one logit), e.g. from ``treg reward-model``
    direct:MODEL       direct RLAIF: E[score 1..10] of a judge LLM rescaled to [−1, 1] (MODEL: path, hub id, treg:tiny)
    module:function    any TRL reward function ``f(prompts, completions, completion_ids, **kw) -> list[float]``
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from treg.files import default_cache_dir
from treg.recipes import RecipeError, check_recipe, load_model_and_tokenizer

logger = logging.getLogger(__name__)

ALGORITHMS = ("grpo", "rloo")
CRITIC_CACHE_VERSION = "rl-critic-v1"


# ------------------------------------------------------------------------------------------ dense advantages (pure)
def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{t' ≥ t} γ^(t' − t) · r_t' · mask_t'.  Shapes: rewards, mask ``[B, T]`` → ``[B, T]`` (0 where masked).

    >>> reward_to_go(torch.tensor([[0.0, -1.0, 0.0, 2.0]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    tensor([[-0.5000, -1.0000,  0.0000,  0.0000]])
    """
    r = rewards.float() * mask
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):  # right to left: G_t = r_t + γ G_{t+1}
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def dense_advantages(
    sequence_advantages: torch.Tensor,
    intrinsic: torch.Tensor,
    mask: torch.Tensor,
    alpha_ex: float = 1.0,
    alpha_in: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """A_t = α1·Â + α2·Σ_{t'≥t} γ^(t'−t) r_in,t'  (module docstring; docs/rl.md).

    Args:
        sequence_advantages: ``[B]``, the trainer's baselined advantage of the extrinsic reward.
        intrinsic: ``[B, T]``, r_in per completion token (0 for samples the critic did not see).
        mask: ``[B, T]``, 1 on completion tokens the loss counts.
    Returns ``[B, T]``; on masked positions the value is α1·Â (the loss ignores it).
    """
    if intrinsic.shape != mask.shape or sequence_advantages.shape != intrinsic.shape[:1]:
        raise ValueError(
            f"shapes: sequence_advantages {tuple(sequence_advantages.shape)} must be [B] and intrinsic "
            f"{tuple(intrinsic.shape)} / mask {tuple(mask.shape)} [B, T]."
        )
    dense = reward_to_go(intrinsic, mask.to(intrinsic.dtype), gamma)
    return alpha_ex * sequence_advantages.unsqueeze(1).to(dense.dtype) + alpha_in * dense


def critic_gate(extrinsic: Sequence[float], threshold: float | None) -> list[bool]:
    """Which samples go to the critic: r_ex ≤ τ (all when τ is None). An unscorable sample (NaN) never goes."""
    return [not math.isnan(r) and (threshold is None or r <= threshold) for r in extrinsic]


# ---------------------------------------------------------------------------------------- critic token rewards
class CriticTokenRewards:
    """RELC intrinsic rewards for sampled completions: gate, ask the critic (batched, guarded), map spans to tokens.

    ``__call__(prompts, completion_ids, extrinsic, threshold)`` returns one list of floats per completion, with
    exactly one value per id of ``completion_ids[i]`` (:func:`treg.token_rewards.critic.map_spans_to_completion_ids`),
    and a stats dict. Answers are cached in memory by critic prompt, and on disk per batch under
    ``<cache_dir>/token_rewards/`` keyed by a hash of the critic id, the settings and the prompts (``"none"``: off).
    Batches with a failed call (error, timeout) are not written to disk.
    """

    STAT_KEYS = (
        "queried",
        "failures",
        "errors",
        "timeouts",
        "unparsed_lines",
        "spans",
        "missing_spans",
        "bad_tokens",
        "good_tokens",
    )

    def __init__(
        self,
        critic,
        critic_id: str,
        tokenizer,
        *,
        good_value: float = 0.25,
        bad_value: float = -0.25,
        task_description: str | None = None,
        few_shot: int = 2,
        use_extrinsic: bool = True,
        batch_size: int = 32,
        timeout_s: float | None = None,
        cache_dir: str | None = None,
        show_progress: bool = False,
        max_logged_failures: int = 3,
    ):
        from treg.token_rewards.critic import DEFAULT_FEW_SHOT, DEFAULT_TASK_DESCRIPTION, check_values

        check_values(good_value, bad_value)
        if few_shot < 0:
            raise ValueError(f"critic_few_shot must be ≥ 0, got {few_shot}.")
        self.critic, self.critic_id, self.tokenizer = critic, critic_id, tokenizer
        self.good_value, self.bad_value = good_value, bad_value
        self.task_description = task_description or DEFAULT_TASK_DESCRIPTION
        self.few_shot = list(DEFAULT_FEW_SHOT[:few_shot])
        self.use_extrinsic, self.batch_size, self.timeout_s = use_extrinsic, batch_size, timeout_s
        self.cache_dir, self.show_progress = cache_dir, show_progress
        self.max_logged_failures, self._logged_failures = max_logged_failures, 0
        self._memo: dict[str, str] = {}

    def critic_prompt(self, prompt, completion_text: str, extrinsic: float | None) -> str:
        from treg.token_rewards.critic import _text, build_critic_prompt

        score = round(extrinsic, 4) if self.use_extrinsic and extrinsic is not None else None
        return build_critic_prompt(
            _text(prompt, self.tokenizer, "prompt", 0),
            completion_text,
            score,
            task_description=self.task_description,
            few_shot=self.few_shot,
        )

    def _answers(self, critic_prompts: list[str]) -> tuple[list[str | None], list[str]]:
        """The answer to each critic prompt and how its call went (``ok``, ``error``, ``timeout``, ``bad_length``)."""
        from treg.token_rewards import cache as cache_lib
        from treg.token_rewards.critic import call_critic

        todo = list(dict.fromkeys(p for p in critic_prompts if p not in self._memo))
        status = {}
        if todo:
            path = None
            if self.cache_dir is None or str(self.cache_dir).lower() != "none":
                settings = {"version": CRITIC_CACHE_VERSION, "critic": self.critic_id, "prompts": todo}
                key = cache_lib.fingerprint(settings)
                root = self.cache_dir or default_cache_dir()
                path = os.path.join(root, "token_rewards", f"{CRITIC_CACHE_VERSION}-{key[:24]}")
                cached = cache_lib.load(path)
                if cached is not None and cached["prompt"] == todo:
                    self._memo.update(zip(todo, cached["answer"]))
                    todo = []
            if todo:
                statuses: list[str] = []
                got, stats = call_critic(
                    self.critic,
                    todo,
                    batch_size=self.batch_size,
                    timeout_s=self.timeout_s,
                    show_progress=self.show_progress,
                    statuses=statuses,
                )
                status = dict(zip(todo, statuses))
                answered = [(p, a) for p, a, st in zip(todo, got, statuses) if st == "ok"]
                if len(self._memo) + len(answered) > 200_000:  # bound a long run's memory; the disk cache keeps all
                    self._memo.clear()
                self._memo.update(answered)
                if path is not None and stats.failed_calls == 0:
                    cache_lib.save_atomic({"prompt": todo, "answer": list(got)}, path)
        answers = [self._memo.get(p) for p in critic_prompts]
        return answers, [status.get(p, "ok") for p in critic_prompts]

    def __call__(
        self,
        prompts: Sequence,
        completion_ids: Sequence[Sequence[int]],
        extrinsic: Sequence[float],
        threshold: float | None = None,
    ) -> tuple[list[list[float]], dict]:
        from treg.token_rewards.critic import is_failure, map_spans_to_completion_ids, parse_critic_output

        if not len(prompts) == len(completion_ids) == len(extrinsic):
            raise ValueError(f"{len(prompts)} prompts, {len(completion_ids)} completions, {len(extrinsic)} rewards.")
        gate = critic_gate(extrinsic, threshold)
        chosen = [i for i, g in enumerate(gate) if g]
        texts = {
            i: self.tokenizer.decode(
                list(completion_ids[i]), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            for i in chosen
        }
        critic_prompts = [self.critic_prompt(prompts[i], texts[i], extrinsic[i]) for i in chosen]
        answers, statuses = self._answers(critic_prompts) if chosen else ([], [])
        stats = Counter({k: 0 for k in self.STAT_KEYS})
        stats["queried"] = len(chosen)
        stats["errors"] = sum(st in ("error", "bad_length") for st in statuses)
        stats["timeouts"] = statuses.count("timeout")
        values = [[0.0] * len(ids) for ids in completion_ids]
        for i, answer in zip(chosen, answers):
            spans, unparsed = parse_critic_output(answer)
            stats["unparsed_lines"] += unparsed
            if is_failure(answer):
                stats["failures"] += 1
                if self._logged_failures < self.max_logged_failures:
                    self._logged_failures += 1
                    logger.warning(
                        "critic failure (r_in = 0) on completion %r: answer %r",
                        texts[i][:80],
                        None if answer is None else answer[:200],
                    )
                continue
            values[i], st = map_spans_to_completion_ids(
                self.tokenizer, list(completion_ids[i]), spans, self.good_value, self.bad_value
            )
            stats["spans"] += st["spans"]
            stats["missing_spans"] += st["missing"]
            stats["bad_tokens"] += st["bad_tokens"]
            stats["good_tokens"] += st["good_tokens"]
        return values, dict(stats)


# ----------------------------------------------------------------------------------------------------- trainer
@dataclass
class TRegGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus RELC dense critic rewards (module docstring, docs/rl.md).

    Dense advantage: critic_alpha_ex (α1, multiplies the trainer's sequence advantage), critic_alpha_in (α2, the
        intrinsic reward-to-go; 0 = the stock trainer), critic_gamma (γ of the reward-to-go).
    Gating: critic_threshold (τ; only samples with weighted extrinsic reward ≤ τ go to the critic; None = all).
    The critic: critic_model (path or hub id of a causal LM, ``treg:tiny``, or ``rule:toy``), critic_good_value /
        critic_bad_value (r_in on GOOD / BAD span tokens), critic_few_shot, critic_task_description,
        critic_use_extrinsic (show r_ex to the critic), critic_max_new_tokens, critic_batch_size (prompts per call),
        critic_timeout_s (a call running longer gives its samples r_in = 0, counted), critic_cache_dir.
    """

    critic_model: str | None = field(default=None, metadata={"help": "critic LM path/hub id, treg:tiny, or rule:toy."})
    critic_alpha_ex: float = field(default=1.0, metadata={"help": "α1: weight of the trainer's sequence advantage."})
    critic_alpha_in: float = field(default=1.0, metadata={"help": "α2: weight of the intrinsic reward-to-go."})
    critic_gamma: float = field(default=1.0, metadata={"help": "γ of the intrinsic reward-to-go, in [0, 1]."})
    critic_threshold: float | None = field(
        default=None, metadata={"help": "τ: only samples with extrinsic reward ≤ τ go to the critic (None: all)."}
    )
    critic_good_value: float = field(default=0.25, metadata={"help": "r_in on GOOD-span tokens, in [0, 0.5)."})
    critic_bad_value: float = field(default=-0.25, metadata={"help": "r_in on BAD-span tokens, in (-0.5, 0]."})
    critic_few_shot: int = field(default=2, metadata={"help": "number of default few-shot examples shown."})
    critic_task_description: str | None = field(default=None, metadata={"help": "critic task description."})
    critic_use_extrinsic: bool = field(default=True, metadata={"help": "show the extrinsic reward to the critic."})
    critic_max_new_tokens: int = field(default=256, metadata={"help": "critic generation budget per sample."})
    critic_batch_size: int = field(default=32, metadata={"help": "critic prompts per critic call."})
    critic_timeout_s: float | None = field(default=None, metadata={"help": "seconds per critic call (None: none)."})
    critic_cache_dir: str | None = field(
        default=None, metadata={"help": "critic answer cache root ($TREG_CACHE_DIR or ~/.cache/treg; none: off)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.critic_gamma <= 1.0:
            raise ValueError(f"critic_gamma must lie in [0, 1], got {self.critic_gamma}.")
        if self.critic_timeout_s is not None and self.critic_timeout_s <= 0:
            raise ValueError(f"critic_timeout_s must be > 0 (or None), got {self.critic_timeout_s}.")
        if self.critic_batch_size < 1:
            raise ValueError(f"critic_batch_size must be ≥ 1, got {self.critic_batch_size}.")
        if self.critic_model:
            from treg.token_rewards.critic import check_values

            check_values(self.critic_good_value, self.critic_bad_value)


class TRegGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with RELC dense critic rewards turned into per-token advantages (module docstring).

    ``critic_rewards`` is a :class:`CriticTokenRewards` (or None: the stock trainer, scaled by α1). Totals of the
    critic's counters over the run are in ``self.critic_totals``.
    """

    def __init__(self, model, reward_funcs=None, args: TRegGRPOConfig | None = None, *, critic_rewards=None, **kwargs):
        super().__init__(model, reward_funcs, args, **kwargs)
        self.critic_rewards = critic_rewards
        self.critic_totals: Counter = Counter()
        self._scored = None

    @property
    def dense(self) -> bool:
        return self.critic_rewards is not None and getattr(self.args, "critic_alpha_in", 0.0) != 0.0

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._scored = (prompts, completion_ids_list, rewards_per_func)  # [N_all, K], gathered over processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        alpha_ex = getattr(self.args, "critic_alpha_ex", 1.0)
        if not self.dense:
            if alpha_ex != 1.0:
                out["advantages"] = alpha_ex * out["advantages"]
            return out
        prompts, completion_ids_list, rewards_per_func = self._scored
        self._scored = None
        n = len(prompts)
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        extrinsic = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        extrinsic[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        extrinsic = extrinsic[local].tolist()
        values, stats = self.critic_rewards(prompts, completion_ids_list, extrinsic, self.args.critic_threshold)
        mask = out["completion_mask"]
        intrinsic = torch.zeros(mask.shape, dtype=torch.float32)
        for i, v in enumerate(values):  # one value per completion id; ids beyond the padded width cannot exist
            intrinsic[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
        intrinsic = intrinsic.to(mask.device)
        out["advantages"] = dense_advantages(
            out["advantages"], intrinsic, mask, alpha_ex, self.args.critic_alpha_in, self.args.critic_gamma
        )
        self._log_critic(stats, intrinsic, mask, n)
        return out

    def _log_critic(self, stats: dict, intrinsic: torch.Tensor, mask: torch.Tensor, n: int) -> None:
        mode = "train" if self.model.training else "eval"
        keys = CriticTokenRewards.STAT_KEYS
        local = torch.tensor(
            [float(stats[k]) for k in keys] + [float(n), (intrinsic * mask).sum().item()],
            device=self.accelerator.device,
        )
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        counts = dict(zip(keys, total[: len(keys)]))
        self.critic_totals.update({k: int(v) for k, v in counts.items()})
        self.critic_totals["samples"] += int(total[len(keys)])
        for k in ("failures", "errors", "timeouts", "unparsed_lines", "missing_spans", "bad_tokens", "good_tokens"):
            self._metrics[mode][f"critic/{k}"].append(counts[k])
        self._metrics[mode]["critic/queried_frac"].append(counts["queried"] / max(total[len(keys)], 1.0))
        self._metrics[mode]["critic/intrinsic_return"].append(total[-1] / max(counts["queried"], 1.0))
        if counts["failures"]:
            logger.info(
                "critic: %d of %d queried samples failed (r_in = 0); %d so far",
                counts["failures"],
                counts["queried"],
                self.critic_totals["failures"],
            )


# ------------------------------------------------------------------------------------------------ reward sources
class ToyReward:
    """The toy task's oracle as a TRL reward function: ``exact`` (1 if every word is right, else 0) or ``score``
    (fraction of correct positions). Prompts that are not toy tasks get None (TRL: unscorable)."""

    def __init__(self, kind: str):
        if kind not in ("exact", "score"):
            raise ValueError(f"toy reward must be toy:exact or toy:score, got toy:{kind}.")
        self.kind, self.__name__ = kind, f"toy_{kind}"

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        from treg.synthetic import oracle

        out = []
        for prompt, completion in zip(prompts, completions):
            try:
                score, _ = oracle(_last_text(prompt).strip(), _last_text(completion).strip())
            except ValueError:
                out.append(None)
                continue
            out.append(float(score == 1.0) if self.kind == "exact" else score)
        return out


class ScorerReward:
    """Any ``score_batch(prompts, responses)`` scorer (e.g. :class:`treg.feedback.direct.DirectScorer`) as a TRL
    reward function named ``name``."""

    def __init__(self, scorer, name: str):
        self.scorer, self.__name__ = scorer, name

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from treg.feedback.onpolicy import score_all

        return score_all(self.scorer, list(prompts), [_last_text(c) for c in completions])

    def to(self, device):
        self.scorer.model.to(device)
        return self


def _last_text(value) -> str:
    if isinstance(value, str):
        return value
    return str(list(value)[-1]["content"])


def build_reward_funcs(specs: Sequence[str], batch_size: int = 16) -> tuple[list, list]:
    """TRL reward functions and their processing classes (None except for reward models) from recipe specs."""
    if not specs:
        raise RecipeError(
            "reward_funcs is empty: give at least one of toy:exact, toy:score, rm:PATH, direct:MODEL, module:function."
        )
    funcs, tokenizers = [], []
    for spec in specs:
        kind, _, rest = str(spec).partition(":")
        if kind == "toy":
            funcs.append(ToyReward(rest))
            tokenizers.append(None)
        elif kind == "rm" and rest:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from treg.models import check_model_spec

            check_model_spec(rest, f"reward_funcs {spec!r}")
            model = AutoModelForSequenceClassification.from_pretrained(rest)
            if getattr(model.config, "num_labels", 1) != 1:
                raise RecipeError(
                    f"reward_funcs {spec!r}: a reward model needs num_labels=1, got {model.config.num_labels}."
                )
            tokenizer = AutoTokenizer.from_pretrained(rest)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            funcs.append(model)  # TRL scores nn.Module rewards itself (chat template, device, DeepSpeed)
            tokenizers.append(tokenizer)
        elif kind == "direct" and rest:
            from treg.feedback.direct import DirectScorer
            from treg.models import load_causal_lm

            judge, judge_tokenizer = load_causal_lm(rest, show_progress=False)
            funcs.append(ScorerReward(DirectScorer(judge, judge_tokenizer, batch_size=batch_size), "direct"))
            tokenizers.append(None)
        elif kind and rest and kind not in ("rm", "direct"):
            try:
                module = importlib.import_module(kind)
                func = getattr(module, rest)
            except (ImportError, AttributeError) as e:
                raise RecipeError(f"reward_funcs {spec!r}: cannot import {rest!r} from module {kind!r}: {e}") from e
            if not callable(func):
                raise RecipeError(f"reward_funcs {spec!r}: {kind}.{rest} is not callable.")
            funcs.append(func)
            tokenizers.append(None)
        else:
            raise RecipeError(
                f"reward_funcs {spec!r}: expected toy:exact, toy:score, rm:PATH, direct:MODEL or module:function."
            )
    return funcs, tokenizers


def build_critic_rewards(config: TRegGRPOConfig, tokenizer, device=None) -> CriticTokenRewards | None:
    """The critic of ``config.critic_model`` wrapped as :class:`CriticTokenRewards` (None without a critic)."""
    from treg.token_rewards.critic import HFCritic, RuleCritic

    name = config.critic_model
    if not name:
        return None
    if name == "rule:toy":
        critic, critic_id = RuleCritic(), RuleCritic.critic_id
    else:
        from treg.models import load_causal_lm, module_hash

        model, critic_tokenizer = load_causal_lm(name, show_progress=False)
        if device is not None:
            model = model.to(device)
        critic = HFCritic(
            model, critic_tokenizer, max_new_tokens=config.critic_max_new_tokens, batch_size=config.critic_batch_size
        )
        critic_id = f"hf:{name}:{module_hash(model)}:{config.critic_max_new_tokens}"
    return CriticTokenRewards(
        critic,
        critic_id,
        tokenizer,
        good_value=config.critic_good_value,
        bad_value=config.critic_bad_value,
        task_description=config.critic_task_description,
        few_shot=config.critic_few_shot,
        use_extrinsic=config.critic_use_extrinsic,
        batch_size=config.critic_batch_size,
        timeout_s=config.critic_timeout_s,
        cache_dir=config.critic_cache_dir,
        show_progress=not config.disable_tqdm,
    )


# ---------------------------------------------------------------------------------------------------- recipes
@dataclass
class RLScriptArguments:
    """Prompts, reward sources and algorithm of ``treg rl``.

    dataset_name: ``treg:toy`` (toy-task prompts), a ``.jsonl`` file with a ``prompt`` field, or a preference
        dataset whose prompts are used (hub id or local path).
    reward_funcs: reward sources (module docstring); weights are GRPOConfig/RLOOConfig's ``reward_weights``.
    rl_algorithm: ``grpo`` (dense critic rewards available) or ``rloo`` (sequence rewards only).
    """

    rl_algorithm: str = field(default="grpo", metadata={"help": "grpo or rloo."})
    dataset_name: str = field(default="treg:toy", metadata={"help": "treg:toy, a .jsonl with 'prompt', or a dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "split of a dataset's prompts."})
    max_train_rows: int | None = field(default=None, metadata={"help": "keep the first N prompts."})
    toy_num_prompts: int = field(default=256, metadata={"help": "treg:toy: number of prompts."})
    toy_seed: int = field(default=0, metadata={"help": "treg:toy: seed of the prompts."})
    reward_funcs: list[str] = field(default_factory=lambda: ["toy:exact"], metadata={"help": "reward sources."})
    reward_batch_size: int = field(default=16, metadata={"help": "direct scorer: pairs per forward."})


def _config_class(algorithm: str):
    if algorithm == "grpo":
        return TRegGRPOConfig
    from trl import RLOOConfig

    return RLOOConfig


def build_parser(algorithm: str = "grpo"):
    from trl import ModelConfig, TrlParser

    if algorithm not in ALGORITHMS:
        raise RecipeError(f"rl_algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}.")
    return TrlParser((RLScriptArguments, _config_class(algorithm), ModelConfig))


def _peek_recipe(argv: list[str]) -> tuple[str, dict]:
    """(rl_algorithm, the recipe's mapping or {}) before the parser is chosen; check_recipe reports bad files."""
    recipe: dict = {}
    if "--config" in argv:
        import yaml

        try:
            with open(argv[argv.index("--config") + 1]) as f:
                loaded = yaml.safe_load(f)
            recipe = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError, IndexError):
            pass
    algorithm = argv[argv.index("--rl_algorithm") + 1] if "--rl_algorithm" in argv[:-1] else None
    return str(algorithm or recipe.get("rl_algorithm", "grpo")), recipe


def parse_rl_args(argv: list[str]):
    """(script args, config, model args) from ``--config recipe.yaml`` and flags; unknown keys name file and key."""

    algorithm, recipe = _peek_recipe(argv)
    parser = build_parser(algorithm)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        critic_keys = [k for k in recipe if str(k).startswith("critic_")]
        if algorithm == "rloo" and critic_keys:
            raise RecipeError(
                f"recipe {path!r}: {critic_keys[0]!r} needs rl_algorithm: grpo. Critic rewards are "
                "per token and TRL's RLOO loss weighs whole sequences (one ratio per completion)."
            )
        keys_hint = (
            f"Keys are the fields of {_config_class(algorithm).__name__}, ModelConfig and RLScriptArguments; "
            "see `treg rl --help`."
        )
        check_recipe(path, parser, keys_hint=keys_hint)
    script_args, config, model_args = parser.parse_args_and_config(argv)
    return script_args, config, model_args


def load_prompts_dataset(script_args: RLScriptArguments, tokenizer):
    """A dataset with a ``prompt`` column (chat messages when the tokenizer has a chat template)."""
    from datasets import Dataset

    from treg.feedback.onpolicy import load_prompts

    n = script_args.toy_num_prompts if script_args.dataset_name == "treg:toy" else script_args.max_train_rows
    prompts = load_prompts(script_args.dataset_name, n, script_args.dataset_train_split, script_args.toy_seed)
    if not prompts:
        raise RecipeError(f"dataset_name {script_args.dataset_name!r} gave no prompts.")
    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = [[{"role": "user", "content": p}] if isinstance(p, str) and chat else p for p in prompts]
    return Dataset.from_dict({"prompt": rows})


def build_trainer(script_args, config, model_args):
    from trl import get_peft_config

    model, tokenizer = load_model_and_tokenizer(model_args)  # names the missing model_name_or_path
    train = load_prompts_dataset(script_args, tokenizer)
    reward_funcs, reward_tokenizers = build_reward_funcs(script_args.reward_funcs, script_args.reward_batch_size)
    common = dict(
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=get_peft_config(model_args),
    )
    if script_args.rl_algorithm == "rloo":
        from trl import RLOOTrainer

        return RLOOTrainer(model, **common)
    trainer = TRegGRPOTrainer(model, **common)
    for func in reward_funcs:  # judges follow the policy's device
        if isinstance(func, ScorerReward):
            func.to(trainer.accelerator.device)
    if config.critic_model and config.critic_alpha_in != 0.0:
        trainer.critic_rewards = build_critic_rewards(config, tokenizer, device=trainer.accelerator.device)
    elif config.critic_model:
        logger.info("critic_alpha_in is 0: the critic is not called (the stock GRPO objective).")
    return trainer


def main(argv: list[str] | None = None) -> int:
    """``treg rl --config recipe.yaml [--key value ...]``: train, save, print the critic's counters."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: treg rl --config recipe.yaml [--key value ...]\n\n" + __doc__.strip() + "\n")
        if argv:
            print(build_parser("grpo").format_help())
        return 0
    script_args, config, model_args = parse_rl_args(argv)
    trainer = build_trainer(script_args, config, model_args)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        totals = getattr(trainer, "critic_totals", None)
        if totals:
            print("critic: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
        print(f"saved to {config.output_dir}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())


__all__ = [
    "CriticTokenRewards",
    "RLScriptArguments",
    "TRegGRPOConfig",
    "TRegGRPOTrainer",
    "build_reward_funcs",
    "critic_gate",
    "dense_advantages",
    "main",
    "reward_to_go",
]
