"""`treg quickstart` runs the whole path and its r̂ is informative on the toy task."""

from pathlib import Path

from treg.quickstart import run


def test_quickstart_end_to_end(tmp_path, tiny, capsys):
    summary = run(output_dir=str(tmp_path / "qs"), train_prompts=64, epochs=1.0, alpha=0.5)
    assert (Path(tmp_path) / "qs" / "model.safetensors").exists()
    # the tiny model scores its own tokens: defect tokens get lower r̂ than correct ones, far above chance
    assert summary["reward_auc"] > 0.7, summary
    assert 0.0 <= summary["eval_reward_accuracy"] <= 1.0
    assert 0.0 <= summary["oracle_after"] <= 1.0 and summary["oracle_before"] > 0.8
    out = capsys.readouterr().out
    assert "r̂ finds defect tokens" in out and "(defect)" in out
