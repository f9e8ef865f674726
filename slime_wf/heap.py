"""The C heap of a trainer on CPU: memory a train step frees is kept for the next step.

A train step on CPU allocates tensors of tens to hundreds of MB (logits, their gradient,
activations and theirs) and frees them when it ends. glibc's malloc serves every block above its
mmap threshold (32 MB at most) with a fresh `mmap` and gives it back with `munmap` on free, and
gives the heap's free top back once it exceeds twice that threshold; so every step faults in the
pages of its tensors anew. At the 12m work of `benchmarks/vs_trl.py` (64 samples of 148 tokens,
vocabulary 5400): 265,000-550,000 page faults and 1.2-3.1 CPU seconds in the kernel per train step.

`keep_freed_memory()` tells malloc (`mallopt`) to serve every block from the heap, which reuses
freed blocks, and not to trim the heap's top: a few page faults and 0.2-0.4 kernel seconds per step
there, the step 4.4-4.8 s instead of 5.3-7.3 s. The process's resident memory then stays at its peak
between steps instead of falling back.

A heap can grow where a small block that lives on lands right after a large freed one: the next
large request does not fit the hole (a 64 MB tensor made and freed 60 times, each followed by a
small tensor that is kept: 4 GB resident). `trim_if_grown()`, which the trainer calls after each
step, bounds that: once the resident memory exceeds 1.25 times what it was after the step that
set the mark, `malloc_trim` gives every free page back (the next step faults its pages in once
more) and the next step sets the mark again.

`SLIME_WF_KEEP_FREED_MEMORY=0` in the environment turns this off (every process the campaign starts
inherits it). The environment also decides when it names a glibc malloc setting itself
(`GLIBC_TUNABLES` with a `glibc.malloc.` tunable, or a `MALLOC_*_` variable such as
`MALLOC_ARENA_MAX`): the heap is then left as it says. On a C library other than glibc (musl,
macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: trim only when 2 GB lie free at the heap's top
_GROWTH = 1.25

_kept = False  # this process keeps freed memory
_mark: int | None = None  # resident bytes after the step that set the mark

_MALLOC_ENV = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_TEST",
)


def environment_chose() -> str | None:
    """The variable through which the environment set glibc's malloc or turned this off, if any."""
    if os.environ.get("SLIME_WF_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return "SLIME_WF_KEEP_FREED_MEMORY"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return next((name for name in _MALLOC_ENV if name in os.environ), None)


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (see the module's docstring).
    True when it did; False when the environment chose otherwise or the C library is not glibc."""
    chosen = environment_chose()
    if chosen is not None:
        logger.debug("malloc left as %s sets it", chosen)
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = _libc().mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both settings apply to blocks allocated from now on
    global _kept
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _kept


def trim_if_grown() -> bool:
    """After a step of a process that keeps freed memory: give the free pages back when the resident
    memory grew past `_GROWTH` times its mark (see the module's docstring). True when it did."""
    global _mark
    if not _kept:
        return False
    resident = _resident_bytes()
    if _mark is None:
        _mark = resident
        return False
    if resident <= _GROWTH * _mark:
        return False
    _libc().malloc_trim(ctypes.c_size_t(0))
    logger.info(
        "resident memory %d MB grew past %.2f x %d MB: free heap pages given back",
        resident >> 20,
        _GROWTH,
        _mark >> 20,
    )
    _mark = None  # set again after the next step, at that step's peak
    return True


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # the C library this process runs on


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
