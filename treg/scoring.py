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

Backends. ``score_completions`` takes a HF causal LM (the HF backend) or a *scorer*: any object with a
``score_items(items, batch_size=..., desc=..., show_progress=...)`` method, such as :class:`VLLMScorer`, vLLM's
``prompt_logprobs`` (imported lazily; ``pip install "treg[vllm]"``). :func:`choose_backend` picks vLLM when it is
installed, a GPU is present and the run is a single process, and the HF backend otherwise. The two agree within
the tolerance documented in ``docs/scale-out.md`` (they are the same log-softmax; kernels and reduction order differ).

:class:`LockstepModel` keeps processes in step when the model's forward is itself collective (DeepSpeed ZeRO-3
gathers each layer's weights from all processes): a process that has run out of rows keeps answering with dummy
forwards until every process is done, so shards of different sizes never deadlock.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Item = tuple[Sequence[int], Sequence[int]]  # (context ids, completion ids)
BACKENDS = ("auto", "hf", "vllm")


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


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in float32, for ``logits [..., V]`` and valid token ids ``labels [...]``."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def last_logits(model, kwargs: dict, keep: int) -> torch.Tensor:
    """``[B, keep, V]``: the logits of the last ``keep`` positions, projected through the LM head at those positions
    only where the model takes ``logits_to_keep``."""
    try:
        return model(**kwargs, logits_to_keep=keep).logits[:, -keep:]
    except TypeError:  # architectures without logits_to_keep
        return model(**kwargs).logits[:, -keep:]


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
    logits = last_logits(model, kwargs, keep)  # [B, keep, V]
    out = []
    for r, (_, comp) in enumerate(rows):
        n = len(comp)
        if n == 0:
            out.append(np.zeros(0, dtype=np.float32))
            continue
        # logits [n, V] predicting the n completion tokens
        logps = label_logps(logits[r, keep - 1 - n : keep - 1], input_ids[r, width - n :])
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
    if hasattr(model, "score_items"):  # a scorer backend (vLLM, or a test double)
        return model.score_items(items, batch_size=batch_size, desc=desc, show_progress=show_progress)
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
                kwargs = dict(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device),
                    use_cache=False,
                )
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


# --------------------------------------------------------------------------------------------------- vLLM backend
def prompt_logprobs_to_array(prompt_logprobs, token_ids: Sequence[int], n_context: int, item: int = 0) -> np.ndarray:
    """The completion part of one vLLM ``RequestOutput.prompt_logprobs`` as float32 ``[len(token_ids) - n_context]``.

    vLLM returns, for a prompt of ``L`` tokens, a list of ``L`` entries: ``None`` for the first token, then for each
    position ``p`` a dict ``{token_id: Logprob}`` that always contains the prompt's own token ``token_ids[p]`` (plus
    the top-k alternatives asked for). ``Logprob`` has a ``.logprob`` float; plain floats are accepted too.
    """
    if prompt_logprobs is None or len(prompt_logprobs) != len(token_ids):
        got = "None" if prompt_logprobs is None else f"{len(prompt_logprobs)} entries"
        raise ValueError(
            f"item {item}: vLLM returned {got} of prompt_logprobs for a {len(token_ids)}-token sequence; "
            "was SamplingParams(prompt_logprobs=...) set?"
        )
    out = np.empty(len(token_ids) - n_context, dtype=np.float32)
    for j, p in enumerate(range(n_context, len(token_ids))):
        entry = prompt_logprobs[p]
        if entry is None or token_ids[p] not in entry:
            raise ValueError(f"item {item}, position {p}: vLLM's prompt_logprobs lack the prompt token {token_ids[p]}.")
        value = entry[token_ids[p]]
        out[j] = getattr(value, "logprob", value)
    return out


class VLLMScorer:
    """Per-token log-probs from vLLM's ``prompt_logprobs``: one request per (context, completion), token ids in, no
    generation beyond one token. ``llm`` is a ``vllm.LLM``; build one with :meth:`from_pretrained`."""

    def __init__(self, llm, dtype=None):
        self.llm = llm
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, model: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.5, seed: int = 0, **kwargs
    ) -> VLLMScorer:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError('the vLLM scoring backend needs vLLM: pip install "treg[vllm]"') from e
        llm = LLM(
            model=model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            skip_tokenizer_init=True,
            **kwargs,
        )
        return cls(llm, dtype=dtype)

    def score_items(
        self, items: Sequence[Item], *, batch_size: int = 8, desc: str = "Scoring (vLLM)", show_progress: bool = True
    ) -> list[np.ndarray]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=0: only the prompt's own token at each position; max_tokens=1: nothing else is generated.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        results: list[np.ndarray | None] = [None] * len(items)
        todo = [i for i, (_, comp) in enumerate(items) if len(comp) > 0]
        for i, (_, comp) in enumerate(items):
            if len(comp) == 0:
                results[i] = np.zeros(0, dtype=np.float32)
        seqs = {i: [int(t) for t in items[i][0]] + [int(t) for t in items[i][1]] for i in todo}
        prompts = [TokensPrompt(prompt_token_ids=seqs[i]) for i in todo]
        disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable) if prompts else []
        for i, out in zip(todo, outputs):
            results[i] = prompt_logprobs_to_array(out.prompt_logprobs, seqs[i], len(items[i][0]), item=i)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Free the engine's GPU memory (best effort: vLLM keeps some global state)."""
        import gc

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(
    requested: str = "auto", *, num_processes: int = 1, model_path: str | None = None, verbose: bool = True
) -> str:
    """``"hf"`` or ``"vllm"`` for the token-reward pass.

    ``auto`` picks vLLM when it is installed, a GPU is present, the run is a single process and the weights are on
    disk or the hub (``model_path``); otherwise the HF backend. ``vllm`` insists and says why it cannot run.
    """
    if requested not in BACKENDS:
        raise ValueError(f"token_reward_backend={requested!r}: choose one of {BACKENDS}.")
    if requested == "hf":
        return "hf"
    reasons = []
    if not vllm_available():
        reasons.append('vLLM is not installed (pip install "treg[vllm]")')
    if not torch.cuda.is_available():
        reasons.append("no GPU is visible")
    if num_processes > 1:
        reasons.append(
            f"the run has {num_processes} processes (vLLM scores in one process: run `treg rewards` on one "
            "GPU first, training on any number of processes then reads its cache)"
        )
    if not model_path:
        reasons.append("the reference weights have no path or hub id vLLM could load")
    if not reasons:
        return "vllm"
    if requested == "vllm":
        raise ValueError("token_reward_backend='vllm' cannot run: " + "; ".join(reasons) + ".")
    if verbose:  # the main process says it once, not every process
        logger.info("token-reward pass: HF backend (%s)", "; ".join(reasons))
    return "hf"


# --------------------------------------------------------------------------------------- collective-forward lockstep
class LockstepModel:
    """Wraps a model whose forward is a collective (DeepSpeed ZeRO-3) so processes with unequal work stay in step.

    Before each real forward every process joins an all-reduce of "I still have work"; once a process is done it
    calls :meth:`finish`, which keeps joining those all-reduces and answers each round in which another process still
    works with a one-token dummy forward. Forwards therefore pair up one to one across processes. ``logits_to_keep``
    is dropped (and the logits sliced here) for architectures without it, so no call fails after the all-reduce.
    """

    def __init__(self, model, device=None):
        self.model = model
        self.device = device if device is not None else next(model.parameters()).device
        module = getattr(model, "module", model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(module.forward).parameters

    def __getattr__(self, name):  # parameters(), training, eval(), train(), config ...
        return getattr(self.model, name)

    def _others_working(self, working: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1 if working else 0], device=self.device)
        dist.all_reduce(flag)
        return int(flag.item()) > (1 if working else 0)

    def __call__(self, **kwargs):
        self._others_working(True)
        keep = kwargs.pop("logits_to_keep", None)
        if keep is not None and self._keeps_logits:
            return self.model(**kwargs, logits_to_keep=keep)
        out = self.model(**kwargs)
        if keep is not None:
            out.logits = out.logits[:, -keep:]
        return out

    @torch.inference_mode()
    def finish(self) -> int:
        """Answer the other processes' forwards until all are done; returns the number of dummy forwards run."""
        dummies = 0
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        while self._others_working(False):
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            dummies += 1
        return dummies
