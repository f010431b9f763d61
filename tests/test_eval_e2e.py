"""End to end, offline: the tiny model as policy and judge on 5 questions of each benchmark (small fixture files shaped
like the real ones), through ``treg eval``; and the training hook firing inside a TRegTrainer run and logging."""

import json
import os

import pytest

from treg.evaluation.cli import main as eval_main


def write_data_root(root, n=5):
    """Fixture files in the layout of eval/data.yaml (shaped like the real AlpacaEval 2 / Arena-Hard v0.1 files)."""
    tasks = ["sort: 3 1 2", "copy: 4 5", "inc: 1 2", "rev: 7 8 9", "sort: 9 8", "copy: 1"][:n]
    os.makedirs(os.path.join(root, "alpaca-eval"), exist_ok=True)
    os.makedirs(os.path.join(root, "arena-hard"), exist_ok=True)
    ref = [
        {"dataset": "helpful_base", "instruction": t, "output": "1 2 3", "generator": "gpt4_1106_preview"}
        for t in tasks
    ]
    with open(os.path.join(root, "alpaca-eval", "gpt4_1106_preview-outputs.json"), "w") as f:
        json.dump(ref, f)
    with open(os.path.join(root, "arena-hard", "v0.1-question.jsonl"), "w") as f:
        for i, t in enumerate(tasks):
            f.write(json.dumps({"uid": f"uid{i}", "category": "arena-hard-v0.1", "cluster": "toy", "prompt": t}) + "\n")
    with open(os.path.join(root, "arena-hard", "v0.1-gpt-4-0314.jsonl"), "w") as f:
        for i, t in enumerate(tasks):
            f.write(
                json.dumps(
                    {
                        "uid": f"uid{i}",
                        "ans_id": f"a{i}",
                        "model": "gpt-4-0314",
                        "tstamp": 0.0,
                        "messages": [
                            {"role": "user", "content": t},
                            {"role": "assistant", "content": {"answer": "**1 2 3**"}},
                        ],
                    }
                )
                + "\n"
            )
    return root


@pytest.fixture
def data_root(tmp_path, monkeypatch, tiny):
    root = write_data_root(str(tmp_path / "data"))
    monkeypatch.setenv("TREG_EVAL_DATA", root)
    return root


def test_alpaca_eval_end_to_end_with_tiny_policy_and_judge(data_root, tmp_path):
    out = tmp_path / "ae"
    argv = [
        "alpaca-eval",
        "--model",
        "treg:tiny",
        "--judge",
        "treg:tiny",
        "--max-instances",
        "5",
        "--out",
        str(out),
        "--max-new-tokens",
        "12",
        "--quiet",
    ]
    assert eval_main(argv) == 0
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert len(outputs) == 5 and set(outputs[0]) >= {"instruction", "output", "generator"}
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert m["n_instances"] == 5 and m["n_failed"] + m["n_total"] == 5 and 0 <= m["win_rate"] <= 100
    assert results["judge_stats"]["judged"] == 10  # both orders
    annotations = json.loads((out / "annotations.json").read_text())
    assert {a["generator_1"] for a in annotations} == {"gpt4_1106_preview"} and len(annotations) == 5
    assert "win rate" in (out / "results.md").read_text()
    # a second run resumes from the caches: no new judgments
    assert eval_main(argv) == 0
    assert json.loads((out / "results.json").read_text())["judge_stats"]["cached"] == 10


def test_arena_hard_end_to_end_with_tiny_policy_and_judge(data_root, tmp_path, capsys):
    out = tmp_path / "ah"
    assert (
        eval_main(
            [
                "arena-hard",
                "--model",
                "treg:tiny",
                "--judge",
                "treg:tiny",
                "--max-instances",
                "5",
                "--out",
                str(out),
                "--max-new-tokens",
                "12",
                "--rounds",
                "20",
                "--quiet",
            ]
        )
        == 0
    )
    answers = [json.loads(line) for line in (out / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    assert len(answers) == 5 and answers[0]["messages"][1]["content"]["answer"] is not None
    judgment_dir = out / "model_judgment" / "treg_tiny"
    records = [json.loads(line) for line in (judgment_dir / "tiny.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["games"]) == 2 for r in records)
    assert {"user_prompt", "judgment", "score"} <= set(records[0]["games"][0])
    results = json.loads((out / "results.json").read_text())
    row = results["metrics"]["models"]["tiny"]
    assert row["n_games"] == 10 and 0 <= row["lower"] <= row["score"] <= row["upper"] <= 100
    # the written judgments are scored again by `show`, with the same point estimate
    capsys.readouterr()
    assert eval_main(["arena-hard", "show", "--judgments", str(judgment_dir), "--rounds", "20"]) == 0
    assert f"{row['score']:.1f}" in capsys.readouterr().out
    # compare: a table and a plot over the two runs
    assert eval_main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.md").exists()


def test_training_hook_fires_and_logs(data_root, tmp_path):
    from treg.synthetic import load_tiny_model, make_pairs
    from treg.trainer import TRegConfig, TRegTrainer

    model, tokenizer, _ = load_tiny_model(show_progress=False)
    config = TRegConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        per_device_train_batch_size=4,
        max_steps=2,
        treg_alpha=0.0,
        token_reward_cache_dir=str(tmp_path / "cache"),
        eval_hooks=["alpaca_eval", "arena_hard"],
        eval_hook_max_instances=2,
        eval_hook_when="2",
        eval_hook_max_new_tokens=8,
        per_device_eval_batch_size=4,
    )
    trainer = TRegTrainer(model, args=config, train_dataset=make_pairs(8, seed=0), processing_class=tokenizer)
    hook = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "EvalHookCallback")
    trainer.train()
    assert [h["step"] for h in hook.history] == [2]
    logged = [h for h in trainer.state.log_history if "eval_hooks/alpaca_eval/win_rate" in h]
    assert len(logged) == 1 and "eval_hooks/arena_hard/win_rate" in logged[0]
    assert (tmp_path / "run" / "eval_hooks" / "arena_hard" / "step-2" / "results.json").exists()


def test_callback_rejects_unknown_hooks_and_schedules():
    from treg.evaluation.callback import EvalHookCallback

    with pytest.raises(ValueError, match="choose from"):
        EvalHookCallback(["mt_bench"])
    with pytest.raises(ValueError, match="eval_hook_when"):
        EvalHookCallback(["alpaca_eval"], when="sometimes")


def test_answers_generated_before_a_kill_are_reused(tmp_path, monkeypatch, tiny, caplog):
    """kill -9 while the third shard of answers is being generated; the rerun reuses the two finished shards (4
    answers, counted in its log) and its answers equal an uninterrupted run's."""
    import logging
    import signal
    import subprocess
    import sys

    root = write_data_root(str(tmp_path / "data"))
    tasks = [f"copy: {i} {i + 1}" for i in range(9)]
    with open(os.path.join(root, "alpaca-eval", "gpt4_1106_preview-outputs.json"), "w") as f:
        json.dump([{"dataset": "helpful_base", "instruction": t, "output": "1", "generator": "gpt4_1106_preview"}
                   for t in tasks], f)
    monkeypatch.setenv("TREG_EVAL_DATA", root)
    argv = ["alpaca-eval", "--model", "treg:tiny", "--judge", "treg:tiny", "--max-new-tokens", "8",
            "--answer-shard-size", "2", "--batch-size", "2", "--quiet"]
    killer = (
        "import os, signal, sys\n"
        "import treg.evaluation.runs as runs\n"
        "real, calls = runs.generate_answers, []\n"
        "def generate(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "runs.generate_answers = generate\n"
        "from treg.evaluation.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", killer, *argv, "--out", str(out)], env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    (shards,) = out.glob(".answers-*.shards")
    assert len(list(shards.glob("*.json"))) == 2  # the two finished shards, nothing half-written
    with caplog.at_level(logging.WARNING):
        assert eval_main([*argv, "--out", str(out)]) == 0
    assert "reused 4 of 9" in caplog.text and not shards.exists()
    assert eval_main([*argv, "--out", str(tmp_path / "whole")]) == 0
    resumed = json.loads((out / "model_outputs.json").read_text())
    whole = json.loads((tmp_path / "whole" / "model_outputs.json").read_text())
    assert [r["output"] for r in resumed] == [r["output"] for r in whole]
