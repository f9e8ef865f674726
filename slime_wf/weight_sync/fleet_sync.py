"""Weight sync in `distributed` mode, the campaign's end: one weight-update group over the engines of a
fleet, planned here and built by the trainer's rank 0 (`distributed.WeightBroadcaster`).

    group = DistributedWeightSync(args, fleet)         # once per fleet start
    metrics = group.sync(trainer, version="3", fp8=fmt)

The group (`slime-wf-<token>-<n>`: trainer rank 0 is group rank 0, engine i holds the ranks from
`1 + i * tp`) is built on the first sync of a fleet start and reused by every later sync; it is built
anew, under a new name, when the engines changed or a sync failed. A trainer rebuilt from a checkpoint
(after a fault) rebuilds the group of the same name on its first sync.

A restarted engine (`EngineFleet.restart`) comes back with the weights it was launched with (the
fleet's `model_path`, tagged with the launch version), not the version the others serve: there is no
export on disk to give it. `rejoin`, the fleet's `after_restart` hook, runs before the engine takes
requests again: it joins the restarted engine alone to a group of its own (the other engines go on
generating) and sends it the trainer's current weights under the version last synced, which are the
weights the others serve (the trainer is only ahead of the engines between `train` and `sync`, when
no rollout runs). The next sync builds the group of all engines anew. If `rejoin` fails, the fleet
stops the engine and reports the restart as failed, so it never serves stale weights.

With `check_weight_update_equal`, each sync also exports the weights to `verify_dir` and checks the
served log-probs against a forward pass over that export (a debug mode: it needs that disk).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import threading
import time
from typing import Any

from slime_wf.checkpoint.fp8_format import Fp8Format
from slime_wf.weight_sync.distributed import DEFAULT_TIMEOUT_S, fp8_to_json

logger = logging.getLogger(__name__)


def group_backend(args: Any) -> str:
    """`storage.weight_sync_backend`, with `auto` as NCCL for SGLang engines and gloo for the local engine."""
    backend = getattr(args, "weight_sync_backend", "auto")
    if backend != "auto":
        return backend
    return "nccl" if args.engine_type == "sglang" else "gloo"


class DistributedWeightSync:
    """The `distributed` mode over one start of an `EngineFleet` (see the module docstring)."""

    def __init__(self, args: Any, fleet: Any):
        self.args, self.fleet = args, fleet
        self.version: str | None = (
            None  # what the engines serve since the last sync; None: the launch weights
        )
        self._fp8: Fp8Format | None = None
        self._token = secrets.token_hex(4)
        self._generation = 0
        self._group: dict[str, Any] | None = None  # the plan of the group of all engines, once built
        self._lock = threading.Lock()  # a rejoin (restart thread) and a sync never overlap

    def plan(self, urls: list[str]) -> dict[str, Any]:
        """The group over `urls`: the current one when it spans exactly them, else a new name."""
        if self._group is not None and [e["url"] for e in self._group["engines"]] == list(urls):
            return self._group
        self._generation += 1
        a = self.args
        ranks = a.rollout_num_gpus_per_engine if a.engine_type == "sglang" else 1
        return {
            "group_name": f"slime-wf-{self._token}-{self._generation}",
            "engines": [{"url": url, "rank_offset": 1 + i * ranks} for i, url in enumerate(urls)],
            "world_size": 1 + ranks * len(urls),
            "master_address": a.weight_sync_master_address,
            "master_port": int(a.weight_sync_master_port or 0),
            "backend": group_backend(a),
            "timeout_s": DEFAULT_TIMEOUT_S,
            "api_key": self.fleet.api_key,
        }

    def _request(self, version: str, flush_cache: bool) -> dict[str, Any]:
        return {
            "weight_version": str(version),
            "bucket_bytes": int(self.args.weight_sync_bucket_mb * 2**20),
            "fp8": fp8_to_json(self._fp8),
            "flush_cache": flush_cache,
        }

    def sync(
        self, trainer: Any, version: str, *, fp8: Fp8Format | None = None, verify_dir: str | None = None
    ) -> dict[str, float]:
        """Broadcast the trainer's weights to every engine as `version`; returns the sync metrics."""
        with self._lock:
            self._fp8 = fp8
            plan = self.plan(self.fleet.urls)
            t0 = time.perf_counter()
            try:
                metrics = trainer.broadcast_weights(plan, self._request(version, flush_cache=True))
            except BaseException:
                self._group = None  # its state on the engines is unknown: the next sync builds a new one
                raise
            seconds = time.perf_counter() - t0
            self._group, self.version = plan, str(version)
        metrics = {**metrics, "sync/s_per_gb": seconds / max(metrics.get("sync/bytes", 0.0) / 2**30, 1e-9)}
        if verify_dir is not None:
            metrics["sync/max_logprob_diff"] = self._verify(trainer, verify_dir)
        logger.info(
            "weights %s synced to %d engine(s) over %s in %.2f s",
            version,
            len(plan["engines"]),
            plan["group_name"],
            seconds,
        )
        return metrics

    def rejoin(self, trainer: Any, url: str) -> None:
        """Bring the restarted engine at `url` to the weights the others serve (the fleet's `after_restart`)."""
        with self._lock:
            self._group = None  # the group of all engines lost a member
            if self.version is None:
                return  # nothing was synced: it serves the launch weights, as the others do
            logger.info("engine %s restarted: sending it weights %s", url, self.version)
            trainer.broadcast_weights(self.plan([url]), self._request(self.version, flush_cache=False))

    def close(self, trainer: Any) -> None:
        """Destroy the group on the trainer and the engines (best effort)."""
        with self._lock:
            self._group = None
            if trainer is not None:
                try:
                    trainer.close_weight_group()
                except Exception as err:  # the trainer or the engines may be gone already
                    logger.debug("closing the weight-update group: %s", err)

    def _verify(self, trainer: Any, folder: str) -> float:
        from slime_wf.weight_sync.disk import export_weights
        from slime_wf.weight_sync.verify import verify_served_weights

        export_weights(trainer, folder, fp8=self._fp8)

        async def run():
            async with self.fleet.session() as session:
                return await verify_served_weights(session, folder)

        try:
            return asyncio.run(run())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
