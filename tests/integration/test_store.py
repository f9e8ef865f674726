"""The same behaviour against a local folder and a real S3 endpoint (moto_server)."""

import os

import pytest

from slime_wf.config import CampaignConfig
from slime_wf.store import RunStore, StoreError
from slime_wf.types import Sample


def test_json_round_trip_and_overwrite(store_root):
    store = RunStore(store_root)
    store.write_json("a/b.json", {"x": 1, "y": [1.5, None]})
    assert store.read_json("a/b.json") == {"x": 1, "y": [1.5, None]}
    store.write_json("a/b.json", {"x": 2})
    assert store.read_json("a/b.json") == {"x": 2}
    assert store.exists("a/b.json") and not store.exists("a/c.json")


def test_missing_file(store_root):
    store = RunStore(store_root)
    assert store.read_json("nope.json", default=None) is None
    with pytest.raises(FileNotFoundError):
        store.read_json("nope.json")


def test_jsonl_of_samples_round_trips(store_root):
    store = RunStore(store_root)
    samples = [
        Sample(index=i, tokens=[i, i + 1], reward=i / 3, status=Sample.Status.COMPLETED) for i in range(5)
    ]
    assert store.write_jsonl("rollouts/000001/samples.jsonl", (s.to_dict() for s in samples)) == 5
    again = [Sample.from_dict(d) for d in store.read_jsonl("rollouts/000001/samples.jsonl")]
    assert again == samples


def test_layout_and_listing(store_root):
    store = RunStore(store_root).child("camp")
    for rid in (2, 0, 11):
        store.write_json(store.rollout_file(rid, "metrics.json"), {"rollout_id": rid})
    store.write_manifest({"last_completed_rollout_id": 11})
    assert store.rollout_ids() == [0, 2, 11]
    assert store.rollout_file(11, "ledger.json") == "rollouts/000011/ledger.json"
    assert store.checkpoint_dir(3) == "checkpoints/000003"
    assert store.read_manifest() == {"last_completed_rollout_id": 11}
    assert store.listdir() == ["manifest.json", "rollouts"]
    assert store.url("manifest.json").endswith("/store/camp/manifest.json")
    store.delete("rollouts/000002")
    assert store.rollout_ids() == [0, 11]


def test_for_campaign_uses_storage_section(store_root):
    cfg = CampaignConfig.from_dict({"campaign": "exp-1", "storage": {"store": store_root}})
    store = RunStore.for_campaign(cfg)
    assert store.uri == f"{store_root}/exp-1"
    store.write_json("manifest.json", {"ok": True})
    assert RunStore(store_root).read_json("exp-1/manifest.json") == {"ok": True}


def test_rejects_relative_escapes(store_root):
    with pytest.raises(StoreError, match="must not contain"):
        RunStore(store_root).write_json("../x.json", {})


def test_unserializable_value_raises_and_writes_nothing(store_root):
    store = RunStore(store_root)
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.write_json("x.json", {"a": object()})
    with pytest.raises(StoreError, match="row 1 is not JSON-serializable"):
        store.write_jsonl("x.jsonl", [{"a": 1}, {"b": {1, 2}}])
    assert not store.exists("x.json") and not store.exists("x.jsonl")


def test_malformed_jsonl_names_the_line(store_root):
    store = RunStore(store_root)
    store.write_text("bad.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(StoreError, match=r"bad.jsonl line 2: malformed JSON"):
        store.read_jsonl("bad.jsonl")


def test_s3_write_to_missing_bucket_raises(s3_server):
    store = RunStore("s3://no-such-bucket-xyz/prefix")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.write_json("manifest.json", {"a": 1})


def test_s3_endpoint_from_config(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    cfg = CampaignConfig.from_dict(
        {"storage": {"store": f"s3://{s3_bucket}/runs", "s3_endpoint_url": s3_server}}
    )
    store = RunStore.for_campaign(cfg)
    store.write_json("manifest.json", {"a": 1})
    assert store.read_json("manifest.json") == {"a": 1}


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path))
    store.write_json("m.json", {"v": 1})

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(StoreError, match="no space left on the device"):
        store.write_json("m.json", {"v": 2})
    monkeypatch.undo()
    assert store.read_json("m.json") == {"v": 1}  # the old file is intact
    assert os.listdir(tmp_path) == ["m.json"]  # the temporary file was removed


def test_local_write_under_a_file_raises(tmp_path):
    (tmp_path / "blocker").write_text("I am a file")
    with pytest.raises(StoreError, match="writing .*blocker/x.json failed"):
        RunStore(str(tmp_path)).write_json("blocker/x.json", {})


def test_jsonl_lines_break_at_newline_only(store_root):
    """U+2028 / U+0085 inside a record belong to it; a CRLF line ending is allowed; a stray form feed
    on its own line is a malformed row, not a line break."""
    store = RunStore(store_root)
    store.write_text("a.jsonl", '{"t": "x\u2028y"}\r\n{"t": "\u0085"}\n')
    assert store.read_jsonl("a.jsonl") == [{"t": "x\u2028y"}, {"t": "\u0085"}]
    store.write_text("b.jsonl", '{"t": 1}\n\x0c\n')
    with pytest.raises(StoreError, match=r"b.jsonl line 2: malformed JSON"):
        store.read_jsonl("b.jsonl")
