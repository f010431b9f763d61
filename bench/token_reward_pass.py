"""Throughput of treg's token-reward pass against bare forward passes of the same model on the same sequences.

What the pass needs, per response (chosen or rejected) y of a prompt x:

* DPO base (T-REG / DPO-REG): 3 scored sequences, x+y (per-token reference log-probs), x⁺+y and x⁻+y (r̂);
* SimPO base (SimPO-REG): 2, x⁺+y and x⁻+y (a SimPO base needs no reference log-probs).

"The limit" is the time of exactly those forwards and nothing else: the same sequences, in the same length-sorted
batches, through the model with no log-softmax, no gather, no column building. Two limits are reported:

* ``forward``  : ``model(input_ids, attention_mask)`` as a user would call it (logits at every position): the
  issue's limit, "a bare forward pass of the same model" per scored sequence;
* ``needed``   : the forward the pass itself needs, ``model(..., logits_to_keep=k)`` (LM head only on the last k
  positions, k = longest completion + 1, left padding) and nothing after it: what remains is the pass's overhead;
* ``backbone`` : the transformer body alone (``model.model``, no LM head at all). No scorer reaches it: reading
  log-probs of completion tokens needs the LM head at those positions.

ratio = limit time / pass time (1.0 = the pass costs no more than its bare forwards). The issue's target is ≥ 0.9×
the limit. The pass is :func:`treg.token_rewards.contrastive.compute_columns` (all contexts of a batch of rows in
one length-sorted scoring call, left padding, LM head only on completion positions via ``logits_to_keep``).

The model is a randomly initialised Llama of ~30M parameters (bigger than the tests' 0.37M tiny model, so that the
forwards dominate as they do for real models; CPU-only here), token ids are random, prompts 32-256 and responses
64-512 tokens, the x⁺/x⁻ templates add 24 tokens. One thread by default (a shared machine).

    python bench/token_reward_pass.py                       # ~2-4 min on one CPU core
    python bench/token_reward_pass.py --rows 8 --repeats 1  # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import time
from types import SimpleNamespace

import torch
from datasets import Dataset


def build_model(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def build_rows(rows: int, vocab: int, seed: int):
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    prompts = [ids(32, 256) for _ in range(rows)]
    data = Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": [ids(64, 512) for _ in range(rows)],
                              "rejected_ids": [ids(64, 512) for _ in range(rows)]})  # fmt: skip
    wrap = [ids(24, 24) for _ in range(2)]  # stand-ins for the rendered x⁺ / x⁻ instructions
    positive = [p + wrap[0] for p in prompts]
    negative = [p + wrap[1] for p in prompts]
    return data, positive, negative


def sequences(data, contexts):
    """Every (context + response) the pass scores, and the response lengths, for per-row context id lists."""
    out, lens = [], []
    for ctx in contexts:
        for side in ("chosen_ids", "rejected_ids"):
            out += [list(c) + list(y) for c, y in zip(ctx, data[side])]
            lens += [len(y) for y in data[side]]
    return out, lens


@torch.inference_mode()
def bare_forwards(model, seqs, batch_size: int, mode: str, completion_lens=None) -> float:
    """Time of the forwards alone: same sequences, length-sorted batches of ``batch_size``. ``mode``: "forward"
    (right padding, all logits), "needed" (left padding, logits_to_keep), "backbone" (no LM head)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    body = model.model if mode == "backbone" else model
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = [seqs[i] for i in idx]
        width = max(len(s) for s in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(batch):
            where = slice(width - len(s), width) if mode == "needed" else slice(0, len(s))
            input_ids[r, where] = torch.tensor(s)
            mask[r, where] = 1
        device = next(model.parameters()).device
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
        if mode == "needed":
            kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            kwargs["logits_to_keep"] = max(completion_lens[i] for i in idx) + 1
        body(**kwargs)
    _sync(model)
    return time.perf_counter() - start


def _sync(model):
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def timed_pass(model, data, positive, negative, with_reference: bool, batch_size: int) -> float:
    from treg.token_rewards.contrastive import compute_columns

    start = time.perf_counter()
    compute_columns(
        model, SimpleNamespace(pad_token_id=0), data, positive_ids=positive, negative_ids=negative, max_length=None,
        batch_size=batch_size, show_progress=False, with_reference=with_reference,
    )  # fmt: skip
    _sync(model)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="preference pairs (each has 2 responses)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2, help="measurements per setting; the best is kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.vocab, args.hidden, args.layers, args.seed).to(args.device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    data, positive, negative = build_rows(args.rows, args.vocab, args.seed)
    results = {"model_params": params, "rows": args.rows, "batch_size": args.batch_size, "threads": args.threads,
               "device": args.device, "dtype": args.dtype, "settings": {}}  # fmt: skip
    print(f"random Llama, {params / 1e6:.1f}M parameters, {args.rows} pairs, batch {args.batch_size}, "
          f"{args.threads} thread(s)")  # fmt: skip
    for name, with_reference, contexts in (
        ("DPO base: x, x+, x- (3 forwards/response)", True, [data["prompt_ids"], positive, negative]),
        ("SimPO base: x+, x- (2 forwards/response)", False, [positive, negative]),
    ):
        seqs, lens = sequences(data, contexts)
        tokens = sum(len(s) for s in seqs)
        timed_pass(model, data.select(range(2)), positive[:2], negative[:2], with_reference, args.batch_size)  # warm-up
        t_pass = min(timed_pass(model, data, positive, negative, with_reference, args.batch_size)
                     for _ in range(args.repeats))  # fmt: skip
        t_fwd, t_need, t_body = (
            min(bare_forwards(model, seqs, args.batch_size, mode, lens) for _ in range(args.repeats))
            for mode in ("forward", "needed", "backbone")
        )
        row = {
            "forwards_per_response": len(contexts), "sequences": len(seqs), "tokens": tokens,
            "pass_s": t_pass, "forward_s": t_fwd, "needed_forward_s": t_need, "backbone_s": t_body,
            "pass_tokens_per_s": tokens / t_pass, "ratio_vs_forward": t_fwd / t_pass,
            "ratio_vs_needed_forward": t_need / t_pass, "ratio_vs_backbone": t_body / t_pass,
        }  # fmt: skip
        results["settings"][name] = row
        print(f"{name}: {len(seqs)} sequences, {tokens} tokens")
        print(f"  pass {t_pass:.2f} s ({tokens / t_pass:.0f} tok/s) | bare forwards {t_fwd:.2f} s -> ratio "
              f"{t_fwd / t_pass:.2f} | needed forwards {t_need:.2f} s -> ratio {t_need / t_pass:.2f} | "
              f"backbone only {t_body:.2f} s -> ratio {t_body / t_pass:.2f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
