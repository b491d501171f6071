"""finetune.data: formats, the validator's report, the chat rendering and the assistant-only mask."""

from __future__ import annotations

import json
import random

import pytest

from finetune import data as D
from finetune.errors import DataError
from tests.tiny import SMOLLM2_TEMPLATE
from tests.unit.finetune_fixtures import (FIXTURES, GEMMA_TEMPLATE, LLAMA3_TEMPLATE, MARKED_CHATML_TEMPLATE,
                                          MISTRAL_TEMPLATE, TOOLS_TEMPLATE, random_conversation, tokenizer_with)

EOT = {SMOLLM2_TEMPLATE: "<|im_end|>", LLAMA3_TEMPLATE: "<|eot_id|>", GEMMA_TEMPLATE: "<end_of_turn>",
       MISTRAL_TEMPLATE: "<|im_end|>", TOOLS_TEMPLATE: "<|im_end|>"}


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
def test_openai_messages_with_tools_and_content_parts():
    examples, report = D.load_examples([FIXTURES / "messages.jsonl"])
    assert report.formats == {"messages.jsonl": "messages"} and not report.rejects
    assert [e.source for e in examples] == ["messages.jsonl:1", "messages.jsonl:2", "messages.jsonl:3"]
    tool_row = examples[1]
    assert [m["role"] for m in tool_row.messages] == ["user", "assistant", "tool", "assistant"]
    call = tool_row.messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}  # JSON string -> dict
    assert tool_row.tools[0]["function"]["name"] == "get_weather"
    assert examples[2].messages[0]["content"] == "Say hi"  # content parts joined


def test_sharegpt_roles_function_call_observation_and_system():
    examples, report = D.load_examples([FIXTURES / "sharegpt.json"])
    assert report.formats == {"sharegpt.json": "sharegpt"} and not report.rejects
    first = examples[0].messages
    assert [m["role"] for m in first] == ["user", "assistant", "tool", "assistant"]
    assert first[1]["tool_calls"][0]["function"]["name"] == "search_recipes"
    assert examples[0].tools[0]["function"]["name"] == "search_recipes"  # tools given as a JSON string
    assert examples[1].messages[0] == {"role": "system", "content": "Be kind."}
    assert examples[2].messages[0] == {"role": "system", "content": "Answer in French."}
    assert examples[0].source == "sharegpt.json[0]"


def test_alpaca_input_history_and_system():
    examples, _ = D.load_examples([FIXTURES / "alpaca.json"])
    assert examples[0].messages == [{"role": "user", "content": "Translate to French.\n\nGood morning"},
                                    {"role": "assistant", "content": "Bonjour"}]
    assert examples[1].messages[0]["content"] == "Name a primary colour."
    assert [m["role"] for m in examples[2].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_prompt_completion_plain_and_conversational():
    examples, report = D.load_examples([FIXTURES / "prompt_completion.jsonl"])
    assert report.formats["prompt_completion.jsonl"] == "prompt_completion"
    assert examples[0].messages[1] == {"role": "assistant", "content": " Paris."}
    assert examples[1].messages == [{"role": "user", "content": "Capital of Italy?"},
                                    {"role": "assistant", "content": "Rome."}]


def test_plain_text_trains_every_token(tiny_tokenizer):
    examples, _ = D.load_examples([FIXTURES / "text.jsonl"])
    enc = D.encode_chat(tiny_tokenizer, examples[0])
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_json_array_and_jsonl_and_datasets_folder_agree(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows]).save_to_disk(str(tmp_path / "ds"))
    got = [D.load_examples([tmp_path / name])[0] for name in ("a.json", "a.jsonl", "ds")]
    assert [e.messages for e in got[0]] == [e.messages for e in got[1]]
    assert [e.messages for e in got[2]] == [e.messages for e in got[0]]
    assert got[2][1].source == "ds[1]"


def test_named_format_that_does_not_match_rejects_rows_with_the_reason():
    examples, report = D.load_examples([FIXTURES / "alpaca.json"], "messages")
    assert not examples
    assert all("missing key 'messages'" in r.reason for r in report.rejects)


def test_undetectable_format_says_what_it_expected(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match="cannot tell the data format.*--format"):
        D.load_examples([tmp_path / "x.jsonl"])


def test_missing_file_and_size_cap(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.load_examples([tmp_path / "nope.jsonl"])
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "x"}\n' * 100)
    with pytest.raises(DataError, match="max_file_bytes"):
        list(D.read_records(big, max_file_bytes=100))
    with pytest.raises(DataError, match="max_rows"):
        list(D.read_records(big, max_rows=10))


# ---------------------------------------------------------------------------------------------
# Validation report
# ---------------------------------------------------------------------------------------------
def test_validator_reports_every_bad_row_with_line_and_reason():
    examples, report = D.load_examples([FIXTURES / "invalid.jsonl"])
    reasons = {r.source: r.reason for r in report.rejects}
    assert reasons.keys() == {f"invalid.jsonl:{n}" for n in (2, 3, 4, 5, 6, 7, 8)}
    assert "invalid JSON" in reasons["invalid.jsonl:2"]
    assert "unknown role 'wizard'" in reasons["invalid.jsonl:3"]
    assert "empty content" in reasons["invalid.jsonl:4"]
    assert "no assistant turn" in reasons["invalid.jsonl:5"]
    assert "invalid UTF-8" in reasons["invalid.jsonl:6"]
    assert "do not alternate" in reasons["invalid.jsonl:7"]
    assert "JSON object" in reasons["invalid.jsonl:8"]
    # Nothing is dropped silently: kept + rejected == read.
    assert len(examples) + len(report.rejects) == report.rows_read == 9
    with pytest.raises(DataError, match=r"(?s)7 of 9 rows .* rejected.*invalid.jsonl:3: message 1: unknown role"):
        report.check(0.05)
    report.check(0.8)  # a looser threshold lets the run go on


def test_overlong_rows_are_rejected_or_truncated_never_dropped(tiny_tokenizer):
    ex = D.Example("f:1", messages=[{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "a" * 50}])
    report = D.DataReport(rows_read=1)
    assert D.encode_all(tiny_tokenizer, [ex], report, max_length=40) == []
    assert "above max_length=40" in report.rejects[0].reason
    # Truncated so far that no assistant token is left: still a reject, with its own reason.
    report = D.DataReport(rows_read=1)
    assert D.encode_all(tiny_tokenizer, [ex], report, max_length=40, overlong="truncate") == []
    assert "no assistant tokens" in report.rejects[0].reason
    full = D.encode_chat(tiny_tokenizer, ex)
    kept = D.encode_all(tiny_tokenizer, [ex], D.DataReport(), max_length=len(full.input_ids) - 10, overlong="truncate")
    assert kept[0].input_ids == full.input_ids[:-10] and kept[0].trained_tokens == full.trained_tokens - 9  # the final newline is untrained


def test_bad_utf8_in_a_json_array_names_the_row(tmp_path):
    raw = b'[{"text": "good"}, {"text": "bad \xff byte"}, {"text": "fine"}]'
    (tmp_path / "a.json").write_bytes(raw)
    examples, report = D.load_examples([tmp_path / "a.json"])
    assert [r.source for r in report.rejects] == ["a.json[1]"] and len(examples) == 2


def test_statistics(tiny_tokenizer):
    examples, _ = D.load_examples([FIXTURES / "messages.jsonl"])
    enc = D.encode_all(tiny_tokenizer, examples, D.DataReport(), max_length=4096)
    stats = D.dataset_stats(enc)
    lengths = sorted(len(e.input_ids) for e in enc)
    assert stats["rows"] == 3 and stats["length_max"] == lengths[-1] and stats["length_p50"] == lengths[1]
    assert stats["turns_mean"] == pytest.approx((2 + 3 + 4) / 3, abs=0.01)  # user + assistant messages
    assert 0 < stats["trained_share"] < 1
    assert "p90" in D.format_stats("train", stats)


# ---------------------------------------------------------------------------------------------
# Rendering and the label mask
# ---------------------------------------------------------------------------------------------
def _labelled_runs(tok, enc):
    runs, cur = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != D.IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, GEMMA_TEMPLATE, MISTRAL_TEMPLATE,
                                      TOOLS_TEMPLATE], ids=["smollm2", "llama3", "gemma", "mistral", "chatml-tools"])
def test_ids_match_apply_chat_template_and_only_assistant_tokens_are_labelled(template):
    tok = tokenizer_with(template)
    rng = random.Random(7)
    for _ in range(25):
        msgs = random_conversation(rng, system=False if template == GEMMA_TEMPLATE else None)
        enc = D.encode_chat(tok, D.Example("x", messages=msgs))
        assert enc.input_ids == tok.apply_chat_template(msgs)["input_ids"]  # token by token
        runs = _labelled_runs(tok, enc)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            # Each labelled run is the answer plus the end-of-turn token: no system/user text,
            # no role header, no newline after the end-of-turn token.
            assert run.endswith(EOT[template])
            assert run[: -len(EOT[template])].strip() == answer.strip()


def test_mask_equals_transformers_generation_mask_on_a_marked_template():
    tok = tokenizer_with(MARKED_CHATML_TEMPLATE)
    rng = random.Random(3)
    for _ in range(25):
        msgs = random_conversation(rng)
        ref = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True)
        enc = D.encode_chat(tok, D.Example("x", messages=msgs))
        assert enc.input_ids == ref["input_ids"]
        assert [int(x != D.IGNORE_INDEX) for x in enc.labels] == ref["assistant_masks"]


def test_smollm2_default_system_prompt_is_not_trained(tiny_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = D.encode_chat(tiny_tokenizer, D.Example("x", messages=msgs))
    assert "SmolLM" in tiny_tokenizer.decode(enc.input_ids)
    assert _labelled_runs(tiny_tokenizer, enc) == ["hello<|im_end|>"]


def test_native_tool_template_gets_structured_tool_calls():
    tok = tokenizer_with(TOOLS_TEMPLATE)
    ex = D.load_examples([FIXTURES / "messages.jsonl"])[0][1]
    enc = D.encode_chat(tok, ex)
    assert enc.input_ids == tok.apply_chat_template(ex.messages, tools=ex.tools)["input_ids"]
    runs = _labelled_runs(tok, enc)
    assert runs[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert runs[1] == "It is 21 C in Paris.<|im_end|>"
    assert "temp_c" not in "".join(runs)  # the tool result is context, not a target


def test_template_without_tool_support_keeps_tools_visible(tiny_tokenizer):
    ex = D.load_examples([FIXTURES / "sharegpt.json"])[0][0]
    enc = D.encode_chat(tiny_tokenizer, ex)
    text = tiny_tokenizer.decode(enc.input_ids)
    assert "<tools>" in text and "search_recipes" in text.split("<|im_end|>")[0]  # schemas in the system turn
    runs = _labelled_runs(tiny_tokenizer, enc)
    assert runs[0].startswith("<tool_call>\n") and '"ingredients": ["rice"]' in runs[0]
    assert runs[1] == "Try fried rice.<|im_end|>"
    assert not any("fried rice\"]" in r for r in runs)  # the observation is not trained


def test_weight_zero_assistant_messages_are_context_only(tiny_tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "skip me", "weight": 0},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "learn me", "weight": 1}]
    ex = D.normalize({"messages": msgs}, "messages", "x")
    assert _labelled_runs(tiny_tokenizer, D.encode_chat(tiny_tokenizer, ex)) == ["learn me<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# Split, batching, collation
# ---------------------------------------------------------------------------------------------
def test_split_depends_on_data_seed_only():
    items = list(range(100))
    a = D.split_examples(items, 0.1, data_seed=1)
    assert a == D.split_examples(items, 0.1, data_seed=1)
    assert a[1] != D.split_examples(items, 0.1, data_seed=2)[1]
    assert sorted(a[0] + a[1]) == items and len(a[1]) == 10
    assert len(D.split_examples(items, 0.5, data_seed=1, max_eval_rows=7)[1]) == 7


def test_length_grouped_batches_cover_everything_once_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = D.length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == D.length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert batches != D.length_grouped_batches(lengths, 8, seed=3, epoch=1)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    order = list(range(1000))
    rng.shuffle(order)
    random_batches = [order[i: i + 8] for i in range(0, 1000, 8)]
    assert padding(batches) < 0.1 * padding(random_batches)


def test_collate_pads_and_masks():
    rows = [D.Encoded("a", [5, 6, 7], [-100, 6, 7]), D.Encoded("b", [8], [8])]
    batch = D.collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_tsv_cells_keep_their_quote_marks_and_csv_follows_rfc4180(tmp_path):
    (tmp_path / "t.tsv").write_text('label\ttext\npositive\t"Quoted, tweet" and more\nneutral\tplain\n')
    rows = [r for _, r in D.read_records(tmp_path / "t.tsv")]
    assert rows == [{"label": "positive", "text": '"Quoted, tweet" and more'}, {"label": "neutral", "text": "plain"}]
    (tmp_path / "c.csv").write_text('label,text\npositive,"a, b"\n')
    assert [r for _, r in D.read_records(tmp_path / "c.csv")] == [{"label": "positive", "text": "a, b"}]
