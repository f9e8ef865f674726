"""slime_wf.heap: a process that keeps freed memory reuses the pages of the tensors it freed, and
its heap stays bounded."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A fresh process (the setting is process-wide): forward and backward of a small MLP whose
# activations are 64 MB, a step repeated; the page faults of steps 5 to 7 are counted (the heap
# settles within the first 2-3).
_PROBE = """
import json, resource, torch
from slime_wf.heap import environment_chose, keep_freed_memory
kept = keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(16, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 16))
x = torch.randn(8192, 16)
step = lambda: net(x).square().mean().backward()
for _ in range(4):
    step()
before = faults()
for _ in range(3):
    step()
print(json.dumps({"kept": kept, "faults": faults() - before, "chosen": environment_chose()}))
"""

_PAGES_OF_ONE_ACTIVATION = (64 << 20) // os.sysconf("SC_PAGE_SIZE")

_CHOICE = """
import json
from slime_wf.heap import environment_chose, keep_freed_memory
print(json.dumps({"kept": keep_freed_memory(), "chosen": environment_chose()}))
"""


def run_probe(code: str, **env: str) -> dict:
    """The JSON that `code` prints, run in a fresh process whose environment sets no malloc option
    but `env`."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GLIBC_TUNABLES", "SLIME_WF_KEEP_FREED_MEMORY") and not k.startswith("MALLOC_")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_step_reuses_the_pages_of_the_step_before():
    kept = run_probe(_PROBE)
    assert kept["kept"] is True and kept["chosen"] is None
    default = run_probe(_PROBE, SLIME_WF_KEEP_FREED_MEMORY="0")
    assert default["kept"] is False
    if default["faults"] < 3 * _PAGES_OF_ONE_ACTIVATION:
        pytest.skip(f"this host's malloc faults little by default ({default['faults']} faults in 3 steps)")
    # from fresh mmaps each step faults its activations' pages in (70,000-80,000 of 4 KB); a kept
    # heap, none in most steps (a block now and then where the heap's holes did not fit)
    assert kept["faults"] * 4 < default["faults"], (kept, default)


@pytest.mark.parametrize(
    "env, chosen",
    [
        ({"SLIME_WF_KEEP_FREED_MEMORY": "0"}, "SLIME_WF_KEEP_FREED_MEMORY"),
        ({"SLIME_WF_KEEP_FREED_MEMORY": "False"}, "SLIME_WF_KEEP_FREED_MEMORY"),
        ({"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}, "GLIBC_TUNABLES"),
        ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX"),
    ],
)
def test_the_environment_decides_first(env, chosen):
    result = run_probe(_CHOICE, **env)
    assert result["kept"] is False and result["chosen"] == chosen


_GROWING = """
import json, torch
from slime_wf.heap import _resident_bytes, keep_freed_memory, trim_if_grown
assert keep_freed_memory()
kept, trims, resident = [], 0, []
for _ in range(20):
    torch.ones(1 << 24)  # 64 MB, freed at once
    kept.append(torch.ones(3))  # lands after it, and lives on: the next 64 MB do not fit the hole
    trims += trim_if_grown()
    resident.append(_resident_bytes())
print(json.dumps({"trims": trims, "resident": resident}))
"""


def test_a_heap_that_grows_from_holes_is_trimmed_back():
    result = run_probe(_GROWING)
    first, mb64 = result["resident"][0], 64 << 20
    assert result["trims"] >= 1
    # untrimmed, each of the 20 rounds would leave 64 MB more resident (1.3 GB)
    assert max(result["resident"]) < 1.5 * first + 2 * mb64, [r >> 20 for r in result["resident"]]
