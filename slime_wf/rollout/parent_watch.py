"""Run a server that ends when the process that launched it ends, even after kill -9 of that process.

    python -m slime_wf.rollout.parent_watch --parent-pid PID -- python -m sglang.launch_server ...

The engine fleet starts SGLang servers and sglang-router through this watcher (the local engine
server watches its launcher itself, `--parent-pid`). It runs the command as its child and polls
its own parent pid; once the launcher is gone it sends SIGTERM to its whole process group (the
server and anything the server started, such as SGLang's scheduler processes), then SIGKILL after
`--grace` seconds. It must therefore be started as the leader of a new process group
(`start_new_session=True`), which is also what lets the fleet stop everything with one `killpg`.

Why a watcher process rather than prctl(PR_SET_PDEATHSIG) in a preexec_fn: the kernel sends the
death signal when the launching *thread* exits, not the process. Fleets are started from Prefect
task threads and engines are restarted from asyncio's executor threads, and those threads end
while the campaign goes on; a death signal tied to them would kill healthy engines. A parent pid
changes only when the launching process is gone. The cost is one sleeping Python process per
server and up to one poll interval before the shutdown begins.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as a shell says


def _stop_group(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the group (this watcher ignores it), the child's graceful exit, then SIGKILL to whatever is left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgrp(), signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # the watcher goes too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slime_wf.rollout.parent_watch", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--parent-pid", type=int, required=True, help="the launcher: when it is gone, stop the command"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between checks of the parent"
    )
    parser.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run: put it after --")
    if os.getpgrp() != os.getpid():
        parser.error("start the watcher as a process group leader (Popen(..., start_new_session=True))")

    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        # the fleet signals the whole group, but a signal sent to the watcher alone must reach the server too
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while child.poll() is None:
        time.sleep(args.poll_interval)
        if os.getppid() != args.parent_pid:
            print(
                f"parent_watch: the launcher (pid {args.parent_pid}) is gone; stopping {command[:3]}",
                file=sys.stderr,
                flush=True,
            )
            _stop_group(child, args.grace)
    return _exit_code(child.returncode)


if __name__ == "__main__":
    sys.exit(main())
