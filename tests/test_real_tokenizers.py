"""Every command on real tokenizers and chat templates (issue 13 §3).

For each of Llama-3.1-8B-Instruct, Gemma-2-9b-it and Qwen2.5-Instruct, the tokenizer files in
``../shared/tokenizers`` are paired with a tiny random model of the matching architecture (hidden 64, 2 layers, the
tokenizer's vocabulary, the right bos/eos/pad ids), saved with those files and the checkpoint's
``generation_config.json`` (its eos list) into a session folder, as the README there says. The weights are random, so
numbers mean nothing; chat templates, special tokens, BOS handling, eos lists and label-token lookup are the real
ones. On each: ``treg rewards`` with an alignment check, ``treg train`` (DPO and SimPO recipes, toy and HH-RLHF rows),
``treg label``, ``treg pairs``, both ``treg eval`` benchmarks with the model as its own judge, ``treg rl`` and
``treg viz``, in process (``treg.cli.main``).

Skipped, saying so, when the shared folder (``../shared`` next to the repository, else ``/work/shared``) is absent.

Speed: ``datasets`` hashes every ``map`` call's arguments for its cache fingerprint, and TRL passes the tokenizer to
``map``: dill-pickling a 128k-256k vocabulary costs 5-15 s a call on a busy CPU. This module replaces that hash with
a random fingerprint (``datasets`` does the same when hashing fails): a ``map`` result of these few rows is then not
reused from the ``datasets`` cache, and treg's own caches key on token ids, not on fingerprints. The whole module
takes about 4-5 minutes on 2 busy CPU cores (Gemma's 256k vocabulary is most of it).
"""

from __future__ import annotations

import gzip
import html
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if (p / "tokenizers").is_dir()), None)
HH = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz" if SHARED else None
pytestmark = pytest.mark.skipif(
    HH is None or not HH.is_file(),
    reason="the shared folder with real tokenizers and HH-RLHF data (../shared next to the repository, or "
    "/work/shared) is absent",
)
FAMILIES = ("llama-3.1-8b-instruct", "gemma-2-9b-it", "qwen2.5-instruct")
MAX_LENGTH = 128
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)


def model_config(family: str):
    """The architecture the shared README pairs with each tokenizer, at test size."""
    if family.startswith("llama"):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                           rope_theta=500000.0, tie_word_embeddings=False, **SIZE)
    if family.startswith("gemma"):
        from transformers import Gemma2Config

        return Gemma2Config(vocab_size=256000, bos_token_id=2, eos_token_id=1, pad_token_id=0, head_dim=16,
                            query_pre_attn_scalar=16, tie_word_embeddings=True, sliding_window=64, **SIZE)
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True, **SIZE)


def build_tiny_real_model(family: str, out: Path) -> Path:
    """A random model of ``family``'s architecture saved with the family's tokenizer files and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    source = SHARED / "tokenizers" / family
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(family))
    model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(out)
    for f in source.iterdir():
        if f.name != "generation_config.json":
            shutil.copy(f, out / f.name)
    return out


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def random_fingerprints():
    """See the module docstring: skip hashing the big tokenizer on every ``datasets.map``."""
    import datasets.arrow_dataset
    import datasets.fingerprint

    def random_fingerprint(*args, **kwargs):
        return datasets.fingerprint.generate_random_fingerprint()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.fingerprint, "update_fingerprint", random_fingerprint)
        mp.setattr(datasets.arrow_dataset, "update_fingerprint", random_fingerprint)
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real-tokenizers")


@pytest.fixture(scope="module")
def data(work):
    """Data files: 16 short HH-RLHF rows and an invalid one (an empty answer, dropped), conversational rows whose
    responses start with whitespace, plain-string rows, prompts for `treg pairs`, and an eval data root."""
    from test_eval_e2e import write_data_root

    with gzip.open(HH, "rt") as f:
        raw = [json.loads(line) for line in f]
    short = [r for r in raw if len(r["chosen"]) < 200 and len(r["rejected"]) < 200][:16]
    short.append(next(r for r in raw if r["chosen"].endswith("Assistant: ")))  # row 86, dropped
    def turn(role, content):
        return {"role": role, "content": content}

    edge = [  # Qwen merges the generation prompt's "\n" with a response starting with "\n" (issue 13, D7)
        {"prompt": [turn("user", "Say hello.")], "chosen": [turn("assistant", "\nHello!")],
         "rejected": [turn("assistant", " Go away.")]},
        {"prompt": [turn("user", "Hi"), turn("assistant", "Hello. How can I help?"), turn("user", "Name a colour.")],
         "chosen": [turn("assistant", "  Blue.")], "rejected": [turn("assistant", "No.")]},
    ]
    plain = [  # standard format: TRL joins prompt and response as they are (D8)
        {"prompt": "Question: what is two plus two?\n", "chosen": "Four, since two and two make four.",
         "rejected": "Five."},
        {"prompt": "Name a colour.\nAnswer:", "chosen": " Blue is a colour.", "rejected": " A car."},
    ]
    prompts = [
        {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}]},
        {"prompt": "Is it possible to download a car?"},
    ]
    files = {}
    for name, rows in (("hh", short), ("edge", edge), ("plain", plain), ("prompts", prompts)):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["eval"] = Path(write_data_root(str(work / "eval-data"), n=2))
    return files


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, work):
    """(name, model folder, tokenizer) of one family; the model is built once per module."""
    from transformers import AutoTokenizer

    path = build_tiny_real_model(request.param, work / request.param)
    return request.param, path, AutoTokenizer.from_pretrained(path)


def run(argv: list[str]) -> None:
    from treg.cli import main

    assert main(argv) == 0, argv


def train_args(model: Path, recipe: str, out: Path, dataset: Path | None, cache: Path) -> list[str]:
    """A tiny recipe with the real model: a few rows, short sequences, no eval, the module's token-reward cache."""
    args = ["--config", str(ROOT / "recipes" / "tiny" / f"{recipe}.yaml"), "--model_name_or_path", str(model),
            "--output_dir", str(out), "--max_length", str(MAX_LENGTH), "--per_device_train_batch_size", "1",
            "--eval_strategy", "no", "--dataset_test_split", "", "--logging_steps", "1", "--disable_tqdm", "true",
            "--token_reward_cache_dir", str(cache), "--token_reward_batch_size", "8"]
    if dataset is None:
        return [*args, "--toy_num_pairs", "4"]
    return [*args, "--dataset_name", str(dataset), "--drop_invalid_rows", "true"]


# ----------------------------------------------------------------------------------------------- alignment
def trl_split(tok, prompt, chosen, rejected):
    """(prompt ids, chosen ids, rejected ids) as TRL 1.16's DPOTrainer tokenizes a row, computed independently."""
    from trl.data_utils import common_prefix_length

    if isinstance(prompt, str):
        chosen, rejected = (t if t.endswith(tok.eos_token) else t + tok.eos_token for t in (chosen, rejected))

        def enc(text, **_):
            return list(tok(text=text)["input_ids"])
    else:
        def enc(messages, **kw):
            return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])
    x, xc, xr = enc(prompt, add_generation_prompt=True), enc(prompt + chosen), enc(prompt + rejected)
    n = min(common_prefix_length(x, xc), common_prefix_length(x, xr))
    return x[:n], xc[n:], xr[n:]


def joined_ids(tok, prompt, template: str, response):
    """The ids of x⁺ (``template`` around the prompt) followed by the response, tokenized as one text, as TRL
    tokenizes x followed by the response."""
    if isinstance(prompt, str):
        body = prompt.rstrip()
        text = template.format(prompt=body) + prompt[len(body):] + response
        return list(tok(text=text)["input_ids"])
    messages = [dict(m) for m in prompt]
    messages[-1]["content"] = template.format(prompt=messages[-1]["content"])
    return list(tok.apply_chat_template(messages + response, tokenize=True, return_dict=True)["input_ids"])


def check_alignment(tok, dataset, items) -> None:
    """Every per-token value sits on a completion token TRL trains on; the pass scored exactly those tokens after x,
    x⁺ and x⁻, which each carry one BOS (none where the template has none: Qwen), and x⁺/x⁻ followed by the
    response are the tokens of the joined text."""
    from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE  # recipes/tiny/treg-dpo.yaml's x⁺/x⁻
    from treg.token_rewards import CHOSEN_REWARDS, REF_CHOSEN, REF_REJECTED, REJECTED_REWARDS, kept_completion_length

    bos = tok.bos_token_id if tok.bos_token else None
    for r, row in enumerate(dataset):
        prompt_ids, chosen_ids, rejected_ids = trl_split(tok, row["prompt"], row["chosen"], row["rejected"])
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (prompt_ids, chosen_ids, rejected_ids)
        n_bos = prompt_ids.count(bos) if bos is not None else 0
        assert n_bos == (0 if bos is None else 1), r
        for side, ids, cols in (("chosen", chosen_ids, (CHOSEN_REWARDS, REF_CHOSEN)),
                                ("rejected", rejected_ids, (REJECTED_REWARDS, REF_REJECTED))):
            kept = ids[: kept_completion_length(len(prompt_ids), len(ids), MAX_LENGTH)]
            for col in cols:
                assert len(row[col]) == len(kept), (r, col)
            contexts = [list(c) for c, y in items if list(y) == kept]
            assert prompt_ids in contexts and len(contexts) >= 3, (r, side)
            response = row[side]
            if isinstance(response, str) and not response.endswith(tok.eos_token):
                response += tok.eos_token  # TRL's add_eos for plain strings
            for template in (POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE):
                full = joined_ids(tok, row["prompt"], template, response)
                matches = [c for c in contexts if c != prompt_ids and full[: len(c) + len(kept)] == c + kept]
                assert matches, (r, side, template, tok.decode(full))
                assert all((c.count(bos) if bos is not None else 0) == n_bos for c in matches), (r, side)


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("rows", ["hh", "edge", "plain"])
def test_rewards_sit_on_the_tokens_trl_trains_on(family, data, work, monkeypatch, rows):
    import datasets

    import treg.token_rewards.contrastive as contrastive

    name, model, tok = family
    items = []
    real = contrastive.score_completions

    def spy(model_, batch, *args, **kwargs):
        items.extend(batch)
        return real(model_, batch, *args, **kwargs)

    real_groups = contrastive.score_groups

    def group_spy(model_, groups, *args, **kwargs):  # the packed pass (treg.packing): each group is its items
        items.extend((ctx, completion) for ctx, completions in groups for completion in completions)
        return real_groups(model_, groups, *args, **kwargs)

    monkeypatch.setattr(contrastive, "score_completions", spy)
    monkeypatch.setattr(contrastive, "score_groups", group_spy)
    out = work / f"{name}-rewards-{rows}"
    run(["rewards", *train_args(model, "treg-dpo", out, data[rows], work / "cache")])
    dataset = datasets.load_from_disk(str(out / "token_rewards"))
    assert len(dataset) == {"hh": 16, "edge": 2, "plain": 2}[rows]
    check_alignment(tok, dataset, items)


@pytest.mark.parametrize("recipe", ["treg-dpo", "treg-simpo"])
@pytest.mark.parametrize("rows", ["toy", "hh"])
def test_train(family, data, work, recipe, rows):
    """Two steps of one pair each. DPO on the HH rows reuses the token-reward pass `treg rewards` cached above;
    SimPO (a pass without reference log-probs, so its own entry) reads the first 4 HH rows."""
    name, model, _ = family
    out = work / f"{name}-{recipe}-{rows}"
    extra = ["--max_train_rows", "4"] if (recipe, rows) == ("treg-simpo", "hh") else []
    run(["train", *train_args(model, recipe, out, None if rows == "toy" else data["hh"], work / "cache"),
         "--max_steps", "2", *extra])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_label_with_chain_of_thought(family, data, work):
    name, model, _ = family
    out = work / f"{name}-label"
    run(["label", "--model_name_or_path", str(model), "--dataset", str(data["hh"]), "--max_rows", "2",
         "--chain_of_thought", "true", "--max_rationale_tokens", "4", "--output_dir", str(out),
         "--output_format", "jsonl", "--batch_size", "4"])
    report = json.loads((out / "report.json").read_text())
    assert report["n_pairs"] == 2 and 0 <= report["human_alignment"] <= 1
    rows = [json.loads(line) for line in (out / "labeled.jsonl").read_text().splitlines()]
    assert all(0 < r["ai_preference"] < 1 and isinstance(r["ai_rationale_a"], str) for r in rows)


def test_pairs(family, data, work, capsys):
    name, model, _ = family
    out = work / f"{name}-pairs"
    run(["pairs", "--model", str(model), "--prompts", str(data["prompts"]), "--scorer", f"direct:{model}",
         "--num-samples", "2", "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 2 and stats["pairs"] + stats["dropped_ties"] + stats["dropped_empty"] == 2


@pytest.mark.parametrize("bench", ["alpaca-eval", "arena-hard"])
def test_eval_with_the_model_as_its_own_judge(family, data, work, monkeypatch, bench):
    name, model, _ = family
    monkeypatch.setenv("TREG_EVAL_DATA", str(data["eval"]))
    out = work / f"{name}-{bench}"
    extra = ["--rounds", "5"] if bench == "arena-hard" else []
    run(["eval", bench, "--model", str(model), "--judge", str(model), "--max-instances", "2", "--out", str(out),
         "--max-new-tokens", "4", "--quiet", *extra])
    results = json.loads((out / "results.json").read_text())
    assert results["judge_stats"]["judged"] + results["judge_stats"]["cached"] == 4  # 2 questions, both orders


@pytest.mark.parametrize("recipe", ["rl-direct", "rl-relc"])
def test_rl(family, work, recipe):
    """rl-direct with the model as its own judge; rl-relc with the model as the RELC critic (it writes span labels
    through its chat template and generation stops at its eos list)."""
    name, model, _ = family
    if recipe == "rl-direct":
        swap = ["--reward_funcs", f"direct:{model}"]
    else:
        swap = ["--critic_model", str(model), "--critic_max_new_tokens", "8"]
    run(["rl", "--config", str(ROOT / "recipes" / "tiny" / f"{recipe}.yaml"), "--model_name_or_path", str(model),
         *swap, "--max_steps", "1", "--output_dir", str(work / f"{name}-{recipe}"), "--toy_num_prompts", "4",
         "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "4",
         "--disable_tqdm", "true"])


def test_viz(family, data, work):
    name, model, _ = family
    out = work / f"{name}-viz.html"
    run(["viz", "--checkpoint", str(model), "--ref-model", str(model), "--dataset", str(data["hh"]), "--rows", "0",
         "1", "--side", "both", "--max-length", str(MAX_LENGTH), "--out", str(out)])
    cells = [html.unescape(t) for t in re.findall(r'<span class="cell"[^>]*>(.*?)</span>', out.read_text())]
    assert cells and sum(t.startswith("·") for t in cells) > len(cells) // 10  # word spaces shown as "·" (D11)
