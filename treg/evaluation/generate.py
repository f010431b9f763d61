"""Generate answers to prompts from a causal LM (HF backend): batched, left-padded, through the chat template.

    >>> texts = generate(model, tokenizer, [[{"role": "user", "content": "sort: 3 1 2"}]], num_samples=2,
    ...                  do_sample=True, max_new_tokens=16)
    >>> len(texts), len(texts[0])
    (1, 2)

Prompts are lists of chat messages (rendered with ``add_generation_prompt``) or plain strings (tokenized as is).
Sampling is reproducible: the same seed, prompts and batch size give the same texts.
"""

from __future__ import annotations

import os

import torch


def render_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    out = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


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
) -> list[list[str]]:
    """``num_samples`` completions per prompt (decoded, special tokens stripped), in the order of ``prompts``."""
    from tqdm.auto import tqdm

    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs do_sample=True (greedy decoding gives the same text every time).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [render_prompt(tokenizer, p) for p in prompts]
    jobs = sorted(
        ((i, s) for i in range(len(prompts)) for s in range(num_samples)), key=lambda j: -len(encoded[j[0]])
    )
    out: list[list[str | None]] = [[None] * num_samples for _ in prompts]
    device = next(model.parameters()).device
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
            kwargs = {"do_sample": do_sample}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            for r, (i, s) in enumerate(batch):
                out[i][s] = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
