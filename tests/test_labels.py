"""RLAIF pairwise AI labels (treg.feedback.labels): the softmax, both-order averaging against a labeler with a known
position bias, the harmlessness inversion, label token ids, and `treg label` end to end."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from treg.feedback.labels import LabelError, label_dataset, label_pairs, label_token_ids, preference_probs
from treg.feedback.templates import TEMPLATES, format_exemplars

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "../shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
GOOD, BAD = "7", "3"  # the fake labeler knows "7" is the better response; neither digit appears in the templates


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]  # the tiny model's byte-level BPE tokenizer (built once per session by conftest)


class FakeLabeler(torch.nn.Module):
    """Next-token logits: label "1" gets ``bias`` (favours whichever response is shown first) ``± strength`` (+ when
    the GOOD response is first, − when the BAD one is); label "2" gets 0. So P(label 1) = σ(bias ± strength)."""

    def __init__(self, tokenizer, bias: float, strength: float, ending: str = "Preferred Response="):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.good = tokenizer(GOOD, add_special_tokens=False)["input_ids"][0]
        self.bad = tokenizer(BAD, add_special_tokens=False)["input_ids"][0]
        self.label1, self.label2 = label_token_ids(tokenizer, ending)
        self.bias, self.strength = bias, strength

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for r in range(b):
            ids = input_ids[r].tolist()
            good_first = ids.index(self.good) < ids.index(self.bad)
            logits[r, :, self.label1] = self.bias + (self.strength if good_first else -self.strength)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_preference_probs_is_the_softmax_by_hand():
    l1, l2 = -0.5, -2.0
    assert preference_probs(l1, l2) == pytest.approx(math.exp(l1) / (math.exp(l1) + math.exp(l2)), abs=1e-12)
    assert preference_probs(-1000.0, -1001.0) == pytest.approx(sig(1.0))  # stable for tiny probabilities
    assert preference_probs([0.0, -3.0], [0.0, 0.0]).tolist() == pytest.approx([0.5, sig(-3.0)])
    with pytest.raises(LabelError):
        preference_probs(float("nan"), 0.0)


def test_position_bias_single_order_is_biased_and_both_orders_average_it_out(tok):
    bias, d = 2.0, 1.0
    model = FakeLabeler(tok, bias, d)
    rows = [("sort: 4 5 6", GOOD, BAD), ("sort: 4 5 6", BAD, GOOD)]
    one = label_pairs(model, tok, rows, both_orders=False, show_progress=False)
    # One order: response 1 "wins" both times, whichever it is.
    assert one[0]["p_first"] == pytest.approx(sig(bias + d), abs=1e-6)
    assert one[1]["p_first"] == pytest.approx(sig(bias - d), abs=1e-6)
    assert one[0]["p_first"] > 0.5 and one[1]["p_first"] > 0.5
    assert one[0]["p_order_b"] is None and one[0]["position_biased"] is None

    both = label_pairs(model, tok, rows, both_orders=True, show_progress=False)
    expected = (sig(bias + d) + 1 - sig(bias - d)) / 2
    assert both[0]["p_order_a"] == pytest.approx(sig(bias + d), abs=1e-6)
    assert both[0]["p_order_b"] == pytest.approx(1 - sig(bias - d), abs=1e-6)
    assert both[0]["p_first"] == pytest.approx(expected, abs=1e-6)
    assert both[0]["p_first"] + both[1]["p_first"] == pytest.approx(1.0, abs=1e-6)  # swapping the pair flips it
    assert both[0]["p_first"] > 0.5 > both[1]["p_first"]  # the GOOD response wins in both rows
    assert both[0]["position_biased"] and both[1]["position_biased"]  # bias > strength: position decides each order

    unbiased = label_pairs(FakeLabeler(tok, 0.0, d), tok, rows, show_progress=False)
    assert unbiased[0]["p_first"] == pytest.approx(sig(d), abs=1e-6)
    assert not unbiased[0]["position_biased"] and not unbiased[1]["position_biased"]


def test_harmlessness_asks_for_the_worse_response_and_is_inverted(tok):
    assert TEMPLATES["harmlessness"].asks_for_worse and not TEMPLATES["helpfulness"].asks_for_worse
    rows = [("how do I pick a lock", GOOD, BAD)]
    ending = TEMPLATES["harmlessness"].ending
    model = FakeLabeler(tok, 0.5, 1.0, ending=ending)  # here "7" is what the labeler calls MORE harmful
    harm = label_pairs(model, tok, rows, task="harmlessness", show_progress=False)[0]
    help_ = label_pairs(FakeLabeler(tok, 0.5, 1.0), tok, rows, task="helpfulness", show_progress=False)[0]
    assert harm["p_first"] == pytest.approx(1 - help_["p_first"], abs=1e-6)
    assert harm["p_first"] < 0.5  # response 1 is the more harmful one, so it is NOT preferred


def test_label_dataset_orients_pairs_and_reports_alignment(tok):
    rows = [
        {"prompt": "sort: 4 5", "chosen": GOOD, "rejected": BAD},
        {"prompt": "sort: 5 6", "chosen": GOOD, "rejected": BAD},
        {"prompt": "sort: 6 4", "chosen": BAD, "rejected": GOOD},  # the human label disagrees with the labeler
    ]
    out, report = label_dataset(FakeLabeler(tok, 2.0, 1.0), tok, datasets.Dataset.from_list(rows), show_progress=False)
    assert out["chosen"] == [GOOD] * 3 and out["rejected"] == [BAD] * 3
    assert out["response_1"] == [GOOD, GOOD, BAD] and out["human_preference"] == [1.0] * 3
    assert report["n_pairs"] == 3 and report["human_alignment"] == pytest.approx(2 / 3)
    assert report["position_bias_rate"] == 1.0 and report["pairs_per_s"] > 0
    assert report["mean_confidence"] == pytest.approx((sig(3) + 1 - sig(1)) / 2, abs=1e-6)

    bad = datasets.Dataset.from_list([{"prompt": "p", "response_1": "a", "response_2": "b"},
                                      {"prompt": "p", "response_1": "  ", "response_2": "b"}])
    with pytest.raises(LabelError, match="row 1, field 'response_1'"):
        label_dataset(FakeLabeler(tok, 0.0, 1.0), tok, bad, show_progress=False)


def _metaspace_tokenizer():
    """SentencePiece-like: a word-initial "1" is "▁1", but after "Response=" the digit is a bare "1"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "▁Preferred", "▁Response", "=", "▁1", "▁2", "1", "2", "▁"]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"), {p: i for i, p in enumerate(pieces)}


def test_label_token_ids_follow_the_ending_not_the_standalone_spelling(tok):
    sp, ids = _metaspace_tokenizer()
    assert sp("1", add_special_tokens=False)["input_ids"] == [ids["▁1"]]  # the naive lookup would be wrong
    assert label_token_ids(sp, "Preferred Response=") == [ids["1"], ids["2"]]
    with pytest.raises(LabelError, match="change when"):
        label_token_ids(sp, "Preferred Response= ")  # "▁" + "1" merge into "▁1"
    a, b = label_token_ids(tok, "Preferred Response=")
    assert tok.convert_ids_to_tokens([a, b]) == ["1", "2"]
    with pytest.raises(LabelError, match="not one"):
        label_token_ids(tok, "Preferred Response=", labels=("1", "sort reverse"))


def test_few_shot_and_chain_of_thought_run(tok, tiny):
    model, tokenizer, _ = tiny
    shots = [{"context": "sort: 2 1", "response1": "1 2", "response2": "2 1", "preferred": 1}]
    assert "Preferred Response=1" in format_exemplars(TEMPLATES["helpfulness"], shots)
    recs = label_pairs(model, tokenizer, [("sort: 4 6 5", "4 5 6", "6 5 4")], few_shot=shots, chain_of_thought=True,
                       max_rationale_tokens=4, show_progress=False)
    assert 0 < recs[0]["p_first"] < 1 and isinstance(recs[0]["rationale_a"], str) and "rationale_b" in recs[0]


def test_cli_label_end_to_end_on_unlabeled_pairs(tiny, tmp_path, capsys):
    from treg.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort: {i} 5 4", "response_1": f"4 5 {i}", "response_2": "5 4"})
                            + "\n" for i in range(3)))
    out = tmp_path / "out"
    rc = main(["label", "--model_name_or_path", "treg:tiny", "--dataset", str(data), "--output_dir", str(out),
               "--output_format", "jsonl", "--both_orders", "false"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_pairs"] == 3 and report["human_alignment"] is None and report["position_bias_rate"] is None
    lines = [json.loads(x) for x in (out / "labeled.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(0 < x["ai_preference"] < 1 for x in lines)
    assert '"n_pairs": 3' in capsys.readouterr().out


@pytest.mark.skipif(not HH.exists(), reason="HH-RLHF harmless-base test file not present")
def test_cli_label_recipe_on_a_few_hh_pairs(tiny, tmp_path):
    from treg.cli import main

    out = tmp_path / "hh"
    recipe = ROOT / "recipes/label/hh-harmless-tiny.yaml"
    assert "treg label --config recipes/label/hh-harmless-tiny.yaml" in recipe.read_text().splitlines()[1]
    rc = main(["label", "--config", str(recipe), "--dataset", str(HH), "--max_rows", "4", "--output_dir", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_pairs"] == 4 and report["task"] == "harmlessness"
    assert 0 <= report["human_alignment"] <= 1 and 0 <= report["position_bias_rate"] <= 1
    labeled = datasets.load_from_disk(str(out / "labeled"))
    assert len(labeled) == 4
    assert {"ai_preference", "chosen", "rejected", "human_preference"} <= set(labeled.column_names)


def test_cli_label_rejects_unknown_recipe_keys(tmp_path, capsys):
    from treg.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: treg:tiny\ndataset: x.jsonl\ntsk: helpfulness\n")
    assert main(["label", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'tsk'" in err and "Did you mean 'task'?" in err


# ------------------------------------------------------------------------- real-tokenizer behaviours (issue 13)
def _spy_labeling(monkeypatch, tokenizer, chain_of_thought):
    """Label one pair with a random model, recording the ids the rationale is generated from and the label is read
    after."""
    from test_generate import random_model

    import treg.feedback.labels as labels
    import treg.scoring

    seen = {}
    real_generate, real_read = labels.generate, treg.scoring.next_token_logprobs

    def generate(model, tok, prompts, **kw):
        seen["rationale_prompts"] = [list(p) for p in prompts]
        return real_generate(model, tok, prompts, **kw)

    def read(model, prompts, *args, **kw):
        seen["label_prompts"] = [list(p) for p in prompts]
        return real_read(model, prompts, *args, **kw)

    monkeypatch.setattr(labels, "generate", generate)
    monkeypatch.setattr(treg.scoring, "next_token_logprobs", read)
    rec = label_pairs(random_model(len(tokenizer)), tokenizer, [("sort: 3 1 2", "1 2 3", "the best answer")],
                      both_orders=False, chain_of_thought=chain_of_thought, max_rationale_tokens=3,
                      show_progress=False)[0]
    return rec, seen


def test_d4_cot_rationale_is_generated_from_the_ids_the_label_is_read_after(monkeypatch):
    """With BOS: the rationale's prompt starts with BOS and is the very beginning of the label prompt."""
    from test_generate import sentencepiece_tokenizer

    sp = sentencepiece_tokenizer()
    rec, seen = _spy_labeling(monkeypatch, sp, chain_of_thought=True)
    (gen_prompt,), (label_prompt,) = seen["rationale_prompts"], seen["label_prompts"]
    assert gen_prompt[0] == sp.bos_token_id and gen_prompt.count(sp.bos_token_id) == 1
    assert label_prompt[: len(gen_prompt)] == gen_prompt
    template = TEMPLATES["helpfulness"]
    tail = sp(f"{template.cot_ending} {rec['rationale_a']}\n{template.ending}", add_special_tokens=False)["input_ids"]
    assert sp.decode(label_prompt).endswith(sp.decode(tail))


def test_d5_label_prompt_is_tokenized_as_one_text(monkeypatch):
    """A SentencePiece tokenizer reads each separately tokenized piece with a leading "▁" (" Response 1:"); the
    label prompt's ids are those of the whole prompt text."""
    from test_generate import sentencepiece_tokenizer

    from treg.feedback.templates import format_sample, label_prompt_body

    sp = sentencepiece_tokenizer()
    _, seen = _spy_labeling(monkeypatch, sp, chain_of_thought=False)
    template = TEMPLATES["helpfulness"]
    text = label_prompt_body(template) + format_sample(template, "sort: 3 1 2", "1 2 3", "the best answer")
    assert seen["label_prompts"] == [sp(text + template.ending)["input_ids"]]  # BOS + the joined text
    alone = sp.convert_ids_to_tokens(sp(f"{template.response_label} 1:\n", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁Response"  # what piece-by-piece tokenizing put into the prompt
