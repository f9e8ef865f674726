"""Run `slime-wf train` as a subprocess and SIGKILL it at moments defined by progress in the run store.

The kill tests never wait on wall time: each kill waits until the store shows a chosen state (a
rollout id committed, a rollout stored but not yet committed, a new engine starting), so they kill
the same phases on a slow machine and on a fast one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from slime_wf import servers
from slime_wf.store import RunStore

POLL_S = 0.05
STALL_S = 900  # a generous guard against a campaign that hangs; progress, not this, decides each kill


def start_train(
    config: Path, api_url: str, log_name: str = "train.log", overrides: Sequence[str] = ()
) -> subprocess.Popen:
    """`slime-wf train --config <config>`, with `--set` for each of `overrides`."""
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(config.parent))
    log = open(config.parent / log_name, "ab")  # closed by the child's exit
    sets = [arg for item in overrides for arg in ("--set", item)]
    return subprocess.Popen(
        [sys.executable, "-m", "slime_wf_cli", "train", "--config", str(config), *sets],
        cwd=config.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def committed(store: RunStore) -> int:
    """The last committed rollout id (-1 before the first commit)."""
    value = (store.read_manifest() or {}).get("last_completed_rollout_id")
    return -1 if value is None else int(value)


def rollout_stored(store: RunStore, rid: int) -> bool:
    return store.exists(RunStore.rollout_file(rid, "rollout.json"))


def file_grew(path: Path, size_before: int) -> Callable[[], bool]:
    return lambda: path.exists() and path.stat().st_size > size_before


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], what: str) -> bool:
    """SIGKILL `proc` as soon as `condition()` holds; False when the process ended first."""
    try:
        servers.wait_until(condition, what, timeout_s=STALL_S, interval_s=POLL_S, process=proc)
    except servers.ProcessExited:
        return False
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"no progress towards {what!r} in {STALL_S} s") from None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 120):
    """Poll `condition` until it is truthy and return its value; the deadline only stops a hang."""
    return servers.wait_until(condition, what, timeout_s=timeout_s, interval_s=0.02)


def processes_matching(pattern: str) -> str:
    return subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout.strip()


def wait_no_processes(pattern: str) -> None:
    """Engines notice their launcher is gone and exit; poll until none is left."""
    try:
        wait_until(lambda: not processes_matching(pattern), "engine processes to exit after their launcher")
    except AssertionError:
        raise AssertionError(f"processes outlived their campaign:\n{processes_matching(pattern)}") from None


def all_json_parses(root: Path) -> int:
    """Every run-store record parses (a torn file would not). Prefect's own result files, which it
    writes non-atomically and this project never reads back, are left out. JSON lines are split
    on "\\n" only, as the store does."""
    count = 0
    for path in [*root.rglob("*.json"), *root.rglob("*.jsonl")]:
        if "prefect" in path.relative_to(root).parts:
            continue
        text = path.read_text(encoding="utf-8")
        for line in text.split("\n") if path.suffix == ".jsonl" else [text]:
            if line.strip():
                json.loads(line)
        count += 1
    return count


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:
                pass  # removed while walking (a pruned export)
    return total
