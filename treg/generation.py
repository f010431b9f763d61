"""Generate answers to prompts from a causal LM: batched, through the chat template; HF backend (CPU/GPU, left-padded)
or vLLM backend (optional extra, imported only when asked for).

    >>> texts = generate(model, tokenizer, [[{"role": "user", "content": "sort: 3 1 2"}]], num_samples=2,
    ...                  do_sample=True, max_new_tokens=16)
    >>> len(texts), len(texts[0])
    (1, 2)

Prompts are lists of chat messages (rendered with ``add_generation_prompt``), plain strings (tokenized as is, no
special tokens added) or lists of token ids (sent as they are, e.g. a prompt that starts with BOS). A system message
sent to a chat template without a system role (Gemma's raises) is folded into the first user turn
(:func:`fold_system_turns`). Generation stops at every end-of-sequence id of the checkpoint (its
``generation_config``, e.g. Gemma's ``<end_of_turn>`` and Llama-3.1's ``<|eot_id|>``) and at the tokenizer's
(:func:`eos_token_ids`). Sampling is reproducible: the same seed, prompts and batch size give the same texts (HF
backend).

:func:`encode_pieces` tokenizes text pieces so that their ids joined equal the ids of the joined text, which
tokenizing each piece alone does not give: SentencePiece tokenizers (Llama-2, Mistral) prepend a word-boundary
``▁`` to every text they tokenize, and merges can cross a boundary.

``backend="vllm"``: ``model`` is a ``vllm.LLM`` (or a path/hub id to build one) and the same token ids are sent to it
(``TokensPrompt``), so both backends see identical prompts. vLLM is not a dependency of treg; without it installed the
call fails with an error that says so. (The vLLM path was not run in treg's CI: vLLM does not install on its CPU-only
machines.)

Benchmark files: :func:`write_alpaca_eval_outputs` (AlpacaEval's ``model_outputs.json``: ``instruction``, ``output``,
``generator``) and :func:`write_arena_hard_answers` (Arena-Hard's ``model_answer/<model>.jsonl``), both atomic.
"""

from __future__ import annotations

import bisect
import json
import os
import time
import uuid
from collections.abc import Sequence

import torch

from treg.files import write_text_atomic
from treg.models import is_partitioned


def render_prompt(tokenizer, prompt) -> list[int]:
    """The token ids of a prompt: a string (no special tokens added), token ids (as they are) or chat messages
    (through the chat template with the generation prompt; system turns folded when the template has no system
    role)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    prompt = list(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    messages = fold_system_turns(tokenizer, prompt)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


_SYSTEM_PROBE = "treg-system-probe-7f3a"
_system_support: dict[tuple, bool] = {}


def supports_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message: rendering one must neither raise (Gemma's
    template raises "System role not supported") nor drop its text. True without a chat template (nothing to
    fold). Cached per template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return True
    key = (str(template), str(getattr(tokenizer, "bos_token", None)), str(getattr(tokenizer, "eos_token", None)))
    if key not in _system_support:
        probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
            _system_support[key] = _SYSTEM_PROBE in str(text)
        except Exception:  # a template's raise_exception (jinja2 TemplateError) or any other rendering failure
            _system_support[key] = False
    return _system_support[key]


def fold_system_turns(tokenizer, messages: Sequence[dict]) -> list[dict]:
    """``messages`` as the chat template can render them: unchanged when it has a system role (or there is no
    system message); otherwise each system message's text is put before the next user turn's, separated by a
    blank line (a system message with no user turn after it becomes a user turn). The caller's dicts are not
    modified."""
    messages = [dict(m) for m in messages]
    if not any(m.get("role") == "system" for m in messages) or supports_system_role(tokenizer):
        return messages
    out, pending = [], []
    for m in messages:
        if m.get("role") == "system":
            pending.append(str(m.get("content", "")))
            continue
        if pending and m.get("role") == "user":
            m["content"] = "\n\n".join([*pending, str(m.get("content", ""))])
            pending = []
        elif pending:
            out.append({"role": "user", "content": "\n\n".join(pending)})
            pending = []
        out.append(m)
    if pending:
        out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a generation: the checkpoint's ``generation_config.eos_token_id`` (an id or a list, e.g.
    Gemma-2's ``<eos>`` and ``<end_of_turn>``) and the tokenizer's eos, in that order, without repeats."""
    ids: list[int] = []
    sources = (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id)
    for source in sources:
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def encode_pieces(tokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """The token ids of each text piece as it is tokenized inside the joined text (no special tokens added).

    Concatenated they are exactly ``tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]``, which ids
    of pieces tokenized one by one are not: a SentencePiece tokenizer that prepends "▁" to every text (Llama-2,
    Mistral) tokenizes the piece "Response 1:" alone as "▁Response 1:", a word with a space before it that the
    joined text does not have. A token that straddles two pieces belongs to the piece it starts in. Uses the
    character offsets of a fast tokenizer; else tokenizes each prefix of the joined text and takes where its ids
    stop agreeing with the whole.
    """
    pieces = list(pieces)
    text = "".join(pieces)
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        owner = [bisect.bisect_right(starts, a) - 1 for a, _ in enc["offset_mapping"]]
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        owner = _owners_by_prefixes(tokenizer, pieces, ids)
    out: list[list[int]] = [[] for _ in pieces]
    current = 0
    for token, k in zip(ids, owner):
        current = max(current, k)  # offsets never move a token back into an earlier piece
        out[current].append(token)
    return out


def _owners_by_prefixes(tokenizer, pieces: list[str], ids: list[int]) -> list[int]:
    """For each id of the joined text, the piece it belongs to, from where each prefix's ids stop matching."""
    owner, prefix = [0] * len(ids), ""
    for k, piece in enumerate(pieces[:-1], start=1):
        prefix += piece
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        agree = 0
        while agree < min(len(prefix_ids), len(ids)) and prefix_ids[agree] == ids[agree]:
            agree += 1
        for t in range(agree, len(ids)):
            owner[t] = k
    return owner


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    num_samples: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    show_progress: bool = True,
    desc: str = "Generating",
    backend: str = "hf",
) -> list[list[str]]:
    """``num_samples`` completions per prompt (decoded, special tokens stripped), in the order of ``prompts``."""
    from tqdm.auto import tqdm

    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs do_sample=True (greedy decoding gives the same text every time).")
    if backend == "vllm":
        return _generate_vllm(
            model,
            tokenizer,
            prompts,
            num_samples=num_samples,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    if backend != "hf":
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [render_prompt(tokenizer, p) for p in prompts]
    eos_ids = eos_token_ids(model, tokenizer)
    jobs = sorted(((i, s) for i in range(len(prompts)) for s in range(num_samples)), key=lambda j: -len(encoded[j[0]]))
    out: list[list[str | None]] = [[None] * num_samples for _ in prompts]
    device = next(model.parameters()).device
    partitioned = is_partitioned(model)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    disable = (not show_progress) or bool(os.environ.get("TQDM_DISABLE"))
    try:
        for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=disable):
            batch = jobs[start : start + batch_size]
            width = max(len(encoded[i]) for i, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (i, _) in enumerate(batch):  # left padding: every prompt ends at the last column
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attn[r, width - len(encoded[i]) :] = 1
            # HF syncs every decoding step across processes whenever DeepSpeed ZeRO-3 is configured; a model whose
            # weights are whole (not partitioned) generates alone, e.g. on the main process in the eval hook.
            kwargs = {"do_sample": do_sample, "synced_gpus": None if partitioned else False}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
                **kwargs,
            )
            for r, (i, s) in enumerate(batch):
                out[i][s] = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "backend='vllm' needs vLLM, which treg does not install (it needs a CUDA machine): pip install vllm. "
            "Use backend='hf' otherwise."
        ) from e
    return vllm


def _generate_vllm(model, tokenizer, prompts, *, num_samples, do_sample, temperature, top_p, max_new_tokens, seed):
    vllm = _import_vllm()
    llm = vllm.LLM(model=model, seed=seed) if isinstance(model, str) else model
    params = vllm.SamplingParams(
        n=num_samples,
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        max_tokens=max_new_tokens,
        seed=seed,
        skip_special_tokens=True,
    )
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=render_prompt(tokenizer, p)) for p in prompts]
    outputs = llm.generate(inputs, params)
    return [[c.text for c in o.outputs] for o in outputs]


def generate_answers(
    model,
    tokenizer,
    instructions: list[str],
    *,
    max_new_tokens: int = 1024,
    batch_size: int = 16,
    backend: str = "hf",
    show_progress: bool = True,
    system_prompt: str | None = None,
    **sampling,
) -> list[str]:
    """One answer per instruction, each sent as a single user turn (with an optional system prompt); greedy unless
    ``do_sample=True`` is passed."""
    prompts = [
        ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": q}]
        for q in instructions
    ]
    out = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
        desc="Answering",
        backend=backend,
        **sampling,
    )
    return [o[0].strip() for o in out]


def write_alpaca_eval_outputs(
    path: str, instructions: list[str], outputs: list[str], generator: str, extra: list[dict] | None = None
) -> None:
    """AlpacaEval's ``model_outputs.json``: a list of ``{"instruction", "output", "generator"}`` (plus ``extra``
    fields per row, e.g. ``dataset``), in the order given."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs.")
    rows = [
        {**(extra[i] if extra else {}), "instruction": q, "output": o, "generator": generator}
        for i, (q, o) in enumerate(zip(instructions, outputs))
    ]
    write_text_atomic(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def write_arena_hard_answers(
    path: str, model: str, uids: list[str], questions: list[str], answers: list[str], metadata: list[dict] | None = None
) -> None:
    """Arena-Hard's ``model_answer/<model>.jsonl`` (the format of lmarena/arena-hard-auto's data): one row per
    question ``{"uid", "ans_id", "model", "messages": [user, {"role": "assistant", "content": {"answer"}}],
    "tstamp"}`` plus ``metadata`` (token and markdown counts for style control) when given."""
    if not (len(uids) == len(questions) == len(answers)):
        raise ValueError(f"{len(uids)} uids, {len(questions)} questions and {len(answers)} answers must match.")
    lines = []
    for i, (uid, q, a) in enumerate(zip(uids, questions, answers)):
        row = {
            "uid": uid,
            "ans_id": uuid.uuid4().hex,
            "model": model,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": {"answer": a}}],
            "tstamp": time.time(),
        }
        if metadata is not None:
            row["metadata"] = metadata[i]
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(path, "\n".join(lines) + "\n")
