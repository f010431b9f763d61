"""The one engine that turns (context ids, completion ids) into per-token log-probs.

Used by every token-reward source, by the per-token reference log-probs, and by log-prob judges. The HF backend
runs a causal LM in inference mode over batches sorted by length (longest first, so an out-of-memory error shows
up in the first batch, not after an hour). Sequences are left-padded so every completion ends at the last position,
and only the last ``max_completion_len + 1`` positions are projected through the LM head (``logits_to_keep``): the
``[B, T, V]`` logits of the context are never materialised.

Example::

    >>> logps = score_completions(model, [([1, 5, 7], [9, 2]), ([1, 4], [3, 3, 2])], batch_size=2)
    >>> [x.shape for x in logps]          # one float32 array per item, one value per completion token
    [(2,), (3,)]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

Item = tuple[Sequence[int], Sequence[int]]  # (context ids, completion ids)


def _batches(order: list[int], items: Sequence[Item], batch_size: int, max_batch_tokens: int | None):
    """Group indices (already sorted longest first) into batches of ≤ batch_size rows and ≤ max_batch_tokens."""
    batch: list[int] = []
    width = 0
    for i in order:
        length = len(items[i][0]) + len(items[i][1])
        new_width = max(width, length)
        too_many_tokens = max_batch_tokens is not None and batch and new_width * (len(batch) + 1) > max_batch_tokens
        if batch and (len(batch) >= batch_size or too_many_tokens):
            yield batch
            batch, new_width = [], length
        batch.append(i)
        width = new_width
    if batch:
        yield batch


def _forward_completion_logps(model, rows: list[Item], pad_token_id: int, device) -> list[np.ndarray]:
    """One left-padded forward; returns log p(completion_t | context, completion_<t) for each row."""
    seqs = [list(ctx) + list(comp) for ctx, comp in rows]
    width = max(len(s) for s in seqs)
    keep = max(len(comp) for _, comp in rows) + 1  # logits at position p predict token p + 1
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):  # [B, width], each row right-aligned
        input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask[r, width - len(s) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, attention_mask, position_ids = input_ids.to(device), attention_mask.to(device), position_ids.to(device)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits  # [B, keep, V]
    except TypeError:  # architectures without logits_to_keep
        logits = model(**kwargs).logits[:, -keep:]
    out = []
    for r, (_, comp) in enumerate(rows):
        n = len(comp)
        if n == 0:
            out.append(np.zeros(0, dtype=np.float32))
            continue
        row_logits = logits[r, keep - 1 - n : keep - 1].float()  # [n, V] predicting the n completion tokens
        targets = input_ids[r, width - n :]
        logps = row_logits.gather(-1, targets[:, None]).squeeze(-1) - row_logits.logsumexp(-1)
        out.append(logps.cpu().numpy().astype(np.float32))
    return out


@torch.inference_mode()
def score_completions(
    model,
    items: Sequence[Item],
    *,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    pad_token_id: int = 0,
    desc: str = "Scoring",
    show_progress: bool = True,
) -> list[np.ndarray]:
    """Per-token log-probs of each completion given its context, HF backend.

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel`` or anything with the same forward signature).
        items: ``(context_ids, completion_ids)`` pairs. The completion's first token is scored given the context.
        batch_size: rows per forward. max_batch_tokens: optional cap on ``rows × padded width`` per forward.
        pad_token_id: id used for left padding (masked out; any valid id works).
        desc, show_progress: progress bar label and switch (``TQDM_DISABLE=1`` also silences it).

    Returns:
        A list aligned with ``items``: float32 arrays with one log-prob per completion token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    for i, (ctx, _) in enumerate(items):
        if len(ctx) == 0:
            raise ValueError(f"item {i}: empty context; the first completion token needs at least one token before it.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]), reverse=True)
    results: list[np.ndarray | None] = [None] * len(items)
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    try:
        with tqdm(total=len(items), desc=desc, unit="seq", disable=disable) as bar:
            for batch in _batches(order, items, batch_size, max_batch_tokens):
                logps = _forward_completion_logps(model, [items[i] for i in batch], pad_token_id, device)
                for i, lp in zip(batch, logps):
                    results[i] = lp
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


@torch.inference_mode()
def next_token_logprobs(
    model,
    contexts: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    desc: str = "Next-token log-probs",
    show_progress: bool = True,
) -> np.ndarray:
    """log p(t | context) for every context and every ``t`` in ``token_ids``; float32 ``[N contexts, len(token_ids)]``.

    One forward per context that projects only its last position through the LM head, so reading k candidate tokens
    costs one sequence instead of the k that :func:`score_completions` would need (label tokens, score digits).
    """
    items = [(ctx[:-1], ctx[-1:]) for ctx in contexts]  # the last context token is the "completion" slot
    for i, ctx in enumerate(contexts):
        if len(ctx) == 0:
            raise ValueError(f"context {i} is empty; a next-token distribution needs at least one token.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    columns = torch.tensor(list(token_ids), dtype=torch.long)
    out = np.zeros((len(contexts), len(columns)), dtype=np.float32)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]), reverse=True)
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    try:
        with tqdm(total=len(contexts), desc=desc, unit="seq", disable=disable) as bar:
            for batch in _batches(order, items, batch_size, None):
                seqs = [list(contexts[i]) for i in batch]
                width = max(len(s) for s in seqs)
                input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for r, s in enumerate(seqs):  # [B, width], each row right-aligned so its last token is at -1
                    input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                    attention_mask[r, width - len(s) :] = 1
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                              position_ids=position_ids.to(device), use_cache=False)
                try:
                    logits = model(**kwargs, logits_to_keep=1).logits[:, -1].float()  # [B, V]
                except TypeError:  # architectures without logits_to_keep
                    logits = model(**kwargs).logits[:, -1].float()
                logps = logits.log_softmax(-1)[:, columns.to(logits.device)]  # [B, len(token_ids)]
                out[batch] = logps.cpu().numpy()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return out
