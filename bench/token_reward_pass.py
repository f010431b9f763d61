"""Throughput of treg's token-reward pass against bare forward passes of the same model on the same sequences, and
of the packed pass (each context computed once per pair, then both responses; no padding between pairs) against
the unpacked forwards it replaces.

What the pass needs, per response (chosen or rejected) y of a prompt x:

* DPO base (T-REG / DPO-REG): 3 scored sequences, x+y (per-token reference log-probs), x⁺+y and x⁻+y (r̂);
* SimPO base (SimPO-REG): 2, x⁺+y and x⁻+y (a SimPO base needs no reference log-probs).

A (context, response) that occurs twice is scored once (treg's default x⁺ is x itself, so with real templates a DPO
base needs x+y and x⁻+y: 2 sequences per response, 4 per pair). "The limit" is the time of exactly those distinct
sequences' forwards and nothing else: the same sequences, in the same length-sorted batches, through the model
with no log-softmax, no gather, no column building:

* ``forward``  : ``model(input_ids, attention_mask)`` as a user would call it (logits at every position);
* ``needed``   : the forward the unpacked pass itself runs, ``model(..., logits_to_keep=k)`` (LM head only on the
  last k positions, k = longest completion + 1, left padding) and nothing after it;
* ``backbone`` : the transformer body alone (``model.model``, no LM head at all). No scorer reaches it;
* ``packed needed`` : the packed layout's limit, the packed pass's rows through the body and the LM head on the
  scored positions only (``packed_needed_vs_needed_forward``: what packing can gain at most over ``needed``).

The passes are :func:`treg.token_rewards.contrastive.compute_columns`, unpacked (``pack_pairs=False``: every
(context, response) its own left-padded row) and packed (``pack_pairs=True``, :func:`treg.packing.score_groups`:
one group ``[context, chosen, rejected]`` per pair and context, groups packed into rows with block-diagonal 4D
attention). Ratios are throughputs relative to the pass (time of the other / time of the pass): ``ratio_vs_*``
for the unpacked pass (target ≥ 0.9× the limit); ``packed_vs_*`` for the packed one (target on hh: ≥ 1.5× the
``needed`` unpacked forwards it replaces).

Timing on a busy machine: the pairs are cut into chunks of ``--chunk``; for each chunk the methods run back to back
(unpacked pass, packed pass, forward, needed, backbone: seconds apart), the whole round ``--repeats`` times, and each
method's time is the sum over chunks of its best time on that chunk. The clock is this process's CPU time on CPU
(``time.process_time``: time-slicing by other processes does not count; one torch thread by default) and wall time
on CUDA (after ``torch.cuda.synchronize``); ``--clock`` overrides.

Data (``--data``):

* ``random`` : a random Llama (~51.5M, untied) on random token ids, prompts 32-256 and responses 64-512 tokens, the
  x⁺/x⁻ stand-ins add 24 tokens each (x⁺ ≠ x: 6 sequences per pair).
* ``hh``     : a random ~19.5M Llama (hidden 256, 8 layers, tied head) with SmolLM2's tokenizer (treg:smollm2) on the
  first HH-RLHF harmless-base test pairs (../shared/data): real lengths, long prompts and short answers, rendered
  with SmolLM2's chat template; x⁺/x⁻ are treg's defaults (x⁺ = x). Skipped with the reason (exit 0, ``"skipped"``
  in the JSON) when the tokenizer or the file is not available.

One thread by default (a shared machine). On a GPU: ``--device cuda --dtype bfloat16`` (SDPA attention).

    python bench/token_reward_pass.py --data hh --rows 32 --repeats 3 --out hh.json   # ~6 CPU-min (20 min busy)
    python bench/token_reward_pass.py --rows 8 --repeats 2                            # random ids, ~3 min
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset

# The clock every measurement reads (--clock): wall time, or this process's CPU time (time.process_time), which a
# busy machine's time-slicing does not inflate (the work runs in this process's threads; on CUDA use wall time).
CLOCK = [time.perf_counter]


def build_model(vocab: int, hidden: int, layers: int, seed: int, tied: bool = False, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096, tie_word_embeddings=tied, attn_implementation=attn,
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


def hh_tokenizer():
    """(SmolLM2's tokenizer, None) or (None, why it is not available)."""
    from transformers import AutoTokenizer

    from treg.evaluation.data import DataNotFound, hh_rlhf_test
    from treg.models import ModelSpecError, resolve_model_spec

    try:
        hh_rlhf_test()
    except DataNotFound as e:
        return None, str(e)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_spec("treg:smollm2", show_progress=False))
    except ModelSpecError as e:
        return None, f"treg:smollm2 cannot be loaded: {str(e).splitlines()[0]}"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, None


def hh_rows(rows: int, tokenizer, max_tokens: int):
    """The first ``rows`` valid HH pairs (file order) whose x⁻ + longer response fits ``max_tokens``, tokenized like
    TRL (chat template; the response ends with its end-of-turn tokens); x⁺/x⁻ rendered as the trainer renders them."""
    from treg.data import load_preference_dataset
    from treg.evaluation.data import hh_rlhf_test
    from treg.token_rewards.contrastive import (
        DEFAULT_NEGATIVE_TEMPLATE,
        DEFAULT_POSITIVE_TEMPLATE,
        render_prompt_ids,
    )

    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    data = load_preference_dataset(hh_rlhf_test(), drop_invalid=True)
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    positive, negative = [], []
    for row in data:
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt = ids(prompt_text)
        sides = []
        for side in ("chosen", "rejected"):
            whole = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            text = whole[len(prompt_text) :] if whole.startswith(prompt_text) else row[side][0]["content"]
            sides.append(ids(text))
        neg = render_prompt_ids(tokenizer, row["prompt"], DEFAULT_NEGATIVE_TEMPLATE, prompt)
        if len(neg) + max(len(s) for s in sides) > max_tokens:
            continue
        for key, value in zip(out, (prompt, *sides)):
            out[key].append(value)
        positive.append(render_prompt_ids(tokenizer, row["prompt"], DEFAULT_POSITIVE_TEMPLATE, prompt))
        negative.append(neg)
        if len(positive) == rows:
            break
    return Dataset.from_dict(out), positive, negative


def sequences(data, contexts):
    """Every distinct (context + response) the unpacked pass scores, and the response lengths."""
    out, lens, seen = [], [], set()
    for ctx in contexts:
        for side in ("chosen_ids", "rejected_ids"):
            for c, y in zip(ctx, data[side]):
                key = (tuple(c), tuple(y))
                if key not in seen:
                    seen.add(key)
                    out.append(list(c) + list(y))
                    lens.append(len(y))
    return out, lens


def packed_groups(data, contexts) -> list:
    """Every distinct (context, [chosen, rejected]) group the packed pass computes."""
    out, seen = [], set()
    for ctx in contexts:
        for c, y_w, y_l in zip(ctx, data["chosen_ids"], data["rejected_ids"]):
            key = (tuple(c), tuple(y_w), tuple(y_l))
            if key not in seen:
                seen.add(key)
                out.append((list(c), [list(y_w), list(y_l)]))
    return out


@torch.inference_mode()
def packed_forwards(model, groups, batch_size: int) -> float:
    """Time of the packed layout's own limit: the same rows as the packed pass (:mod:`treg.packing`), through the
    transformer body, and the LM head on the scored (labelled) positions only; no log-softmax, no gather."""
    from treg import packing

    sizes = [packing.group_size(ctx, comps) for ctx, comps in groups]
    order = sorted(range(len(groups)), key=lambda g: sizes[g], reverse=True)
    forwards = getattr(packing, "_forwards", None)  # the packed pass's own grouping, where it is available
    members = list(forwards(sizes, batch_size)) if forwards else [order[i : i + batch_size]
                                                                   for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    dtype = torch.bool if model.config._attn_implementation == "sdpa" else next(model.parameters()).dtype
    start = CLOCK[0]()
    for m in members:
        batch = packing.pack_groups([groups[g] for g in m]).to(device)
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             attention_mask=batch.attention_mask(dtype), use_cache=False).last_hidden_state
        model.lm_head(hidden[batch.labels != -100])
    _sync(model)
    return CLOCK[0]() - start


@torch.inference_mode()
def bare_forwards(model, seqs, batch_size: int, mode: str, completion_lens=None) -> float:
    """Time of the forwards alone: same sequences, length-sorted batches of ``batch_size``. ``mode``: "forward"
    (right padding, all logits), "needed" (left padding, logits_to_keep), "backbone" (no LM head)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    body = model.model if mode == "backbone" else model
    start = CLOCK[0]()
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
    return CLOCK[0]() - start


def _sync(model):
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def timed_pass(model, data, positive, negative, with_reference: bool, batch_size: int, packed: bool = False):
    """(seconds, columns) of one :func:`compute_columns` call."""
    from treg.token_rewards.contrastive import compute_columns

    start = CLOCK[0]()
    columns = compute_columns(
        model, SimpleNamespace(pad_token_id=0), data, positive_ids=positive, negative_ids=negative, max_length=None,
        batch_size=batch_size, show_progress=False, with_reference=with_reference, **_pack_kwargs(packed),
    )  # fmt: skip
    _sync(model)
    return CLOCK[0]() - start, columns


def _pack_kwargs(packed: bool) -> dict:
    """``pack_pairs=...`` where compute_columns has it (None: this treg has no packed pass)."""
    import inspect

    from treg.token_rewards.contrastive import compute_columns

    if "pack_pairs" not in inspect.signature(compute_columns).parameters:
        return {}
    return {"pack_pairs": packed}


def packing_available(model) -> bool:
    if not _pack_kwargs(True):
        return False
    from treg.packing import packing_support

    return packing_support(model) is None


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a − b| over every per-token column value (the packed and unpacked passes' agreement)."""
    worst = 0.0
    for key in a:
        for x, y in zip(a[key], b[key]):
            if isinstance(x, list):
                worst = max([worst] + [abs(u - v) for u, v in zip(x, y)])
    return worst


def measure(model, data, positive, negative, with_reference: bool, contexts, args) -> dict:
    """One setting: the unpacked pass, the packed pass and the three bare-forward limits on chunks of
    ``args.chunk`` pairs, alternated chunk by chunk (ABAB: seconds apart) ``args.repeats`` times; each chunk's best
    time per method, summed over chunks."""
    seqs, lens = sequences(data, contexts)
    tokens = sum(len(s) for s in seqs)
    packed = packing_available(model)
    passes = (False, True) if packed else (False,)
    small = data.select(range(min(2, len(data))))
    for pack in passes:  # warm-up
        timed_pass(model, small, positive[:2], negative[:2], with_reference, args.batch_size, pack)
    chunks = [list(range(i, min(i + args.chunk, len(data)))) for i in range(0, len(data), args.chunk)]
    best: dict[str, list[float]] = {}
    diff = 0.0
    for repeat in range(args.repeats):
        for c, rows in enumerate(chunks):
            part, pos, neg = data.select(rows), [positive[i] for i in rows], [negative[i] for i in rows]
            times, columns = {}, {}
            for pack in passes:
                times["packed_pass" if pack else "pass"], columns[pack] = timed_pass(
                    model, part, pos, neg, with_reference, args.batch_size, pack)
            part_seqs, part_lens = sequences(part, [[ctx[i] for i in rows] for ctx in contexts])
            for mode in ("forward", "needed", "backbone"):
                times[mode] = bare_forwards(model, part_seqs, args.batch_size, mode, part_lens)
            if packed:
                part_groups = packed_groups(part, [[ctx[i] for i in rows] for ctx in contexts])
                times["packed_needed"] = packed_forwards(model, part_groups, args.batch_size)
            for key, t in times.items():
                chunk_best = best.setdefault(key, [math.inf] * len(chunks))
                chunk_best[c] = min(chunk_best[c], t)
            if packed and repeat == 0:
                diff = max(diff, max_abs_diff(columns[True], columns[False]))
    total = {k: sum(v) for k, v in best.items()}
    t_pass, t_fwd, t_need, t_body = total["pass"], total["forward"], total["needed"], total["backbone"]
    t_packed = total.get("packed_pass")
    row = {
        "forwards_per_response": len(contexts), "sequences": len(seqs), "tokens": tokens, "chunks": len(chunks),
        "pass_s": t_pass, "forward_s": t_fwd, "needed_forward_s": t_need, "backbone_s": t_body,
        "pass_tokens_per_s": tokens / t_pass, "ratio_vs_forward": t_fwd / t_pass,
        "ratio_vs_needed_forward": t_need / t_pass, "ratio_vs_backbone": t_body / t_pass,
        "packed_pass_s": t_packed, "best_s_per_chunk": best,
    }  # fmt: skip
    if t_packed is not None:
        row.update(packed_vs_needed_forward=t_need / t_packed, packed_vs_forward=t_fwd / t_packed,
                   packed_vs_unpacked_pass=t_pass / t_packed, packed_tokens_per_s=tokens / t_packed,
                   packed_max_abs_diff=diff, packed_needed_forward_s=total["packed_needed"],
                   packed_vs_packed_needed=total["packed_needed"] / t_packed,
                   packed_needed_vs_needed_forward=t_need / total["packed_needed"])  # fmt: skip
    return row


def describe(name: str, row: dict) -> str:
    text = (f"{name}: {row['sequences']} sequences, {row['tokens']} tokens\n"
            f"  unpacked pass {row['pass_s']:.2f} s ({row['pass_tokens_per_s']:.0f} tok/s) | bare forwards "
            f"{row['forward_s']:.2f} s -> ratio {row['ratio_vs_forward']:.2f} | needed forwards "
            f"{row['needed_forward_s']:.2f} s -> ratio {row['ratio_vs_needed_forward']:.2f} | backbone only "
            f"{row['backbone_s']:.2f} s -> ratio {row['ratio_vs_backbone']:.2f}")  # fmt: skip
    if row["packed_pass_s"] is None:
        return text + "\n  packed pass: not available in this treg (compute_columns has no pack_pairs)"
    target = "PASS" if row["packed_vs_needed_forward"] >= 1.5 else "MISS"
    return text + (f"\n  packed pass {row['packed_pass_s']:.2f} s: {row['packed_vs_needed_forward']:.2f}x the "
                   f"throughput of the unpacked needed forwards (target ≥1.50x {target}), "
                   f"{row['packed_vs_forward']:.2f}x the bare forwards, {row['packed_vs_unpacked_pass']:.2f}x the "
                   f"unpacked pass; max |packed − unpacked| {row['packed_max_abs_diff']:.1e}\n"
                   f"  packed needed forwards (body on the packed rows, LM head on scored positions only) "
                   f"{row['packed_needed_forward_s']:.2f} s: {row['packed_needed_vs_needed_forward']:.2f}x the "
                   f"unpacked needed forwards; the packed pass runs at {row['packed_vs_packed_needed']:.2f}x its own "
                   "limit")  # fmt: skip


def load_inputs(args):
    """(model, data, x⁺ ids, x⁻ ids, description) for ``args.data``, or a skip reason as a string."""
    dtype = getattr(torch, args.dtype)
    if args.data == "random":
        model = build_model(args.vocab, args.hidden or 512, args.layers or 6, args.seed, attn=args.attn)
        data, positive, negative = build_rows(args.rows, args.vocab, args.seed)
        return model.to(args.device, dtype), data, positive, negative, "random ids"
    tokenizer, reason = hh_tokenizer()
    if tokenizer is None:
        return reason
    model = build_model(len(tokenizer), args.hidden or 256, args.layers or 8, args.seed, tied=True, attn=args.attn)
    data, positive, negative = hh_rows(args.rows, tokenizer, args.max_tokens)
    return model.to(args.device, dtype), data, positive, negative, "HH-RLHF harmless-base, SmolLM2 tokenizer"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="random", choices=["random", "hh"])
    parser.add_argument("--rows", type=int, default=16, help="preference pairs (each has 2 responses)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=None, help="default 512 (random), 256 (hh)")
    parser.add_argument("--layers", type=int, default=None, help="default 6 (random), 8 (hh)")
    parser.add_argument("--vocab", type=int, default=32000, help="random ids only (hh: the tokenizer's)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="hh: longest x⁻ + response kept")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per chunk; the best is kept")
    parser.add_argument("--chunk", type=int, default=8, help="pairs per chunk (methods alternate chunk by chunk)")
    parser.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                        help="process CPU time (default on CPU: a busy machine's time-slicing does not count) or "
                             "wall time (default on CUDA)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (packing needs sdpa or eager)")
    parser.add_argument("--out", "--json", dest="out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and not args.device.startswith("cuda"))
    CLOCK[0] = time.process_time if cpu_clock else time.perf_counter
    loaded = load_inputs(args)
    if isinstance(loaded, str):
        print(f"skipped {args.data}: {loaded}")
        results = {"skipped": {args.data: loaded}, "ratios": {}}
    else:
        model, data, positive, negative, what = loaded
        params = sum(p.numel() for p in model.parameters())
        results = {"data": args.data, "model_params": params, "rows": len(data), "batch_size": args.batch_size,
                   "threads": args.threads, "device": args.device, "dtype": args.dtype, "attn": args.attn,
                   "clock": "process CPU time" if cpu_clock else "wall time", "chunk": args.chunk,
                   "packing": packing_available(model), "settings": {}}  # fmt: skip
        print(f"random Llama, {params / 1e6:.1f}M parameters, {len(data)} pairs ({what}), batch {args.batch_size}, "
              f"{args.threads} thread(s), {args.device} {args.dtype}")  # fmt: skip
        for name, with_reference, contexts in (
            ("DPO base: x, x+, x- (3 forwards/response)", True, [data["prompt_ids"], positive, negative]),
            ("SimPO base: x+, x- (2 forwards/response)", False, [positive, negative]),
        ):
            row = measure(model, data, positive, negative, with_reference, contexts, args)
            results["settings"][name] = row
            print(describe(name, row), flush=True)
        dpo, simpo = results["settings"].values()
        results["ratios"] = {args.data: {
            "packed pass/unpacked forwards": dpo.get("packed_vs_needed_forward"),
            "packed pass/unpacked pass": dpo.get("packed_vs_unpacked_pass"),
            "simpo packed pass/unpacked forwards": simpo.get("packed_vs_needed_forward"),
            "unpacked pass/unpacked forwards": dpo["ratio_vs_needed_forward"],
            "packed max abs diff": dpo.get("packed_max_abs_diff"),
            "packed limit/unpacked forwards": dpo.get("packed_needed_vs_needed_forward"),
        }}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
