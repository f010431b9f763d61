"""Loading, normalising and validating preference data for DPO / T-REG training.

Every dataset leaves this module in TRL's *explicit-prompt* preference format, in one of two shapes.

Standard (plain strings)::

    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."}

Conversational (message lists; ``chosen`` / ``rejected`` hold only the response)::

    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon."}]}

Inputs that are accepted and converted by :func:`to_preference_format`:

* either shape above (returned unchanged, extra columns kept);
* conversational rows *without* a ``prompt`` column, where ``chosen`` and ``rejected`` are full
  conversations sharing a prefix; the prefix becomes the prompt (``trl.data_utils.extract_prompt``)::

    {"chosen":   [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}

* Anthropic HH-RLHF transcripts (only ``chosen`` / ``rejected`` strings); see :func:`to_preference_format`.

:func:`validate_preference_rows` then rejects rows a trainer cannot learn from, naming the row and field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from trl.data_utils import extract_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "PreferenceDataError",
    "load_preference_dataset",
    "to_preference_format",
    "validate_preference_rows",
]

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
_FIX_HINT = "Every row needs a non-empty prompt, chosen and rejected; drop or fix the row."

# Local file suffixes and the `datasets` builder that reads them.
_BUILDERS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
# Suffixes that make a missing name look like a local path rather than a hub dataset id.
_PATH_LIKE_SUFFIXES = (*_BUILDERS, ".gz", ".csv", ".arrow", ".txt", ".tsv")

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

_STANDARD, _CONVERSATIONAL, _IMPLICIT, _HH = "standard", "conversational", "implicit-conversational", "hh"


class PreferenceDataError(ValueError):
    """Bad preference data; message names the row index and the field and says what to do."""


def _row_error(idx: int, field: str, problem: str, hint: str = _FIX_HINT) -> PreferenceDataError:
    return PreferenceDataError(f"row {idx}, field '{field}': {problem}. {hint}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_preference_dataset(
    name_or_path: str,
    split: str = "train",
    config_name: str | None = None,
    max_rows: int | None = None,
    drop_invalid: bool = False,
) -> datasets.Dataset:
    """Load preference rows, normalise them (:func:`to_preference_format`) and validate them.

    ``name_or_path`` may be a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet``;
    ``split`` is ignored), a local directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
    or holding such files (files whose name starts with ``split`` are preferred), or a hub dataset id
    (``datasets.load_dataset(name, config_name, split=split)``).

    ``max_rows`` keeps the first N raw rows (before any row is dropped).  With ``drop_invalid=False``
    (default) the first bad row raises :class:`PreferenceDataError`; with ``True`` bad rows are dropped and
    their count plus the first few reasons are logged as a warning.

    Example::

        >>> ds = load_preference_dataset("data/hh-rlhf-harmless-base-test.jsonl.gz", max_rows=50)  # doctest: +SKIP
        >>> ds[0]["prompt"][-1]["role"], ds[0]["chosen"][0]["role"]  # doctest: +SKIP
        ('user', 'assistant')
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}.")
    dataset = _load_raw(name_or_path, split, config_name)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    if drop_invalid:
        dataset = _drop_invalid_rows(dataset)
    dataset = to_preference_format(dataset)
    validate_preference_rows(dataset)
    return dataset


def _load_raw(name_or_path: str, split: str, config_name: str | None) -> datasets.Dataset:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_dir(path, split)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"Preference data file or directory not found: {str(path)!r}. "
            "Check the path (or pass a Hugging Face hub dataset id such as 'Anthropic/hh-rlhf')."
        )
    return datasets.load_dataset(name_or_path, config_name, split=split)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~")) or name.lower().endswith(_PATH_LIKE_SUFFIXES)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(_BUILDERS, key=len, reverse=True) if name.endswith(s)), "")


def _load_file(path: Path) -> datasets.Dataset:
    builder = _BUILDERS.get(_suffix(path))
    if builder is None:
        raise ValueError(f"Unsupported preference data file {str(path)!r}; use one of {', '.join(_BUILDERS)}.")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _load_dir(path: Path, split: str) -> datasets.Dataset:
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _pick_split(datasets.load_from_disk(str(path)), split, path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
    preferred = [p for p in files if p.name.startswith(split)]
    files = preferred or files
    if not files:
        raise FileNotFoundError(
            f"Directory {str(path)!r} is neither a saved dataset (save_to_disk) nor holds any "
            f"{', '.join(_BUILDERS)} file."
        )
    builders = {_BUILDERS[_suffix(p)] for p in files}
    if len(builders) > 1:
        raise ValueError(f"Directory {str(path)!r} mixes json and parquet files; keep one kind per directory.")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, path: Path) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise ValueError(f"Split {split!r} not in the dataset saved at {str(path)!r}; it has {sorted(loaded)}.")
    return loaded[split]


def _drop_invalid_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    fmt = _detect_format(dataset)
    keep, reasons = [], []
    for idx, row in _iter_rows(dataset, _input_columns(fmt)):
        problem = _raw_row_problem(fmt, row, idx)
        if problem is None:
            keep.append(idx)
        else:
            reasons.append(problem)
    if not keep:
        raise PreferenceDataError(f"All {len(dataset)} rows are invalid; the first: {reasons[0]}")
    if reasons:
        logger.warning(
            "Dropped %d of %d preference rows as invalid; first reasons: %s",
            len(reasons),
            len(dataset),
            " | ".join(reasons[:5]),
        )
    return dataset.select(keep)


def _raw_row_problem(fmt: str, row: dict[str, Any], idx: int) -> str | None:
    try:
        converted = _convert_row(fmt, row, idx)
    except PreferenceDataError as err:
        return str(err)
    return _row_problem(converted, idx, conversational=fmt != _STANDARD)


# --------------------------------------------------------------------------------------------------
# Normalising
# --------------------------------------------------------------------------------------------------


def to_preference_format(dataset: datasets.Dataset) -> datasets.Dataset:
    """Normalise ``dataset`` to TRL's explicit-prompt preference format (standard or conversational).

    The format is detected from the first row; every row is converted, and a row that does not fit the
    detected format raises :class:`PreferenceDataError` naming the row and field.

    * Rows that already have a ``prompt`` column are returned unchanged (extra columns kept).
    * Conversational rows without ``prompt`` are split with ``trl.data_utils.extract_prompt``; so are rows
      whose ``prompt`` is a string while ``chosen``/``rejected`` are full conversations (UltraFeedback-binarized
      style; the string prompt is replaced by the extracted message prefix).
    * HH-RLHF transcripts (``chosen`` / ``rejected`` strings, no ``prompt``) become conversational rows:
      the turns before the final ``"\\n\\nAssistant:"`` form the prompt (Human -> ``user``, Assistant ->
      ``assistant``, text stripped) and the final Assistant text is the single response message.
      The prompts parsed from ``chosen`` and ``rejected`` must be identical.

    HH example (a test mirrors it)::

        >>> row = {
        ...     "chosen": "\\n\\nHuman: How do I boil an egg?\\n\\nAssistant: Put it in boiling water."
        ...               "\\n\\nHuman: For how long?\\n\\nAssistant: About nine minutes for a hard yolk.",
        ...     "rejected": "\\n\\nHuman: How do I boil an egg?\\n\\nAssistant: Put it in boiling water."
        ...                 "\\n\\nHuman: For how long?\\n\\nAssistant: An hour or so.",
        ... }
        >>> to_preference_format(datasets.Dataset.from_list([row]))[0] == {
        ...     "prompt": [
        ...         {"role": "user", "content": "How do I boil an egg?"},
        ...         {"role": "assistant", "content": "Put it in boiling water."},
        ...         {"role": "user", "content": "For how long?"},
        ...     ],
        ...     "chosen": [{"role": "assistant", "content": "About nine minutes for a hard yolk."}],
        ...     "rejected": [{"role": "assistant", "content": "An hour or so."}],
        ... }
        True
    """
    fmt = _detect_format(dataset)
    if fmt in (_STANDARD, _CONVERSATIONAL):
        return dataset
    return dataset.map(
        lambda row, idx: _convert_row(fmt, row, idx),
        with_indices=True,
        keep_in_memory=True,
        desc=f"Converting {fmt} preference rows",
    )


def _detect_format(dataset: datasets.Dataset) -> str:
    _require_columns(dataset, ("chosen", "rejected"))
    if len(dataset) == 0:
        raise PreferenceDataError("The preference dataset has no rows.")
    first = dataset[0]
    chosen = first["chosen"]
    if "prompt" in dataset.column_names:
        if isinstance(first["prompt"], str) and _is_message_list(chosen):
            return _IMPLICIT  # e.g. UltraFeedback-binarized: string prompt, full conversations in chosen/rejected
        return _CONVERSATIONAL if isinstance(first["prompt"], list) else _STANDARD
    if isinstance(chosen, str):
        return _HH
    if _is_message_list(chosen):
        return _IMPLICIT
    raise _row_error(
        0,
        "chosen",
        f"got {_type_name(chosen)} and there is no 'prompt' column",
        "Without a prompt column, chosen/rejected must be HH-RLHF transcripts ('\\n\\nHuman: ...\\n\\nAssistant: "
        "...') or full message lists [{role, content}, ...]; add a 'prompt' column otherwise.",
    )


def _input_columns(fmt: str) -> tuple[str, ...]:
    return REQUIRED_COLUMNS if fmt in (_STANDARD, _CONVERSATIONAL) else ("chosen", "rejected")


def _convert_row(fmt: str, row: dict[str, Any], idx: int) -> dict[str, Any]:
    if fmt == _HH:
        return _convert_hh_row(row, idx)
    if fmt == _IMPLICIT:
        return _convert_implicit_row(row, idx)
    return row


def _convert_implicit_row(row: dict[str, Any], idx: int) -> dict[str, Any]:
    for field in ("chosen", "rejected"):
        if not _is_message_list(row[field]):
            raise _row_error(
                idx, field, f"expected a list of {{role, content}} messages like row 0, got {_type_name(row[field])}"
            )
    return extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})


def _convert_hh_row(row: dict[str, Any], idx: int) -> dict[str, Any]:
    prompt, chosen = _parse_hh(row["chosen"], idx, "chosen")
    rejected_prompt, rejected = _parse_hh(row["rejected"], idx, "rejected")
    if rejected_prompt != prompt:
        turn = next((i for i, (a, b) in enumerate(zip(prompt, rejected_prompt)) if a != b), None)
        turn = min(len(prompt), len(rejected_prompt)) if turn is None else turn
        raise _row_error(
            idx,
            "rejected",
            f"the dialogue before the final 'Assistant:' turn differs from the one in 'chosen' (chosen has "
            f"{len(prompt)} prompt turns, rejected {len(rejected_prompt)}; first difference at turn {turn})",
            "An HH pair must share its prompt; drop or fix the row.",
        )
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _parse_hh(text: Any, idx: int, field: str) -> tuple[list[dict[str, str]], str]:
    """Split one HH transcript into (prompt messages, final assistant text)."""
    if not isinstance(text, str):
        raise _row_error(idx, field, f"expected an HH-RLHF transcript string like row 0, got {_type_name(text)}")
    parts = _HH_TURN.split(text)
    roles, contents = parts[1::2], [p.strip() for p in parts[2::2]]
    if "Assistant" not in roles:
        raise _row_error(
            idx,
            field,
            "HH transcript has no '\\n\\nAssistant:' turn",
            "Each transcript must end with '\\n\\nAssistant: <response>'; drop or fix the row.",
        )
    if parts[0].strip():
        raise _row_error(idx, field, f"text before the first 'Human:' turn: {parts[0].strip()[:60]!r}")
    if roles[-1] != "Assistant":
        raise _row_error(idx, field, "HH transcript ends with a 'Human:' turn instead of the Assistant's response")
    prompt = [{"role": _HH_ROLES[r], "content": c} for r, c in zip(roles[:-1], contents[:-1])]
    return prompt, contents[-1]


# --------------------------------------------------------------------------------------------------
# Validating
# --------------------------------------------------------------------------------------------------


def validate_preference_rows(dataset: datasets.Dataset) -> None:
    """Raise :class:`PreferenceDataError` on the first bad row of an explicit-prompt preference dataset.

    Checked: the ``prompt``/``chosen``/``rejected`` columns exist; no value is None; values are strings
    (standard, decided by the first row's prompt) or lists of ``{"role": str, "content": str}`` messages
    (conversational); no text is empty or whitespace-only (conversational: the prompt list must not be empty
    and must contain some text, and the last message of ``chosen`` / ``rejected`` must have text);
    ``chosen`` differs from ``rejected``.  Row indices are 0-based into ``dataset`` as given, e.g.::

        row 17, field 'rejected': empty string. Every row needs a non-empty prompt, chosen and rejected; ...
    """
    _require_columns(dataset, REQUIRED_COLUMNS)
    if len(dataset) == 0:
        return
    conversational = isinstance(dataset[0]["prompt"], list)
    for idx, row in _iter_rows(dataset, REQUIRED_COLUMNS):
        problem = _row_problem(row, idx, conversational)
        if problem is not None:
            raise PreferenceDataError(problem)


def _require_columns(dataset: datasets.Dataset, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise PreferenceDataError(
            f"missing column(s) {', '.join(repr(c) for c in missing)}; the dataset has columns "
            f"{dataset.column_names}. Rename or add columns so every row has {', '.join(columns)}."
        )


def _iter_rows(dataset: datasets.Dataset, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    idx = 0
    for batch in dataset.select_columns(list(columns)).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in columns)):
            yield idx, dict(zip(columns, values))
            idx += 1


def _row_problem(row: dict[str, Any], idx: int, conversational: bool) -> str | None:
    check = _message_list_problem if conversational else _text_problem
    for field in REQUIRED_COLUMNS:
        problem = "value is missing (None)" if row[field] is None else check(row[field], field)
        if problem is not None:
            return str(_row_error(idx, field, problem))
    if row["chosen"] == row["rejected"]:
        return str(
            _row_error(
                idx,
                "rejected",
                "identical to 'chosen', so the pair carries no preference",
                "Drop the row or give it a different rejected response.",
            )
        )
    return None


def _text_problem(value: Any, field: str) -> str | None:
    if not isinstance(value, str):
        return f"expected a string (standard format, as in row 0), got {_type_name(value)}"
    if not value:
        return "empty string"
    if not value.strip():
        return "whitespace-only string"
    return None


def _message_list_problem(value: Any, field: str) -> str | None:
    if not isinstance(value, list):
        return f"expected a list of {{role, content}} messages (conversational, as in row 0), got {_type_name(value)}"
    if not value:
        return "empty message list"
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and message["role"]):
            return f"message {i} is not a {{'role': str, 'content': str}} dict: {message!r:.80}"
        if not isinstance(message.get("content"), str):
            return f"message {i} content is {_type_name(message.get('content'))}, expected a string"
    if field == "prompt" and not any(m["content"].strip() for m in value):
        return "every prompt message is empty or whitespace-only"
    if field != "prompt" and not value[-1]["content"].strip():
        return f"final message content is {'empty' if not value[-1]['content'] else 'whitespace-only'}"
    return None


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__
