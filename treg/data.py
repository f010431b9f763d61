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

* Anthropic HH-RLHF transcripts (only ``chosen`` / ``rejected`` strings); see :func:`to_preference_format`;
* Orca-style pairs (``system`` + ``question`` + ``chosen`` / ``rejected`` strings, as in Intel/orca_dpo_pairs): the
  system text (when not empty) and the question become the prompt's messages, the answers assistant messages.

A file of SFT conversations (only ``messages``, or ``text`` / ``completion``) is an error that says so.
:func:`keep_training_columns` keeps only the columns training reads (prompt, chosen, rejected and treg's own), so no
other column reaches TRL's format detection.

:func:`validate_preference_rows` then rejects rows a trainer cannot learn from, naming the row and field.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from trl.data_utils import extract_prompt

from treg.files import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "PreferenceDataError",
    "load_preference_dataset",
    "prompt_problem",
    "to_preference_format",
    "validate_preference_rows",
]

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
# Chat roles accepted in conversational rows, and those a response (chosen / rejected) may hold.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
RESPONSE_ROLES = ("assistant", "tool")
# Per-token columns that may come with the data (treg.token_rewards names them); each pair is given whole or not at all.
TOKEN_VALUE_COLUMN_PAIRS = (
    ("chosen_token_rewards", "rejected_token_rewards"),
    ("ref_chosen_token_logps", "ref_rejected_token_logps"),
)
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

_STANDARD, _CONVERSATIONAL, _IMPLICIT, _HH, _ORCA = (
    "standard", "conversational", "implicit-conversational", "hh", "orca"
)
# Columns training reads besides prompt/chosen/rejected: per-token values (treg.token_rewards), the extrinsic scores the
# RELC critic may show, TRL's per-row chat-template arguments, and the embedded toy task's defect flags (viz, benches).
TREG_COLUMNS = (
    *(c for pair in TOKEN_VALUE_COLUMN_PAIRS for c in pair),
    "score_chosen", "score_rejected", "chat_template_kwargs",
    "chosen_defects", "rejected_defects", "chosen_token_defects", "rejected_token_defects",
)


class PreferenceDataError(UserError):
    """Bad preference data; message names the row index and the field and says what to do."""


class PreferenceDataNotFound(PreferenceDataError, FileNotFoundError):
    """A preference data path that does not exist, or a folder without data files."""


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
    counts: dict | None = None,
) -> datasets.Dataset:
    """Load preference rows, normalise them (:func:`to_preference_format`) and validate them.

    ``name_or_path`` may be a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet``;
    ``split`` is ignored), a local directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
    or holding such files (files whose name starts with ``split`` are preferred), or a hub dataset id
    (``datasets.load_dataset(name, config_name, split=split)``).

    ``max_rows`` keeps the first N raw rows (before any row is dropped).  With ``drop_invalid=False``
    (default) the first bad row raises :class:`PreferenceDataError`; with ``True`` bad rows are dropped and
    their count plus the first few reasons are logged as a warning. ``counts``, when given, receives
    ``rows_read`` and ``rows_dropped``.

    Example::

        >>> ds = load_preference_dataset("data/hh-rlhf-harmless-base-test.jsonl.gz", max_rows=50)  # doctest: +SKIP
        >>> ds[0]["prompt"][-1]["role"], ds[0]["chosen"][0]["role"]  # doctest: +SKIP
        ('user', 'assistant')
    """
    if max_rows is not None and max_rows < 1:
        raise PreferenceDataError(f"max_rows must be a positive integer or None, got {max_rows!r}.")
    dataset = _load_raw(name_or_path, split, config_name)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    rows_read = len(dataset)
    if drop_invalid:
        dataset = _drop_invalid_rows(dataset)
    if counts is not None:
        counts.update(rows_read=rows_read, rows_dropped=rows_read - len(dataset))
    dataset = to_preference_format(dataset)
    validate_preference_rows(dataset)
    check_token_value_columns(dataset)
    return dataset


def _load_raw(name_or_path: str, split: str, config_name: str | None) -> datasets.Dataset:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_dir(path, split)
    if _looks_like_path(name_or_path):
        raise PreferenceDataNotFound(
            f"Preference data file or directory not found: {str(path)!r}. "
            "Check the path (or pass a Hugging Face hub dataset id such as 'Anthropic/hh-rlhf')."
        )
    try:
        return datasets.load_dataset(name_or_path, config_name, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetsError) as e:
        raise PreferenceDataError(
            f"hub dataset {name_or_path!r} (config {config_name!r}, split {split!r}) could not be loaded: "
            f"{type(e).__name__}: {_one_line(e)}. Check the id, config and split; offline (HF_HUB_OFFLINE=1) only "
            "datasets already in the local Hugging Face cache load; or pass a local file or folder."
        ) from e


def _looks_like_path(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~")) or name.lower().endswith(_PATH_LIKE_SUFFIXES)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(_BUILDERS, key=len, reverse=True) if name.endswith(s)), "")


def _load_file(path: Path) -> datasets.Dataset:
    builder = _BUILDERS.get(_suffix(path))
    if builder is None:
        raise PreferenceDataError(
            f"Unsupported preference data file {str(path)!r}; use one of {', '.join(_BUILDERS)} (rename a file of "
            "JSON lines to .jsonl; convert CSV to JSON lines or Parquet)."
        )
    return _read_data_files(builder, [path])


def _load_dir(path: Path, split: str) -> datasets.Dataset:
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            raise PreferenceDataError(
                f"saved dataset {str(path)!r} (save_to_disk) cannot be read: {type(e).__name__}: {_one_line(e)}. "
                "Save it again, or copy it again if it was copied."
            ) from e
        return _pick_split(loaded, split, path)
    files = data_files_of_dir(path, split)
    if not files:
        raise PreferenceDataNotFound(
            f"Directory {str(path)!r} is neither a saved dataset (save_to_disk) nor holds any "
            f"{', '.join(_BUILDERS)} file."
        )
    builders = {_BUILDERS[_suffix(p)] for p in files}
    if len(builders) > 1:
        raise PreferenceDataError(
            f"Directory {str(path)!r} mixes json and parquet files; keep one kind per directory."
        )
    return _read_data_files(builders.pop(), files)


def data_files_of_dir(path: Path, split: str) -> list[Path]:
    """The data files of a folder that a split reads: those whose name starts with ``split``, else all of them."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and _suffix(p))
    return [p for p in files if p.name.startswith(split)] or files


def local_data_source(name_or_path: str, split: str) -> tuple[str, ...] | None:
    """What a local ``name_or_path`` reads for ``split``: its data files (absolute paths), or the saved dataset's folder
    (with the split's name when it is a DatasetDict); None for hub ids and missing paths. Two splits with the same
    source read the same rows (a file has no splits)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return (str(path.resolve()),)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return (str(path.resolve()), split)
    if (path / "state.json").is_file():
        return (str(path.resolve()),)
    return tuple(str(p.resolve()) for p in data_files_of_dir(path, split))


def _read_data_files(builder: str, files: list[Path]) -> datasets.Dataset:
    """``datasets.load_dataset(builder, data_files=files)``; a file it cannot read (empty, binary, truncated gzip, a
    malformed JSON line, a bare JSON value, not Parquet) raises :class:`PreferenceDataError` naming the file and,
    for JSON lines, the line."""
    for path in files:
        if path.stat().st_size == 0:
            raise PreferenceDataError(f"preference data file {str(path)!r} is empty (0 bytes); give a file with rows.")
    # datasets' json builder logs its own ERROR line before raising; the error below says it better, naming the line
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except (ValueError, OSError, EOFError, StopIteration, zlib.error, datasets.exceptions.DatasetsError) as e:
        problem = next(filter(None, (_file_problem(p, builder) for p in files)), None)
        raise PreferenceDataError(
            problem or f"preference data {', '.join(repr(str(p)) for p in files)} could not be read as {builder}: "
            f"{type(e).__name__}: {_one_line(e)}. Check that the file is valid {builder}."
        ) from e
    finally:
        quiet.setLevel(level)
    if len(dataset) == 0:
        raise PreferenceDataError(
            f"preference data {', '.join(repr(str(p)) for p in files)} holds no rows; give a file with rows."
        )
    return dataset


def _file_problem(path: Path, builder: str) -> str | None:
    """Why ``path`` cannot be read as ``builder`` data, naming the file (and line), or None if no reason is found."""
    name = repr(str(path))
    if builder == "parquet":
        try:
            import pyarrow.parquet as pq

            pq.read_metadata(str(path))
        except Exception as e:  # noqa: BLE001 — pyarrow raises several kinds; each means "not a Parquet file"
            return f"{name} is not a readable Parquet file ({_one_line(e)}); export or copy it again."
        return None
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        return (
            f"{name} is not a complete gzip file ({_one_line(e)}); it is probably truncated: download or compress it "
            "again."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (
            f"{name} is not UTF-8 text (undecodable byte at offset {e.start}), so not JSON: is it a binary file? "
            "Give JSON lines (one object per line) or a JSON array of objects."
        )
    if not text.strip():
        return f"{name} holds only whitespace, no rows; give a file with rows."
    return _json_text_problem(name, text)


def _json_text_problem(name: str, text: str) -> str | None:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None  # several values: JSON lines, checked line by line below
    else:
        if isinstance(doc, list):
            bad = next((i for i, item in enumerate(doc) if not isinstance(item, dict)), None)
            if not doc or bad is not None:
                got = "is an empty JSON array" if not doc else f"has a {_json_type(doc[bad])} as item {bad}"
                return f"{name} {got}; expected a JSON array of objects with prompt, chosen and rejected."
            return None
        if not isinstance(doc, dict):
            return (
                f"{name} holds a bare JSON {_json_type(doc)} ({text.strip()[:40]!r}); expected JSON lines (one object "
                "per line) or a JSON array of objects with prompt, chosen and rejected."
            )
        return None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{name} line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or delete the line."
        if not isinstance(value, dict):
            return f"{name} line {n} is a JSON {_json_type(value)}, expected an object with prompt, chosen, rejected."
    return None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, path: Path) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise PreferenceDataError(
            f"Split {split!r} not in the dataset saved at {str(path)!r}; it has {sorted(loaded)}."
        )
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


def keep_training_columns(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` with only prompt, chosen, rejected and :data:`TREG_COLUMNS` (and TRL's tokenized ``*_ids``): a
    column training does not read (``messages``, ``prompt_id``, scores under other names, …) never reaches TRL, whose
    format sniffing picks a column from a set (so the column it reads depends on ``PYTHONHASHSEED``) and fails on an
    empty list there."""
    keep = (*REQUIRED_COLUMNS, *TREG_COLUMNS, "prompt_ids", "chosen_ids", "rejected_ids")
    extra = [c for c in dataset.column_names if c not in keep]
    return dataset.remove_columns(extra) if extra else dataset


def set_aside_extra_columns(dataset: datasets.Dataset):
    """``(kept, put_back)``: ``dataset`` with only the training columns (:func:`keep_training_columns`), and a function
    that puts the other columns back beside a same-length, same-order result (a Python caller's own columns survive
    TRL's tokenization, as in TRL); a result with other rows keeps only its own columns."""
    kept = keep_training_columns(dataset)
    extra = [c for c in dataset.column_names if c not in kept.column_names]
    if not extra:
        return kept, lambda result: result
    aside = dataset.select_columns(extra)

    def put_back(result: datasets.Dataset) -> datasets.Dataset:
        if len(result) != len(aside):
            return result
        return datasets.concatenate_datasets([result, aside.remove_columns(
            [c for c in extra if c in result.column_names])], axis=1)

    return kept, put_back


def _detect_format(dataset: datasets.Dataset) -> str:
    columns = set(dataset.column_names)
    if not {"chosen", "rejected"} <= columns:
        sft = [c for c in ("messages", "conversations", "text", "completion") if c in columns]
        if sft:
            raise PreferenceDataError(
                f"this looks like SFT data (column {sft[0]!r}, no 'chosen'/'rejected'; columns "
                f"{dataset.column_names}): treg trains on preference pairs, each a prompt with a chosen and a "
                "rejected response. Use a preference dataset (prompt, chosen, rejected), or build pairs from your "
                "prompts with `treg pairs`."
            )
    if {"question", "chosen", "rejected"} <= columns and "prompt" not in columns:
        return _ORCA
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
        if not _HH_TURN.search(chosen):  # plain strings without a prompt column, not HH transcripts
            raise PreferenceDataError(
                f"missing column 'prompt'; the dataset has columns {dataset.column_names} and row 0's 'chosen' is a "
                "plain string, not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'). Add a 'prompt' "
                "column (or rename yours to 'prompt')."
            )
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
    if fmt == _ORCA:
        return ("question", "chosen", "rejected")
    return REQUIRED_COLUMNS if fmt in (_STANDARD, _CONVERSATIONAL) else ("chosen", "rejected")


def _convert_row(fmt: str, row: dict[str, Any], idx: int) -> dict[str, Any]:
    if fmt == _HH:
        return _convert_hh_row(row, idx)
    if fmt == _ORCA:
        return _convert_orca_row(row, idx)
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


def _convert_orca_row(row: dict[str, Any], idx: int) -> dict[str, Any]:
    """system + question + chosen/rejected strings → conversational rows (a blank system text is left out)."""
    for name in ("question", "chosen", "rejected", "system"):
        value = row.get(name)
        if name == "system" and value is None:
            continue
        if not isinstance(value, str):
            raise _row_error(idx, name, f"expected a string (Orca-style pairs), got {_type_name(value)}")
    prompt = [{"role": "user", "content": row["question"]}]
    if (row.get("system") or "").strip():
        prompt.insert(0, {"role": "system", "content": row["system"]})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


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

    Conversational rows must also alternate roles: no two consecutive messages of the conversation (the prompt
    followed by ``chosen``, the prompt followed by ``rejected``) are both ``user`` or both ``assistant`` turns.
    Many chat templates (Gemma, Mistral, Llama-2) raise on such a conversation when the trainer tokenizes it, with
    an error that names no row; others render it, but it is malformed data either way (HH-RLHF's harmless-base test
    split has four rows with two Assistant turns in a row). Such rows are rejected here, naming the row and the
    turns, rather than merged: merging would change the text the pair was labeled on. With ``drop_invalid`` (the
    recipe key ``drop_invalid_rows``) they are dropped and counted like any other bad row.
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
    if conversational:
        for field in ("chosen", "rejected"):
            problem = _alternation_problem(row["prompt"], row[field], field)
            if problem is not None:
                return str(_row_error(idx, problem[0], problem[1], _ALTERNATION_HINT))
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


_ALTERNATION_HINT = (
    "Chat templates that need alternating user/assistant turns (Gemma, Mistral, Llama-2) cannot render it; merge "
    "the two turns into one or drop the row (drop_invalid_rows: true)."
)


def _alternation_problem(prompt: list, response: list, field: str) -> tuple[str, str] | None:
    """(field, problem) for the first two consecutive user or assistant turns of ``prompt + response``."""
    turns = [("prompt", i, m["role"]) for i, m in enumerate(prompt)]
    turns += [(field, i, m["role"]) for i, m in enumerate(response)]
    for (f0, i0, r0), (f1, i1, r1) in zip(turns, turns[1:]):
        if r0 == r1 and r0 in ("user", "assistant"):
            where = f"messages {i0} and {i1}" if f0 == f1 else f"the last prompt message and {field} message {i1}"
            return f1, f"{where} are both '{r0}' turns (roles must alternate)"
    return None


def prompt_problem(value: Any) -> str | None:
    """What is wrong with a prompt on its own (a string, or chat messages whose roles alternate), or None."""
    if value is None:
        return "value is missing (None)"
    if isinstance(value, str):
        return _text_problem(value, "prompt")
    problem = _message_list_problem(value, "prompt")
    if problem is None:
        alternation = _alternation_problem(value, [], "prompt")
        problem = None if alternation is None else alternation[1]
    return problem


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
    role_problem = _role_problem(value, field)
    if role_problem is not None:
        return role_problem
    if field == "prompt" and not any(m["content"].strip() for m in value):
        return "every prompt message is empty or whitespace-only"
    if field != "prompt" and not value[-1]["content"].strip():
        return f"final message content is {'empty' if not value[-1]['content'] else 'whitespace-only'}"
    return None


def _role_problem(messages: list[dict[str, Any]], field: str) -> str | None:
    """A role outside :data:`CHAT_ROLES`, or a response (``chosen``/``rejected``) holding a user or system turn."""
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            return f"message {i} has role {message['role']!r}; chat roles are {', '.join(CHAT_ROLES)}: rename it"
    if field != "prompt":
        for i, message in enumerate(messages):
            if message["role"] not in RESPONSE_ROLES:
                return (
                    f"message {i} has role {message['role']!r}, but a response holds only "
                    f"{' or '.join(map(repr, RESPONSE_ROLES))} messages: move the turn into 'prompt' or fix the role"
                )
    return None


def check_token_value_columns(dataset: datasets.Dataset) -> None:
    """Per-token columns given with the data (token rewards, reference log-probs) come in pairs, and each value is a
    list of numbers; raise :class:`PreferenceDataError` naming the column (and row) otherwise. Their lengths are
    checked after tokenization (:func:`treg.token_rewards.check_token_columns`)."""
    columns = set(dataset.column_names)
    for pair in TOKEN_VALUE_COLUMN_PAIRS:
        present = [c for c in pair if c in columns]
        if len(present) == 1:
            missing = next(c for c in pair if c not in columns)
            raise PreferenceDataError(
                f"column {present[0]!r} is given without {missing!r}; per-token values come in pairs (one list per "
                f"chosen and per rejected response), and treg would otherwise replace both. Add {missing!r}, or "
                f"drop {present[0]!r} to let treg compute both."
            )
        for column in present:
            for idx, values in enumerate(dataset[column]):
                problem = _number_list_problem(values)
                if problem is not None:
                    raise _row_error(
                        idx, column, problem, "Give one number per completion token, or drop the column to recompute."
                    )


def _number_list_problem(values: Any) -> str | None:
    if values is None:
        return "value is missing (None)"
    if not isinstance(values, list | tuple):
        return f"expected a list of numbers, got {_type_name(values)} {values!r:.40}"
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"value {k} is {'None' if v is None else f'{_type_name(v)} {v!r:.40}'}, expected a number"
    return None


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------------
# Prompt length
# --------------------------------------------------------------------------------------------------


def cut_prompts(dataset: datasets.Dataset, tokenizer, max_tokens: int, name: str = "train") -> datasets.Dataset:
    """Prompts longer than ``max_tokens`` tokens (as TRL renders them: a string with the tokenizer's special tokens,
    messages through the chat template with the generation prompt) cut from their start: whole turns first, oldest
    first, keeping leading system messages and starting at a user turn; then the start of the oldest remaining text.
    The number cut is logged (with the first row) as a warning. Rows whose prompt fits are unchanged."""
    cut: list[tuple[int, int, int]] = []

    def shorten(row, idx):
        before = prompt_length(tokenizer, row["prompt"])
        if before <= max_tokens:
            return {"prompt": row["prompt"]}
        prompt = _cut_prompt(tokenizer, row["prompt"], max_tokens)
        cut.append((idx, before, prompt_length(tokenizer, prompt)))
        return {"prompt": prompt}

    out = dataset.map(shorten, with_indices=True, keep_in_memory=True, desc=f"{name}: max_prompt_length")
    if cut:
        row, before, after = cut[0]
        logger.warning(
            "%s: max_prompt_length=%d cut %d of %d prompts from their start (first: row %d, %d -> %d tokens).",
            name, max_tokens, len(cut), len(dataset), row, before, after,
        )
    return out


def prompt_length(tokenizer, prompt) -> int:
    """Tokens of a prompt as the trainer tokenizes it."""
    if isinstance(prompt, str):
        return len(tokenizer(text=prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text=text, add_special_tokens=False)["input_ids"])


def _cut_prompt(tokenizer, prompt, max_tokens: int):
    if isinstance(prompt, str):
        return _cut_text(prompt, lambda text: prompt_length(tokenizer, text) <= max_tokens)
    messages = [dict(m) for m in prompt]
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    body = messages[head:]
    # drop the oldest turns while more than the last user turn remains, so the rest starts at a user turn
    while prompt_length(tokenizer, messages[:head] + body) > max_tokens:
        later = [i for i, m in enumerate(body) if i > 0 and m.get("role") == "user"]
        if not later:
            break
        body = body[later[0]:]
    messages = messages[:head] + body
    first = min(head, len(messages) - 1)  # the oldest non-system message (or the last system one)
    if prompt_length(tokenizer, messages) > max_tokens and isinstance(messages[first].get("content"), str):

        def fits(text):
            trial = [dict(m) for m in messages]
            trial[first]["content"] = text
            return prompt_length(tokenizer, trial) <= max_tokens

        messages[first]["content"] = _cut_text(messages[first]["content"], fits)
    return messages


def _cut_text(text: str, fits) -> str:
    """The longest end of ``text`` for which ``fits`` holds (a binary search over where it starts)."""
    lo, hi = 0, len(text)  # text[hi:] == "" is the shortest candidate
    if fits(text):
        return text
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(text[mid:]):
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]
