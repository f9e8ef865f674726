"""The run store: one folder (local or `s3://`) holding everything a campaign produces.

Layout of a campaign (ARCHITECTURE.md at the repository root, "The run store"):

    <store>/<campaign>/manifest.json
    <store>/<campaign>/config.yaml
    <store>/<campaign>/rollouts/<id:06d>/{samples.jsonl,ledger.json,metrics.json,data_source.json}
    <store>/<campaign>/checkpoints/<id:06d>/
    <store>/<campaign>/lease.json                  the one writer (slime_wf.ledger.Lease)
    <store>/<campaign>/evaluations/<id:06d>.json   written by the `evaluate` flow only

Every write is atomic: locally a temporary file in the same folder, fsynced, then renamed over
the target; on S3 one PUT (objects appear whole or not at all). A failed write raises
`StoreError` naming the path and the cause; nothing is silently dropped. Records are JSON,
never pickle.

JSON lines are split on "\n" only, and written so that no other character can break a line:
`str.splitlines()` (and many editors and tools) also break at U+0085, U+2028 and U+2029, which
`json.dumps(ensure_ascii=False)` leaves raw inside strings, and a model's response may hold any of
them. Those three and lone surrogates (which UTF-8 cannot encode) are written as JSON's own
backslash-u escapes, so any Python string round-trips.

Size: one module over 400 lines because the local and the S3 write paths (atomic rename, flock'd
conditional write; PUT, If-Match/If-None-Match) are two halves of one contract that `RunStore` keeps
side by side, so a change to one is made next to the other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec

_MISSING = object()
_S3_SINGLE_PUT_LIMIT = (
    5 * 2**30
)  # S3's limit for one PUT; larger objects use an (equally atomic) multipart upload


class StoreError(OSError):
    """A run-store read or write that failed; the message names the path and what to do."""


class StoreConflict(StoreError):
    """A conditional write (`RunStore.write_if`) lost: the object changed, appeared or vanished since it was read."""


# Outside string literals json.dumps emits ASCII only, so every match is inside a string, where its
# backslash-u escape decodes to the same character.
_LINE_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


def _escape_line_unsafe(text: str) -> str:
    return _LINE_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_text(obj: Any, **dumps_kwargs: Any) -> str:
    """`json.dumps(obj, ensure_ascii=False, allow_nan=True)` that is valid UTF-8 and holds no line
    break other than the ones `indent` adds: readable non-ASCII text, safe for JSON lines."""
    return _escape_line_unsafe(json.dumps(obj, ensure_ascii=False, allow_nan=True, **dumps_kwargs))


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line of JSON-lines text, split on "\n" only."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip(" \t\r"):  # JSON's own whitespace; anything else on a line is a malformed row
            yield lineno, line


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem; credentials come from the standard AWS environment variables or profiles."""
    import s3fs

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region or os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = region or os.environ["AWS_DEFAULT_REGION"]
    # Listings are not cached: a resumed campaign must see what another process wrote.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True)


def filesystem_for(uri: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None):
    """(filesystem, path without protocol) for a local path or an fsspec URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(s3_endpoint_url, s3_region), uri[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


class RunStore:
    """Atomic JSON / JSONL / bytes I/O under one root, local or on S3."""

    def __init__(self, root: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None):
        self.uri = root.rstrip("/")
        self.fs, self._root = filesystem_for(self.uri, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
        self._root = self._root.rstrip("/")
        self.is_local = self.uri.startswith("file://") or "://" not in self.uri
        self._s3 = (s3_endpoint_url, s3_region)

    @classmethod
    def for_campaign(cls, config: Any) -> RunStore:
        """The store of one campaign: `<storage.store>/<campaign>`."""
        st = config.storage
        return cls(
            f"{st.store.rstrip('/')}/{config.campaign}",
            s3_endpoint_url=st.s3_endpoint_url,
            s3_region=st.s3_region,
        )

    def child(self, *parts: str) -> RunStore:
        return RunStore(self.url(*parts), s3_endpoint_url=self._s3[0], s3_region=self._s3[1])

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    # ---- paths ---------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        rel = rel.strip("/")
        if any(part in ("..", ".") for part in rel.split("/")):
            raise StoreError(f"store path {rel!r} must not contain '.' or '..'")
        return f"{self._root}/{rel}" if rel else self._root

    def url(self, *parts: str) -> str:
        """The full URI (or local path) of a path under the root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.uri}/{rel}" if rel else self.uri

    def local_path(self, *parts: str) -> str:
        """The local filesystem path of `parts`; only for a local store."""
        if not self.is_local:
            raise StoreError(f"{self.uri} is not a local store")
        return self._path("/".join(parts))

    # ---- raw I/O -------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        try:
            if self.is_local:
                _atomic_local_write(path, data)
            else:
                self.fs.pipe_file(path, data, chunksize=_S3_SINGLE_PUT_LIMIT)
        except StoreError:
            raise
        except Exception as err:
            raise StoreError(_describe_write_error(self.url(rel), err)) from err

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise StoreError(f"reading {self.url(rel)} failed: {type(err).__name__}: {err}") from err

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under `rel`, sorted; [] when it does not exist."""
        path = self._path(rel)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})
        return [
            n for n in names if n and not n.startswith((".tmp-", ".lock-"))
        ]  # in-flight writes, write_if locks

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- conditional writes (compare and swap) --------------------------------------------

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """The bytes at `rel` and their version for `write_if`, or None when `rel` does not exist.

        On S3 the version is the ETag, read before the bytes: if the object changes in between, the
        bytes are newer than the version and a `write_if` with it fails, so no decision is made on
        a version that was never current."""
        path = self._path(rel)
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    data = f.read()
                return data, _content_version(data)
            etag = self.fs.info(path)["ETag"]
            return self.fs.cat_file(path), etag
        except FileNotFoundError:
            return None
        except Exception as err:
            raise StoreError(f"reading {self.url(rel)} failed: {type(err).__name__}: {err}") from err

    def write_if(self, rel: str, data: bytes, *, version: str | None) -> str:
        """Write `rel` only if it is still at `version` (None: only if it does not exist); returns the new
        version. Raises `StoreConflict` when another writer changed it first.

        Locally the check and the atomic write happen under an exclusive `flock` on a lock file beside
        `rel`. On S3 it is one PUT with `If-None-Match: *` or `If-Match: <ETag>`, which S3 evaluates
        atomically (AWS S3 since 2024; also MinIO and moto)."""
        path = self._path(rel)
        try:
            if self.is_local:
                return _local_write_if(path, data, version)
            condition = {"mode": "create"} if version is None else {"IfMatch": version}
            out = self.fs.pipe_file(path, data, **condition)
            return out["ETag"] if isinstance(out, dict) and out.get("ETag") else self.fs.info(path)["ETag"]
        except StoreConflict:
            raise
        except Exception as err:
            if _is_precondition_failure(err) or (version is not None and isinstance(err, FileNotFoundError)):
                raise StoreConflict(
                    f"{self.url(rel)} changed since it was read (conditional write refused)"
                ) from err
            raise StoreError(_describe_write_error(self.url(rel), err)) from err

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Copy a local folder to `rel` (replacing it). Locally a rename into place; on S3 an upload.

        Callers make the copy visible through a later atomic write (the manifest), so a folder
        that is half uploaded is never referenced.
        """
        target = self._path(rel)
        try:
            if self.is_local:
                if os.path.abspath(local_dir) == os.path.abspath(target):
                    return
                self.delete(rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copytree(local_dir, target)
            else:
                self.delete(rel)
                self.fs.put(local_dir.rstrip("/") + "/", target + "/", recursive=True)
        except Exception as err:
            raise StoreError(_describe_write_error(self.url(rel), err)) from err

    def get_dir(self, rel: str, local_dir: str) -> str:
        """A local copy of the folder `rel` (the folder itself for a local store)."""
        if self.is_local:
            return self._path(rel)
        if os.path.exists(local_dir):
            shutil.rmtree(local_dir)
        os.makedirs(local_dir, exist_ok=True)
        self.fs.get(self._path(rel).rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
        return local_dir

    # ---- typed helpers -------------------------------------------------------------------

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> None:
        try:
            blob = json_text(obj, indent=1)
        except (TypeError, ValueError) as err:
            raise StoreError(f"cannot write {self.url(rel)}: value is not JSON-serializable ({err})") from err
        self.write_text(rel, blob + "\n")

    def read_json(self, rel: str, default: Any = _MISSING) -> Any:
        try:
            text = self.read_text(rel)
        except FileNotFoundError:
            if default is _MISSING:
                raise
            return default
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise StoreError(f"{self.url(rel)} is not valid JSON ({err})") from err

    def write_jsonl(self, rel: str, rows: Iterable[Any]) -> int:
        """Write all rows as one atomic object; returns the number of rows."""
        lines = []
        for i, row in enumerate(rows):
            try:
                lines.append(json_text(row))
            except (TypeError, ValueError) as err:
                raise StoreError(
                    f"cannot write {self.url(rel)}: row {i} is not JSON-serializable ({err})"
                ) from err
        self.write_text(rel, "".join(line + "\n" for line in lines))
        return len(lines)

    def read_jsonl(self, rel: str) -> list[Any]:
        rows = []
        for lineno, line in jsonl_lines(self.read_text(rel)):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StoreError(f"{self.url(rel)} line {lineno}: malformed JSON ({err})") from err
        return rows

    # ---- campaign layout -----------------------------------------------------------------

    MANIFEST = "manifest.json"
    CONFIG = "config.yaml"

    @staticmethod
    def rollout_dir(rollout_id: int) -> str:
        return f"rollouts/{rollout_id:06d}"

    @classmethod
    def rollout_file(cls, rollout_id: int, name: str) -> str:
        return f"{cls.rollout_dir(rollout_id)}/{name}"

    @staticmethod
    def checkpoint_dir(rollout_id: int) -> str:
        return f"checkpoints/{rollout_id:06d}"

    @staticmethod
    def evaluation_file(rollout_id: int | None) -> str:
        """Where the `evaluate` flow records its metrics: outside rollouts/, which only `train` writes."""
        return f"evaluations/{'initial' if rollout_id is None else f'{rollout_id:06d}'}.json"

    def rollout_ids(self) -> list[int]:
        """Rollout ids that have a folder, ascending."""
        return sorted(int(n) for n in self.listdir("rollouts") if n.isdigit())

    def checkpoint_ids(self) -> list[int]:
        """Rollout ids that have a checkpoint folder, ascending."""
        return sorted(int(n) for n in self.listdir("checkpoints") if n.isdigit())

    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json(self.MANIFEST, default=None)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_json(self.MANIFEST, manifest)


def _atomic_local_write(path: str, data: bytes) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=os.path.basename(path)[-32:])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_write_if(path: str, data: bytes, version: str | None) -> str:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".lock-{os.path.basename(path)}")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        try:
            with open(path, "rb") as f:
                current = _content_version(f.read())
        except FileNotFoundError:
            current = None
        if current != version:
            state = "exists" if current is not None else "does not exist"
            raise StoreConflict(f"{path} changed since it was read ({state} now; conditional write refused)")
        _atomic_local_write(path, data)
    return _content_version(data)


def _is_precondition_failure(err: BaseException) -> bool:
    """Whether S3 refused a conditional write: 412 PreconditionFailed, or 409 ConditionalRequestConflict
    (a concurrent conditional write to the same key). s3fs keeps botocore's error as the cause."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe_write_error(url: str, err: Exception) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return (
            f"writing {url} failed: no space left on the device; free space or point storage.store elsewhere"
        )
    text = f"{type(err).__name__}: {err}"
    if url.startswith("s3://"):
        bucket = url[len("s3://") :].split("/", 1)[0]
        if (
            "NoSuchBucket" in text
            or "bucket does not exist" in text.lower()
            or isinstance(err, FileNotFoundError)
        ):
            return f"writing {url} failed: S3 bucket {bucket!r} does not exist (or is not visible); create it first"
        if "AccessDenied" in text or isinstance(err, PermissionError) or "InvalidAccessKeyId" in text:
            return f"writing {url} failed: access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({text})"
    return f"writing {url} failed: {text}"
