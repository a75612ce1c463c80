"""Prompt files, templates, tokenizers and the arithmetic task, with real tokenizers
trained in-process (no downloads)."""

import json
import operator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_erc.data import (
    PLAIN_TEMPLATE,
    HFTokenizer,
    PromptDataConfig,
    PromptDataset,
    PromptFileError,
    SentencePieceTokenizer,
    Tokenizer,
    generate_problems,
    load_tokenizer,
    read_prompt_records,
    render_prompt,
    train_sentencepiece,
    write_arithmetic_jsonl,
)
from megatron_erc.rewards import MathGrader

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [p.prompt + " " + p.sft_target for p in generate_problems(200, seed=1)] + [
    "User: Assistant: hello world, the quick brown fox jumps over the lazy dog."
]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tiny.model")


def _build_hf_dir(path, chat_template):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|eos|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eos|>", pad_token="<|pad|>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return HFTokenizer(_build_hf_dir(tmp_path_factory.mktemp("hf"), CHAT_TEMPLATE))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- reading prompt files -------------------------------------------------------------


def test_jsonl_with_custom_fields(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question": "What is 1 + 1?", "solution": "2", "id": 7},
            "",  # blank lines are skipped
            {"question": "Halve 1.", "solution": 0.5},
            {"question": "Count.", "solution": 12},
        ],
    )
    records = read_prompt_records(path, prompt_field="question", answer_field="solution")
    assert [r.prompt for r in records] == ["What is 1 + 1?", "Halve 1.", "Count."]
    assert [r.answer for r in records] == ["2", "0.5", "12"]
    assert records[0].meta == {"id": 7}
    assert records[1].source == f"{path}:3"


def test_parquet_with_custom_fields(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({"q": ["a?", "b?"], "gold": ["1", "2"], "level": [1, 2]})
    pq.write_table(table, path)
    records = read_prompt_records(path, prompt_field="q", answer_field="gold")
    assert [(r.prompt, r.answer, r.meta) for r in records] == [
        ("a?", "1", {"level": 1}),
        ("b?", "2", {"level": 2}),
    ]
    with pytest.raises(PromptFileError, match=r"p\.parquet.*missing column 'prompt'"):
        read_prompt_records(path)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["ok", None], "answer": ["1", "2"]}), bad)
    with pytest.raises(PromptFileError, match=r"bad\.parquet:row 1.*'prompt' must be a string"):
        read_prompt_records(bad)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "x", "answer": ', "invalid JSON"),
        ('{"prompt": "x"}', r"missing field 'answer'.*fields present: \['prompt'\]"),
        ('{"prompt": ["x"], "answer": "1"}', "'prompt' must be a string, got list"),
        ('{"prompt": "x", "answer": null}', "'answer' must be a string or number"),
        ('{"prompt": "x", "answer": true}', "'answer' must be a string or number"),
        ('["prompt", "answer"]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, match):
    path = _write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, line],
    )
    with pytest.raises(PromptFileError, match=match) as info:
        read_prompt_records(path)
    assert f"{path}:3:" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PromptFileError, match=r"empty\.jsonl: contains no prompts"):
        read_prompt_records(empty)
    blank = _write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(PromptFileError, match="contains no prompts"):
        read_prompt_records(blank)
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_records(tmp_path / "nope.jsonl")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="max_prompt_tokens must be a positive"):
        PromptDataConfig(path="x.jsonl", max_prompt_tokens=0)
    with pytest.raises(ValueError, match="overlong must be 'drop' or 'truncate_left'"):
        PromptDataConfig(path="x.jsonl", overlong="truncate")
    with pytest.raises(ValueError, match="must name different fields"):
        PromptDataConfig(path="x.jsonl", prompt_field="q", answer_field="q")
    with pytest.raises(ValueError, match="path is empty"):
        PromptDataConfig(path="")
    with pytest.raises(TypeError):
        PromptDataConfig("x.jsonl")  # kw_only


# --- templates and lengths ------------------------------------------------------------


def test_chat_template_applied_through_hf_tokenizer(hf_tokenizer, tmp_path):
    assert isinstance(hf_tokenizer, Tokenizer)
    text = render_prompt(hf_tokenizer, "What is 2 + 2?", system_prompt="Be brief.")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"}])
    ds = PromptDataset(PromptDataConfig(path=str(path)), hf_tokenizer)
    assert ds[0].text.startswith("<|im_start|>user\n")
    assert ds[0].prompt_ids == hf_tokenizer.encode(ds[0].text)
    # The special markers are single tokens, not spelled out byte by byte.
    assert ds[0].prompt_ids[0] == hf_tokenizer.hf.convert_tokens_to_ids("<|im_start|>")
    assert hf_tokenizer.decode(ds[0].prompt_ids) == ds[0].text
    assert hf_tokenizer.eos_token_id == hf_tokenizer.hf.convert_tokens_to_ids("<|eos|>")
    assert hf_tokenizer.pad_token_id == hf_tokenizer.hf.convert_tokens_to_ids("<|pad|>")


def test_plain_fallback_and_raw(tmp_path, sp_tokenizer):
    hf_plain = HFTokenizer(_build_hf_dir(tmp_path / "plain", chat_template=None))
    for tok in (hf_plain, sp_tokenizer):
        assert render_prompt(tok, "Hi?") == "User: Hi?\nAssistant:"
        assert render_prompt(tok, "Hi?", system_prompt="S.") == "S.\n\nUser: Hi?\nAssistant:"
        assert render_prompt(tok, "Hi?", template="raw") == "Hi?"
    assert PLAIN_TEMPLATE.format(system_block="", prompt="Q") == "User: Q\nAssistant:"


def test_overlong_prompts_dropped_with_count(tmp_path, sp_tokenizer):
    rows = [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "long " * 200, "answer": "0"}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = PromptDataConfig(path=str(path), max_prompt_tokens=40)
    ds = PromptDataset(cfg, sp_tokenizer)
    assert [s.record.prompt for s in ds] == ["What is 1 + 2?"]
    assert ds.stats == {
        "data/num_records": 2,
        "data/num_prompts": 1,
        "data/dropped_overlong": 1,
        "data/truncated": 0,
    }
    tight = PromptDataConfig(path=str(path), max_prompt_tokens=2)
    with pytest.raises(PromptFileError, match="all 2 prompts are longer"):
        PromptDataset(tight, sp_tokenizer)


def test_overlong_prompts_truncated_left(tmp_path, sp_tokenizer):
    long_prompt = "the quick brown fox " * 30 + "What is 1 + 2?"
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": long_prompt, "answer": "3"}])
    cfg = PromptDataConfig(path=str(path), max_prompt_tokens=16, overlong="truncate_left")
    ds = PromptDataset(cfg, sp_tokenizer)
    full_text = render_prompt(sp_tokenizer, long_prompt)
    full_ids = sp_tokenizer.encode(full_text)
    assert len(full_ids) > 16
    assert ds[0].prompt_ids == full_ids[-16:]
    # The end survives (question and assistant marker), the start is gone.
    assert full_text.endswith(ds[0].text) and ds[0].text.endswith("+ 2?\nAssistant:")
    assert not ds[0].text.startswith("User:")
    assert ds.stats["data/truncated"] == 1 and ds.stats["data/dropped_overlong"] == 0


def test_batches_are_deterministic(tmp_path, sp_tokenizer):
    path = tmp_path / "a.jsonl"
    write_arithmetic_jsonl(path, 10, seed=3)
    ds = PromptDataset(PromptDataConfig(path=str(path)), sp_tokenizer)

    def order(**kw):
        return [[s.record.prompt for s in b] for b in ds.batches(4, **kw)]

    assert order(seed=0, epoch=1) == order(seed=0, epoch=1)
    assert order(seed=0, epoch=1) != order(seed=0, epoch=2)
    assert len(order(seed=0)) == 2  # the partial batch is dropped
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(11))


# --- tokenizers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "What is 37 + 48?",
        "  two  spaces\n\ttab",
        "héllo wörld ✓ 🙂 日本語",
        r"\boxed{\frac{1}{2}}",
        "",
    ],
)
def test_sentencepiece_round_trip(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)
    assert sp_tokenizer.decode(ids) == text


def test_sentencepiece_special_ids_and_loading(sp_tokenizer, tmp_path):
    assert isinstance(sp_tokenizer, Tokenizer)
    assert sp_tokenizer.vocab_size > 256
    assert sp_tokenizer.eos_token_id == 2 and sp_tokenizer.pad_token_id == 3
    assert sp_tokenizer.chat_template is None
    reloaded = load_tokenizer(sp_tokenizer.path)
    assert isinstance(reloaded, SentencePieceTokenizer)
    assert reloaded.encode("What is 5 * 6?") == sp_tokenizer.encode("What is 5 * 6?")
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(CORPUS, tmp_path / "x.model", vocab_size=256)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "missing.bin")


def test_hf_tokenizer_round_trip_and_loading(hf_tokenizer):
    text = "héllo ✓ What is 37 + 48?"
    assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == text
    assert isinstance(load_tokenizer(hf_tokenizer.path), HFTokenizer)
    assert hf_tokenizer.vocab_size == len(hf_tokenizer.hf)


# --- arithmetic task ------------------------------------------------------------------


def test_arithmetic_generator_is_deterministic(tmp_path):
    a = generate_problems(50, seed=7, difficulty=2)
    assert a == generate_problems(50, seed=7, difficulty=2)
    assert a != generate_problems(50, seed=8, difficulty=2)
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for p in a:
        assert p.prompt == f"What is {p.a} {p.op} {p.b}? Put the final answer in \\boxed{{}}."
        assert int(p.answer) == ops[p.op](p.a, p.b) >= 0
        assert 0 <= p.a <= 99 and 0 <= p.b <= 99
    assert {p.op for p in a} == {"+", "-", "*"}
    assert all(p.a <= 9 and p.b <= 9 for p in generate_problems(20, seed=0, difficulty=1))

    path = tmp_path / "arith.jsonl"
    write_arithmetic_jsonl(path, 5, seed=7)
    records = read_prompt_records(path)
    assert [(r.prompt, r.answer) for r in records] == [(p.prompt, p.answer) for p in a[:5]]
    assert records[0].meta == {"target": a[0].sft_target}
    assert path.read_bytes() == (write_arithmetic_jsonl(path, 5, seed=7) and path.read_bytes())


def test_arithmetic_targets_graded_correct():
    problems = generate_problems(24, seed=11, difficulty=2)
    targets = [p.sft_target for p in problems]
    answers = [p.answer for p in problems]
    wrong = [str(int(p.answer) + 1) for p in problems]
    with MathGrader(timeout_s=5, num_workers=1) as grader:
        right = grader.grade(targets, answers)
        off_by_one = grader.grade(targets, wrong)
    assert right.rewards == [1.0] * len(problems)
    assert off_by_one.rewards == [0.0] * len(problems)
