"""The weight-update process group: trainer rank 0 (group rank 0) plus every engine rank.

The one piece of the `distributed` weight sync that both ends run: the trainer's end
(`weight_sync.distributed`) and the engine server's (`engine_server.weight_update`). It sits beside
both packages, importing neither, so that neither end imports the other.

Both ends build it the way SGLang's `init_custom_process_group` does for
`/init_weights_update_group`: a TCPStore served by group rank 0 at `master_address:master_port`,
keys prefixed by the group name (`PrefixStore(group_name)`, then torch's own `"{group_name}/"`
and `"{device}/"`), and a backend over it (gloo on CPU, NCCL on GPUs). So the trainer's end meets
a real SGLang server as well as the local engine. The group is built from public torch classes and
never becomes the process's default group: the trainer's rank 0 keeps its own torchrun group
untouched.

Gloo broadcasts no float8 (nor every dtype NCCL takes), so over gloo each tensor travels as its raw
bytes: sender and receiver both view it as uint8, which moves the same bits. Over NCCL tensors go as
they are, as SGLang receives them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass
class WeightGroup:
    """One end of a weight-update group; `store` is kept alive with it (rank 0 serves it)."""

    name: str
    rank: int
    world_size: int
    backend: str
    pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None  # None once closed
    store: dist.TCPStore | None
    port: int

    @property
    def device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast `tensors` (in place, in order) from group rank 0: the sender passes its tensors, a
        receiver empty ones of the announced dtypes and shapes."""
        pg = self.pg
        assert pg is not None, "broadcast on a closed weight-update group"
        # torch's stubs omit the `broadcast` that the C++ backends bind.
        works = [pg.broadcast(self._wire(t), 0) for t in tensors]  # type: ignore[union-attr]
        for work in works:
            work.wait()

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.backend != "gloo":
            return tensor
        if not tensor.is_contiguous():
            raise ValueError("weight-update broadcasts need contiguous tensors")
        return tensor.reshape(-1).view(torch.uint8)

    def close(self) -> None:
        """Drop the group (its connections close with it). Safe to call twice."""
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "abort"):
            try:
                pg.abort()
            except RuntimeError:
                pass
        self.store = None


def connect(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float,
) -> WeightGroup:
    """An engine rank's end: join the group whose rank 0 serves its store at `master_address:master_port`
    (blocks until every rank has joined)."""
    if rank == 0:
        raise ValueError("group rank 0 is the trainer's; engine ranks start at rank_offset >= 1")
    store = dist.TCPStore(master_address, master_port, world_size, is_master=False, timeout=_delta(timeout_s))
    return join(store, rank, world_size, group_name, backend, timeout_s)


def host_store(master_port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Group rank 0's store, listening at once on every interface (port 0: a free one, then `store.port`)
    without waiting for the other ranks, so that they can be told where it is."""
    return dist.TCPStore(
        "127.0.0.1",
        master_port,
        world_size,
        is_master=True,
        timeout=_delta(timeout_s),
        wait_for_workers=False,
        multi_tenant=True,
    )


def join(
    store: dist.TCPStore,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float,
) -> WeightGroup:
    """Build this rank's end of the group over `store` (blocks until every rank has joined)."""
    if backend not in BACKENDS:
        raise ValueError(f"weight-update group backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"weight-update group rank {rank} is outside the group's world size {world_size}")
    device = "cuda" if backend == "nccl" else "cpu"
    prefixed = dist.PrefixStore(
        f"{device}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
    )
    pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, _delta(timeout_s))
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _delta(timeout_s)
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    return WeightGroup(group_name, rank, world_size, backend, pg, store, int(store.port))


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)
