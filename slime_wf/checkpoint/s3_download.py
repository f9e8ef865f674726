"""Mirror an `s3://bucket/prefix` folder to local disk: parallel, resumable, verified.

Objects are fetched by a thread pool, one file per task, in ranged GETs of 16 MiB. A file arrives
as `<file>.part` next to a `<file>.part.json` that records the object's ETag; an interrupted
download continues from the `.part` size when the ETag is unchanged, and starts over otherwise.
Every finished file is checked against the object's size and ETag before it is renamed into place
and recorded in `.slime_wf_download.json`. A later call skips files whose size, mtime and ETag
still match that record (a cheap check: a same-size change that keeps the mtime goes unseen), and
re-verifies by hashing any file that is present but not recorded.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from slime_wf.checkpoint import CheckpointError

log = logging.getLogger(__name__)

MANIFEST_NAME = ".slime_wf_download.json"
_CHUNK = 16 * 2**20  # one ranged GET per chunk


@dataclass
class DownloadReport:
    local_dir: str
    files: int  # files under the prefix (after allow_patterns)
    downloaded: int  # files fetched in this call, resumed ones included
    resumed: int  # of those, continued from a .part file
    skipped: int  # already present and verified
    bytes_downloaded: int
    etag_unverified: int  # multipart objects whose part size could not be learned: size-checked only


def download_s3(
    uri: str,
    cache_dir: str,
    *,
    allow_patterns: list[str] | str | None = None,
    max_workers: int = 8,
    progress: bool = True,
    fs: Any = None,
) -> DownloadReport:
    """Mirror every object under `uri` into `<cache_dir>/s3/<bucket>/<prefix>`; see the module docstring.

    `fs` is the s3fs filesystem to read with (default: credentials and endpoint from the AWS
    environment, as the run store uses).
    """
    from slime_wf.store import s3_filesystem

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise CheckpointError(f"{uri} names no bucket: expected s3://bucket/prefix")
    fs = fs or s3_filesystem()
    root = f"{bucket}/{prefix}" if prefix else bucket
    remote = _list_s3(fs, uri, bucket, root, allow_patterns)
    dest = (
        os.path.join(cache_dir, "s3", bucket, *prefix.split("/"))
        if prefix
        else os.path.join(cache_dir, "s3", bucket)
    )
    os.makedirs(dest, exist_ok=True)
    return _Mirror(fs, uri, root, dest, remote, max_workers, progress).run()


def _list_s3(fs, uri: str, bucket: str, root: str, allow_patterns) -> dict[str, dict[str, Any]]:
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{uri}: S3 bucket {bucket!r} does not exist (or is not visible to these credentials)"
        ) from err
    except PermissionError as err:
        raise CheckpointError(
            f"{uri}: access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the "
            f"bucket policy ({err})"
        ) from err
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns or [])
    remote: dict[str, dict[str, Any]] = {}
    for key, info in listing.items():
        if not key.startswith(root + "/") or key.endswith("/"):
            continue  # the prefix itself as an object, or a folder marker
        rel = key[len(root) + 1 :]
        if any(part in ("", ".", "..") for part in rel.split("/")):
            raise CheckpointError(
                f"{uri}: object key {key!r} would land outside the download folder; refusing it"
            )
        if patterns and not any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        remote[rel] = {"key": key, "size": int(info["size"]), "etag": str(info.get("ETag", "")).strip('"')}
    if not remote:
        hint = f" matching {patterns}" if patterns else ""
        raise CheckpointError(
            f"{uri}: no objects under this prefix{hint}; check the bucket and the prefix (it is a folder: "
            "s3://bucket/path/to/checkpoint)"
        )
    return remote


class _Mirror:
    """One download of a remote folder into `dest`."""

    def __init__(
        self,
        fs,
        uri: str,
        root: str,
        dest: str,
        remote: dict[str, dict[str, Any]],
        workers: int,
        progress: bool,
    ):
        self.fs, self.uri, self.root, self.dest, self.remote = fs, uri.rstrip("/"), root, dest, remote
        self.workers = max(1, workers)
        self.progress = progress
        self.lock = threading.Lock()
        self.manifest_path = os.path.join(dest, MANIFEST_NAME)
        self.manifest = _read_manifest(self.manifest_path)
        self.report = DownloadReport(dest, len(remote), 0, 0, 0, 0, 0)

    def run(self) -> DownloadReport:
        todo = [rel for rel in sorted(self.remote) if not self._recorded(rel)]
        self.report.skipped = len(self.remote) - len(todo)
        needed = sum(self.remote[rel]["size"] - self._resumable_bytes(rel) for rel in todo)
        free = shutil.disk_usage(self.dest).free
        if needed > free:
            raise CheckpointError(
                f"not enough space in {self.dest} for {self.uri}: {needed} bytes needed, {free} free; free space "
                "or use another cache dir"
            )
        self.needed = needed
        if not todo:
            return self.report
        bar = tqdm(
            total=needed, unit="B", unit_scale=True, desc=f"download {self.uri}", disable=not self.progress
        )
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="s3-download")
        try:
            futures = [pool.submit(self._fetch, rel, bar) for rel in todo]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((err for f in done if (err := f.exception()) is not None), None)
            if failed is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise failed
        finally:
            pool.shutdown(wait=True)
            bar.close()
        return self.report

    # -- bookkeeping --

    def _recorded(self, rel: str) -> bool:
        entry = self.manifest.get(rel)
        info = self.remote[rel]
        if not entry or entry.get("etag") != info["etag"] or entry.get("size") != info["size"]:
            return False
        try:
            st = os.stat(os.path.join(self.dest, rel))
        except FileNotFoundError:
            return False
        return st.st_size == info["size"] and st.st_mtime_ns == entry.get("mtime_ns")

    def _record(self, rel: str) -> None:
        st = os.stat(os.path.join(self.dest, rel))
        info = self.remote[rel]
        with self.lock:
            self.manifest[rel] = {"etag": info["etag"], "size": info["size"], "mtime_ns": st.st_mtime_ns}
            tmp = self.manifest_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"source": self.uri, "files": self.manifest}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.manifest_path)

    def _resumable_bytes(self, rel: str) -> int:
        part = os.path.join(self.dest, rel) + ".part"
        state = _read_json(part + ".json")
        if state and state.get("etag") == self.remote[rel]["etag"] and os.path.exists(part):
            return min(os.path.getsize(part), self.remote[rel]["size"])
        return 0

    # -- one file --

    def _fetch(self, rel: str, bar) -> None:
        info = self.remote[rel]
        local = os.path.join(self.dest, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        part_size = self._part_size(info)
        if os.path.exists(local) and _matches(local, info, part_size):
            self._record(rel)  # present but unrecorded (manifest lost, or touched): it verified
            with self.lock:
                self.report.skipped += 1
            return
        try:
            resumed = self._download(rel, info, local, part_size, bar)
            if not _matches(local + ".part", info, part_size):
                if not resumed:
                    raise CheckpointError(
                        f"{self.uri}/{rel}: the downloaded bytes do not match the object's size / ETag "
                        f"({info['size']} bytes, ETag {info['etag']}); run again"
                    )
                log.warning("%s/%s: resumed download did not verify; downloading it again", self.uri, rel)
                os.unlink(local + ".part")
                self._download(rel, info, local, part_size, bar)
                if not _matches(local + ".part", info, part_size):
                    raise CheckpointError(
                        f"{self.uri}/{rel}: downloaded twice and still does not match its ETag"
                    )
        except CheckpointError:
            for leftover in (local + ".part", local + ".part.json"):  # never resume from bytes that failed
                if os.path.exists(leftover):
                    os.unlink(leftover)
            raise
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise CheckpointError(
                    f"no space left in {self.dest} while downloading {self.uri}/{rel} ({info['size']} bytes; "
                    f"{self.needed} bytes for the whole download); free space or use another cache dir"
                ) from err
            if isinstance(err, PermissionError):
                raise CheckpointError(
                    f"{self.uri}/{rel}: access denied ({err}); check the AWS credentials"
                ) from err
            got = os.path.getsize(local + ".part") if os.path.exists(local + ".part") else 0
            raise CheckpointError(
                f"{self.uri}/{rel}: download stopped after {got} of {info['size']} bytes ({type(err).__name__}: "
                f"{err}); run again to resume from there"
            ) from err
        os.replace(local + ".part", local)
        os.unlink(local + ".part.json")
        self._record(rel)

    def _download(self, rel: str, info: dict[str, Any], local: str, part_size: int | None, bar) -> bool:
        """Fetch into `<local>.part`, continuing an earlier one when the ETag matches; True if resumed."""
        from s3fs.utils import FileExpired

        part, state_path = local + ".part", local + ".part.json"
        offset = self._resumable_bytes(rel)
        if offset == 0:
            with open(state_path, "w") as f:
                json.dump({"etag": info["etag"], "size": info["size"]}, f)
            open(part, "wb").close()
        try:
            with self.fs.open(info["key"], "rb", cache_type="none") as src, open(part, "r+b") as out:
                if str(src.details.get("ETag", "")).strip('"') != info["etag"]:
                    raise CheckpointError(f"{self.uri}/{rel} changed after it was listed; run again")
                src.seek(offset)
                out.seek(offset)
                out.truncate()
                done = offset
                while done < info["size"]:
                    data = src.read(min(_CHUNK, info["size"] - done))
                    if not data:
                        break
                    out.write(data)
                    done += len(data)
                    with self.lock:
                        self.report.bytes_downloaded += len(data)
                    bar.update(len(data))
        except FileExpired as err:
            raise CheckpointError(f"{self.uri}/{rel} changed during the download; run again") from err
        with self.lock:
            self.report.downloaded += 1
            self.report.resumed += offset > 0
            self.report.etag_unverified += part_size is None and "-" in info["etag"]
        return offset > 0

    def _part_size(self, info: dict[str, Any]) -> int | None:
        """The part size of a multipart upload (to recompute its ETag), or None if single-part / unknown."""
        if "-" not in info["etag"]:
            return None
        bucket, _, key = info["key"].partition("/")
        try:
            head = self.fs.call_s3("head_object", Bucket=bucket, Key=key, PartNumber=1)
            return int(head["ContentLength"])
        except Exception as err:  # any failure only weakens the check to size-only
            log.info("%s: part size unknown (%s); checking size only", info["key"], err)
            return None


def _matches(path: str, info: dict[str, Any], part_size: int | None) -> bool:
    """Whether the local file has the object's size and, where it can be recomputed, its ETag.

    A single-part upload's ETag is the MD5 of its bytes. A multipart upload's is
    md5(concat(md5 of each part)) + "-<parts>", which needs the part size (asked of S3 for part 1);
    when that is unknown, or the ETag is neither form (SSE-KMS, or another store's own format), only
    the size is compared.
    """
    if os.path.getsize(path) != info["size"]:
        return False
    etag = info["etag"]
    plain = re.fullmatch(r"[0-9a-f]{32}", etag)
    multi = re.fullmatch(r"([0-9a-f]{32})-(\d+)", etag)
    if plain:
        return _md5_parts(path, None)[0] == etag
    if multi and part_size:
        digests = _md5_parts(path, part_size)
        if len(digests) != int(multi.group(2)):
            return False
        return hashlib.md5(b"".join(bytes.fromhex(d) for d in digests)).hexdigest() == multi.group(1)
    return True


def _md5_parts(path: str, part_size: int | None) -> list[str]:
    """MD5 hex digests of consecutive `part_size` pieces of a file (one digest of all of it when None)."""
    digests, h, in_part = [], hashlib.md5(), 0
    with open(path, "rb") as f:
        while True:
            want = _CHUNK if part_size is None else min(_CHUNK, part_size - in_part)
            block = f.read(want)
            if not block:
                break
            h.update(block)
            in_part += len(block)
            if part_size is not None and in_part == part_size:
                digests.append(h.hexdigest())
                h, in_part = hashlib.md5(), 0
    if part_size is None or in_part or not digests:
        digests.append(h.hexdigest())
    return digests


def _read_manifest(path: str) -> dict[str, Any]:
    data = _read_json(path)
    return dict(data.get("files", {})) if isinstance(data, dict) else {}


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
