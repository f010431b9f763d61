"""Batched generation: order kept, greedy deterministic, sampling reproducible by seed, batching invisible; and the
real-tokenizer behaviours of issue 13: system turns folded for templates without a system role (D1), the
checkpoint's eos list honoured (D2), text pieces tokenized in context (D5/D6)."""

import pytest
import torch

from treg.generation import generate, render_prompt


def _prompts():
    return [[{"role": "user", "content": p}] for p in ("copy: 1 2 3", "sort: 9 1 5 3 2", "inc: 4")]


def test_greedy_is_deterministic_and_independent_of_batch_size(tiny):
    model, tokenizer, _ = tiny
    a = generate(model, tokenizer, _prompts(), max_new_tokens=12, batch_size=3, show_progress=False)
    b = generate(model, tokenizer, _prompts(), max_new_tokens=12, batch_size=1, show_progress=False)
    assert a == b and len(a) == 3 and all(len(x) == 1 for x in a)
    # prompts keep their order although batches are sorted by length
    assert a == [generate(model, tokenizer, [p], max_new_tokens=12, show_progress=False)[0] for p in _prompts()]


def test_sampling_is_reproducible_by_seed(tiny):
    model, tokenizer, _ = tiny
    kw = dict(num_samples=4, do_sample=True, max_new_tokens=12, show_progress=False)
    a = generate(model, tokenizer, _prompts(), seed=3, **kw)
    assert a == generate(model, tokenizer, _prompts(), seed=3, **kw)
    assert all(len(x) == 4 for x in a)


def test_multiple_samples_need_sampling(tiny):
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, tokenizer, _prompts(), num_samples=2)


def test_render_prompt_uses_the_chat_template(tiny):
    _, tokenizer, _ = tiny
    ids = render_prompt(tokenizer, [{"role": "user", "content": "copy: 1"}])
    assert tokenizer.decode(ids) == "<|user|>copy: 1<|end|><|assistant|>"


# ------------------------------------------------------------------------- real-tokenizer behaviours (issue 13)
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's chat template: no system role, roles must alternate
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
_SP_CORPUS = [
    "Response 1: Response 2: Context: Preferred Response= More Harmful Response= 1 2 Rationale",
    "My final verdict is: [[ A>>B A>B A=B B>A B>>A ]] the best answer hello world",
    "Write the best possible response: helpful, correct, coherent and concise. Write a poor response.",
    "[INST] sort: 3 1 2 [/INST] 1 2 3 copy: 4 5 the quick brown fox jumps over the lazy dog",
]


def sentencepiece_tokenizer():
    """A small Llama-2/Mistral-style tokenizer (built in ~0.1 s): BPE over Metaspace pieces with
    ``prepend_scheme="first"``, so every text tokenized on its own starts with "▁" ("Response 1:" alone is
    ``▁Response ▁1:``, inside "…\\n\\nResponse 1:" it is ``Response ▁1:``); BOS added; the decoder drops the leading
    space of the first token it decodes; Mistral-v0.1's chat template (no system role)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[*string.printable, "▁"], show_progress=False)
    tok.train_from_iterator(_SP_CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", chat_template=MISTRAL_TEMPLATE)


def random_model(vocab_size: int, seed: int = 0):
    """A random 1-layer Llama over ``vocab_size`` tokens: outputs are noise, the plumbing is real."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def test_d1_system_turn_is_folded_for_templates_without_a_system_role(tiny):
    from treg.generation import fold_system_turns, supports_system_role

    sp = sentencepiece_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort: 3 1 2"}]
    with pytest.raises(Exception, match="roles must alternate|not supported"):
        sp.apply_chat_template(messages, tokenize=False)
    assert not supports_system_role(sp)
    assert fold_system_turns(sp, messages) == [{"role": "user", "content": "Be brief.\n\nsort: 3 1 2"}]
    assert messages[0]["role"] == "system"  # the caller's list is untouched
    assert sp.decode(render_prompt(sp, messages)) == "<s>[INST] Be brief.\n\nsort: 3 1 2 [/INST]"
    # a template with a system role keeps it as it is
    tokenizer = tiny[1]
    assert supports_system_role(tokenizer) and fold_system_turns(tokenizer, messages) == messages


def test_d2_generation_stops_at_every_eos_of_the_checkpoint(tiny):
    """Gemma's generation_config lists <eos> and <end_of_turn>: generation must stop at either, not only at the
    tokenizer's eos."""
    import copy

    from treg.generation import eos_token_ids

    model, tokenizer, _ = tiny
    model = copy.deepcopy(model)
    prompt = [_prompts()[1]]
    with torch.no_grad():
        first = int(model(torch.tensor([render_prompt(tokenizer, prompt[0])])).logits[0, -1].argmax())
    free = generate(model, tokenizer, prompt, max_new_tokens=6, show_progress=False)[0][0]
    assert first != tokenizer.eos_token_id and len(tokenizer(free, add_special_tokens=False)["input_ids"]) > 1
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]  # a second end-of-turn id
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id, first]
    stopped = generate(model, tokenizer, prompt, max_new_tokens=6, show_progress=False)[0][0]
    assert stopped == tokenizer.decode([first], skip_special_tokens=True)  # the first token ended the answer


def test_token_id_prompts_are_sent_as_they_are(tiny):
    model, tokenizer, _ = tiny
    ids = render_prompt(tokenizer, _prompts()[0])
    assert render_prompt(tokenizer, ids) == ids
    kw = dict(max_new_tokens=8, show_progress=False)
    assert generate(model, tokenizer, [ids], **kw) == generate(model, tokenizer, [_prompts()[0]], **kw)


@pytest.mark.parametrize("fast", [True, False])
def test_d5_encode_pieces_joins_to_the_joined_text(tiny, monkeypatch, fast):
    """Pieces tokenized in context, not alone: a SentencePiece tokenizer reads "Response 1:" alone as
    "▁Response ▁1:"; the ids of the pieces concatenated are those of the joined text."""
    from treg.generation import encode_pieces

    sp = sentencepiece_tokenizer()
    if not fast:  # the prefix route of tokenizers without offsets
        monkeypatch.setattr(type(sp), "is_fast", property(lambda self: False))
    pieces = ["Context:\nhello world\n\n", "Response 1:\n", "the best answer", "", "\n\nA>>B]]"]
    for tokenizer in (sp, tiny[1]):
        out = encode_pieces(tokenizer, pieces)
        assert len(out) == len(pieces) and out[3] == []
        assert sum(out, []) == tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
    alone = sp("Response 1:\n", add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(alone)[0] == "▁Response"
    assert not sp.convert_ids_to_tokens(encode_pieces(sp, pieces)[1])[0].startswith("▁")  # no space in the text
