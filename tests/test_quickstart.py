"""`treg quickstart` runs the whole path and its r̂ is informative on the toy task."""

from pathlib import Path

from treg.quickstart import run


def test_quickstart_end_to_end(tmp_path, tiny, capsys):
    summary = run(output_dir=str(tmp_path / "qs"), train_pairs=64, epochs=1.0, alpha=0.5)
    assert (Path(tmp_path) / "qs" / "model.safetensors").exists()
    # the tiny model scores its own tokens: defect tokens get lower r̂ than correct ones, far above chance
    assert summary["reward_auc"] > 0.65, summary
    assert 0.0 <= summary["eval_reward_accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "r̂ finds defect tokens" in out and "DEFECT" in out
