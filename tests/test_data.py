"""Tests for treg.data: loading, normalising and validating preference data (all offline)."""

from __future__ import annotations

import doctest
import gzip
import json
import logging
from pathlib import Path

import datasets
import pytest

import treg.data
from treg.data import (
    PreferenceDataError,
    load_preference_dataset,
    to_preference_format,
    validate_preference_rows,
)

HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

# Mirrors the HH example in to_preference_format's docstring.
HH_ROW = {
    "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."
    "\n\nHuman: For how long?\n\nAssistant: About nine minutes for a hard yolk.",
    "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."
    "\n\nHuman: For how long?\n\nAssistant: An hour or so.",
}
HH_EXPECTED = {
    "prompt": [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water."},
        {"role": "user", "content": "For how long?"},
    ],
    "chosen": [{"role": "assistant", "content": "About nine minutes for a hard yolk."}],
    "rejected": [{"role": "assistant", "content": "An hour or so."}],
}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _standard_rows(n=5):
    return [
        {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."} for i in range(n)
    ]


def _conversational_rows(n=5):
    return [
        {
            "prompt": [_user(f"Question {i}?")],
            "chosen": [_assistant(f"Good {i}.")],
            "rejected": [_assistant(f"Bad {i}.")],
        }
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_row_error(err: pytest.ExceptionInfo, row: int, field: str) -> None:
    message = str(err.value)
    assert f"row {row}," in message, message
    assert f"'{field}'" in message, message


# ---------------------------------------------------------------- HH conversion


def test_hh_conversion_mirrors_docstring_example():
    out = to_preference_format(datasets.Dataset.from_list([HH_ROW]))
    assert out[0] == HH_EXPECTED
    validate_preference_rows(out)


def test_docstring_examples_run():
    assert doctest.testmod(treg.data).failed == 0


def test_hh_conversion_keeps_extra_columns_and_single_turn():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.", "id": 7}
    out = to_preference_format(datasets.Dataset.from_list([row]))[0]
    assert out["prompt"] == [_user("Hi")]
    assert out["chosen"] == [_assistant("Hello!")] and out["rejected"] == [_assistant("Go away.")]
    assert out["id"] == 7


def test_real_hh_first_50_rows():
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} not present")
    ds = load_preference_dataset(str(HH_FILE), max_rows=50)
    assert len(ds) == 50
    for row in ds:
        assert isinstance(row["prompt"], list) and row["prompt"][-1]["role"] == "user"
        for field in ("chosen", "rejected"):
            assert len(row[field]) == 1 and row[field][0]["role"] == "assistant"
            assert row[field][0]["content"].strip()


def test_real_hh_full_file_has_known_bad_rows(caplog):
    """The full harmless-base test split holds 13 rows that cannot be used as-is: 9 empty or mismatched pairs and 4
    with two Assistant turns in a row (issue 13, D3)."""
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} not present")
    with pytest.raises(PreferenceDataError) as err:
        load_preference_dataset(str(HH_FILE))
    _assert_row_error(err, 1254, "rejected")
    with caplog.at_level(logging.WARNING, logger="treg.data"):
        ds = load_preference_dataset(str(HH_FILE), drop_invalid=True)
    assert len(ds) == 2312 - 13
    assert "Dropped 13 of 2312" in caplog.text and "row 86, field 'chosen'" in caplog.text


# ---------------------------------------------------------------- accepted inputs


def test_standard_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "std.jsonl", [{**r, "score": 1.0} for r in _standard_rows()])
    ds = load_preference_dataset(str(path))
    assert len(ds) == 5 and ds[2]["prompt"] == "Question 2?" and ds[2]["chosen"] == "Good answer 2."
    assert "score" in ds.column_names


def test_conversational_jsonl_gz_and_max_rows(tmp_path):
    path = tmp_path / "conv.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in _conversational_rows())
    ds = load_preference_dataset(str(path), max_rows=3)
    assert len(ds) == 3 and ds[1] == _conversational_rows()[1]


def test_implicit_prompt_conversational(tmp_path):
    rows = [
        {
            "chosen": [_user(f"Q{i}"), _assistant("A"), _user("more?"), _assistant(f"good {i}")],
            "rejected": [_user(f"Q{i}"), _assistant("A"), _user("more?"), _assistant(f"bad {i}")],
        }
        for i in range(4)
    ]
    ds = load_preference_dataset(str(_write_jsonl(tmp_path / "implicit.jsonl", rows)))
    assert ds[3]["prompt"] == [_user("Q3"), _assistant("A"), _user("more?")]
    assert ds[3]["chosen"] == [_assistant("good 3")] and ds[3]["rejected"] == [_assistant("bad 3")]


def test_string_prompt_with_full_conversations_is_extracted():
    row = {"prompt": "Q", "chosen": [_user("Q"), _assistant("good")], "rejected": [_user("Q"), _assistant("bad")]}
    out = to_preference_format(datasets.Dataset.from_list([row]))[0]
    assert out == {"prompt": [_user("Q")], "chosen": [_assistant("good")], "rejected": [_assistant("bad")]}


def test_parquet_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(_standard_rows()).to_parquet(str(path))
    ds = load_preference_dataset(str(path))
    assert ds.to_list() == _standard_rows()


def test_json_list_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(_standard_rows()))
    assert load_preference_dataset(str(path)).to_list() == _standard_rows()


def test_save_to_disk_dir(tmp_path):
    datasets.Dataset.from_list(_conversational_rows()).save_to_disk(str(tmp_path / "saved"))
    ds = load_preference_dataset(str(tmp_path / "saved"))
    assert ds.to_list() == _conversational_rows()


def test_saved_dataset_dict_picks_split(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(_standard_rows(4)), test=datasets.Dataset.from_list(_standard_rows(2))
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_preference_dataset(str(tmp_path / "dd"), split="test")) == 2


def test_directory_of_files_prefers_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _standard_rows(4))
    _write_jsonl(tmp_path / "test.jsonl", _standard_rows(2))
    assert len(load_preference_dataset(str(tmp_path), split="test")) == 2


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_preference_dataset("./no/such/pairs.jsonl")
    with pytest.raises(FileNotFoundError):
        load_preference_dataset("missing-file.parquet")


# ---------------------------------------------------------------- bad inputs


def test_missing_column():
    ds = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c"}])
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(ds)
    assert "'rejected'" in str(err.value) and "['prompt', 'chosen']" in str(err.value)


def test_none_value():
    rows = _standard_rows()
    rows[3]["chosen"] = None
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "chosen")
    assert "None" in str(err.value)


def test_non_string_value():
    # Arrow columns have one type, so a non-string column is already wrong at row 0.
    rows = [{"prompt": "p", "chosen": i, "rejected": "r"} for i in range(4)]
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 0, "chosen")
    assert "int" in str(err.value)


def test_conversational_message_content_not_string():
    rows = _conversational_rows()
    rows[3]["rejected"] = [{"role": "assistant", "content": None}]
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "rejected")


def test_empty_string():
    rows = _standard_rows()
    rows[3]["rejected"] = ""
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "rejected")
    assert "empty string" in str(err.value) and "drop or fix the row" in str(err.value)


def test_whitespace_only():
    rows = _standard_rows()
    rows[3]["prompt"] = "  \n\t"
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "prompt")
    assert "whitespace" in str(err.value)


def test_conversational_empty_final_message_and_empty_prompt():
    rows = _conversational_rows()
    rows[3]["chosen"] = [_assistant("   ")]
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "chosen")
    rows = _conversational_rows()
    rows[3]["prompt"] = []
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "prompt")


def test_chosen_equals_rejected():
    rows = _standard_rows()
    rows[3]["rejected"] = rows[3]["chosen"]
    with pytest.raises(PreferenceDataError) as err:
        validate_preference_rows(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "rejected")
    assert "no preference" in str(err.value)


def test_hh_differing_prompts():
    rows = [HH_ROW] * 5
    rows[3] = {**HH_ROW, "rejected": "\n\nHuman: How do I fry an egg?\n\nAssistant: With oil."}
    with pytest.raises(PreferenceDataError) as err:
        to_preference_format(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "rejected")
    assert "share its prompt" in str(err.value)


def test_hh_without_assistant_turn():
    rows = [HH_ROW] * 5
    rows[3] = {**HH_ROW, "chosen": "\n\nHuman: How do I boil an egg?"}
    with pytest.raises(PreferenceDataError) as err:
        to_preference_format(datasets.Dataset.from_list(rows))
    _assert_row_error(err, 3, "chosen")
    assert "Assistant:" in str(err.value)


def test_drop_invalid_drops_and_logs(tmp_path, caplog):
    rows = [HH_ROW] * 5
    rows[1] = {**HH_ROW, "chosen": "\n\nHuman: How do I boil an egg?"}
    rows[3] = {**HH_ROW, "chosen": HH_ROW["rejected"]}
    path = _write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(PreferenceDataError):
        load_preference_dataset(str(path))
    with caplog.at_level(logging.WARNING, logger="treg.data"):
        ds = load_preference_dataset(str(path), drop_invalid=True)
    assert len(ds) == 3 and ds[0] == HH_EXPECTED
    assert "Dropped 2 of 5" in caplog.text and "row 1," in caplog.text and "row 3," in caplog.text


def test_no_prompt_column_and_unrecognised_chosen():
    ds = datasets.Dataset.from_list([{"chosen": 1, "rejected": 2}])
    with pytest.raises(PreferenceDataError) as err:
        to_preference_format(ds)
    _assert_row_error(err, 0, "chosen")


# ------------------------------------------------------------- role alternation (issue 13, D3)
def test_d3_consecutive_turns_of_one_role_are_rejected_naming_the_row_and_dropped(tmp_path, caplog):
    """Two Assistant turns in a row (HH-RLHF harmless-base test rows 667, 763, 1319, 1849) pass every other check,
    then Gemma's and Mistral's chat templates raise an unnamed error when the trainer tokenizes them."""
    double = HH_ROW["chosen"].replace("\n\nHuman: For how long?", "\n\nAssistant: Any egg will do.")
    rows = [HH_ROW, {"chosen": double, "rejected": HH_ROW["rejected"].replace(
        "\n\nHuman: For how long?", "\n\nAssistant: Any egg will do.")}]
    path = _write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(PreferenceDataError) as err:
        load_preference_dataset(str(path))
    _assert_row_error(err, 1, "prompt")
    assert "messages 1 and 2 are both 'assistant' turns" in str(err.value) and "drop_invalid_rows" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="treg.data"):
        kept = load_preference_dataset(str(path), drop_invalid=True)
    assert kept.to_list() == [HH_EXPECTED] and "Dropped 1 of 2" in caplog.text
    # a prompt ending with an assistant turn followed by the assistant's response; two user turns in a row
    conversational = [
        {"prompt": [_user("Hi"), _assistant("Hello")], "chosen": [_assistant("A")], "rejected": [_assistant("B")]},
        {"prompt": [_user("Hi"), _user("Hello?")], "chosen": [_assistant("A")], "rejected": [_assistant("B")]},
    ]
    for row, field in zip(conversational, ("chosen", "prompt")):
        with pytest.raises(PreferenceDataError) as err:
            validate_preference_rows(datasets.Dataset.from_list([row]))
        _assert_row_error(err, 0, field)
    ok = {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")], "chosen": [_assistant("A")],
          "rejected": [_assistant("B")]}
    validate_preference_rows(datasets.Dataset.from_list([ok]))  # a system turn before the first user turn is fine


def test_d3_real_hh_rows_with_two_assistant_turns(tmp_path):
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} not present")
    with gzip.open(HH_FILE, "rt") as f:
        raw = [json.loads(line) for line in f]
    for i in (667, 763, 1319, 1849):
        with pytest.raises(PreferenceDataError, match="row 1, field 'prompt'.*both 'assistant' turns"):
            validate_preference_rows(to_preference_format(datasets.Dataset.from_list([raw[0], raw[i]])))
    path = _write_jsonl(tmp_path / "four.jsonl", [raw[i] for i in (0, 667, 763, 1319, 1849)])
    assert len(load_preference_dataset(str(path), drop_invalid=True)) == 1
