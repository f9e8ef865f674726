"""How a trainer group is launched: torchrun on one node, or on many through torchrun's static rendezvous.

One node: `torchrun --standalone --nproc-per-node G`. Many nodes (`actor_num_nodes` N > 1): the
campaign's node is node 0, so global rank 0, the rank that `RemoteTrainer` talks to on 127.0.0.1,
runs there. Its torchrun agent hosts the rendezvous store at `trainer_rdzv_endpoint` (host:port)
and waits for the other nodes; each of them runs `slime-wf trainer-node` (`run_trainer_node`),
which starts that node's torchrun agent with `--node-rank K`. The joining ranks get the trainer's
settings and the checkpoint paths from rank 0 over the process group (`service.py`), so a joining
node needs no config file, only the same software and the HF checkpoint at the same path. The
rendezvous is the static one (`--node-rank`): the dynamic (c10d) one numbers the nodes by host
and process id, which would not keep rank 0 on the campaign's node.

Each start of a group is logged after a line that begins with `STARTING_MARK`; `failure_summary` and
`log_tail` read how the latest start ended from that log.

A group ends as a whole (a rank died, or the client shut it down), and the campaign starts a new one
from its committed checkpoint. So that a joining node takes part in every group and never in the
one that is ending, each start of the head publishes a fresh generation id in its rendezvous store
(`GENERATION_KEY`, also torchrun's `--rdzv-id`); `trainer-node` joins each generation once and
then waits for the next.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import TCPStore

logger = logging.getLogger(__name__)

SERVICE_MODULE = "slime_wf.training.service"
GENERATION_KEY = "slime-wf/trainer-generation"
STARTING_MARK = "==== starting:"
_POLL_S = 0.5
_LOG_TAIL_LINES = 40


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"trainer rendezvous endpoint {endpoint!r} is not host:port (e.g. 10.0.0.1:29500)")
    return host, int(port)


def threads_per_rank(nproc_per_node: int) -> int:
    """OMP_NUM_THREADS of each rank: as set in the environment, else this node's cores shared by its ranks."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // nproc_per_node)


def torchrun_command(
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    generation: str | None = None,
    rdzv_timeout_s: float = 900.0,
) -> list[str]:
    """The torchrun agent of one node, up to the module it runs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        return [*cmd, "--standalone"]
    if not rdzv_endpoint or not generation:
        raise ValueError("a trainer group of several nodes needs a rendezvous endpoint and a generation id")
    return [
        *cmd,
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={generation}",
        f"--rdzv-conf=timeout={int(rdzv_timeout_s)}",
        "--max-restarts=0",
    ]


def join_commands(
    rdzv_endpoint: str, nnodes: int, nproc_per_node: int, rdzv_timeout_s: float = 900.0
) -> list[str]:
    """The command each other trainer node (1 .. nnodes-1) runs to join the campaign's groups."""
    return [
        f"slime-wf trainer-node --rdzv-endpoint {rdzv_endpoint} --nnodes {nnodes} --nproc-per-node {nproc_per_node} "
        f"--rdzv-timeout-s {rdzv_timeout_s:g} --node-rank {k}"
        for k in range(1, nnodes)
    ]


def log_tail(log_path: Path) -> str:
    """The last lines of a group's log, for an error message."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def failure_summary(log_path: Path) -> str:
    """torchrun's own account of which rank of the latest start failed and how (its "exitcode" lines)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    start = max((i for i, line in enumerate(lines) if line.startswith(STARTING_MARK)), default=0)
    found = [line.strip() for line in lines[start:] if "exitcode" in line or "Signal" in line]
    return "; ".join(dict.fromkeys(found))


def _store(endpoint: str) -> TCPStore | None:
    """A client of the rendezvous store at `endpoint`, or None while nothing listens there (checked with a
    plain connection first: a TCPStore client logs every failed attempt at length)."""
    from torch.distributed import TCPStore

    host, port = split_endpoint(endpoint)
    try:
        socket.create_connection((host, port), timeout=2.0).close()
        return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=5))
    except (OSError, RuntimeError):  # RuntimeError: torch's DistNetworkError / DistStoreError
        return None


def publish_generation(endpoint: str, generation: str) -> bool:
    """Write `generation` into the head agent's rendezvous store; False while that store is not up."""
    store = _store(endpoint)
    if store is None:
        return False
    try:
        store.set(GENERATION_KEY, generation)
    except RuntimeError:
        return False
    return True


def read_generation(endpoint: str) -> str | None:
    """The generation id the head at `endpoint` publishes; None when no head is there (yet)."""
    store = _store(endpoint)
    try:
        if store is not None and store.check([GENERATION_KEY]):
            return store.get(GENERATION_KEY).decode()
    except RuntimeError:
        pass
    return None


def run_trainer_node(
    rdzv_endpoint: str,
    nnodes: int,
    node_rank: int,
    nproc_per_node: int,
    *,
    idle_timeout_s: float | None = None,
    rdzv_timeout_s: float = 900.0,
) -> int:
    """Join every trainer group the campaign's head starts at `rdzv_endpoint`, one after the other. Returns
    when no new group has started for `idle_timeout_s` (None: runs until interrupted)."""
    if not 0 < node_rank < nnodes:
        raise ValueError(
            f"--node-rank {node_rank}: give 1 .. {nnodes - 1}; node 0 is the campaign's own node"
        )
    split_endpoint(rdzv_endpoint)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(nproc_per_node))}
    last = None
    while True:
        logger.warning(
            "trainer node %d of %d: waiting for the campaign's trainer group at %s",
            node_rank,
            nnodes,
            rdzv_endpoint,
        )
        deadline = None if idle_timeout_s is None else time.monotonic() + idle_timeout_s
        while (generation := read_generation(rdzv_endpoint)) in (None, last):
            if deadline is not None and time.monotonic() > deadline:
                logger.warning(
                    "no new trainer group at %s for %.0f s: stopping", rdzv_endpoint, idle_timeout_s
                )
                return 0
            time.sleep(_POLL_S)
        cmd = torchrun_command(
            nproc_per_node,
            nnodes=nnodes,
            node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint,
            generation=generation,
            rdzv_timeout_s=rdzv_timeout_s,
        )
        logger.warning("joining trainer group %s: %s", generation, " ".join(cmd))
        code = subprocess.call([*cmd, "-m", SERVICE_MODULE], env=env)
        logger.warning("trainer group %s ended (torchrun exit code %d)", generation, code)
        last = generation


def add_trainer_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rdzv-endpoint", required=True, help="the campaign's train.trainer_rdzv_endpoint (host:port)"
    )
    parser.add_argument("--nnodes", type=int, required=True, help="the campaign's train.actor_num_nodes")
    parser.add_argument("--node-rank", type=int, required=True, help="this node's rank: 1 .. nnodes-1")
    parser.add_argument(
        "--nproc-per-node", type=int, required=True, help="the campaign's train.actor_num_gpus_per_node"
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=None,
        help="stop when no new trainer group starts for this long (default: run until interrupted)",
    )
    parser.add_argument(
        "--rdzv-timeout-s",
        type=float,
        default=900.0,
        help="how long each group waits for all nodes (the campaign's train.trainer_rdzv_timeout_s)",
    )


def trainer_node_main(ns: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run_trainer_node(
            ns.rdzv_endpoint,
            ns.nnodes,
            ns.node_rank,
            ns.nproc_per_node,
            idle_timeout_s=ns.idle_timeout_s,
            rdzv_timeout_s=ns.rdzv_timeout_s,
        )
    except KeyboardInterrupt:
        return 130
    except ValueError as err:  # a flag that does not fit
        print(f"slime-wf trainer-node: {err}", file=sys.stderr)
        return 2
