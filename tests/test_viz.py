"""Token heatmaps (`treg.viz`, `treg viz`): the HTML and PNG renderers, the values computed from a checkpoint and
its reference on the tiny model, and the command's errors."""

import copy
import html
import json
import re

import numpy as np
import pytest
import torch

from treg.cli import main
from treg.scoring import score_completions
from treg.synthetic import make_pairs, word_flags_to_token_flags
from treg.token_rewards import REF_REJECTED, REJECTED_REWARDS
from treg.trainer import TRegConfig, TRegTrainer
from treg.viz import (
    POLICY_LABEL,
    RHAT_LABEL,
    TokenHeatmap,
    VizError,
    compute_heatmaps,
    display_token,
    render_html,
    render_png,
    row_scales,
    visualize,
)

TOKENS = ["<b>", "a&b", " x", "\n", '"q"']


def heatmap(scale=1.0, title="first <prompt>"):
    return TokenHeatmap(
        tokens=list(TOKENS),
        rows={"A": [-1.0 * scale, -0.5 * scale, 0.0, 0.25 * scale, 1.0 * scale], "B": [0.1, 0.2, 0.3, 0.4, 0.5]},
        defects=[False, True, False, False, True],
        title=title,
    )


# ------------------------------------------------------------------------------------------------------------ HTML
def test_html_has_every_token_one_span_per_token_per_row_tooltips_and_defects(tmp_path):
    out = tmp_path / "sub" / "h.html"
    page = render_html([heatmap()], out)
    assert out.read_text(encoding="utf-8") == page
    assert [p.name for p in out.parent.iterdir()] == ["h.html"], "no temporary file left behind"
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "src=" not in page and "href=" not in page
    for token in TOKENS:
        assert html.escape(display_token(token)) in page
    assert "<b>" not in page.split("<body>")[1].replace("<body>", ""), "token text is escaped"
    assert "·x" in page and "↵" in page  # whitespace is visible
    cells = re.findall(r'<span class="cell" style="background:rgb\((\d+),(\d+),(\d+)\)[^"]*" title="([^"]*)"', page)
    assert len(cells) == len(TOKENS) * 2
    tips = [html.unescape(t) for *_, t in cells]
    assert tips[0].startswith("A: -1.0000") and tips[4].startswith("A: +1.0000") and tips[9].startswith("B: +0.5000")
    rgb = [tuple(map(int, c[:3])) for c in cells]
    assert rgb[0] == (215, 48, 39) and rgb[2] == (255, 255, 255) and rgb[4] == (26, 152, 80)  # red, white, green
    assert rgb[3][1] > rgb[3][0] and rgb[3][0] > rgb[4][0]  # +0.25: pale green
    assert len(re.findall(r'class="dcell defect"', page)) == 2
    assert len(re.findall(r'class="dcell"', page)) == 3
    assert "title" in page and "first &lt;prompt&gt;" in page


def test_html_scale_is_shared_per_label_across_heatmaps():
    page = render_html([heatmap(scale=1.0), heatmap(scale=0.5, title="second")])
    second = page.split("<h2>second</h2>")[1]
    first_cell = re.search(r'<span class="cell" style="background:rgb\((\d+),(\d+),(\d+)\)', second).groups()
    assert tuple(map(int, first_cell)) != (215, 48, 39), "-0.5 on a ±1 scale is not full red"
    assert row_scales([heatmap(1.0), heatmap(0.5)]) == {"A": 1.0, "B": 0.5}


def test_heatmap_without_defects_has_no_defect_line():
    page = render_html(TokenHeatmap(tokens=["a", "b"], rows={"A": [0.0, 0.0]}))
    assert 'class="dcell' not in page and page.count('class="cell"') == 2


def test_length_mismatch_names_the_label():
    with pytest.raises(ValueError, match=r"row 'my method' has 2 values for 3 tokens"):
        TokenHeatmap(tokens=["a", "b", "c"], rows={"ok": [1, 2, 3], "my method": [1, 2]})
    with pytest.raises(ValueError, match="defects has 1 flags for 2 tokens"):
        TokenHeatmap(tokens=["a", "b"], rows={}, defects=[True])


# ------------------------------------------------------------------------------------------------------------- PNG
def test_png_is_written_and_valid(tmp_path):
    pytest.importorskip("matplotlib")
    long = TokenHeatmap(tokens=[f" t{i}$" for i in range(60)], rows={"A": list(np.linspace(-1, 1, 60))})
    out = tmp_path / "h.png"
    assert render_png([heatmap(), long], out, dpi=80) == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]


# ------------------------------------------------------------------------------------------ values from the models
@pytest.fixture(scope="module")
def pairs():
    return make_pairs(4, seed=10_000)


@pytest.fixture(scope="module")
def trainer_columns(tiny, pairs, tmp_path_factory):
    """What TRegTrainer itself computes for all the pairs (r̂ and reference log-probs)."""
    model, tokenizer, _ = tiny
    config = TRegConfig(
        output_dir=str(tmp_path_factory.mktemp("out")),
        use_cpu=True,
        activation_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        treg_alpha=1.0,
        max_length=None,
    )
    trainer = TRegTrainer(copy.deepcopy(model), args=config, train_dataset=pairs, processing_class=tokenizer)
    return trainer.train_dataset


def test_implicit_rewards_are_zero_when_checkpoint_is_reference_and_rhat_matches_trainer(tiny, pairs, trainer_columns):
    model, tokenizer, _ = tiny
    rows = [1, 3]
    hms = compute_heatmaps(copy.deepcopy(model), tokenizer, pairs, rows, ref_model=copy.deepcopy(model))
    assert len(hms) == len(rows)
    for hm, row in zip(hms, rows):
        expected = trainer_columns[row]
        assert list(hm.rows) == [RHAT_LABEL, POLICY_LABEL]
        assert hm.rows[POLICY_LABEL] == [0.0] * len(hm.tokens)
        assert hm.rows[RHAT_LABEL] == pytest.approx(expected[REJECTED_REWARDS], abs=1e-5)
        assert hm.tokens == [tokenizer.decode([t]) for t in expected["rejected_ids"]]
        text = pairs[row]["rejected"][0]["content"]
        flags = word_flags_to_token_flags(tokenizer, text, pairs[row]["rejected_defects"])
        assert hm.defects == flags + [False] * (len(hm.tokens) - len(flags))
        assert any(hm.defects) and hm.defects[-1] is False  # end-of-turn token
        assert f"row {row}" in hm.title and "rejected" in hm.title and pairs[row]["prompt"][-1]["content"] in hm.title


def test_implicit_rewards_of_a_different_checkpoint(tiny, pairs, trainer_columns):
    model, tokenizer, _ = tiny
    checkpoint = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in checkpoint.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 0.3
    (hm,) = compute_heatmaps(checkpoint, tokenizer, pairs, [2], ref_model=copy.deepcopy(model), beta=beta)
    row = trainer_columns[2]
    (ckpt,) = score_completions(checkpoint, [(row["prompt_ids"], row["rejected_ids"])], show_progress=False)
    expected = beta * (ckpt - np.asarray(row[REF_REJECTED]))
    assert np.abs(expected).max() > 1e-3
    assert hm.rows[POLICY_LABEL] == pytest.approx(expected.tolist(), abs=1e-4)


def test_without_reference_only_rhat_and_both_sides(tiny, pairs, trainer_columns):
    model, tokenizer, _ = tiny
    hms = compute_heatmaps(copy.deepcopy(model), tokenizer, pairs, [0], side="both")
    assert [list(hm.rows) for hm in hms] == [[RHAT_LABEL], [RHAT_LABEL]]
    assert "chosen" in hms[0].title and "rejected" in hms[1].title
    assert hms[0].rows[RHAT_LABEL] == pytest.approx(trainer_columns[0]["chosen_token_rewards"], abs=1e-5)
    if "chosen_defects" not in pairs.column_names:
        assert hms[0].defects is None
    assert hms[1].defects is not None


def test_token_level_defect_column_is_used_as_is(tiny, pairs):
    model, tokenizer, _ = tiny
    n = len(tokenizer(pairs[0]["rejected"][0]["content"], add_special_tokens=False)["input_ids"]) + 1
    flags = [i % 2 == 0 for i in range(n)]
    data = pairs.select([0]).add_column("rejected_token_defects", [flags])
    (hm,) = compute_heatmaps(copy.deepcopy(model), tokenizer, data, [0])
    assert hm.defects == flags


# ---------------------------------------------------------------------------------------------------- command line
def test_cli_writes_html(tmp_path, tiny, capsys):
    out = tmp_path / "heat.html"
    argv = [
        "viz",
        "--checkpoint",
        "treg:tiny",
        "--ref-model",
        "treg:tiny",
        "--dataset",
        "treg:toy",
        "--rows",
        "0",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.count("<section") == 2 and POLICY_LABEL in page and "dcell defect" in page


def test_cli_png_from_local_checkpoint_and_jsonl(tmp_path, tiny, capsys):
    pytest.importorskip("matplotlib")
    _, _, model_path = tiny
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for row in make_pairs(3, seed=1, conversational=False):
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "heat.png"
    argv = [
        "viz",
        "--checkpoint",
        model_path,
        "--dataset",
        str(data),
        "--rows",
        "2",
        "--side",
        "both",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_extension_and_out_of_range_row(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt'.*\.html, \.htm, \.png"):
        visualize("treg:tiny", "treg:toy", out=str(tmp_path / "x.txt"))
    assert main(["viz", "--checkpoint", "treg:tiny", "--dataset", "treg:toy", "--out", "x.pdf"]) == 2
    assert "unsupported extension '.pdf'" in capsys.readouterr().err
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(3, seed=1, conversational=False)))
    with pytest.raises(VizError, match=r"row 7 is out of range: the dataset has 3 rows"):
        visualize("treg:tiny", str(data), rows=[0, 7], out=str(tmp_path / "x.html"))
    assert main(["viz", "--checkpoint", "treg:tiny", "--dataset", "treg:toy", "--rows", "-1"]) == 2
    assert "row -1 is out of range" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_max_length_shows_only_the_kept_tokens(tiny, pairs, trainer_columns):
    model, tokenizer, _ = tiny
    max_length = len(trainer_columns[0]["prompt_ids"]) + 3
    (hm,) = compute_heatmaps(copy.deepcopy(model), tokenizer, pairs, [0], max_length=max_length)
    assert len(hm.tokens) == len(hm.rows[RHAT_LABEL]) == len(hm.defects) == 3
    assert hm.tokens == [tokenizer.decode([t]) for t in trainer_columns[0]["rejected_ids"][:3]]


# ------------------------------------------------------------------------- real-tokenizer behaviours (issue 13)
def test_d11_token_labels_keep_sentencepiece_word_spaces():
    """A SentencePiece decoder drops the word-boundary space of the first token it decodes, so decoding each token
    alone lost every space between words ("▁world" → "world"); labels read each token in place."""
    from test_generate import sentencepiece_tokenizer

    from treg.viz import token_texts

    sp = sentencepiece_tokenizer()
    context = sp("[INST] sort: 3 1 2 [/INST]")["input_ids"]
    ids = sp("[INST] sort: 3 1 2 [/INST] the best answer\n1 2 3")["input_ids"][len(context) :]
    assert [sp.decode([t]) for t in ids][:3] == ["the", "best", "answer"]  # the bug: no spaces
    labels = token_texts(sp, ids, context=context)
    assert labels[:3] == [" the", " best", " answer"]
    assert "".join(labels) == " the best answer\n1 2 3"
    assert [display_token(t) for t in labels[:2]] == ["·the", "·best"]


def test_d11_byte_level_tokens_of_one_character_show_it_once(tiny):
    """A character split over byte-level tokens: no "�" labels; the token that completes it shows it."""
    from treg.viz import token_texts

    tokenizer = tiny[1]
    ids = tokenizer(" a 😀 b", add_special_tokens=False)["input_ids"]
    labels = token_texts(tokenizer, ids)
    assert "".join(labels) == " a 😀 b" and not any("\ufffd" in t for t in labels)
    assert len(labels) == len(ids) and "😀" in labels


def test_viz_draws_rhat_with_the_templates_the_checkpoint_was_trained_with(tmp_path):
    """`treg viz` without --positive/--negative-template: a run folder's training_args.bin gives them; a treg:tiny
    reference its own wording (it was tuned on it); anything else TRegConfig's defaults."""
    import torch

    from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE
    from treg.viz import training_templates

    run = tmp_path / "run"
    run.mkdir()
    config = TRegConfig(output_dir=str(run), report_to="none", contrastive_positive_template="A {prompt}",
                        contrastive_negative_template="B {prompt}")
    torch.save(config, run / "training_args.bin")  # what Trainer.save_model writes
    assert training_templates(str(run), "treg:tiny") == ("A {prompt}", "B {prompt}")
    assert training_templates(str(tmp_path), "treg:tiny") == (POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE)
    assert training_templates("treg:tiny") == (POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE)
    assert training_templates(str(tmp_path), "some/model") == (None, None)
    (run / "training_args.bin").write_bytes(b"not a pickle")
    assert training_templates(str(run), "some/model") == (None, None)
