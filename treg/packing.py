"""Pair packing: the forward that computes each prompt once for both of its completions, with no padding between pairs.

A preference pair ``(prompt, chosen, rejected)`` padded the usual way costs two rows, ``[prompt, chosen]`` and
``[prompt, rejected]``, each padded to the longest row of the batch: the prompt is computed twice and the padding
is computed too. Packed, a pair is one *group*: the shared context ``prompt[:-1]`` followed by one *branch* per
completion, ``[prompt[-1], chosen[:-1]]`` and ``[prompt[-1], rejected[:-1]]``. A branch token attends to its group's
context and to the earlier tokens of its own branch only (rejected never sees chosen), and its position id is the
one it has in the unpacked sequence (both branches start at ``len(prompt) - 1``), so every hidden state, and every
log-prob, is the unpacked one. Branch token ``t`` predicts completion token ``t``: the last prompt token is repeated
at the head of each branch (it predicts each completion's first token), and a completion's last token, which
predicts nothing, is left out — a pair costs ``len(prompt) - 1 + len(chosen) + len(rejected)`` tokens instead of
``2·len(prompt) + len(chosen) + len(rejected)`` plus padding. Several groups share a row (first-fit decreasing, rows
no wider than the widest group unless ``max_tokens`` says otherwise); attention is block-diagonal over groups. In a
row all contexts come first and all branches last, so the scored positions sit at the row's end (rows are
left-padded) and an inference forward projects only those through the LM head (``logits_to_keep``)::

    row:      pad pad | p1 p1 p1 | p2 p2 | p1' c1 c1 | p1' r1 | p2' c2 | p2' r2 r2 r2
    position:  0   0  |  0  1  2 |  0  1 |  3  4  5  |  3  4  |  2  3  |  2  3  4  5

The attention mask is a 4D boolean (SDPA) or additive (eager) ``[R, 1, T, T]`` tensor that transformers passes to the
attention as it is, with explicit ``position_ids``. Backends that take no such mask (flash-attention, which would
need a tree mask its varlen kernel cannot express; flex-attention), sliding-window layers (the mask would override
their window), ALiBi, prompt-learning PEFT and models without ``position_ids`` fall back to the padded forward:
:func:`packing_support` says why, once in the log. Float32 log-probs equal the padded ones to rounding
(``tests/test_packing.py``: ≤ 1e-5).

Used by :class:`treg.trainer.TRegTrainer` (training forward, through TRL's fused LM head: no ``[R, T, V]`` logits)
and by the token-reward pass (:func:`score_groups`: x, x⁺ and x⁻ each computed once per pair, followed by both
completions). ``pack_pairs: false`` in a recipe turns both off.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from treg.scoring import label_logps, last_logits

logger = logging.getLogger(__name__)

Group = tuple[Sequence[int], Sequence[Sequence[int]]]  # (context ids, the completions that share it)
PACKED_KEY_PREFIX = "packed_"  # batch keys of a packed training batch (collated beside TRL's padded keys)
MASK_BACKENDS = ("eager", "sdpa")  # attention implementations that take a custom 4D mask as it is
_logged: set[tuple[str, str]] = set()  # (where, reason) already said in the log


@dataclass
class PackedBatch:
    """Groups packed into rows. ``R`` rows of ``T`` tokens (left-padded), ``G`` groups of at most ``K`` completions
    of at most ``L`` tokens.

    input_ids, position_ids: ``[R, T]``. group_ids: ``[R, T]`` the group of each token (-1 on padding).
    branch_ids: ``[R, T]`` 0 on a group's shared context, ``k + 1`` on completion k's branch.
    labels: ``[R, T]`` the token each position predicts (-100 where none): TRL's fused head's ``shift_labels``.
    index, mask: ``[G, K, L]`` flat position ``r·T + t`` whose prediction is token ``l`` of completion ``k`` of group
    ``g`` (0 where ``mask`` is False): ``log_probs.reshape(-1)[index]`` is the padded per-token layout.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group_ids: torch.Tensor
    branch_ids: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor

    def attention_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``[R, 1, T, T]``: query i sees key j iff both are in one group, j ≤ i, and j is on the shared context or
        on i's branch. Boolean (True = attend) or additive in ``dtype`` (0 or the dtype's minimum, for eager)."""
        g, b = self.group_ids, self.branch_ids
        pos = torch.arange(g.size(1), device=g.device)
        allowed = (g[:, :, None] == g[:, None, :]) & (pos[:, None] >= pos[None, :])
        allowed &= (b[:, None, :] == 0) | (b[:, :, None] == b[:, None, :])
        allowed = allowed[:, None]
        if dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=g.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def to(self, device) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def as_inputs(self) -> dict[str, torch.Tensor]:
        """The batch as collator keys (``packed_*``); :meth:`from_inputs` reads them back."""
        return {PACKED_KEY_PREFIX + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_inputs(cls, inputs) -> PackedBatch:
        return cls(**{f.name: inputs[PACKED_KEY_PREFIX + f.name] for f in fields(cls)})


def group_size(context: Sequence[int], completions: Sequence[Sequence[int]]) -> int:
    """Tokens a group takes in a packed row: the context but its last token, and one token per completion token."""
    return len(context) - 1 + sum(len(c) for c in completions)


def _first_fit(sizes: Sequence[int], width: int) -> list[list[int]]:
    """Group indices into rows of at most ``width`` tokens, first-fit decreasing (a group wider than ``width`` gets
    a row of its own)."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for g in sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True):
        for r, used in enumerate(fill):
            if used + sizes[g] <= width:
                rows[r].append(g)
                fill[r] += sizes[g]
                break
        else:
            rows.append([g])
            fill.append(sizes[g])
    return rows


def pack_groups(groups: Sequence[Group], *, max_tokens: int | None = None, pad_token_id: int = 0) -> PackedBatch:
    """Pack ``(context, completions)`` groups into rows (see the module docstring).

    max_tokens: row width to fill; default (and at least) the widest group's :func:`group_size`.
    Raises ``ValueError`` naming the group whose context is empty (its first completion token has nothing before it).
    """
    if not groups:
        raise ValueError("pack_groups: no groups to pack.")
    for g, (ctx, _) in enumerate(groups):
        if len(ctx) == 0:
            raise ValueError(f"group {g}: empty context; the first completion token needs a token before it.")
    sizes = [group_size(ctx, comps) for ctx, comps in groups]
    rows = _first_fit(sizes, max(max(sizes), max_tokens or 0))
    width = max(sum(sizes[g] for g in row) for row in rows)
    n_rows, n_comp = len(rows), max(len(comps) for _, comps in groups)
    longest = max([len(c) for _, comps in groups for c in comps] + [1])
    ids = np.full((n_rows, width), pad_token_id, dtype=np.int64)
    position, group_ids = np.zeros((n_rows, width), dtype=np.int64), np.full((n_rows, width), -1, dtype=np.int64)
    branch, labels = np.zeros((n_rows, width), dtype=np.int64), np.full((n_rows, width), -100, dtype=np.int64)
    index = np.zeros((len(groups), n_comp, longest), dtype=np.int64)
    mask = np.zeros((len(groups), n_comp, longest), dtype=bool)
    for r, members in enumerate(rows):
        t = width - sum(sizes[g] for g in members)  # left padding: the scored branches end every row
        for g in members:  # the shared contexts first ...
            n = len(groups[g][0]) - 1
            ids[r, t : t + n] = groups[g][0][:-1]
            position[r, t : t + n], group_ids[r, t : t + n] = np.arange(n), g
            t += n
        for g in members:  # ... then every branch
            ctx, comps = groups[g]
            for k, comp in enumerate(comps):
                m = len(comp)
                if m == 0:
                    continue
                ids[r, t] = ctx[-1]
                ids[r, t + 1 : t + m] = comp[:-1]
                position[r, t : t + m] = np.arange(len(ctx) - 1, len(ctx) - 1 + m)
                group_ids[r, t : t + m], branch[r, t : t + m], labels[r, t : t + m] = g, k + 1, comp
                index[g, k, :m], mask[g, k, :m] = r * width + np.arange(t, t + m), True
                t += m
    as_tensor = torch.from_numpy
    return PackedBatch(as_tensor(ids), as_tensor(position), as_tensor(group_ids), as_tensor(branch), as_tensor(labels),
                       as_tensor(index), as_tensor(mask))


def pack_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    *,
    max_tokens: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """One group per pair, ``[prompt, chosen, rejected]`` (see :func:`pack_groups`); completion 0 of group b is
    pair b's chosen, completion 1 its rejected. Example::

        >>> b = pack_pairs([[1, 2, 3]], [[4, 5]], [[6]])
        >>> b.input_ids.tolist(), b.position_ids.tolist(), b.labels.tolist()
        ([[1, 2, 3, 4, 3]], [[0, 1, 2, 3, 2]], [[-100, -100, 4, 5, 6]])
    """
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(f"pack_pairs: {len(prompt_ids)} prompts, {len(chosen_ids)} chosen, {len(rejected_ids)} "
                         "rejected; give one of each per pair.")
    groups = [(p, (c, r)) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
    return pack_groups(groups, max_tokens=max_tokens, pad_token_id=pad_token_id)


# ------------------------------------------------------------------------------------------------ model support
def _unwrap(model):
    """The transformers model inside a DeepSpeed engine or DDP (``module``), a LockstepModel or a PEFT model."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def packing_support(model) -> str | None:
    """None when ``model`` can run a packed forward; else the reason it cannot (logged once by :func:`use_packing`)."""
    peft_configs = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values()):
        return "prompt-learning PEFT adds virtual tokens that a packed 4D mask does not cover"
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no transformers config"
    backend = getattr(config, "_attn_implementation", None) or "eager"
    if backend not in MASK_BACKENDS:
        return f"attention implementation {backend!r} takes no custom 4D mask (packing needs one of {MASK_BACKENDS})"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if getattr(text, "alibi", False):
        return "ALiBi attention biases come from a 2D mask, not from position_ids"
    if any(t != "full_attention" for t in layer_types) or window:
        return "the model has sliding-window or other non-causal layers, whose masks a packed 4D mask would replace"
    if "position_ids" not in inspect.signature(type(model).forward).parameters:
        return f"{type(model).__name__}.forward takes no position_ids"
    return None


def use_packing(model, requested: bool = True, *, where: str = "training") -> bool:
    """Whether to pack for ``model``: ``requested`` and supported. Says once in the log why not, when requested."""
    if not requested:
        return False
    reason = packing_support(model)
    if reason is not None and (where, reason) not in _logged:
        _logged.add((where, reason))
        logger.warning("pair packing is off for %s: %s; using the padded forward.", where, reason)
    return reason is None


def _mask_dtype(model) -> torch.dtype:
    backend = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)
    return torch.bool if backend == "sdpa" else next(model.parameters()).dtype


def has_fused_head(model) -> bool:
    """Whether ``model`` carries TRL's fused LM head (``add_fused_lm_head``: log-probs without ``[R, T, V]`` logits)."""
    function = getattr(_unwrap(model).forward, "__func__", None)
    return function is not None and "fused_lm_head" in function.__code__.co_varnames


# ------------------------------------------------------------------------------------------------------ forwards
def packed_logps(model, batch: PackedBatch, *, fused_lm_head: bool | None = None) -> torch.Tensor:
    """``[G, K, L]`` log p(completion token | context, earlier completion tokens) of a packed batch (0 where
    ``batch.mask`` is False), with gradients when grad mode is on.

    fused_lm_head: project through TRL's fused head (float32 log-probs of the labelled positions, no logits); None
    uses it when the model has it. Otherwise the model's logits of the rows' last positions, where the branches are.
    """
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids,
                  attention_mask=batch.attention_mask(_mask_dtype(model)), use_cache=False)
    if fused_lm_head is None:
        fused_lm_head = has_fused_head(model)
    if fused_lm_head:
        per_position = model(**kwargs, shift_labels=batch.labels, fused_lm_head=True).log_probs  # [R, T]
    else:
        per_position = _logits_logps(model, kwargs, batch.labels)
    return per_position.reshape(-1)[batch.index].masked_fill(~batch.mask, 0.0)


SCORED_CHUNK = 1024  # labelled positions per LM-head call on the scored-positions path (a [chunk, V] float32 block)


def _head_parts(model):
    """``(body, head)`` of a plain causal LM whose logits are ``head(body(...).last_hidden_state)`` and nothing more;
    None for anything else: wrappers that must see every call (a DeepSpeed engine or DDP, whose ZeRO-3 gathers must
    pair up across processes, a LockstepModel), logit soft-capping or scaling (Gemma-2, Cohere)."""
    if hasattr(model, "_others_working") or isinstance(getattr(model, "module", None), torch.nn.Module):
        return None
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    body = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if body is None or body is inner or head is None or not hasattr(inner, "lm_head"):
        return None
    return body, head


def _scored_logps(parts, kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
    """``[R, T]`` float32 log-probs of the labelled positions through the LM head at those positions only (a packed
    row's branches interleave scored positions with the contexts of the groups after them, so the last-``keep``
    slice of :func:`_logits_logps` would project many unscored ones), in chunks of :data:`SCORED_CHUNK`."""
    body, head = parts
    hidden = body(**kwargs).last_hidden_state
    where = labels != -100
    states, targets = hidden[where], labels[where]
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    values = []
    for start in range(0, targets.numel(), SCORED_CHUNK):
        values.append(label_logps(head(states[start : start + SCORED_CHUNK]), targets[start : start + SCORED_CHUNK]))
    if values:
        out[where] = torch.cat(values)
    return out


def _logits_logps(model, kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
    """``[R, T]`` float32 log-prob of each position's label (0 where none): through the LM head at the labelled
    positions only where the model allows it (:func:`_head_parts`), else from the logits of the last ``keep``
    positions: every labelled position is among them, since branches end the left-padded rows."""
    parts = None if torch.is_grad_enabled() else _head_parts(model)
    if parts is not None:
        return _scored_logps(parts, kwargs, labels)
    scored = (labels != -100).any(0).nonzero()
    width = labels.size(1)
    keep = width - int(scored[0]) if len(scored) else 1
    logits = last_logits(model, kwargs, keep)  # [R, keep, V]
    kept = labels[:, -keep:]
    # one row at a time: a float32 copy of one row's logits, not the batch's
    rows = [label_logps(logits[r], kept[r].clamp(min=0)) for r in range(logits.size(0))]
    out = torch.stack(rows).masked_fill(kept == -100, 0.0)
    return torch.cat([out.new_zeros(out.size(0), width - keep), out], dim=1)


def packed_pair_logps(model, batch: PackedBatch, *, fused_lm_head: bool | None = None):
    """``(chosen_logps, chosen_mask, rejected_logps, rejected_mask)``, each ``[B, L]`` (L the longest completion),
    for a batch from :func:`pack_pairs`, with gradients: the per-token inputs of :func:`treg.losses.treg_loss`."""
    logps = packed_logps(model, batch, fused_lm_head=fused_lm_head)
    return logps[:, 0], batch.mask[:, 0], logps[:, 1], batch.mask[:, 1]


def _forwards(sizes: Sequence[int], rows_per_forward: int):
    """Group indices per forward, longest first: rows as wide as the forward's widest group, filled first-fit
    decreasing, at most ``rows_per_forward`` of them (:func:`pack_groups` rebuilds the same rows)."""
    members: list[int] = []
    fill: list[int] = []
    for g in sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True):
        width = sizes[members[0]] if members else sizes[g]
        row = next((r for r, used in enumerate(fill) if used + sizes[g] <= width), None)
        if row is None and len(fill) >= rows_per_forward:
            yield members
            members, fill = [], []
        if row is None:
            fill.append(sizes[g])
        else:
            fill[row] += sizes[g]
        members.append(g)
    if members:
        yield members


@torch.inference_mode()
def score_groups(
    model,
    groups: Sequence[Group],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    desc: str = "Scoring (packed)",
    show_progress: bool = True,
) -> list[list[np.ndarray]]:
    """Per-token log-probs of every completion of every ``(context, completions)`` group, the context computed once
    per group: ``out[g][k]`` is a float32 array with one value per token of completion k of group g, as
    :func:`treg.scoring.score_completions` returns for the item ``(context, completion)``.

    batch_size: rows per forward; a row is as wide as the forward's widest group and holds as many groups as fit.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    for g, (ctx, _) in enumerate(groups):
        if len(ctx) == 0:
            raise ValueError(f"group {g}: empty context; the first completion token needs a token before it.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sizes = [group_size(ctx, comps) for ctx, comps in groups]
    results: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.float32)] * len(comps) for _, comps in groups]
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    try:
        with tqdm(total=len(groups), desc=desc, unit="group", disable=disable) as bar:
            for members in _forwards(sizes, batch_size):
                batch = pack_groups([groups[g] for g in members], pad_token_id=pad_token_id).to(device)
                logps = packed_logps(model, batch, fused_lm_head=False).float().cpu().numpy()  # [G, K, L]
                for i, g in enumerate(members):
                    results[g] = [logps[i, k, : len(comp)].copy() for k, comp in enumerate(groups[g][1])]
                bar.update(len(members))
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------ trainer glue
def collate_packed(examples, max_length: int | None = None, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The ``packed_*`` batch keys for TRL-tokenized examples (``prompt_ids``, ``chosen_ids``, ``rejected_ids``),
    completions truncated as TRL's collator truncates (``keep_start`` to ``max_length``). Empty when some prompt is
    empty or fills ``max_length``: that batch runs the padded forward."""
    prompts = [list(ex["prompt_ids"]) for ex in examples]
    if any(len(p) == 0 or (max_length is not None and len(p) >= max_length) for p in prompts):
        return {}

    def kept(prompt, completion):
        return list(completion) if max_length is None else list(completion)[: max_length - len(prompt)]

    chosen = [kept(p, ex["chosen_ids"]) for p, ex in zip(prompts, examples)]
    rejected = [kept(p, ex["rejected_ids"]) for p, ex in zip(prompts, examples)]
    return pack_pairs(prompts, chosen, rejected, pad_token_id=pad_token_id).as_inputs()


def policy_logps(model, inputs) -> torch.Tensor:
    """Per-token log-probs ``[2B, T - 1]`` of a training batch in TRL's padded layout (rows 0..B-1 chosen, B..2B-1
    rejected, lined up with ``completion_mask[:, 1:]``, 0 elsewhere), through TRL's fused LM head (no logits): from
    the packed forward when the batch carries ``packed_*`` keys, else from TRL's padded rows."""
    completion_mask = inputs["completion_mask"]
    if PACKED_KEY_PREFIX + "input_ids" not in inputs:
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                     fused_lm_head=True, use_cache=False).log_probs[:, 1 - completion_mask.size(1) :]
    batch = PackedBatch.from_inputs(inputs)
    logps = packed_logps(model, batch, fused_lm_head=True)  # [B, 2, L]
    compact = torch.cat([logps[:, 0], logps[:, 1]])[torch.cat([batch.mask[:, 0], batch.mask[:, 1]])]
    target = completion_mask[:, 1:].bool()
    return compact.new_zeros(target.shape).masked_scatter(target, compact)
