"""Checkpoint resolution: S3 mirroring against a real moto_server (resume, skip, verify, errors),
the Hugging Face hub cache offline, and local folders in place."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest

import slime_wf_cli as cli
from slime_wf.checkpoint import s3_download
from slime_wf.checkpoint.download import MANIFEST_NAME, CheckpointError, download_s3, resolve_checkpoint
from slime_wf.servers import free_port
from slime_wf.store import s3_filesystem

MiB = 2**20


def upload(endpoint: str, bucket: str, prefix: str, files: dict[str, bytes], multipart: tuple[str, ...] = ()):
    """Put `files` under s3://bucket/prefix/; names in `multipart` go up in 5 MiB parts (ETag md5-of-md5s-N)."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint)
    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    for name, data in files.items():
        key = f"{prefix}/{name}"
        if name in multipart:
            client.upload_fileobj(io.BytesIO(data), bucket, key, Config=parts)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=data)


def checkpoint_files(seed: int = 0) -> dict[str, bytes]:
    rnd = __import__("random").Random(seed)
    return {
        "config.json": b'{"model_type": "qwen3"}',
        "model-00001-of-00002.safetensors": rnd.randbytes(MiB + 17),
        "model-00002-of-00002.safetensors": rnd.randbytes(6 * MiB + 5),  # multipart: 2 parts
        "tokenizer/tokenizer.json": rnd.randbytes(1000),
    }


MULTIPART = ("model-00002-of-00002.safetensors",)


def read_tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


class FlakyFS:
    """The real s3fs filesystem, with reads that drop the connection or flip a byte (network faults)."""

    def __init__(self, fs, fail_after: int | None = None, corrupt: bool = False):
        self.fs, self.fail_after, self.corrupt = fs, fail_after, corrupt

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open(self, path, mode="rb", **kwargs):
        return _FlakyFile(self.fs.open(path, mode, **kwargs), self.fail_after, self.corrupt)


class _FlakyFile:
    def __init__(self, f, fail_after, corrupt):
        self.f, self.fail_after, self.corrupt, self.read_bytes = f, fail_after, corrupt, 0
        self.details = f.details

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def seek(self, pos):
        return self.f.seek(pos)

    def read(self, n):
        if self.fail_after is not None and self.read_bytes >= self.fail_after:
            raise ConnectionResetError("connection reset by peer (simulated)")
        data = self.f.read(n)
        if self.corrupt and self.read_bytes == 0 and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.read_bytes += len(data)
        return data


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(s3_download, "_CHUNK", MiB)


# ---- S3 -----------------------------------------------------------------------------------------


def test_s3_checkpoint_downloads_with_correct_bytes(s3_server, s3_bucket, tmp_path):
    files = checkpoint_files()
    upload(s3_server, s3_bucket, "ckpt/qwen", files, MULTIPART)
    upload(s3_server, s3_bucket, "ckpt/qwen-other", {"config.json": b"{}"})  # a sibling prefix, not ours
    path = resolve_checkpoint(f"s3://{s3_bucket}/ckpt/qwen", str(tmp_path), max_workers=4, progress=False)
    assert path == os.path.join(str(tmp_path), "s3", s3_bucket, "ckpt", "qwen")
    got = read_tree(path)
    manifest = json.loads(got.pop(MANIFEST_NAME))
    assert got == files  # every byte, no .part files left, nothing from the sibling prefix
    assert set(manifest["files"]) == set(files)
    assert manifest["files"]["model-00002-of-00002.safetensors"]["etag"].endswith("-2")


def test_second_call_downloads_nothing(s3_server, s3_bucket, tmp_path):
    upload(s3_server, s3_bucket, "m", checkpoint_files(), MULTIPART)
    first = download_s3(f"s3://{s3_bucket}/m", str(tmp_path), progress=False)
    assert first.downloaded == 4 and first.bytes_downloaded == sum(map(len, checkpoint_files().values()))
    assert first.etag_unverified == 0  # the multipart ETag was recomputed, not just the size compared
    mtimes = {n: os.stat(os.path.join(first.local_dir, n)).st_mtime_ns for n in checkpoint_files()}
    second = download_s3(f"s3://{s3_bucket}/m", str(tmp_path), progress=False)
    assert (second.downloaded, second.bytes_downloaded, second.skipped) == (0, 0, 4)
    assert mtimes == {n: os.stat(os.path.join(first.local_dir, n)).st_mtime_ns for n in checkpoint_files()}

    # Without the manifest, files are re-verified against their ETags instead of fetched again.
    os.unlink(os.path.join(first.local_dir, MANIFEST_NAME))
    third = download_s3(f"s3://{s3_bucket}/m", str(tmp_path), progress=False)
    assert (third.downloaded, third.bytes_downloaded, third.skipped) == (0, 0, 4)
    assert os.path.exists(os.path.join(first.local_dir, MANIFEST_NAME))


def test_interrupted_download_resumes_from_the_part_file(s3_server, s3_bucket, tmp_path, small_chunks):
    data = checkpoint_files()["model-00002-of-00002.safetensors"]
    upload(s3_server, s3_bucket, "r", {"model.safetensors": data}, ("model.safetensors",))
    uri = f"s3://{s3_bucket}/r"
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: download stopped after 3145728 of 6291461 bytes "
        r"\(ConnectionResetError: .*\); run again to resume",
    ):
        download_s3(uri, str(tmp_path), fs=FlakyFS(s3_filesystem(), fail_after=3 * MiB), progress=False)
    local = os.path.join(str(tmp_path), "s3", s3_bucket, "r", "model.safetensors")
    assert os.path.getsize(local + ".part") == 3 * MiB and not os.path.exists(local)

    report = download_s3(uri, str(tmp_path), progress=False)
    assert report.resumed == 1 and report.bytes_downloaded == len(data) - 3 * MiB
    assert open(local, "rb").read() == data
    assert not os.path.exists(local + ".part") and not os.path.exists(local + ".part.json")


def test_part_file_of_a_changed_object_is_discarded(s3_server, s3_bucket, tmp_path, small_chunks):
    old, new = os.urandom(4 * MiB), os.urandom(4 * MiB)
    upload(s3_server, s3_bucket, "c", {"w.bin": old})
    uri = f"s3://{s3_bucket}/c"
    with pytest.raises(CheckpointError, match="run again to resume"):
        download_s3(uri, str(tmp_path), fs=FlakyFS(s3_filesystem(), fail_after=2 * MiB), progress=False)
    upload(s3_server, s3_bucket, "c", {"w.bin": new})  # a new version: the old bytes must not be reused
    report = download_s3(uri, str(tmp_path), progress=False)
    assert report.resumed == 0 and report.bytes_downloaded == len(new)
    assert open(os.path.join(report.local_dir, "w.bin"), "rb").read() == new


def test_corrupted_or_missing_local_files_are_downloaded_again(s3_server, s3_bucket, tmp_path):
    files = checkpoint_files()
    upload(s3_server, s3_bucket, "x", files, MULTIPART)
    first = download_s3(f"s3://{s3_bucket}/x", str(tmp_path), progress=False)
    shard = os.path.join(first.local_dir, "model-00001-of-00002.safetensors")
    with open(shard, "r+b") as f:  # same size, different bytes
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    # File times tick in milliseconds: make sure this write is seen as later than the download's.
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.unlink(os.path.join(first.local_dir, "config.json"))
    again = download_s3(f"s3://{s3_bucket}/x", str(tmp_path), progress=False)
    assert again.downloaded == 2 and again.skipped == 2
    assert again.bytes_downloaded == len(files["model-00001-of-00002.safetensors"]) + len(
        files["config.json"]
    )
    assert {k: v for k, v in read_tree(first.local_dir).items() if k != MANIFEST_NAME} == files


@pytest.mark.parametrize("name", ["config.json", "model-00002-of-00002.safetensors"])
def test_bytes_that_do_not_match_the_etag_are_refused(s3_server, s3_bucket, tmp_path, name):
    """Single-part (MD5) and multipart (MD5 of part MD5s) ETags are both checked."""
    upload(s3_server, s3_bucket, "e", {name: checkpoint_files()[name]}, MULTIPART)
    with pytest.raises(CheckpointError, match=f"{name}: the downloaded bytes do not match .*ETag"):
        download_s3(
            f"s3://{s3_bucket}/e", str(tmp_path), fs=FlakyFS(s3_filesystem(), corrupt=True), progress=False
        )
    folder = os.path.join(str(tmp_path), "s3", s3_bucket, "e")
    assert [n for n in os.listdir(folder) if n != MANIFEST_NAME] == []  # no file, no .part to resume from


def test_missing_prefix_or_bucket_and_denied_access_are_explained(s3_server, s3_bucket, tmp_path):
    upload(s3_server, s3_bucket, "present", {"config.json": b"{}"})
    with pytest.raises(CheckpointError, match=f"s3://{s3_bucket}/absent: no objects under this prefix"):
        resolve_checkpoint(f"s3://{s3_bucket}/absent", str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match=r"no objects under this prefix matching \['\*.bin'\]"):
        resolve_checkpoint(
            f"s3://{s3_bucket}/present", str(tmp_path), allow_patterns=["*.bin"], progress=False
        )
    with pytest.raises(CheckpointError, match="S3 bucket 'no-such-bucket-x' does not exist"):
        resolve_checkpoint("s3://no-such-bucket-x/ckpt", str(tmp_path), progress=False)

    class DeniedFS(FlakyFS):
        def find(self, *args, **kwargs):  # what s3fs raises for AccessDenied / InvalidAccessKeyId
            raise PermissionError("Access Denied")

    with pytest.raises(CheckpointError, match="access denied; check AWS_ACCESS_KEY_ID"):
        download_s3(f"s3://{s3_bucket}/present", str(tmp_path), fs=DeniedFS(s3_filesystem()), progress=False)


def test_allow_patterns_select_files(s3_server, s3_bucket, tmp_path):
    upload(s3_server, s3_bucket, "p", checkpoint_files())
    path = resolve_checkpoint(f"s3://{s3_bucket}/p", str(tmp_path), allow_patterns=["*.json"], progress=False)
    assert sorted(k for k in read_tree(path) if k != MANIFEST_NAME) == [
        "config.json",
        "tokenizer/tokenizer.json",
    ]


def test_a_full_disk_is_reported_before_downloading(s3_server, s3_bucket, tmp_path, monkeypatch):
    files = checkpoint_files()
    upload(s3_server, s3_bucket, "big", files)
    real = s3_download.shutil.disk_usage
    monkeypatch.setattr(s3_download.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    dest = os.path.join(str(tmp_path), "s3", s3_bucket, "big")
    needed = sum(map(len, files.values()))
    with pytest.raises(
        CheckpointError, match=f"not enough space in {dest} .*{needed} bytes needed, 1000 free"
    ):
        resolve_checkpoint(f"s3://{s3_bucket}/big", str(tmp_path), progress=False)


# ---- local folders and the hub ------------------------------------------------------------------


def test_local_folder_is_used_in_place(tmp_path):
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    assert resolve_checkpoint(str(ckpt), str(cache)) == str(ckpt)
    assert not cache.exists()  # nothing copied
    with pytest.raises(CheckpointError, match=f"local checkpoint {tmp_path / 'nope'} does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"), str(cache))
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_checkpoint(str(ckpt), str(cache))
    with pytest.raises(CheckpointError, match="neither an existing local folder"):
        resolve_checkpoint("not a repo id!", str(cache))


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path):
    """A Hugging Face cache holding org/tiny at COMMIT (branch main), laid out as the hub client writes it."""
    repo = tmp_path / "hf_home" / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "qwen3"}')
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hf_home"


def test_hub_repo_resolves_from_the_cache_offline(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = str(hf_home / "hub" / "models--org--tiny" / "snapshots" / COMMIT)
    assert resolve_checkpoint("org/tiny", str(hf_home), progress=False) == expected
    assert resolve_checkpoint("org/tiny", str(hf_home), revision=COMMIT, progress=False) == expected
    assert resolve_checkpoint("org/tiny", str(hf_home), allow_patterns=["*.json"], progress=False) == expected
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("org/missing", str(hf_home), progress=False)
    message = str(err.value)
    assert "'org/missing'" in message and "HF_HUB_OFFLINE" in message and str(hf_home / "hub") in message
    with pytest.raises(CheckpointError, match="'org/tiny' at revision 'v9'.*not in the cache"):
        resolve_checkpoint("org/tiny", str(hf_home), revision="v9", progress=False)


def test_hub_unreachable_falls_back_to_the_cache(hf_home, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    expected = str(hf_home / "hub" / "models--org--tiny" / "snapshots" / COMMIT)
    assert resolve_checkpoint("org/tiny", str(hf_home), progress=False) == expected
    with pytest.raises(
        CheckpointError, match="'org/missing' could not be fetched .*unreachable.*not in the cache"
    ):
        resolve_checkpoint("org/missing", str(hf_home), progress=False)


def test_cli_download(s3_server, s3_bucket, tmp_path, capsys):
    upload(s3_server, s3_bucket, "cli", {"config.json": b"{}"})
    assert cli.main(["download", f"s3://{s3_bucket}/cli", "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    path = capsys.readouterr().out.strip()
    assert open(os.path.join(path, "config.json"), "rb").read() == b"{}"
    assert (
        cli.main(["download", f"s3://{s3_bucket}/none", "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    )
    assert "no objects under this prefix" in capsys.readouterr().err
    assert hashlib.md5(b"{}").hexdigest() in open(os.path.join(path, MANIFEST_NAME)).read()
