"""Any text a dataset or a model produces survives every place a sample is stored or sent.

`str.splitlines()` breaks lines at U+0085, U+2028, U+2029, \\x1c-\\x1e, \\x0b and \\x0c as well as
at "\\n" and "\\r"; a random model's byte-level tokens decode to all of them, and web text holds
them too. A lone surrogate is a valid Python string that UTF-8 cannot encode.
"""

import json

import pytest

from slime_wf.config import CampaignConfig
from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer
from slime_wf.rollout.dataset import DataError, Dataset
from slime_wf.store import RunStore
from slime_wf.types import Sample, read_samples_jsonl, write_samples_jsonl

HOSTILE = {
    "nel": "\u0085",
    "line_separator": "\u2028",
    "paragraph_separator": "\u2029",
    "file_separator": "\x1c",
    "group_separator": "\x1d",
    "record_separator": "\x1e",
    "vertical_tab": "\x0b",
    "form_feed": "\x0c",
    "carriage_return": "\r",
    "lone_high_surrogate": "\ud800",
    "lone_low_surrogate": "\udc80",
    "emoji": "\U0001f99c\U0001f3f3\ufe0f\u200d\U0001f308",
    "rtl": "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u202eevil\u202c",
}
# Separated: a high surrogate right before a low one reads back as the character the pair encodes,
# as JSON defines it (any JSON decoder that produced the text would already have joined them).
ALL = " ".join(HOSTILE.values())


def text(name: str) -> str:
    return f"before {HOSTILE[name]} middle {HOSTILE[name]}{HOSTILE[name]} after"


def hostile_samples() -> list[Sample]:
    """One sample per character (in prompt, response, label and metadata), and one with all of them."""
    samples = []
    for i, name in enumerate([*HOSTILE, None]):
        t = ALL if name is None else text(name)
        samples.append(
            Sample(
                group_index=i,
                index=i,
                prompt=t if i % 2 else [{"role": "system", "content": t}, {"role": "user", "content": t}],
                tokens=[1, 2, 3],
                response=t,
                response_length=1,
                label=t if i % 3 else {"answer": t, "aliases": [t, "plain"]},
                reward={"score": 1.0, t: 0.5},
                loss_mask=[1],
                rollout_log_probs=[-0.25],
                weight_versions=[t],
                status=Sample.Status.COMPLETED,
                metadata={"source": t, t: [t, {"nested": t}]},
            )
        )
    return samples


def assert_one_record_per_line(data: bytes, records: int) -> None:
    """Valid UTF-8, and one line per record even for readers that split on every line break."""
    decoded = data.decode("utf-8")
    assert decoded.count("\n") == records
    assert len(decoded.splitlines()) == records


# ---- the run store (samples.jsonl, data_source.json) -----------------------------------------


def test_samples_round_trip_through_the_store(store_root):
    store = RunStore(store_root)
    samples = hostile_samples()
    rel = RunStore.rollout_file(9, "samples.jsonl")
    assert store.write_jsonl(rel, (s.to_dict() for s in samples)) == len(samples)
    assert_one_record_per_line(store.read_bytes(rel), len(samples))
    again = [Sample.from_dict(row) for row in store.read_jsonl(rel)]
    assert again == samples
    assert again[-1].response == ALL
    raw = store.read_text(rel)  # only line breakers and lone surrogates are escaped: the text stays readable
    assert HOSTILE["rtl"] in raw and HOSTILE["emoji"] in raw


def test_samples_written_with_raw_line_separators_are_read(store_root):
    """A samples.jsonl that an earlier writer left with raw U+0085 / U+2028 / U+2029 inside strings
    (which made the campaign unresumable) reads back."""
    store = RunStore(store_root)
    rows = [
        {"response": text(name), "i": i}
        for i, name in enumerate(["nel", "line_separator", "paragraph_separator"])
    ]
    store.write_text("old.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert store.read_jsonl("old.jsonl") == rows


def test_json_documents_with_lone_surrogates_round_trip(store_root):
    store = RunStore(store_root)
    doc = {"buffer": [[s.to_dict() for s in hostile_samples()]], ALL: ALL}
    store.write_json("doc.json", doc)
    store.read_bytes("doc.json").decode("utf-8")
    assert store.read_json("doc.json") == doc


# ---- the dataset loader ----------------------------------------------------------------------


SURROGATES = ("lone_high_surrogate", "lone_low_surrogate")
PROMPTABLE = " ".join(v for k, v in HOSTILE.items() if k not in SURROGATES)


def dataset_rows() -> list[dict]:
    """Labels and metadata hold every character; prompts every one that a tokenizer can encode (a lone
    surrogate in a prompt is a bad row: see the test below)."""
    rows = []
    for i, name in enumerate(HOSTILE):
        prompt = text("rtl") if name in SURROGATES else text(name)
        rows.append({"prompt": prompt, "label": text(name), "metadata": {"why": text(name), "i": i}})
    rows.append(
        {
            "prompt": [{"role": "user", "content": PROMPTABLE}],
            "label": [ALL],
            "metadata": json.dumps({ALL: ALL}),
        }
    )
    return rows


def dataset_bytes(rows: list[dict], newline: str = "\n") -> bytes:
    """JSON lines as other tools write them: raw UTF-8 text; lone surrogates (not UTF-8) escaped.
    One record has "\r" as JSON whitespace between its items, which only "\n" may split."""
    lines = []
    for i, row in enumerate(rows):
        line = json.dumps(row, ensure_ascii=False, separators=(",\r ", ":\r") if i == 1 else None)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(row)
        lines.append(line)
    return "".join(line + newline for line in lines).encode("utf-8")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_dataset_rows_round_trip(store_root, newline):
    store = RunStore(store_root)
    rows = dataset_rows()
    data = dataset_bytes(rows, newline)
    assert (
        "\u2028".encode() in data and "\u0085".encode() in data
    )  # raw in the file, as web-text dumps have them
    store.write_bytes("prompts.jsonl", data)
    ds = Dataset(store.url("prompts.jsonl"))
    assert ds.stats.rows == len(rows) and len(ds) == len(rows)
    for sample, row in zip(ds.origin_samples, rows, strict=True):
        assert sample.prompt == row["prompt"] and sample.label == row["label"]
    assert [s.metadata for s in ds.origin_samples[:-1]] == [r["metadata"] for r in rows[:-1]]
    assert ds.origin_samples[-1].metadata == {ALL: ALL}


@pytest.mark.parametrize("prompt", ["a\ud800b", [{"role": "user", "content": "x\udc80"}]])
def test_a_prompt_with_a_lone_surrogate_is_a_bad_row(tmp_path, prompt):
    """No tokenizer encodes a lone surrogate, so the engine request would fail on every retry and resume:
    the row is refused at load, naming the line, or skipped and counted."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "fine", "label": "1"})
        + "\n"
        + json.dumps({"prompt": prompt, "label": "1"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"prompts.jsonl:2: .*lone surrogate U\+D[8C]\d\d"):
        Dataset(str(path))
    ds = Dataset(str(path), skip_bad_rows=True)
    assert len(ds) == 1 and ds.stats.skipped_bad_rows == 1


# ---- the data source's buffer state, through the store ----------------------------------------


def test_buffer_state_round_trips_through_the_store(tmp_path, store_root):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(dataset_bytes(dataset_rows()))
    args = CampaignConfig.from_dict(
        {"data": {"prompt_data": str(path)}, "rollout": {"n_samples_per_prompt": 2}}
    ).args()
    original = RolloutDataSourceWithBuffer(args)
    groups = original.get_samples(len(HOSTILE) + 1)
    for g, group in enumerate(groups):
        for sample in group:  # partial responses holding the characters go back to the buffer
            sample.response = ALL if g % 2 else text(list(HOSTILE)[g % len(HOSTILE)])
            sample.tokens, sample.response_length = [5, 6], 1
            sample.loss_mask, sample.rollout_log_probs = [1], [-1.0]
            sample.status = Sample.Status.ABORTED
            sample.metadata[ALL] = sample.response
    original.add_samples(groups)

    store = RunStore(store_root)
    rel = RunStore.rollout_file(3, "data_source.json")
    store.write_json(rel, original.state_dict())
    restored = RolloutDataSourceWithBuffer(args)
    restored.load_state_dict(store.read_json(rel))
    assert restored.state_dict() == original.state_dict()
    want, got = original.get_samples(4, rollout_id=4), restored.get_samples(4, rollout_id=4)
    assert [[s.to_dict() for s in g] for g in got] == [[s.to_dict() for s in g] for g in want]


# ---- the trainer service's sample transport ---------------------------------------------------


def test_trainer_sample_transport_round_trips(tmp_path):
    samples = hostile_samples()
    path = write_samples_jsonl(samples, tmp_path / "samples-000009.jsonl")
    assert_one_record_per_line(path.read_bytes(), len(samples))
    assert read_samples_jsonl(path) == samples


def test_sample_to_json_is_one_line():
    for sample in hostile_samples():
        line = sample.to_json()
        line.encode("utf-8")
        assert len(line.splitlines()) == 1
        assert Sample.from_json(line) == sample
