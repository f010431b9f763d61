"""treg's verifiable-instruction checkers (treg/evaluation/instructions.py): each checker on hand-made responses with
the exact offending spans, every kwargs of IFEval's 541 real rows, token flags from a real fast tokenizer's offsets,
and the composed training prompts (deterministic, disjoint from IFEval, parameters that round-trip through check)."""

import json
import os

import pytest

from treg.evaluation import instructions as I
from treg.evaluation.instructions import Instruction, InstructionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IFEVAL = os.path.join(ROOT, "..", "shared", "data", "ifeval", "input_data.jsonl")
TOKENIZERS = os.path.join(ROOT, "..", "shared", "tokenizers")
needs_ifeval = pytest.mark.skipif(not os.path.isfile(IFEVAL), reason=f"IFEval data not at {IFEVAL}")

# (id, kwargs, a response that follows it, one that breaks it, the substrings the violation spans cover, in order)
CASES = [
    ("punctuation:no_comma", {}, "No commas here.", "Yes, sure, fine.", [",", ","]),
    ("change_case:english_lowercase", {}, "all small: 3 cats.", "all Small CAPS", ["S", "CAPS"]),
    ("change_case:english_capital", {}, "ALL BIG: 3 CATS.", "ALL bIG", ["b"]),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "ONE capital word.", "ONE and TWO and THREE.", ["TWO", "THREE"]),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "ONE and TWO.", "Only ONE.", []),
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "red"]},
     "Rocky hills, bored crowds.", "Rock music is red-hot; I rock.", ["Rock", "red", "rock"]),
    ("keywords:existence", {"keywords": ["river", "Sarah"]}, "sarah swam in the River.", "Sarah swam in rivers.", []),
    ("keywords:frequency", {"keyword": "war", "relation": "less than", "frequency": 2},
     "One war, no warfare, no wars.", "War and war and WAR.", ["war", "WAR"]),
    ("keywords:frequency", {"keyword": "peace", "relation": "at least", "frequency": 2},
     "Peace, then peace.", "Peace, then peaceful.", []),
    ("keywords:letter_frequency", {"letter": "q", "let_relation": "less than", "let_frequency": 2},
     "A quiet day.", "Quick quiz: queue.", ["q", "q"]),
    ("keywords:letter_frequency", {"letter": "#", "let_relation": "at least", "let_frequency": 2},
     "#one #two", "#one", []),
    ("startend:end_checker", {"end_phrase": "Peace!"}, "Bye now. peace!  \n", "Bye now. Peace! See you.",
     [" See you."]),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, "Done. Is there anything else?",
     "Done. Anything else?", ["Done."]),
    ("startend:quotation", {}, ' "Quoted answer." \n', "Quoted answer.", ["Q", "."]),
    ("startend:quotation", {}, "“Curly quotes.”", '"Half quoted.', ["."]),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3},
     "Don't panic!", "One two, three four.", ["three four"]),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 3}, "One two three.", "One two.", []),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2},
     "Dr. Who met Mr. Smith at 3.30 p.m. today.", "First one. Second one! Third one?", ["Second one! Third one?"]),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "One.\nTwo\n* three", "One. Two.", []),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.",
     "First.\n***\nSecond.\n***\nThird.", ["Third."]),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Start.\n\n**Then** end.", "Start.\n\nAfter that, end.", ["After"]),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Text.\n\np.p.s. more", "Text. P.S. more", []),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "To [name] at [address].", "To [name].", []),
    ("detectable_format:title", {}, "<<A Title>>\nBody.", "<< >> Body.", []),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "* not a highlight *, *one*", []),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro.\n* a\n- b\n***\n**bold**",
     "* a\n* b\n  * c\n* d", ["  * c", "* d"]),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "## Section 1\nA.\nSECTION 2\nB.", "SECTION 1\nA.\nSECTION 2\nB.\nSECTION 3\nC.", ["SECTION 3\nC."]),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{'a': 1}", []),
    ("detectable_format:constrained_response", {}, "Well. My answer is no.", "My answer is no", []),
    ("combination:two_responses", {}, "One joke.\n******\nAnother joke.", "Same.\n******\nSame.", []),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses...",
     "Write a song. Roses...", ["song."]),
]  # fmt: skip


def _covered(text, spans):
    return [text[s:e] for s, e in spans]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_passes_fails_and_flags_the_offending_characters(case):
    instruction_id, kwargs, good, bad, flagged = case
    instruction = Instruction(instruction_id, kwargs)
    assert instruction.check(good) and instruction.violations(good) == []
    assert not instruction.check(bad)
    assert _covered(bad, instruction.violations(bad)) == flagged


def test_the_covered_ids():
    required = {
        "punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
        "change_case:capital_word_frequency", "keywords:forbidden_words", "keywords:existence", "keywords:frequency",
        "keywords:letter_frequency", "startend:end_checker", "startend:quotation", "length_constraints:number_words",
        "length_constraints:number_sentences", "detectable_content:postscript", "detectable_format:title",
        "detectable_format:number_highlighted_sections", "detectable_format:number_bullet_lists",
        "detectable_content:number_placeholders",
    }  # fmt: skip
    assert required <= I.SUPPORTED and len(I.SUPPORTED) == 24
    assert "language:response_language" not in I.SUPPORTED
    assert I.WITH_SPANS <= I.SUPPORTED and {c[0] for c in CASES} == I.SUPPORTED
    assert {c[0] for c in CASES if c[4]} == I.WITH_SPANS  # every span-giving type is shown flagging something


def test_words_and_sentences_by_hand():
    text = "Don't stop, well-known 3.5 cats!  Mr. Brown said: e.g. this.\nA list line\n\n* bullet"
    assert [text[s:e] for s, e in I.words(text)] == [
        "Don't", "stop", "well-known", "3", "5", "cats", "Mr", "Brown", "said", "e", "g", "this", "A", "list", "line",
        "bullet",
    ]  # fmt: skip
    assert [text[s:e] for s, e in I.sentences(text)] == [
        "Don't stop, well-known 3.5 cats!", "Mr. Brown said: e.g. this.", "A list line", "* bullet",
    ]  # fmt: skip


def test_violations_merge_and_check_response_collects_only_failed_instructions():
    rules = [
        Instruction("punctuation:no_comma"),
        Instruction("change_case:english_lowercase"),
        Instruction("length_constraints:number_words", {"relation": "at least", "num_words": 2}),
    ]
    text = "AB, cd,"
    assert rules[1].violations(text) == [(0, 2)]  # adjacent capitals merge into one span
    result = I.check_response(rules, text)
    assert result == {"follow_all": False, "follow": [False, False, True], "spans": [(0, 3), (6, 7)]}
    assert I.check_response(rules, "ab cd") == {"follow_all": True, "follow": [True, True, True], "spans": []}


def test_accuracy_prompt_and_instruction_level_by_hand():
    results = [
        {"follow_all": True, "follow": [True, True]},
        {"follow_all": False, "follow": [True, False, False]},
        {"follow_all": False, "follow": [False]},
    ]
    # prompts: 1 of 3 followed; instructions: 3 of 6
    assert I.accuracy(results) == {"prompt_level": 1 / 3, "instruction_level": 3 / 6}
    with pytest.raises(I.UserError, match="no results"):
        I.accuracy([])


def test_token_flags_by_hand():
    offsets = [(0, 0), (0, 2), (2, 3), (3, 6), (6, 7), (7, 7)]  # a special token, tokens, an empty one at the end
    assert I.token_flags([(2, 3)], offsets) == [False, False, True, False, False, False]
    assert I.token_flags([(1, 4), (6, 9)], offsets) == [False, True, True, True, True, False]
    assert I.token_flags([], offsets) == [False] * 6


@pytest.mark.parametrize("family", ["qwen2.5-instruct", "llama-3.1-8b-instruct"])
def test_token_flags_with_a_real_fast_tokenizer(family):
    transformers = pytest.importorskip("transformers")
    folder = os.path.join(TOKENIZERS, family)
    if not os.path.isdir(folder):
        pytest.skip(f"no tokenizer at {folder}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast
    text = "the Quick brown fox, it said, jumps over the lazy dog. The End"
    rules = [Instruction("punctuation:no_comma"), Instruction("change_case:english_lowercase")]
    spans = I.check_response(rules, text)["spans"]
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    flags = I.token_flags(spans, enc["offset_mapping"])
    assert len(flags) == len(enc["input_ids"])
    flagged = {text[s:e].strip() for (s, e), f in zip(enc["offset_mapping"], flags) if f}
    clean = {text[s:e].strip() for (s, e), f in zip(enc["offset_mapping"], flags) if not f and e > s}
    assert {",", "Quick", "The", "End"} <= {t.strip(",") or "," for t in flagged}
    assert not any("," in t or any(c.isupper() for c in t) for t in clean)
    assert all("," in t or any(c.isupper() for c in t) for t in flagged)


def test_bad_ids_and_kwargs_name_the_row_and_what_to_do():
    row = {"key": 7, "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "de"}]}
    with pytest.raises(InstructionError, match=r"row key=7.*language:response_language.*supported_only"):
        I.parse_instructions(row)
    assert I.parse_instructions(row, supported_only=True) == []
    bad = {"key": 8, "instruction_id_list": ["keywords:frequency"],
           "kwargs": [{"keyword": "x", "relation": "at most", "frequency": 2}]}  # fmt: skip
    with pytest.raises(InstructionError, match=r"row key=8.*'relation' must be one of \['at least', 'less than'\]"):
        I.parse_instructions(bad)
    with pytest.raises(InstructionError, match=r"missing \['num_words'\]"):
        Instruction("length_constraints:number_words", {"relation": "at least"})
    with pytest.raises(InstructionError, match="single character"):
        Instruction("keywords:letter_frequency", {"letter": "ab", "let_relation": "at least", "let_frequency": 1})
    with pytest.raises(InstructionError, match="same length"):
        I.parse_instructions({"key": 9, "instruction_id_list": ["punctuation:no_comma"], "kwargs": []})
    # copies of IFEval that fill every kwarg key with null parse the same
    nulls = {"key": 1, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": None}]}
    assert I.parse_instructions(nulls) == [Instruction("punctuation:no_comma", {})]


@needs_ifeval
def test_every_ifeval_row_parses_and_the_supported_subset(capsys):
    rows = I.load_ifeval(IFEVAL, supported_only=False)
    assert len(rows) == 541
    parsed = [I.parse_instructions(r, supported_only=True) for r in rows]
    covered = sum(len(p) for p in parsed)
    supported = I.load_ifeval(IFEVAL)
    with capsys.disabled():
        print(f"\nIFEval: {len(supported)} of 541 rows have only covered instructions; {covered} of 834 instructions")
    assert len(supported) == 510 and covered == 834 - 31  # all but language:response_language (31)
    assert all(set(r["instruction_id_list"]) <= I.SUPPORTED for r in supported)
    for row, instructions in zip(rows, parsed):  # kwargs as the data gives them, e.g. relation "less than"
        for instruction, kw in zip(instructions, [k for i, k in zip(row["instruction_id_list"], row["kwargs"])
                                                  if i in I.SUPPORTED]):  # fmt: skip
            assert instruction.kwargs == kw
            instruction.check("A plain response, to be scored.")  # every checker runs on every real kwargs


@needs_ifeval
def test_default_path_comes_from_the_data_roots(monkeypatch, tmp_path):
    monkeypatch.delenv("TREG_EVAL_DATA", raising=False)
    monkeypatch.chdir(ROOT)  # ../shared/data from the working directory
    assert os.path.samefile(I.ifeval_path(), IFEVAL)
    monkeypatch.chdir(tmp_path)  # no ../shared/data here: found beside the repository holding treg
    assert os.path.samefile(I.ifeval_path(), IFEVAL)
    (tmp_path / "ifeval").mkdir()
    (tmp_path / "ifeval" / "input_data.jsonl").write_text(
        json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n"
    )
    monkeypatch.setenv("TREG_EVAL_DATA", str(tmp_path))
    assert [r["key"] for r in I.load_ifeval()] == [1]


# ------------------------------------------------------------------------------------------------ composed prompts
def _satisfying(instruction_id, kw, task):
    """A response built to follow one composed instruction from its kwargs alone."""
    n = {k: v for k, v in kw.items() if isinstance(v, int)}
    count = next(iter(n.values()), 0)
    relation = kw.get("relation") or kw.get("let_relation") or kw.get("capital_relation")
    times = count if relation != "less than" else count - 1
    build = {
        "punctuation:no_comma": lambda: "plain words here.",
        "change_case:english_lowercase": lambda: "all lowercase text.",
        "change_case:english_capital": lambda: "ALL CAPITAL TEXT.",
        "change_case:capital_word_frequency": lambda: "ok " + "LOUD " * times,
        "keywords:forbidden_words": lambda: "ok then.",
        "keywords:existence": lambda: " ".join(kw.get("keywords", [])) + ".",
        "keywords:frequency": lambda: f"ok {kw.get('keyword')} " * times,
        "keywords:letter_frequency": lambda: "ok " + kw.get("letter", "") * times,
        "startend:end_checker": lambda: f"Some text. {kw.get('end_phrase')}",
        "startend:quotation": lambda: '"quoted text."',
        "length_constraints:number_words": lambda: "word " * times,
        "length_constraints:number_sentences": lambda: "Yes. " * times,
        "length_constraints:number_paragraphs": lambda: "\n***\n".join(["A paragraph."] * count),
        "detectable_content:postscript": lambda: f"Text.\n\n{kw.get('postscript_marker')} a note.",
        "detectable_content:number_placeholders": lambda: "[blank] " * count,
        "detectable_format:title": lambda: "<<A Title>>\nText.",
        "detectable_format:number_highlighted_sections": lambda: "*part* " * count,
        "detectable_format:number_bullet_lists": lambda: "\n".join(["* item"] * count),
        "combination:repeat_prompt": lambda: f"{task} The answer.",
        "combination:two_responses": lambda: "First one.\n******\nSecond one.",
    }
    return build[instruction_id]()


def test_composed_prompts_are_deterministic_parse_and_round_trip():
    rows = I.compose_training_prompts(400, seed=3)
    assert rows == I.compose_training_prompts(400, seed=3)
    assert rows != I.compose_training_prompts(400, seed=4)
    assert [r["key"] for r in rows] == list(range(400))
    seen = set()
    for row in rows:
        instructions = I.parse_instructions(row)
        assert 1 <= len(instructions) <= 2 and set(row["instruction_id_list"]) <= I.COMPOSABLE
        if len(instructions) == 2:
            assert I._compatible(*row["instruction_id_list"])
        task = next(t for t in I.TASKS if row["prompt"].startswith(t))
        for instruction in instructions:
            seen.add(instruction.id)
            for value in instruction.kwargs.values():  # the parameters (but the relation's name) are in the prompt
                for v in value if isinstance(value, list) else [value]:
                    assert str(v) in row["prompt"] or v in I.RELATIONS
            response = _satisfying(instruction.id, instruction.kwargs, task)
            assert instruction.check(response), (row, response)
    assert seen == I.COMPOSABLE


def test_composed_prompts_restrict_to_ids_and_reject_unknown_ones():
    ids = ["punctuation:no_comma", "keywords:forbidden_words"]
    rows = I.compose_training_prompts(50, seed=0, ids=ids)
    assert {i for r in rows for i in r["instruction_id_list"]} == set(ids)
    with pytest.raises(InstructionError, match="language:response_language"):
        I.compose_training_prompts(5, ids=["language:response_language"])


def test_composed_pools_do_not_conflict_with_each_other():
    text = " ".join(I.TASKS + I._FORBIDDEN_POOL + I._KEYWORD_POOL + I._END_PHRASES).lower()
    assert not set(I._RARE_LETTERS) & set(" ".join(I._KEYWORD_POOL + I._END_PHRASES).lower())
    assert "," not in text and not set(I._FORBIDDEN_POOL) & set(I._KEYWORD_POOL)
    for phrase in I._END_PHRASES:
        assert not any(Instruction("keywords:forbidden_words", {"forbidden_words": [w]}).violations(phrase)
                       for w in I._FORBIDDEN_POOL)  # fmt: skip
    assert len(I.TASKS) >= 40 and len(set(I.TASKS)) == len(I.TASKS)


@needs_ifeval
def test_composed_prompts_are_many_and_disjoint_from_ifeval():
    ifeval = [r["prompt"] for r in I.load_ifeval(IFEVAL, supported_only=False)]
    rows = I.compose_training_prompts(3000, seed=0)
    prompts = {r["prompt"] for r in rows}
    assert len(prompts) > 2000  # many more than IFEval's 541
    for prompt in prompts:
        assert not any(q in prompt for q in ifeval)
    # no sentence of treg's wording is IFEval's: every composed sentence is absent from every IFEval prompt
    sentences = {prompt[s:e] for prompt in prompts for s, e in I.sentences(prompt)}
    joined = "\n".join(ifeval)
    shared = sorted(s for s in sentences if len(s) > 25 and s in joined)
    assert shared == []
