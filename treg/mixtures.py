"""Dataset mixtures: several preference datasets, each with its split, columns and share, read as one.

:func:`treg.compat.translate_recipe` turns the three formats users bring into one spec (``dataset_mixture``, JSON);
this module reads it with the meaning each format has in its project:

* ``alignment-handbook`` (``dataset_mixture: {datasets: [{id, config, split, columns, weight}], seed,
  test_split_size}``): each dataset shuffled with ``seed`` and cut to ``int(len × weight)`` rows; all concatenated
  and shuffled with ``seed``; ``test_split_size`` (a fraction or a row count) carved off as the test split.
* ``alignment-handbook-v0`` (``dataset_mixer: {id: fraction}`` + ``dataset_splits``; the SimPO and WPO repositories'
  format): splits whose name contains ``train`` keep their first ``int(fraction × len)`` rows and form the training
  set, splits containing ``test`` are kept whole as the test set; each set is shuffled with the recipe's ``seed``.
* ``trl`` (``datasets: [{path, name, split, columns, fraction, data_files, data_dir}]``, ``test_split_size``): without
  fractions the datasets are concatenated whole; with them, the fractions are normalised and the mixture is the
  largest that oversamples none (the first ``round(share × N)`` rows of each); then shuffled with the recipe's seed.

Every dataset is loaded, converted and validated by :mod:`treg.data` on its own, so a bad row is named by dataset,
split and row; only prompt/chosen/rejected (and treg's own columns) are kept, so datasets with other columns mix.
"""

from __future__ import annotations

import json
import logging

import datasets

from treg.data import (
    PreferenceDataError,
    _drop_invalid_rows,
    _load_raw,
    check_token_value_columns,
    keep_training_columns,
    to_preference_format,
    validate_preference_rows,
)

logger = logging.getLogger(__name__)


def load_mixture(spec: str | dict, *, seed: int = 42, drop_invalid: bool = False):
    """(train, test or None, report) for a mixture spec (see the module docstring). ``seed`` is the recipe's seed,
    used where the format has no seed of its own. ``report`` lists each part's rows read and kept."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"dataset_mixture is not a valid mixture spec: {e}") from e
    fmt = spec.get("format")
    entries = spec.get("datasets") or []
    if not entries:
        raise PreferenceDataError("dataset_mixture has no datasets.")
    seed = int(spec.get("seed", seed)) if fmt == "alignment-handbook" else int(seed)
    parts, report = [], []
    for i, entry in enumerate(entries):
        label = _label(i, entry)
        ds = _load_part(entry, label, drop_invalid)
        report.append({"dataset": entry["path"], "split": entry.get("split"), "role": entry.get("role", "train"),
                       "rows": len(ds)})
        parts.append(ds)

    if fmt == "alignment-handbook":
        for i, entry in enumerate(entries):
            if entry.get("weight") is not None:
                parts[i] = parts[i].shuffle(seed=seed).select(range(int(len(parts[i]) * entry["weight"])))
        train, test = _concat(parts, entries, "train"), None
        train = train.shuffle(seed=seed)
        train, test = _split(train, spec.get("test_split_size"), seed)
    elif fmt == "alignment-handbook-v0":
        for i, entry in enumerate(entries):
            if entry["role"] == "train":
                parts[i] = parts[i].select(range(int(entry["weight"] * len(parts[i]))))
        train_ids = [i for i, e in enumerate(entries) if e["role"] == "train"]
        test_ids = [i for i, e in enumerate(entries) if e["role"] == "test"]
        if not train_ids:
            raise PreferenceDataError("dataset_splits names no training split (a split whose name contains 'train').")
        train = _concat([parts[i] for i in train_ids], [entries[i] for i in train_ids], "train").shuffle(seed=seed)
        test = (_concat([parts[i] for i in test_ids], [entries[i] for i in test_ids], "test").shuffle(seed=seed)
                if test_ids else None)
    elif fmt == "trl":
        fractions = [e.get("fraction") for e in entries]
        if all(f is not None for f in fractions):
            total_share = sum(fractions)
            if total_share <= 0:
                raise PreferenceDataError("datasets: the fractions sum to 0; give at least one a share > 0.")
            shares = [f / total_share for f in fractions]
            size = min(len(p) / s for p, s in zip(parts, shares) if s > 0)
            parts = [p.select(range(min(len(p), round(s * size)))) for p, s in zip(parts, shares)]
        train = _concat(parts, entries, "train").shuffle(seed=seed)
        train, test = _split(train, spec.get("test_split_size"), seed)
    else:
        raise PreferenceDataError(f"dataset_mixture: unknown format {fmt!r}.")

    for row, entry in zip(report, entries):
        row["weight"] = entry.get("weight", entry.get("fraction"))
    kept = {"train": len(train), "test": len(test) if test is not None else 0}
    logger.info(
        "dataset mixture (%s): %s -> %d training rows%s", fmt,
        "; ".join(f"{r['dataset']} [{r['split']}] {r['rows']} rows" + (f" × {r['weight']}" if r["weight"] is not None
                                                                           else "") for r in report),
        kept["train"], f", {kept['test']} test rows" if test is not None else "",
    )
    return train, test, {"format": fmt, "parts": report, **kept}


def _label(i: int, entry: dict) -> str:
    config = f", config {entry['config']}" if entry.get("config") else ""
    return f"dataset {i} of the mixture ({entry['path']}{config}, split {entry.get('split', 'train')})"


def _load_part(entry: dict, label: str, drop_invalid: bool) -> datasets.Dataset:
    try:
        if entry.get("data_files") is not None or entry.get("data_dir") is not None:
            try:
                raw = datasets.load_dataset(entry["path"], entry.get("config"), data_dir=entry.get("data_dir"),
                                            data_files=entry.get("data_files"), split=entry.get("split", "train"))
            except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as e:
                raise PreferenceDataError(f"cannot be loaded: {type(e).__name__}: {' '.join(str(e).split())}") from e
        else:
            raw = _load_raw(entry["path"], entry.get("split", "train"), entry.get("config"))
        columns = entry.get("columns")
        if columns:
            missing = [c for c in columns if c not in raw.column_names]
            if missing:
                raise PreferenceDataError(f"has no column(s) {missing} (it has {raw.column_names}); fix 'columns'")
            raw = raw.select_columns(columns)
        if drop_invalid:
            raw = _drop_invalid_rows(raw)
        ds = to_preference_format(raw)
        validate_preference_rows(ds)
        check_token_value_columns(ds)
    except PreferenceDataError as e:
        raise PreferenceDataError(f"{label}: {e}") from e
    return keep_training_columns(ds)


def _concat(parts: list[datasets.Dataset], entries: list[dict], role: str) -> datasets.Dataset:
    """The parts concatenated on the columns they all have (prompt/chosen/rejected at least; treg's optional columns,
    e.g. score_chosen, only where every part has them), each cast to the first part's features."""
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    parts = [p.select_columns(common) if p.column_names != common else p for p in parts]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    aligned = [first]
    for part, entry in zip(parts[1:], entries[1:]):
        if part.features != first.features:
            try:
                part = part.cast(first.features)
            except (ValueError, TypeError) as e:
                raise PreferenceDataError(
                    f"the {role} mixture cannot be concatenated: {entry['path']} [{entry.get('split')}] holds "
                    f"{_shape(part)} rows and {entries[0]['path']} [{entries[0].get('split')}] {_shape(first)} rows "
                    "(plain strings vs chat messages, or different message fields); convert one of them."
                ) from e
        aligned.append(part)
    return datasets.concatenate_datasets(aligned)


def _shape(ds: datasets.Dataset) -> str:
    return "conversational" if isinstance(ds[0]["prompt"], list) else "plain-text"


def _split(train: datasets.Dataset, size, seed: int):
    if size is None:
        return train, None
    if isinstance(size, float) and size >= 1:
        size = int(size)
    if (isinstance(size, int) and size >= len(train)) or (isinstance(size, float) and int(size * len(train)) < 1):
        raise PreferenceDataError(
            f"test_split_size {size} leaves no training or no test rows from a mixture of {len(train)} rows; give a "
            "fraction in (0, 1) or a row count below the mixture's size."
        )
    parts = train.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]
