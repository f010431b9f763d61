"""TRL integration: ``TRegConfig(DPOConfig)`` and ``TRegTrainer(DPOTrainer)``, the only file that knows DPOTrainer
internals. The token-reward pass lives in :mod:`treg.token_rewards.precompute`, which knows nothing of TRL.

What the subclass changes, and why:

* ``_prepare_dataset``: validates the rows, tokenizes them as TRL does, and turns TRL's silent drop of prompts that
  fill ``max_length`` into an error naming the row.
* ``_precompute_ref_logps``: instead of TRL's per-sequence reference sums, runs the token-reward pass (per-token
  reference log-probs and r̂, cached on disk) with the accelerator's state; no reference model stays in memory.
* a collator that pads the per-token columns beside ``completion_mask``;
* ``compute_loss``: one policy forward (TRL's fused LM head, no logits; pairs packed by :mod:`treg.packing`), then
  :func:`treg.losses.treg_loss`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer
from trl.models import prepare_deepspeed
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad, use_adapter

from treg.data import cut_prompts, set_aside_extra_columns, validate_preference_rows
from treg.losses import BASE_LOSSES, treg_loss
from treg.models import weights_hash
from treg.packing import collate_packed, policy_logps, use_packing
from treg.recipes import check_config_values
from treg.scoring import BACKENDS
from treg.token_rewards import (
    CHOSEN_REWARDS,
    PER_TOKEN_COLUMNS,
    REF_CHOSEN,
    REF_REJECTED,
    REF_TOKEN_COLUMNS,
    REJECTED_REWARDS,
    TOKEN_REWARD_COLUMNS,
    check_trainable_rows,
    per_token_rows,
)
from treg.token_rewards.contrastive import DEFAULT_NEGATIVE_TEMPLATE, DEFAULT_POSITIVE_TEMPLATE
from treg.token_rewards.precompute import TOKEN_REWARD_SOURCES, Distributed, PassSettings, attach_token_columns


def _arg(default, help: str, **metadata):
    """A config field with its ``--help`` text (and e.g. ``choices``)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TRegConfig(DPOConfig):
    """DPOConfig plus T-REG's settings. Every DPOConfig field keeps its meaning, with these changes of default:
    ``bf16`` is on only where a GPU supports it (DPOConfig's default fails on CPU), activation checkpointing is set
    through its current name, and ``precompute_ref_log_probs`` is always on (the token-reward pass computes the
    per-token reference log-probs; no reference model is kept in memory).

    T-REG (METHOD.md §2):
        treg_alpha: α, weight of the token-level regularizer. 0 is plain DPO/SimPO. The paper uses 0.1–0.5.
        base_loss: "dpo" (with DPOConfig's ``loss_type`` sigmoid, hinge or ipo, and ``label_smoothing``) or "simpo".
        simpo_gamma: SimPO's target reward margin γ (absolute; the SimPO paper quotes γ/β, e.g. β=10, γ/β=0.3 → γ=3).
        treg_sequence_weight: weight the regularizer by w = stopgrad σ(r_l − r_w); False is the paper's ablation.

    Token rewards (``token_reward_*``, ``contrastive_*``, ``critic_*``): the token-reward pass's settings, described
        in :class:`treg.token_rewards.precompute.PassSettings`. ``token_reward_source`` is "contrastive" (r̂ from the
        reference model), "dpo_derived" (from a DPO checkpoint) or "critic" (RELC span rewards, METHOD.md §3).
    """

    treg_alpha: float = _arg(0.25, "α: weight of the token-level reward regularizer.")
    base_loss: str = _arg("dpo", "Sequence-level objective.", choices=list(BASE_LOSSES))
    simpo_gamma: float = _arg(0.5, "SimPO target margin γ (absolute, not γ/β).")
    gamma_beta_ratio: float | None = _arg(None, "SimPO's γ/β: when set, simpo_gamma = gamma_beta_ratio × beta.")
    max_prompt_length: int | None = _arg(None, "Cut longer prompts from their start (oldest turns first), logged.")
    treg_sequence_weight: bool = _arg(True, "Weight the regularizer by the detached DPO gradient coefficient w.")
    token_reward_source: str = _arg("contrastive", "Token-reward source.", choices=list(TOKEN_REWARD_SOURCES))
    token_reward_model: str | None = _arg(None, "dpo_derived: the trained DPO checkpoint whose log-ratios become r̂.")
    token_reward_scale: float = _arg(1.0, "dpo_derived: s in σ(s·log π_dpo/π_ref) − 0.5.")
    contrastive_positive_template: str = _arg(
        DEFAULT_POSITIVE_TEMPLATE, "x⁺; contains {prompt}. Default: the plain prompt (docs/token-rewards-real.md)."
    )
    contrastive_negative_template: str = _arg(
        DEFAULT_NEGATIVE_TEMPLATE, "x⁻: asks for a worse response; contains {prompt}."
    )
    pack_pairs: bool = _arg(True, "Pack each pair as [prompt, chosen, rejected]: the prompt computed once, no padding "
                            "(training and token-reward pass); the padded forward where the model cannot (logged).")
    token_reward_cache_dir: str | None = _arg(None, "Cache root for token rewards; 'none' disables caching.")
    token_reward_batch_size: int = _arg(8, "Rows per forward in the token-reward pass.")
    token_reward_shard_size: int = _arg(512, "Rows per shard of the token-reward pass (over processes, resumable).")
    token_reward_backend: str = _arg("auto", "Scoring backend of the token-reward pass.", choices=list(BACKENDS))
    token_reward_vllm_gpu_memory: float = _arg(0.5, "vLLM backend: fraction of GPU memory its engine may use.")
    critic_model: str | None = _arg(None, "critic: path/hub id of the critic LM, treg:tiny, or rule:toy.")
    critic_good_value: float = _arg(0.25, "critic: r̂ on GOOD-span tokens, in [0, 0.5).")
    critic_bad_value: float = _arg(-0.25, "critic: r̂ on BAD-span tokens, in (-0.5, 0].")
    critic_max_new_tokens: int = _arg(256, "critic: generation budget per response.")
    critic_few_shot: int = _arg(2, "critic: number of default few-shot examples shown.")
    critic_task_description: str | None = _arg(None, "critic: task description (default: treg's).")
    critic_use_extrinsic: bool = _arg(True, "critic: show score_chosen/score_rejected to the critic when present.")

    # changed defaults
    precompute_ref_log_probs: bool = _arg(True, "Always True in treg: per-token reference log-probs are precomputed.")
    gradient_checkpointing: bool | None = _arg(None, "Deprecated alias of activation_checkpointing.")
    activation_checkpointing: bool | None = _arg(True, "Recompute activations in the backward pass to save memory.")

    # evaluation hooks (treg.evaluation.callback.EvalHookCallback; docs/evaluation.md)
    eval_hooks: list[str] | None = _arg(None, "Benchmarks to run during/after training: alpaca_eval, arena_hard.")
    eval_hook_max_instances: int | None = _arg(32, "Eval hooks: subset size per run.")
    eval_hook_judge: str | None = _arg(None, "Eval hooks: judge (path, treg:tiny, openai:MODEL@URL); default: policy.")
    eval_hook_when: str = _arg("end", "Eval hooks: 'end', 'eval' or a step interval.")
    eval_hook_max_new_tokens: int = _arg(256, "Eval hooks: answer length budget.")
    eval_hook_arena_bench: str = _arg("v0.1", "Eval hooks: Arena-Hard version.")

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()
        check_config_values(self)  # treg.recipes: each setting treg cannot train with, as a ValueError

    @property
    def needs_token_rewards(self) -> bool:
        return self.treg_alpha != 0.0


@dataclass
class DataCollatorForTReg(DataCollatorForPreference):
    """TRL's preference collator plus the per-token columns, padded beside ``completion_mask``.

    Adds ``ref_token_logps`` and ``token_rewards``, float ``[2B, T]`` (rows 0..B-1 chosen, B..2B-1 rejected), 0 on
    prompt and padding, when the examples carry them. Example (no truncation)::

        >>> c = DataCollatorForTReg(pad_token_id=0)
        >>> c([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5],
        ...     "chosen_token_rewards": [0.2], "rejected_token_rewards": [-0.1, 0.3]}])["token_rewards"]
        tensor([[ 0.0000,  0.0000,  0.2000,  0.0000],
                [ 0.0000,  0.0000, -0.1000,  0.3000]])

    Taking ``[:, 1:]`` lines the values up with ``completion_mask[:, 1:]`` and the fused head's log-probs.
    """

    pack_pairs: bool = False  # also the packed forward's ``packed_*`` keys (:func:`treg.packing.collate_packed`)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for key, columns in (("ref_token_logps", REF_TOKEN_COLUMNS), ("token_rewards", TOKEN_REWARD_COLUMNS)):
            if columns[0] not in examples[0]:
                continue
            rows = [torch.tensor(r, dtype=torch.float32) for r in per_token_rows(examples, columns, self.max_length)]
            output[key] = pad(rows, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        if self.pack_pairs:
            output.update(collate_packed(examples, self.max_length, self.pad_token_id))
        return output


class TRegTrainer(DPOTrainer):
    """DPO/SimPO with T-REG's token-level reward regularization, on TRL's DPOTrainer.

    Usage mirrors DPOTrainer: ``TRegTrainer(model, args=TRegConfig(...), train_dataset=ds, processing_class=tok)``.
    At construction the token-reward pass runs once (or loads its cache); training then needs one policy forward per
    step and no reference model.
    """

    _tag_names = ["trl", "dpo", "treg"]
    _name = "T-REG"

    def __init__(self, model, ref_model=None, args: TRegConfig | None = None, data_collator=None, **kwargs):
        if args is None:
            args = TRegConfig(output_dir="treg-output")
        if not isinstance(args, TRegConfig):
            raise TypeError(f"args must be a TRegConfig, got {type(args).__name__}.")
        if kwargs.get("peft_config") is not None and isinstance(model, torch.nn.Module):  # TRL wraps it in a PeftModel:
            self._full_weights_hash = weights_hash(model)  # the reference is this base model, hashed before wrapping
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator, **kwargs)
        if data_collator is None:
            self.data_collator = DataCollatorForTReg(
                pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
                pack_pairs=use_packing(self.model, args.pack_pairs),
            )
        if args.eval_hooks:
            from treg.evaluation.callback import EvalHookCallback

            self.add_callback(EvalHookCallback.for_trainer(self))

    # ----------------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, IterableDataset):
            raise TypeError("treg precomputes token rewards, so it needs a map-style datasets.Dataset, not streaming.")
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset  # already prepared (TRL's evaluate() calls this again)
        dataset, put_back = set_aside_extra_columns(dataset)  # TRL's format sniffing sees training columns only
        validate_preference_rows(dataset)
        if args.max_prompt_length is not None:
            dataset = cut_prompts(dataset, processing_class, args.max_prompt_length, dataset_name)
        untruncated = copy.copy(args)
        untruncated.max_length = None  # TRL would silently drop over-long prompts; we report them instead
        dataset = put_back(super()._prepare_dataset(dataset, processing_class, untruncated, dataset_name))
        check_trainable_rows(dataset, args.max_length, dataset_name)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        signature = list(self._signature_columns)
        self._signature_columns = signature + [c for c in PER_TOKEN_COLUMNS if c not in signature]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """The token-reward pass (:func:`~treg.token_rewards.precompute.attach_token_columns`) instead of TRL's sums:
        per-token reference log-probs (DPO, or for DPO-derived r̂) and r̂ (α ≠ 0), sharded, cached and resumable.
        Under PEFT the reference is TRL's: the model's "ref" adapter if it has one, else the base (adapters off)."""
        zero_engine = self._zero_engine if self.ref_model is None else None
        peft = self.model if self.ref_model is None and is_peft_model(self.model) else None
        adapter = "ref" if peft is not None and "ref" in peft.peft_config else None  # None: all adapters off
        return attach_token_columns(
            dataset, self.model, self._tokenizer, PassSettings.from_config(self.args),
            Distributed.from_accelerator(self.accelerator, zero_engine), ref_model=self.ref_model,
            model_hash=self._reference_hash, name=name,
            reference_context=(lambda: use_adapter(peft, adapter)) if peft is not None else None,
        )

    def _reference_hash(self) -> str:
        """The reference weights' hash, once: TRL's, or under ZeRO-3 of the gathered whole weights (TRL's sees only
        partitioned placeholders there)."""
        if getattr(self, "_full_weights_hash", None) is None:
            self._full_weights_hash = weights_hash(self.ref_model or self.model, self._precompute_model_hash)
        return self._full_weights_hash

    def _zero_engine(self):
        """The reference (the policy before training) as a DeepSpeed inference engine, built once (TRL's own)."""
        if self._precompute_engine is None:
            self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
        return self._precompute_engine

    # ----------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        completion_mask = inputs["completion_mask"]  # [2B, T] rows 0..B-1 chosen, B..2B-1 rejected
        mask = completion_mask[:, 1:]  # [2B, T-1], aligned with the fused head's next-token log-probs
        logps = policy_logps(model, inputs)  # packed pairs when the batch has them, else the padded rows
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_mask, rejected_mask = mask.chunk(2)
        ref_chosen = ref_rejected = rhat_chosen = rhat_rejected = None
        if args.base_loss == "dpo":
            ref_chosen, ref_rejected = inputs["ref_token_logps"][:, 1:].chunk(2)
        if "token_rewards" in inputs:
            rhat_chosen, rhat_rejected = inputs["token_rewards"][:, 1:].chunk(2)
        out = treg_loss(
            policy_chosen_logps=chosen_logps, policy_rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            chosen_token_rewards=rhat_chosen, rejected_token_rewards=rhat_rejected,
            chosen_mask=chosen_mask, rejected_mask=rejected_mask,
            base=args.base_loss, beta=args.beta, alpha=args.treg_alpha, gamma=args.simpo_gamma,
            loss_type=args.loss_type[0], label_smoothing=args.label_smoothing,
            use_sequence_weight=args.treg_sequence_weight,
        )
        loss = out.losses.mean()
        self._log_metrics(mode, out, chosen_logps, rejected_logps, chosen_mask, rejected_mask)
        if return_outputs:
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss

    def _log_metrics(self, mode, out, chosen_logps, rejected_logps, chosen_mask, rejected_mask):
        gather = self.accelerator.gather
        metrics = self._metrics[mode]

        def add(name, value):
            metrics[name].append(gather(value.detach().float()).nanmean().item())

        add("rewards/chosen", out.chosen_rewards)
        add("rewards/rejected", out.rejected_rewards)
        add("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).float())
        add("rewards/margins", out.chosen_rewards - out.rejected_rewards)
        add("logps/chosen", (chosen_logps.detach() * chosen_mask).sum(-1))
        add("logps/rejected", (rejected_logps.detach() * rejected_mask).sum(-1))
        add("treg/base_loss", out.base_losses)
        add("treg/reg", out.reg_losses)
        add("treg/weight", out.weights)
        if not torch.isnan(out.chosen_token_agreement).all():
            add("treg/token_agreement", torch.cat([out.chosen_token_agreement, out.rejected_token_agreement]))


__all__ = ["TRegConfig", "TRegTrainer", "DataCollatorForTReg", "CHOSEN_REWARDS", "REJECTED_REWARDS", "REF_CHOSEN",
           "REF_REJECTED"]
