"""Every file in ds_configs/ is read the way accelerate and DeepSpeed read it, and every paper recipe parses with the
hyperparameters it cites (a config or script that no test loads rots)."""

import json
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "ds_configs"
JSONS = sorted(DS.glob("*.json"))
YAMLS = sorted(DS.glob("*.yaml"))
PAPER_RECIPES = {
    "llama-3-8b-instruct/dpo.yaml": dict(base_loss="dpo", beta=0.01, treg_alpha=0.0, learning_rate=7e-7),
    "llama-3-8b-instruct/treg-dpo.yaml": dict(base_loss="dpo", beta=0.01, treg_alpha=0.25, learning_rate=7e-7),
    "gemma-2-9b-it/simpo.yaml": dict(base_loss="simpo", beta=10.0, simpo_gamma=5.0, treg_alpha=0.0, learning_rate=8e-7),
    "gemma-2-9b-it/treg-simpo.yaml": dict(
        base_loss="simpo", beta=10.0, simpo_gamma=5.0, treg_alpha=0.25, learning_rate=8e-7
    ),
}
DATASETS = {"llama": "princeton-nlp/llama3-ultrafeedback-armorm", "gemma": "princeton-nlp/gemma2-ultrafeedback-armorm"}


def test_the_expected_files_are_there():
    assert [p.name for p in JSONS] == ["zero2.json", "zero3.json", "zero3_offload.json"]
    assert {p.name for p in YAMLS} == {
        "single_gpu.yaml", "single_gpu_zero3_offload.yaml", "zero2_8gpu.yaml", "zero3_8gpu.yaml",
        "zero3_offload_8gpu.yaml", "multinode_zero3.yaml", "cpu_2proc_ddp.yaml", "cpu_2proc_zero2.yaml",
        "cpu_2proc_zero3.yaml",
    }  # fmt: skip
    assert (DS / "slurm_multinode.sh").is_file()


def _autos(d, prefix=""):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _autos(v, f"{prefix}{k}.")
        elif v == "auto":
            out.append(prefix + k)
    return out


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_deepspeed_json_is_valid_once_the_hf_integration_fills_auto(path, tmp_path):
    """transformers fills every "auto" from the training arguments, then DeepSpeed's own (strict, pydantic) config
    class accepts the result: a misspelt key would fail here."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from treg.trainer import TRegConfig

    raw = json.loads(path.read_text())
    assert _autos(raw), "the batch sizes and precision should be left to the recipe ('auto')"
    args = TRegConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=1e-6,
        max_grad_norm=1.0,
    )
    hf = HfTrainerDeepSpeedConfig(str(path))
    hf.trainer_config_process(args)
    model = torch.nn.Linear(8, 8)
    model.config = type("Cfg", (), {"hidden_size": 4096, "hidden_sizes": None})()
    hf.trainer_config_finalize(args, model, num_training_steps=100)
    assert _autos(hf.config) == []
    ds = DeepSpeedConfig(hf.config)
    stage = 2 if path.name == "zero2.json" else 3
    assert ds.zero_optimization_stage == stage
    assert ds.train_micro_batch_size_per_gpu == 2 and ds.gradient_accumulation_steps == 8
    assert ds.gradient_clipping == 1.0
    offload = ds.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == ("offload" in path.name)
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save  # `treg train` saves a loadable checkpoint


def _launch_env(path: Path):
    """What `accelerate launch --config_file path -m treg train` validates and exports, without starting anything."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "treg", "train"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    env = None
    if args.use_deepspeed:  # as accelerate's launch_command does before it starts DeepSpeed
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    return args, env


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_accelerate_yaml_is_accepted_by_accelerate_launch(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAMLs name their JSON relative to the repository root, as README launches them
    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file ds_configs/" in text, "header with the command"
    raw = yaml.safe_load(text)
    args, env = _launch_env(path)
    assert args.num_processes == raw["num_processes"] and args.num_machines == raw["num_machines"]
    if raw["distributed_type"] == "DEEPSPEED":
        from accelerate.utils import DeepSpeedPlugin

        ds_file = raw["deepspeed_config"]["deepspeed_config_file"]
        assert (ROOT / ds_file).is_file()
        assert "mixed_precision" not in raw, "with a DeepSpeed JSON, precision comes from the JSON ('auto')"
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()  # runs accelerate's checks of config file vs YAML fields
        expected = 2 if "zero2" in ds_file else 3
        assert plugin.zero_stage == expected
        assert f"zero{expected}" in path.name  # the file name says which stage it launches


def test_cpu_ddp_yaml_really_starts_two_processes():
    """`--cpu --num_processes 2` (MULTI_CPU) silently runs one process; the tests' YAML goes through torchrun."""
    args, env = _launch_env(DS / "cpu_2proc_ddp.yaml")
    assert args.multi_gpu and not args.cpu and args.num_processes == 2
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_multinode_yaml_takes_rank_address_and_port_from_the_command_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = [
        "--config_file",
        str(DS / "multinode_zero3.yaml"),
        "--num_machines",
        "4",
        "--num_processes",
        "32",
        "--machine_rank",
        "3",
        "--main_process_ip",
        "node001",
        "--main_process_port",
        "29600",
        "-m",
        "treg",
    ]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (args.num_machines, args.num_processes, args.machine_rank) == (4, 32, 3)
    assert (args.main_process_ip, args.main_process_port) == ("node001", 29600)


def test_slurm_script_is_valid_bash_and_fills_the_multinode_flags():
    script = (DS / "slurm_multinode.sh").read_text()
    subprocess.run(["bash", "-n", str(DS / "slurm_multinode.sh")], check=True)
    for flag in (
        "--config_file ds_configs/multinode_zero3.yaml",
        "--machine_rank",
        "--main_process_ip",
        "--main_process_port",
        "--num_machines",
        "--num_processes",
        "-m treg train --config",
    ):
        assert flag in script, flag
    assert "SLURM_NODEID" in script and "TREG_CACHE_DIR" in script


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_parses_with_its_cited_hyperparameters(name):
    from treg.cli import parse_train_args

    recipe = ROOT / "recipes" / name
    lines = recipe.read_text().splitlines()
    launch = re.search(r"accelerate launch --config_file (ds_configs/\S+) -m treg train --config (\S+)", lines[1])
    assert launch, "line 2 shows the launch command"
    assert (ROOT / launch.group(1)).is_file() and launch.group(2) == f"recipes/{name}"
    data_args, config, model_args = parse_train_args(["--config", str(recipe)])
    for key, value in PAPER_RECIPES[name].items():
        assert getattr(config, key) == pytest.approx(value), key
    assert data_args.dataset_name == DATASETS[name.split("-")[0]]
    processes = yaml.safe_load((ROOT / launch.group(1)).read_text())["num_processes"]
    assert config.per_device_train_batch_size * processes * config.gradient_accumulation_steps == 128
    assert config.num_train_epochs == 1 and config.lr_scheduler_type.value == "cosine"
    assert config.warmup_steps == 0.1 and config.max_length == 2048
    assert model_args.model_name_or_path in ("meta-llama/Meta-Llama-3-8B-Instruct", "google/gemma-2-9b-it")
