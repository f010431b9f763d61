"""LoRA / PEFT end to end on the tiny model (``use_peft: true``, TRL's ModelConfig keys).

* The token-reward pass and the per-token reference log-probs come from the base model with the adapters off (TRL's
  reference under PEFT), under the cache key of the base weights: a LoRA run shares the entry of a full fine-tune on
  the same base and data, and its values are bitwise those of the full run's pass even when the adapters are not
  zero at the start (``init_lora_weights=False``).
* Training moves only the adapters; the run saves ``adapter_model.safetensors`` + ``adapter_config.json`` with a
  loadable base; ``treg eval`` and ``treg viz`` take the adapter folder (base + merged adapter).
"""

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from test_eval_e2e import write_data_root  # noqa: E402  (pytest puts tests/ on sys.path)

from treg.cli import main  # noqa: E402
from treg.models import ModelSpecError, load_causal_lm  # noqa: E402
from treg.token_rewards import REF_TOKEN_COLUMNS, TOKEN_REWARD_COLUMNS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA_FLAGS = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]


def _train_argv(out_dir, cache_dir, *extra):
    return ["--config", str(ROOT / "recipes/tiny/treg-dpo.yaml"), "--output_dir", str(out_dir), "--toy_num_pairs",
            "16", "--eval_strategy", "no", "--dataset_test_split=", "--disable_tqdm", "true",
            "--token_reward_cache_dir", str(cache_dir), *extra]


def _entries(cache_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(cache_dir, "token_rewards")))


def test_lora_train_eval_viz_end_to_end(tmp_path, tiny, monkeypatch, capsys):
    from safetensors.torch import load_file

    import treg.cli

    base_model, _, base_path = tiny
    cache = tmp_path / "cache"
    # A full fine-tune's pass on the same base and data writes the entry the LoRA run must reuse.
    assert main(["rewards", *_train_argv(tmp_path / "full", cache)]) == 0
    entries = _entries(cache)
    assert len(entries) == 1

    built = {}

    def build_and_keep(*args):
        trainer = build_trainer(*args)
        built["trainer"] = trainer
        built["before"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return trainer

    build_trainer = treg.cli.build_trainer
    monkeypatch.setattr(treg.cli, "build_trainer", build_and_keep)
    out = tmp_path / "lora"
    assert main(["train", *_train_argv(out, cache, "--max_steps", "2", *LORA_FLAGS)]) == 0
    assert _entries(cache) == entries, "the LoRA run must reuse the full run's entry (same base, same data)"

    # only the adapters moved; the base weights are the tiny model's, unchanged
    trainer = built["trainer"]
    after = trainer.model.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and all(("q_proj" in k or "v_proj" in k) for k in lora)
    assert all(not torch.equal(after[k], built["before"][k]) for k in lora if "lora_B" in k)
    base = base_model.state_dict()
    for name, tensor in after.items():
        if "lora_" not in name:
            canonical = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(tensor, base[canonical]), name
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad] == [
        n for n in lora if n.endswith(".weight")
    ]

    # the checkpoint is an adapter with a base that reloads
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(base_path) and config["r"] == 4
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    merged, tokenizer = load_causal_lm(str(out))
    ids = tokenizer("sort: 3 1 2", return_tensors="pt").input_ids
    peft_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        assert not torch.allclose(base_model(input_ids=ids).logits, expected, atol=1e-5)

    # treg viz and treg eval take the adapter folder
    heatmap = tmp_path / "heat.html"
    assert main(["viz", "--checkpoint", str(out), "--ref-model", "treg:tiny", "--dataset", "treg:toy", "--rows", "0",
                 "--out", str(heatmap)]) == 0
    assert "<section" in heatmap.read_text(encoding="utf-8")
    monkeypatch.setenv("TREG_EVAL_DATA", write_data_root(str(tmp_path / "data")))
    run = tmp_path / "ah"
    assert main(["eval", "arena-hard", "--model", str(out), "--judge", "treg:tiny", "--max-instances", "2", "--out",
                 str(run), "--max-new-tokens", "8", "--rounds", "10", "--quiet"]) == 0
    answers = (run / "model_answer" / "lora.jsonl").read_text().splitlines()
    assert len(answers) == 2


def test_reference_is_the_base_model_with_adapters_off(tmp_path, tiny):
    """Adapters that are not zero at the start (init_lora_weights=False) change the model's outputs, yet the pass's
    reference log-probs, r̂ and cache entry name are exactly the full fine-tune's: the pass runs the base model."""
    from peft import LoraConfig

    from treg.synthetic import make_pairs
    from treg.trainer import TRegConfig, TRegTrainer

    _, _, path = tiny
    pairs = make_pairs(12, seed=3)
    trainers = {}
    for kind in ("full", "lora"):
        model, tokenizer = load_causal_lm(path)
        args = TRegConfig(output_dir=str(tmp_path / kind), use_cpu=True, report_to="none", max_length=128,
                          treg_alpha=0.5, activation_checkpointing=False, disable_tqdm=True,
                          token_reward_cache_dir=str(tmp_path / kind / "cache"))
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 task_type="CAUSAL_LM") if kind == "lora" else None
        trainers[kind] = TRegTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                     peft_config=peft_config)
    full, lora = trainers["full"], trainers["lora"]
    ids = torch.tensor([full.train_dataset[0]["prompt_ids"] + full.train_dataset[0]["chosen_ids"]])
    with torch.no_grad():
        assert not torch.allclose(lora.model(input_ids=ids).logits, full.model(input_ids=ids).logits, atol=1e-3)
    assert lora._reference_hash() == full._reference_hash()
    assert _entries(tmp_path / "lora" / "cache") == _entries(tmp_path / "full" / "cache")
    for column in REF_TOKEN_COLUMNS + TOKEN_REWARD_COLUMNS:
        assert list(lora.train_dataset[column]) == list(full.train_dataset[column]), column


def test_adapter_folder_with_an_unloadable_base_names_it(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelSpecError, match="adapter folder .* base model"):
        load_causal_lm(str(folder))
    assert main(["viz", "--checkpoint", str(folder), "--dataset", "treg:toy", "--out", str(tmp_path / "x.html")]) == 2
