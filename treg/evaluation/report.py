"""Results of a run as JSON plus a short markdown table; several runs compared in one table and one plot."""

from __future__ import annotations

import json
import math
import os

from treg.files import UserError, write_atomic, write_text_atomic


def _fmt(x, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    """A short markdown table for one run (AlpacaEval 2 or Arena-Hard results dict)."""
    bench, m = results["benchmark"], results["metrics"]
    head = f"### {bench}: {results['model']} (judge: {results['judge']})\n\n"
    if bench == "alpaca_eval":
        lc = _fmt(m.get("length_controlled_winrate"))
        rows = [
            "| metric | value |",
            "|---|---|",
            f"| win rate (%) | {_fmt(m.get('win_rate'))} ± {_fmt(m.get('standard_error'))} |",
            f"| length-controlled win rate (%) | {lc} |",
            f"| discrete win rate (%) | {_fmt(m.get('discrete_win_rate'))} |",
            f"| instances / failed judgments (left out of the win rate) | {m.get('n_instances')} / "
            f"{m.get('n_failed')} |",
            f"| average output length (chars) | {_fmt(m.get('avg_length'), 0)} |",
        ]
        if m.get("position_biased_fraction") is not None:
            rows.append(f"| pairs with position bias | {_fmt(100 * m['position_biased_fraction'])}% |")
        note = f"\n\n{m['lc_unavailable_reason']}" if m.get("lc_unavailable_reason") else ""
        return head + "\n".join(rows) + note + "\n"
    rows = [
        "| model | win rate vs baseline (%) | 95% CI | games invalid / total | average #tokens |",
        "|---|---|---|---|---|",
    ]
    for name, row in sorted(m["models"].items(), key=lambda kv: -kv[1]["score"]):
        ci = f"{_fmt(row['lower'])} – {_fmt(row['upper'])}"
        games = f"{row['invalid_games']} / {row['n_games']}" if "n_games" in row else "baseline"
        rows.append(f"| {name} | {_fmt(row['score'])} | {ci} | {games} | {_fmt(row.get('avg_tokens'), 0)} |")
    extra = (
        f"\n\nstyle control: {m['style_control']}, coefficients {m['style_coefs']}" if m.get("style_control") else ""
    )
    sources = _token_sources(m)
    if sources:
        extra += f"\n\ntoken lengths: {sources}"
    return head + "\n".join(rows) + extra + "\n"


def _token_sources(metrics: dict) -> str | None:
    """Where the token lengths came from (stored in the answer files, or counted and with what), per category."""
    if metrics.get("token_len_source"):
        return metrics["token_len_source"]
    per = metrics.get("per_category") or {}
    parts = [f"{c}: {v['token_len_source']}" for c, v in per.items() if v.get("token_len_source")]
    return "; ".join(parts) or None


def write_report(out_dir: str, results: dict) -> tuple[str, str]:
    """``results.json`` and ``results.md`` in ``out_dir`` (atomic). Returns both paths."""
    js, md = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    write_text_atomic(js, json.dumps(results, indent=2, default=_json_default) + "\n")
    write_text_atomic(md, markdown(results))
    return js, md


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def headline(results: dict) -> tuple[float | None, float | None, float | None]:
    """(score, lower, upper) of the evaluated model: win rate ± 1.96 SE for AlpacaEval, the CI for Arena-Hard."""
    m = results["metrics"]
    if results["benchmark"] == "alpaca_eval":
        wr, se = m.get("win_rate"), m.get("standard_error")
        if wr is None:
            return None, None, None
        se = se if se is not None and not math.isnan(se) else 0.0
        return wr, wr - 1.96 * se, wr + 1.96 * se
    row = m["models"].get(results["model"])
    return (row["score"], row["lower"], row["upper"]) if row else (None, None, None)


def compare(paths: list[str], out_dir: str) -> tuple[str, str | None]:
    """A markdown table (and ``comparison.png`` when matplotlib is installed) over several ``results.json``."""
    runs = []
    for p in paths:
        path = os.path.join(p, "results.json") if os.path.isdir(p) else p
        try:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        except FileNotFoundError as e:
            raise UserError(f"compare: {path!r} does not exist; pass run folders that `treg eval` wrote (they hold "
                            "results.json) or results.json files.") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"compare: {path!r} is not a results JSON file ({e}).") from e
    lines = ["| run | benchmark | model | judge | score (%) | interval |", "|---|---|---|---|---|---|"]
    for p, r in zip(paths, runs):
        s, lo, hi = headline(r)
        lines.append(f"| {p} | {r['benchmark']} | {r['model']} | {r['judge']} | {_fmt(s)} | {_fmt(lo)} – {_fmt(hi)} |")
    md = os.path.join(out_dir, "comparison.md")
    write_text_atomic(md, "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return md, None
    fig, axes = plt.subplots(1, len({r["benchmark"] for r in runs}), figsize=(6, 3.5), squeeze=False)
    for ax, bench in zip(axes[0], sorted({r["benchmark"] for r in runs})):
        sel = [(p, r) for p, r in zip(paths, runs) if r["benchmark"] == bench]
        vals = [headline(r) for _, r in sel]
        xs = range(len(sel))
        ys = [v[0] if v[0] is not None else float("nan") for v in vals]
        err = [
            [(v[0] - v[1]) if v[0] is not None else 0 for v in vals],
            [(v[2] - v[0]) if v[0] is not None else 0 for v in vals],
        ]
        ax.bar(xs, ys, yerr=err, capsize=4, color="#4c72b0")
        ax.set_xticks(list(xs), [os.path.basename(os.path.normpath(p)) or p for p, _ in sel], rotation=30, ha="right")
        ax.set_ylabel("win rate (%)")
        ax.set_title({"alpaca_eval": "AlpacaEval 2", "arena_hard": "Arena-Hard"}.get(bench, bench))
    fig.tight_layout()
    png = os.path.join(out_dir, "comparison.png")
    write_atomic(png, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return md, png
