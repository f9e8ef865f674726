"""Reading and writing safetensors files one tensor at a time, at known byte offsets.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
little-endian tensor bytes. Because every output tensor's dtype and shape are known before any
data is computed, the writer lays the whole file out first and then fills each tensor's byte range
with `pwrite` as soon as that tensor is ready, from any thread, holding nothing else in memory.
Reads use `preadv` into a fresh tensor, so no file is memory-mapped and resident memory stays at the
tensors in flight.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors spelling: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


def list_shards(model_dir: str) -> list[str]:
    """The safetensors shard names of a checkpoint folder: those its index lists, or every
    `*.safetensors` file when it has no index. Raises ValueError for a broken or incomplete one."""
    index_path = os.path.join(model_dir, INDEX_NAME)
    on_disk = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                listed = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_path} is not a valid safetensors index ({err!r})") from None
        missing = [n for n in listed if n not in on_disk]
        if missing:
            raise ValueError(
                f"{index_path} lists {len(missing)} shard(s) that are not in {model_dir} (first: {missing[0]}); "
                "the download is incomplete"
            )
        extra = [n for n in on_disk if n not in listed]
        if extra:
            log.warning(
                "ignoring %d .safetensors file(s) not listed in %s: %s", len(extra), index_path, extra[:3]
            )
        return listed
    if not on_disk:
        raise ValueError(
            f"no *.safetensors files in {model_dir}: only safetensors checkpoints are read "
            "(save with save_pretrained(..., safe_serialization=True))"
        )
    return on_disk


def read_header(path: str) -> tuple[list[TensorEntry], dict[str, str]]:
    """(tensors in file order, `__metadata__`) of a safetensors file; ValueError names the file if it is malformed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file: header length {header_len} is implausible")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: header is not JSON ({err})") from None
        size = os.fstat(f.fileno()).st_size
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            entry = TensorEntry(
                name,
                str(info["dtype"]),
                tuple(int(d) for d in info["shape"]),
                data_start + begin,
                end - begin,
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: header entry {name!r} is malformed: {info!r}") from None
        if entry.nbytes < 0 or entry.begin + entry.nbytes > size:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file (truncated download?)")
        entries.append(entry)
    entries.sort(key=lambda e: e.begin)
    return entries, metadata


def read_tensor(fd: int, entry: TensorEntry) -> torch.Tensor:
    """Tensor `entry` read from open file `fd` into fresh memory."""
    dtype = TORCH_DTYPES.get(entry.dtype)
    if dtype is None:
        raise ValueError(
            f"tensor {entry.name!r} has dtype {entry.dtype}, which cannot be read as a torch tensor here"
        )
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())  # type: ignore[arg-type]  # numpy's stubs omit ndarray.__buffer__
    done = 0
    while done < entry.nbytes:
        n = os.preadv(fd, [view[done:]], entry.begin + done)
        if n == 0:
            raise ValueError(f"tensor {entry.name!r}: unexpected end of file at byte {entry.begin + done}")
        done += n
    return buf.view(dtype).reshape(entry.shape)


class StreamingWriter:
    """A safetensors file whose layout is fixed up front and whose tensors are written in any order.

    Data goes to `<path>.tmp`; `close()` checks that every tensor was written and renames it into
    place, so an interrupted conversion never leaves a file that looks complete.
    """

    def __init__(
        self, path: str, layout: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]
    ):
        if sys.byteorder != "little":
            raise RuntimeError(
                "safetensors data is little-endian; this writer only runs on little-endian hosts"
            )
        self.path = path
        # Larger elements first (as safetensors' own writer does) keeps every tensor aligned to its element size.
        ordered = sorted(layout, key=lambda t: (-_itemsize(t[1]), t[0]))
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, dtype, shape, nbytes in ordered:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._offsets[name] = (offset, nbytes)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self.size = self._data_start + offset
        self.data_bytes = offset
        self._pending = set(self._offsets)
        self._tmp = path + ".tmp"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _reserve(self._fd, self.size)
            _pwrite_all(self._fd, struct.pack("<Q", len(blob)) + blob, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes = self._offsets[name]
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r} has {data.numel()} bytes, the layout reserved {nbytes}"
            )
        # numpy's stubs omit ndarray.__buffer__
        _pwrite_all(self._fd, memoryview(data.numpy()), self._data_start + offset)  # type: ignore[arg-type]
        self._pending.discard(name)

    def copy_from(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy tensor `name`'s bytes unchanged from another file (in the kernel where it can)."""
        offset, nbytes = self._offsets[name]
        dst, done = self._data_start + offset, 0
        while done < nbytes:
            try:
                n = os.copy_file_range(src_fd, self._fd, nbytes - done, src_offset + done, dst + done)
            except OSError:  # another filesystem or an old kernel: copy through memory
                chunk = os.pread(src_fd, min(nbytes - done, 64 * 2**20), src_offset + done)
                n = len(chunk)
                _pwrite_all(self._fd, chunk, dst + done)
            if n == 0:
                raise ValueError(f"{self.path}: source of tensor {name!r} ended early")
            done += n
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise RuntimeError(
                f"{self.path}: {len(missing)} tensors were never written (first: {missing[0]})"
            )
        os.close(self._fd)
        self._fd = -1
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def _itemsize(dtype: str) -> int:
    torch_dtype = TORCH_DTYPES.get(dtype)
    return torch_dtype.itemsize if torch_dtype is not None else 1


def _reserve(fd: int, size: int) -> None:
    # Reserving the blocks up front turns a full disk into one clear error before any work is done.
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # the filesystem cannot reserve: grow lazily
            raise
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
