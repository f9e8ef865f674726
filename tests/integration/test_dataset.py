import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slime_wf.rollout.dataset import DataError, Dataset, load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"what is {i} plus {i}", "label": 2 * i, "metadata": {"i": i}} for i in range(10)]


def test_jsonl_rows_become_samples(tmp_path):
    ds = Dataset(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert len(ds) == 10
    assert ds[3].prompt == "what is 3 plus 3" and ds[3].label == 6 and ds[3].metadata == {"i": 3}
    assert ds.stats.as_dict() == {
        "rows": 10,
        "kept": 10,
        "skipped_bad_rows": 0,
        "skipped_empty_prompts": 0,
        "skipped_over_context": 0,
        "dropped_too_long": 0,
    }


def test_custom_keys_and_metadata_as_json_string(tmp_path):
    rows = [
        {"question": "q", "answer": "a", "meta": json.dumps({"rm_type": "f1"})},
        {"question": "q2", "answer": "b"},
    ]
    ds = Dataset(
        write_jsonl(tmp_path / "d.jsonl", rows),
        prompt_key="question",
        label_key="answer",
        metadata_key="meta",
    )
    assert ds[0].label == "a" and ds[0].metadata == {"rm_type": "f1"} and ds[1].metadata == {}


def test_no_label_key(tmp_path):
    ds = Dataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}]), label_key=None)
    assert ds[0].label is None


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": r["prompt"], "label": str(r["label"])} for r in ROWS]), path
    )
    ds = Dataset(str(path))
    assert len(ds) == 10 and ds[9].label == "18"


def test_parquet_bad_row_names_the_row(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "x", "label": "1"}, {"prompt": "y", "label": None}]), path
    )
    with pytest.raises(DataError, match=r"d.parquet row 1: missing label key 'label'"):
        Dataset(str(path))


def test_row_slice(tmp_path):
    ds = Dataset(write_jsonl(tmp_path / "d.jsonl", ROWS) + "@[2:5]")
    assert [s.label for s in ds.samples] == [4, 6, 8]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], '{"prompt": "broken', ROWS[2]])
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON.*skip_bad_rows"):
        Dataset(path)


def test_missing_label_names_key_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "no label here"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing label key 'label' \(row keys: \['prompt'\]\)"):
        Dataset(path)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"label": 1}, "missing prompt key 'prompt'"),
        ({"prompt": 3, "label": 1}, "must be a string or a list of"),
        ({"prompt": [{"content": "x"}], "label": 1}, "must be a string or a list of"),
        ({"prompt": "x", "label": 1, "metadata": "not json"}, "metadata 'metadata' is a string but not JSON"),
        ({"prompt": "x", "label": 1, "metadata": [1]}, "must be a mapping"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_rows(tmp_path, row, expected):
    with pytest.raises(DataError, match=expected):
        Dataset(write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row]))


def test_skip_bad_rows_counts_them(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "{oops", {"prompt": "x"}, ROWS[1]])
    ds = Dataset(path, skip_bad_rows=True)
    assert len(ds) == 2
    assert ds.stats.skipped_bad_rows == 2 and ds.stats.rows == 4
    assert "skipped 2 bad row(s)" in caplog.text and "d.jsonl:2" in caplog.text


def test_missing_file_and_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Dataset(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported format"):
        Dataset(str(tmp_path / "d.csv"))


def test_all_rows_bad_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable prompts"):
        Dataset(write_jsonl(tmp_path / "d.jsonl", ["{x"]), skip_bad_rows=True)


def test_chat_template_and_max_prompt_len(tmp_path, tiny_tokenizer_dir, caplog):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    rows = [
        {"prompt": "what is 1 plus 2", "label": 3},
        {"prompt": [{"role": "user", "content": "what is 12345 plus 67890"}], "label": 1},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = Dataset(path, tokenizer=tok, apply_chat_template=True)
    assert ds[0].prompt == "<|im_start|>user what is 1 plus 2<|im_end|><|im_start|>assistant"
    # <|im_start|> user what is 1 plus 2 <|im_end|> <|im_start|> assistant = 10 tokens; the second has 18
    lengths = [len(tok(s.prompt, add_special_tokens=False)["input_ids"]) for s in ds.samples]
    assert lengths == [10, 18]
    short = Dataset(path, tokenizer=tok, apply_chat_template=True, max_length=15)
    assert len(short) == 1 and short.stats.dropped_too_long == 1
    assert "dropped 1 prompt(s) longer than rollout_max_prompt_len=15" in caplog.text


def test_tokenizer_required(tmp_path):
    with pytest.raises(DataError, match="need a tokenizer"):
        Dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), max_length=4)


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    ds = Dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), seed=7)
    ds.shuffle(0)
    epoch0 = [s.label for s in ds.samples]
    ds.shuffle(1)
    epoch1 = [s.label for s in ds.samples]
    ds.shuffle(0)
    assert [s.label for s in ds.samples] == epoch0
    assert sorted(epoch0) == sorted(epoch1) == [r["label"] for r in ROWS]
    assert epoch0 != epoch1
    other = Dataset(write_jsonl(tmp_path / "e.jsonl", ROWS), seed=8)
    other.shuffle(0)
    assert [s.label for s in other.samples] != epoch0


def test_dataset_on_s3(s3_server, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.pipe(f"{s3_bucket}/data/d.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), path)
    fs.put(str(path), f"{s3_bucket}/data/d.parquet")
    assert len(Dataset(f"s3://{s3_bucket}/data/d.jsonl")) == 10
    assert Dataset(f"s3://{s3_bucket}/data/d.parquet")[2].metadata == {"i": 2}


def test_invalid_utf8_names_file_and_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps(ROWS[0]).encode()
        + b"\n"
        + b'{"prompt": "caf\xe9", "label": 1}\n'
        + json.dumps(ROWS[1]).encode()
        + b"\n"
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8.*skip_bad_rows"):
        Dataset(str(path))
    ds = Dataset(str(path), skip_bad_rows=True)
    assert [s.label for s in ds.samples] == [0, 2] and ds.stats.skipped_bad_rows == 1


@pytest.mark.parametrize(
    "prompt",
    ["", "  \n\t\u3000", [], [{"role": "system", "content": ""}, {"role": "user", "content": " \n"}]],
    ids=["empty", "whitespace", "no-messages", "blank-messages"],
)
def test_empty_prompt_is_rejected_with_file_line_and_fix(tmp_path, prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": prompt, "label": 1}, ROWS[1]])
    with pytest.raises(
        DataError, match=r"d.jsonl:2: prompt 'prompt' is (empty|an empty list).*skip_bad_rows=true"
    ):
        Dataset(path)


def context_rows():
    return [
        {"prompt": "what is 1 plus 2", "label": 3},  # 5 tokens
        {"prompt": " ", "label": 0},
        {"prompt": "what is 12345 plus 67890 " * 2, "label": 1},  # 26 tokens
        {"prompt": [{"role": "user", "content": "what is 1 plus 1"}], "label": 2},  # rendered: 10 tokens
        {"prompt": [], "label": 4},
        {"prompt": "what is 123 plus 456", "label": 5},  # 10 tokens
    ]


def test_prompt_over_the_engine_context_is_rejected(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    path = write_jsonl(tmp_path / "d.jsonl", [r for r in context_rows() if r["prompt"] not in (" ", [])])
    with pytest.raises(
        DataError,
        match=r"d.jsonl:2: the prompt has 26 tokens; with rollout_max_response_len=8 that is 34, "
        r"over the engine's context length of 20 tokens.*rollout_max_prompt_len=12.*"
        r"skip_bad_rows=true",
    ):
        Dataset(path, tokenizer=tok, context_length=20, max_response_len=8)
    # exactly at the limit is fine: 26 + 10 == 36
    assert len(Dataset(path, tokenizer=tok, context_length=36, max_response_len=10)) == 4
    with pytest.raises(DataError, match="leaves no room for a prompt"):
        Dataset(path, tokenizer=tok, context_length=20, max_response_len=20)
    with pytest.raises(DataError, match="need a tokenizer"):
        Dataset(path, context_length=20)


def test_skip_bad_rows_counts_empty_and_over_context_prompts(tmp_path, tiny_tokenizer_dir, caplog):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    ds = Dataset(
        write_jsonl(tmp_path / "d.jsonl", context_rows()),
        tokenizer=tok,
        context_length=20,
        max_response_len=10,
        skip_bad_rows=True,
    )
    assert [s.label for s in ds.samples] == [3, 2, 5]
    assert ds.stats.as_dict() == {
        "rows": 6,
        "kept": 3,
        "skipped_bad_rows": 3,
        "skipped_empty_prompts": 2,
        "skipped_over_context": 1,
        "dropped_too_long": 0,
    }
    assert "skipped 3 bad row(s) (2 empty prompt(s), 1 over the engine's context)" in caplog.text
    assert "d.jsonl:2" in caplog.text


def test_max_prompt_len_still_drops_before_the_context_check(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    rows = [r for r in context_rows() if r["prompt"] not in (" ", [])]
    ds = Dataset(
        write_jsonl(tmp_path / "d.jsonl", rows),
        tokenizer=tok,
        max_length=12,
        context_length=20,
        max_response_len=10,
    )
    assert [s.label for s in ds.samples] == [3, 2, 5]
    assert ds.stats.dropped_too_long == 1 and ds.stats.skipped_bad_rows == 0
