"""Token heatmaps: which response tokens does each signal call good or bad, next to where the defects really are.

Each response becomes one heatmap: its tokens as the trainer tokenizes them, one coloured line per signal (red
negative, white 0, green positive) and, when the data knows them, the defective tokens::

    r̂ (contrastive)              1  ·7  ·1  ·3  <|end|>      the reference model's self-generated token rewards
    β·log π/π_ref (checkpoint)    1  ·7  ·1  ·3  <|end|>      the trained policy's implicit token rewards
    defects                          ███                       ground truth (toy task)

:func:`render_html` writes one self-contained page (hover a token for its value), :func:`render_png` the same figure
with matplotlib (``pip install "treg[viz]"``). :func:`compute_heatmaps` fills them from a checkpoint, its reference
model and a preference dataset; :func:`visualize` is ``treg viz``::

    treg viz --checkpoint out/treg --ref-model treg:tiny --dataset treg:toy --rows 0 1 2 --out heatmap.html

Each signal has its own colour scale, symmetric around 0 and shared by every heatmap of the page (max |value| of
that signal over all of them), so one method's values compare across examples; scales of different signals differ.
"""

from __future__ import annotations

import html
import logging
import math
import operator
import os
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from treg.files import UserError, write_atomic, write_text_atomic

logger = logging.getLogger(__name__)

RHAT_LABEL = "r̂ (contrastive)"
POLICY_LABEL = "β·log π/π_ref (checkpoint)"
DEFECT_LABEL = "defects"
SIDES = ("chosen", "rejected", "both")
HTML_EXTENSIONS = (".html", ".htm")
PNG_EXTENSIONS = (".png",)

# Diverging scale (ColorBrewer RdYlGn ends, white centre): negative → red, 0 → white, positive → green.
_NEGATIVE = (215, 48, 39)
_ZERO = (255, 255, 255)
_POSITIVE = (26, 152, 80)
_NAN = (200, 200, 200)
_DEFECT = (40, 40, 40)


class VizError(UserError):
    """Bad input to the heatmap renderer or to ``treg viz``; the message names what is wrong."""


# ------------------------------------------------------------------------------------------------------ data model
@dataclass
class TokenHeatmap:
    """One response: its tokens, one value per token for each signal, and optionally the true defect tokens.

    Args:
        tokens: decoded text of each completion token.
        rows: signal label → exactly one value per token (e.g. ``{"r̂ (contrastive)": [...]}``).
        defects: ground-truth defect flag per token, or None when unknown.
        title: shown above the heatmap (e.g. the prompt and which response).
    """

    tokens: list[str]
    rows: dict[str, list[float]]
    defects: list[bool] | None = None
    title: str = ""

    def __post_init__(self):
        self.tokens = [str(t) for t in self.tokens]
        n = len(self.tokens)
        checked = {}
        for label, values in self.rows.items():
            values = [float(v) for v in values]
            if len(values) != n:
                raise VizError(f"row {label!r} has {len(values)} values for {n} tokens; give exactly one per token.")
            checked[str(label)] = values
        self.rows = checked
        if self.defects is not None:
            self.defects = [bool(f) for f in self.defects]
            if len(self.defects) != n:
                raise VizError(f"defects has {len(self.defects)} flags for {n} tokens; give exactly one per token.")


def row_scales(heatmaps: Sequence[TokenHeatmap]) -> dict[str, float]:
    """Per signal label: max |finite value| over all heatmaps, the half-width of its colour scale (0: all white)."""
    scales: dict[str, float] = {}
    for hm in heatmaps:
        for label, values in hm.rows.items():
            finite = [abs(v) for v in values if math.isfinite(v)]
            scales[label] = max([scales.get(label, 0.0), *finite])
    return scales


def _divisor(scale: float) -> float:
    return scale if scale > 0 else 1.0


def _rgb(value: float, scale: float) -> tuple[int, int, int]:
    if not math.isfinite(value):
        return _NAN
    t = max(-1.0, min(1.0, value / _divisor(scale)))
    end = _POSITIVE if t > 0 else _NEGATIVE
    return tuple(round(z + abs(t) * (e - z)) for z, e in zip(_ZERO, end))  # type: ignore[return-value]


def display_token(token: str) -> str:
    """Token text with whitespace made visible: space → '·', newline → '↵', tab → '→', empty → '∅'."""
    if token == "":
        return "∅"
    return token.replace(" ", "·").replace("\r", "␍").replace("\n", "↵").replace("\t", "→")


_TOKEN_CONTEXT = 8  # prompt tokens decoded before a response's first token, so it reads as it does in place


def token_texts(tokenizer, ids: Sequence[int], context: Sequence[int] = ()) -> list[str]:
    """The text of each token of ``ids`` as it reads in place: what decoding up to it adds to decoding up to the
    token before (after the last few ``context`` ids, e.g. the prompt's).

    Decoding a token alone loses what depends on its neighbours: a SentencePiece decoder drops the word-boundary
    space of the first token it decodes (Llama-2, Mistral: "▁the" → "the"), and a character split over byte tokens
    comes out as "�". Here a token that ends inside a character shows nothing and the one that completes it shows
    the character; byte-level markers (Ġ, Ċ) and "▁" become the spaces and newlines they stand for.
    """
    ctx = list(context)[-_TOKEN_CONTEXT:]
    seq = ctx + list(ids)

    def text(n: int) -> str:
        return tokenizer.decode(seq[:n], clean_up_tokenization_spaces=False)

    out, prev = [], text(len(ctx))
    for t in range(len(ids)):
        cur = text(len(ctx) + t + 1)
        if cur.endswith("\ufffd") and t + 1 < len(ids):
            out.append("")  # ends inside a character: the next token shows it
        elif cur.startswith(prev):
            out.append(cur[len(prev) :])
            prev = cur
        else:  # the decoded prefix changed (a decoder that rewrites earlier text): the token on its own
            out.append(tokenizer.decode([ids[t]], clean_up_tokenization_spaces=False))
            prev = cur
    return out


def _check_heatmaps(heatmaps) -> list[TokenHeatmap]:
    if isinstance(heatmaps, TokenHeatmap):
        heatmaps = [heatmaps]
    heatmaps = list(heatmaps)
    if not heatmaps:
        raise VizError("no heatmaps to render.")
    for i, hm in enumerate(heatmaps):
        if not isinstance(hm, TokenHeatmap):
            raise VizError(f"heatmap {i} is a {type(hm).__name__}, not a TokenHeatmap.")
    return heatmaps


# ------------------------------------------------------------------------------------------------------------ HTML
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin: 1.4em 0 0.4em; font-weight: 600; }
.legend { font-size: 0.85em; margin-bottom: 1em; }
.legend .bar { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle; border: 1px solid #999;
  background: linear-gradient(to right, rgb@NEG, rgb@ZERO, rgb@POS); }
.legend table { border-collapse: collapse; margin-top: 0.4em; }
.legend td { padding: 0 0.8em 0 0; }
.heatmap { overflow-x: auto; padding-bottom: 0.3em; }
.line { white-space: nowrap; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 0.9em; line-height: 1.9; }
.label { display: inline-block; width: 16em; font-family: system-ui, sans-serif; font-size: 0.85em; color: #444;
  overflow: hidden; text-overflow: ellipsis; vertical-align: middle; }
.cell, .dcell { white-space: pre; padding: 0.1em 0.15em; margin-right: 1px; border-radius: 2px; }
.dcell { color: #bbb; }
.dcell.defect { background: rgb@DEFECT; color: #fff; font-weight: 600; }
.swatch { padding: 0 0.4em; border-radius: 2px; }
"""
for _name, _colour in (("@NEG", _NEGATIVE), ("@ZERO", _ZERO), ("@POS", _POSITIVE), ("@DEFECT", _DEFECT)):
    _CSS = _CSS.replace(_name, str(_colour))


def _html_line(label: str, hm: TokenHeatmap, scale: float) -> str:
    parts = [f'<div class="line"><span class="label" title="{html.escape(label)}">{html.escape(label)}</span>']
    for token, value in zip(hm.tokens, hm.rows[label]):
        r, g, b = _rgb(value, scale)
        strong = math.isfinite(value) and abs(value) / _divisor(scale) > 0.6
        color = ";color:#fff" if strong else ""
        tip = html.escape(f"{label}: {value:+.4f}  token {token!r}")
        text = html.escape(display_token(token))
        parts.append(f'<span class="cell" style="background:rgb({r},{g},{b}){color}" title="{tip}">{text}</span>')
    parts.append("</div>")
    return "".join(parts)


def _html_defects(hm: TokenHeatmap) -> str:
    parts = [f'<div class="line"><span class="label">{DEFECT_LABEL}</span>']
    for token, flag in zip(hm.tokens, hm.defects or []):
        cls, tip = ("dcell defect", "defect") if flag else ("dcell", "not a defect")
        tip = html.escape(f"{tip}  token {token!r}")
        parts.append(f'<span class="{cls}" title="{tip}">{html.escape(display_token(token))}</span>')
    parts.append("</div>")
    return "".join(parts)


def render_html(heatmaps: Sequence[TokenHeatmap] | TokenHeatmap, path: str | os.PathLike | None = None) -> str:
    """One self-contained HTML page (inline CSS, no script, no external assets) showing every heatmap.

    Per heatmap: its title, one line per signal with every token coloured on that signal's diverging scale (hover
    for the value), and a ``defects`` line when the heatmap has defect flags. Returns the HTML; also writes it
    (atomically) to ``path`` when given.
    """
    heatmaps = _check_heatmaps(heatmaps)
    scales = row_scales(heatmaps)
    legend_rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>±{scale:.4g}</td></tr>" for label, scale in scales.items()
    )
    body = [
        "<h1>Token heatmap</h1>",
        '<div class="legend"><span>negative</span> <span class="bar"></span> <span>positive</span> '
        "(white = 0; hover a token for its value). Each signal is scaled to its largest |value| on this page:"
        f"<table>{legend_rows}</table>"
        f'<span class="swatch" style="background:rgb{_DEFECT};color:#fff">defect</span> '
        "= ground-truth defective token. '·' is a space, '↵' a newline.</div>",
    ]
    for hm in heatmaps:
        body.append('<section class="heatmap">')
        if hm.title:
            body.append(f"<h2>{html.escape(hm.title)}</h2>")
        body += [_html_line(label, hm, scales[label]) for label in hm.rows]
        if hm.defects is not None:
            body.append(_html_defects(hm))
        body.append("</section>")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>treg token heatmap</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    if path is not None:
        path = os.fspath(path)

        write_text_atomic(path, page)
    return page


# ------------------------------------------------------------------------------------------------------------- PNG
def _mpl_text(text: str) -> str:
    return text.replace("$", r"\$")  # '$' would start mathtext


def _draw_png_heatmap(ax, hm: TokenHeatmap, cmap, divisors: dict[str, float], width_tokens: int, annotate: bool):
    """Draw one heatmap on its axes: a coloured cell per token and signal (values printed when ``annotate``)."""
    import numpy as np

    labels = list(hm.rows)
    n = len(hm.tokens)
    image = np.ones((len(labels) + (hm.defects is not None), max(n, 1), 4))
    for i, label in enumerate(labels):
        values = np.asarray(hm.rows[label], dtype=np.float64)
        colours = cmap(np.clip(np.nan_to_num(values, nan=0.0) / divisors[label], -1, 1) * 0.5 + 0.5)
        colours[~np.isfinite(values)] = (*(np.array(_NAN) / 255), 1.0)
        image[i, :n] = colours
        if annotate:
            decimals = min(4, max(1, 1 - math.floor(math.log10(divisors[label]))))
            for j, v in enumerate(hm.rows[label]):
                strong = math.isfinite(v) and abs(v) / divisors[label] > 0.6
                ax.text(
                    j,
                    i,
                    f"{v:.{decimals}f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if strong else "black",
                )
    if hm.defects is not None:
        image[len(labels), :n] = [(*(np.array(_DEFECT if f else (245, 245, 245)) / 255), 1.0) for f in hm.defects]
        labels.append("defect")
    if n == 0:
        image[:, :] = 1.0
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xlim(-0.5, width_tokens - 0.5)
    ax.set_xticks(range(n))
    ticks = [_mpl_text(display_token(t)) for t in hm.tokens]
    ax.set_xticklabels(ticks, rotation=90 if any(len(t) > 2 for t in ticks) else 0, fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([_mpl_text(label) for label in labels], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if hm.title:
        title = hm.title if len(hm.title) <= 150 else hm.title[:149] + "…"
        ax.set_title(_mpl_text(title.replace("\n", " ")), fontsize=9, loc="left")


def render_png(heatmaps: Sequence[TokenHeatmap] | TokenHeatmap, path: str | os.PathLike, dpi: int = 150) -> str:
    """The same figure as :func:`render_html`, as a PNG drawn with matplotlib. Returns ``path``.

    Per heatmap a grid: columns are the tokens (their text as tick labels), rows the signals plus a ``defect`` row,
    each signal coloured on its own symmetric scale (shared across heatmaps); values are printed in the cells when
    the longest response has at most 40 tokens. Uses matplotlib's object API with the Agg canvas, so it neither needs
    a display nor changes the pyplot backend. The file is written atomically.
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('render_png needs matplotlib: pip install "treg[viz]"') from e
    import warnings

    import numpy as np

    heatmaps = _check_heatmaps(heatmaps)
    path = os.fspath(path)
    scales = row_scales(heatmaps)
    divisors = {label: _divisor(s) for label, s in scales.items()}
    cmap = LinearSegmentedColormap.from_list(
        "treg_diverging", [np.array(c) / 255 for c in (_NEGATIVE, _ZERO, _POSITIVE)]
    )
    width_tokens = max(1, max(len(hm.tokens) for hm in heatmaps))
    annotate = width_tokens <= 40
    n_lines = [max(1, len(hm.rows) + (hm.defects is not None)) for hm in heatmaps]
    label_width = max([len(label) for hm in heatmaps for label in hm.rows] + [len(DEFECT_LABEL)])
    fig_width = min(60.0, 1.5 + 0.09 * label_width + 0.42 * width_tokens)
    heights = [0.38 * n + 1.3 for n in n_lines]
    fig = Figure(figsize=(fig_width, sum(heights) + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heatmaps), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, hm in zip(axes, heatmaps):
        _draw_png_heatmap(ax, hm, cmap, divisors, width_tokens, annotate)
    scale_note = ";  ".join(f"{label}: ±{s:.3g}" for label, s in scales.items())
    note = textwrap.wrap(f"red < 0 < green, per-signal scales: {scale_note}", width=max(60, int(fig_width * 15)))
    fig_height = fig.get_figheight() + 0.13 * len(note)
    fig.set_figheight(fig_height)
    bottom = (0.13 * len(note) + 0.05) / fig_height
    fig.text(0.01, 0.003, _mpl_text("\n".join(note)), fontsize=7, va="bottom")

    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # missing glyphs for exotic token text
            fig.tight_layout(rect=(0, bottom, 1, 1))
            fig.savefig(tmp, format="png", dpi=dpi)

    write_atomic(path, write)
    return path


# ------------------------------------------------------------------------------------------------ from a checkpoint
def _text_of(value) -> str | None:
    """Plain text of a prompt or response: the string itself, or the content of the last (user) message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        users = [m for m in value if m.get("role") == "user"]
        message = (users or value)[-1]
        return message.get("content") if isinstance(message.get("content"), str) else None
    return None


def _response_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        content = value[0].get("content")
        return content if isinstance(content, str) else None
    return None  # multi-message completions: word flags are ambiguous


def _find(haystack: list[int], needle: list[int]) -> int:
    for k in range(len(haystack) - len(needle) + 1):
        if haystack[k : k + len(needle)] == needle:
            return k
    return -1


def _token_defects(tokenizer, example: dict, side: str, completion_ids: list[int], kept: int, row: int):
    """Defect flag per kept completion token, from ``{side}_token_defects`` or ``{side}_defects``; else None."""
    token_col, word_col = f"{side}_token_defects", f"{side}_defects"
    if example.get(token_col) is not None:
        flags = [bool(f) for f in example[token_col]]
        if len(flags) not in (len(completion_ids), kept):
            raise VizError(
                f"dataset row {row}, column {token_col!r}: {len(flags)} flags for {len(completion_ids)} {side} tokens."
            )
        return flags[:kept]
    if example.get(word_col) is None:
        return None
    from treg.synthetic import word_flags_to_token_flags

    text = _response_text(example.get(side))
    word_flags = [bool(f) for f in example[word_col]]
    if text is None:
        logger.warning("dataset row %d: %s response is not one text; no defect line.", row, side)
        return None
    if len(word_flags) != len(text.split()):
        raise VizError(
            f"dataset row {row}, column {word_col!r}: {len(word_flags)} flags for {len(text.split())} words of the "
            f"{side} response; give one per whitespace-separated word."
        )
    text_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    start = _find(list(completion_ids), text_ids)
    if start < 0:
        logger.warning(
            "dataset row %d: the %s text does not tokenize to a run of its completion tokens; no defect line.",
            row,
            side,
        )
        return None
    token_flags = word_flags_to_token_flags(tokenizer, text, word_flags)
    flags = [False] * start + list(token_flags)
    flags += [False] * (len(completion_ids) - len(flags))  # e.g. the chat template's end-of-turn token
    return flags[:kept]


def _check_rows(rows, n: int | None) -> list[int]:
    """Row indices as a list of ints within ``range(n)`` (only checked for being integers when ``n`` is None)."""
    rows = [rows] if isinstance(rows, int) else list(rows)
    if not rows:
        raise VizError("no rows selected; pass at least one row index.")
    out = []
    for r in rows:
        try:
            if isinstance(r, bool):
                raise TypeError
            r = operator.index(r)  # int, numpy integer
        except TypeError:
            raise VizError(f"row {r!r} is not an integer index.") from None
        if n is not None and not 0 <= r < n:
            raise VizError(f"row {r} is out of range: the dataset has {n} rows (valid rows are 0..{n - 1}).")
        out.append(r)
    return out


def _prepare_rows(
    reference, tokenizer, selected, rows, *, beta, max_length, cache_dir, batch_size, positive_template,
    negative_template,
):
    """Tokenize the selected rows and attach the reference's r̂ exactly as TRegTrainer does for training."""
    import torch

    from treg.data import PreferenceDataError
    from treg.trainer import TRegConfig, TRegTrainer

    templates = {}
    if positive_template is not None:
        templates["contrastive_positive_template"] = positive_template
    if negative_template is not None:
        templates["contrastive_negative_template"] = negative_template
    with tempfile.TemporaryDirectory(prefix="treg-viz-") as tmp:
        config = TRegConfig(
            output_dir=tmp,
            treg_alpha=1.0,
            beta=beta,
            max_length=max_length,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            report_to="none",
            activation_checkpointing=False,
            disable_tqdm=True,
            save_strategy="no",
            token_reward_cache_dir=cache_dir,
            token_reward_batch_size=batch_size,
            precompute_ref_batch_size=batch_size,
            **templates,
        )
        try:
            trainer = TRegTrainer(reference, args=config, train_dataset=selected, processing_class=tokenizer)
        except PreferenceDataError as e:
            raise PreferenceDataError(f"{e} (row numbers count within the selected rows {rows})") from e
        prepared = trainer.train_dataset
        del trainer
    return prepared


def _policy_token_rewards(checkpoint_model, reference, tokenizer, prepared, entries, *, beta, batch_size):
    """The checkpoint's implicit token rewards β·(log π_ckpt − log π_ref) of every entry's kept completion tokens."""
    import numpy as np

    from treg.scoring import score_completions

    device = next(reference.parameters()).device
    if next(checkpoint_model.parameters()).device != device:
        checkpoint_model.to(device)
    items = [(prepared[i]["prompt_ids"], ids[:kept]) for i, _, ids, kept in entries]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kw = dict(batch_size=batch_size, pad_token_id=pad_id, show_progress=False)
    ref_logps = score_completions(reference, items, desc="Reference log-probs", **kw)
    ckpt_logps = score_completions(checkpoint_model, items, desc="Checkpoint log-probs", **kw)
    return [
        (beta * (c.astype(np.float64) - r.astype(np.float64))).tolist() for c, r in zip(ckpt_logps, ref_logps)
    ]


def compute_heatmaps(
    checkpoint_model,
    tokenizer,
    dataset,
    rows: Sequence[int],
    *,
    ref_model=None,
    beta: float = 0.1,
    side: str = "rejected",
    max_length: int | None = None,
    positive_template: str | None = None,
    negative_template: str | None = None,
    policy_label: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 8,
) -> list[TokenHeatmap]:
    """Heatmaps of the selected rows' responses: r̂ of the reference model and the checkpoint's implicit rewards.

    Rows are tokenized and scored exactly as :class:`~treg.trainer.TRegTrainer` does (a trainer is built over the
    selected rows, so the token-reward cache is shared with training): r̂ is the contrastive pass of ``ref_model``
    (or of ``checkpoint_model`` when no reference is given). With a ``ref_model`` a second row shows the checkpoint's
    implicit token reward β·(log π_ckpt − log π_ref); both log-probs come from :func:`treg.scoring.score_completions`
    with the same items and batching, so it is exactly 0 when the two models have equal weights.
    ``checkpoint_model`` is moved to the reference model's device for that.

    Args:
        dataset: a ``datasets.Dataset`` of preference rows (standard or conversational). Defect lines come from
            ``{side}_token_defects`` (one flag per completion token) or ``{side}_defects`` (one per word).
        rows: indices into ``dataset``. side: "chosen", "rejected" or "both" (chosen then rejected per row).
        max_length: the trainer's ``max_length``; only the kept completion tokens are shown.
        positive_template, negative_template: x⁺ and x⁻ (default: TRegConfig's).
        policy_label: label of the implicit-reward row (default ``POLICY_LABEL``).
        cache_dir: token-reward cache root (default ``$TREG_CACHE_DIR`` or ``~/.cache/treg``; "none" disables).
    """
    from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS, kept_completion_length

    if side not in SIDES:
        raise VizError(f"side={side!r}: choose one of {list(SIDES)}.")
    rows = _check_rows(rows, len(dataset))
    sides = ("chosen", "rejected") if side == "both" else (side,)
    reference = ref_model if ref_model is not None else checkpoint_model
    prepared = _prepare_rows(
        reference, tokenizer, dataset.select(rows), rows, beta=beta, max_length=max_length, cache_dir=cache_dir,
        batch_size=batch_size, positive_template=positive_template, negative_template=negative_template,
    )

    rewards_col = {"chosen": CHOSEN_REWARDS, "rejected": REJECTED_REWARDS}
    entries = []  # (selection index, side, kept completion ids)
    for i in range(len(prepared)):
        example = prepared[i]
        for s in sides:
            ids = list(example[f"{s}_ids"])
            kept = kept_completion_length(len(example["prompt_ids"]), len(ids), max_length)
            entries.append((i, s, ids, kept))

    policy_values = None
    if ref_model is not None:
        policy_values = _policy_token_rewards(
            checkpoint_model, reference, tokenizer, prepared, entries, beta=beta, batch_size=batch_size
        )

    heatmaps = []
    for k, (i, s, ids, kept) in enumerate(entries):
        example = prepared[i]
        values = {RHAT_LABEL: [float(v) for v in example[rewards_col[s]]]}
        if policy_values is not None:
            values[policy_label or POLICY_LABEL] = policy_values[k]
        prompt = _text_of(example["prompt"]) or ""
        heatmaps.append(
            TokenHeatmap(
                tokens=token_texts(tokenizer, ids[:kept], context=example["prompt_ids"]),
                rows=values,
                defects=_token_defects(tokenizer, example, s, ids, kept, rows[i]),
                title=f"row {rows[i]} · {s} · {prompt}",
            )
        )
    return heatmaps


# ----------------------------------------------------------------------------------------------------- entry point
def _output_kind(out: str) -> str:
    ext = os.path.splitext(str(out))[1].lower()
    if ext in HTML_EXTENSIONS:
        return "html"
    if ext in PNG_EXTENSIONS:
        return "png"
    supported = ", ".join(HTML_EXTENSIONS + PNG_EXTENSIONS)
    raise VizError(f"out={str(out)!r}: unsupported extension {ext or '(none)'!r}; use one of {supported}.")


def _load_model(name: str, with_tokenizer: bool = True):
    if name == "treg:tiny":
        from treg.synthetic import load_tiny_model

        model, tokenizer, _ = load_tiny_model(show_progress=False)
        return model, tokenizer
    from treg.models import load_adapter_folder

    adapter = load_adapter_folder(name, show_progress=False)  # a LoRA run's output: its base, adapter merged in
    if adapter is not None:
        return adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            logger.info("no tokenizer loadable from %s (%s)", name, e)
    return model, tokenizer


def training_templates(checkpoint, ref_model=None) -> tuple[str | None, str | None]:
    """x⁺ and x⁻ to draw r̂ with when the user names none: those in the checkpoint's ``training_args.bin`` (saved by
    ``treg train``) when it is a local folder that has one; else treg:tiny's own wording when the reference is
    ``treg:tiny`` (it was instruction-tuned on it, and its recipes train with it); else (None, None): TRegConfig's
    defaults."""
    import torch

    args_file = Path(os.fspath(checkpoint)) / "training_args.bin"
    if args_file.is_file():
        try:  # a pickle treg itself wrote into the user's own run folder
            saved = torch.load(args_file, weights_only=False, map_location="cpu")
        except Exception as e:  # an unreadable file only costs the default wording
            logger.warning("could not read the templates of %s (%s); using TRegConfig's defaults", args_file, e)
        else:
            positive = getattr(saved, "contrastive_positive_template", None)
            negative = getattr(saved, "contrastive_negative_template", None)
            if positive is not None and negative is not None:
                return positive, negative
    if ref_model == "treg:tiny" or (ref_model is None and checkpoint == "treg:tiny"):
        from treg.synthetic import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE

        return POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE
    return None, None


def visualize(
    checkpoint: str,
    dataset,
    *,
    ref_model: str | None = None,
    rows: Sequence[int] = (0,),
    side: str = "rejected",
    beta: float = 0.1,
    out: str | os.PathLike = "token-heatmap.html",
    max_length: int | None = None,
    split: str = "train",
    positive_template: str | None = None,
    negative_template: str | None = None,
) -> str:
    """``treg viz``: load a checkpoint (and its reference), render token heatmaps of dataset rows, write them.

    Args:
        checkpoint: local path, hub id, or ``treg:tiny``. ref_model: the same forms; without one the heatmaps show
            only the checkpoint's own r̂ (there is no implicit reward without a reference).
        dataset: a ``datasets.Dataset``, ``treg:toy`` (the toy evaluation pairs, seed 10 000), or anything
            :func:`treg.data.load_preference_dataset` reads (with ``split``).
        rows, side, beta, max_length: see :func:`compute_heatmaps`.
        positive_template, negative_template: x⁺ and x⁻; when neither is given, those the checkpoint was trained
            with (:func:`training_templates`), so that r̂ is the one training used.
        out: ``.html``/``.htm`` (self-contained page) or ``.png`` (needs matplotlib).
    Returns the path written.
    """
    out = os.fspath(out)
    kind = _output_kind(out)
    if side not in SIDES:
        raise VizError(f"side={side!r}: choose one of {list(SIDES)}.")
    rows = _check_rows(rows, None)  # integers, at least one; the range is checked once the dataset is loaded
    if isinstance(dataset, (str, os.PathLike)):
        dataset, needed = os.fspath(dataset), max(max(rows), 0) + 1
        if dataset == "treg:toy":
            from treg.synthetic import make_pairs

            dataset = make_pairs(needed, seed=10_000)
        else:
            from treg.data import load_preference_dataset

            dataset = load_preference_dataset(dataset, split=split, max_rows=needed)
    rows = _check_rows(rows, len(dataset))
    if positive_template is None and negative_template is None:
        positive_template, negative_template = training_templates(checkpoint, ref_model)
    model, tokenizer = _load_model(checkpoint)
    ref = None
    if ref_model is not None:
        ref, ref_tokenizer = _load_model(ref_model, with_tokenizer=tokenizer is None)
        tokenizer = tokenizer or ref_tokenizer
    if tokenizer is None:
        raise VizError(f"no tokenizer found in {checkpoint!r}" + (f" or {ref_model!r}." if ref_model else "."))
    heatmaps = compute_heatmaps(
        model,
        tokenizer,
        dataset,
        rows,
        ref_model=ref,
        beta=beta,
        side=side,
        max_length=max_length,
        positive_template=positive_template,
        negative_template=negative_template,
    )
    if kind == "png":
        return render_png(heatmaps, out)
    render_html(heatmaps, out)
    return out
