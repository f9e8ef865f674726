"""Weight sync in `distributed` mode, the trainer's end: rank 0 broadcasts the weights to the engines
over SGLang's weight-update group (`slime_wf.weight_group`), while its HTTP calls make the engines receive.

Every trainer rank takes part: `iter_hf_weights` gathers the tensor-parallel shards into HF names, a
collective of each TP group. Global rank 0 alone talks to the engines:

1. once per group (`plan["group_name"]` new to it): `/destroy_weights_update_group` of that name on
   every engine (a group a previous trainer left there), then it serves the group's store and, at the
   same time, asks every engine to join with `/init_weights_update_group {master_address,
   master_port, rank_offset, world_size, group_name, backend}`; a group of another name that it held
   is destroyed on both ends first;
2. per sync: `/begin_weight_update`, then per bucket of about `bucket_bytes` one
   `/update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache,
   weight_version}` to every engine, sent while rank 0 broadcasts the bucket's tensors in that
   order; the last bucket alone carries `weight_version` and `flush_cache`, so an engine's version
   changes only once it has every weight; then `/end_weight_update`.

When the engines serve FP8, each weight is cast to the served checkpoint's layout (`Fp8Format`) by the
same quantizer as a disk export (`fp8.quantize_fp8`, the scale named and typed by the layout), and the
FP8 weight and its scale travel in the same bucket, under the checkpoint's names.

The plan and the request are JSON (they reach a torchrun service as a command); the plan carries the
engines' admin key, which is sent as a bearer token and never logged. Rank 0 needs to reach every
engine's HTTP port, and every engine must reach `master_address:master_port` (the store, then the
backend's own connections): on GPUs, NCCL between the trainer's node and the engines' nodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from slime_wf.checkpoint.dtypes import dtype_name
from slime_wf.checkpoint.fp8_format import Fp8Format, ScaleSpec
from slime_wf.checkpoint.safetensors_stream import TORCH_DTYPES
from slime_wf.redact import redact_url
from slime_wf.weight_group import WeightGroup, host_store, join

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class WeightSyncError(RuntimeError):
    """A distributed weight sync failed; the message names each engine that failed and how."""


# ---- SGLang's request bodies (contract-tested against its io_struct) -------------------------------


def init_group_body(plan: dict[str, Any], engine: dict[str, Any], port: int) -> dict[str, Any]:
    return {
        "master_address": plan["master_address"],
        "master_port": int(port),
        "rank_offset": int(engine["rank_offset"]),
        "world_size": int(plan["world_size"]),
        "group_name": plan["group_name"],
        "backend": plan["backend"],
    }


def update_body(
    bucket: list[tuple[str, torch.Tensor]], group_name: str, *, flush_cache: bool, weight_version: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "names": [name for name, _ in bucket],
        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": flush_cache,
    }
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def destroy_body(group_name: str) -> dict[str, Any]:
    return {"group_name": group_name}


BEGIN_BODY: dict[str, Any] = {"selector": "all"}
END_BODY: dict[str, Any] = {}


# ---- the FP8 layout as JSON, and the cast -----------------------------------------------------------


def fp8_to_json(fmt: Fp8Format | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    return {
        "strategy": fmt.strategy,
        "block_size": list(fmt.block_size) if fmt.block_size else None,
        "quantization_config": fmt.quantization_config,
        "scales": None
        if fmt.scales is None
        else {w: [s.name, list(s.shape), s.dtype] for w, s in fmt.scales.items()},
        "not_converted": list(fmt.not_converted),
        "source": fmt.source,
    }


def fp8_from_json(data: dict[str, Any] | None) -> Fp8Format | None:
    if data is None:
        return None
    scales = data.get("scales")
    return Fp8Format(
        data["strategy"],
        tuple(data["block_size"]) if data.get("block_size") else None,
        data.get("quantization_config"),
        None
        if scales is None
        else {w: ScaleSpec(n, tuple(shape), dt) for w, (n, shape, dt) in scales.items()},
        tuple(data.get("not_converted") or ()),
        data.get("source"),
    )


def cast_for_engines(
    name: str, tensor: torch.Tensor, fmt: Fp8Format | None
) -> list[tuple[str, torch.Tensor]]:
    """`[(name, tensor)]`, or the FP8 weight and its scale as the served checkpoint names and types them."""
    if fmt is None or not fmt.quantizes(name, tensor):
        return [(name, tensor)]
    from slime_wf.checkpoint.fp8 import DEFAULT_BLOCK_SIZE, QUANTIZABLE_DTYPES, quantize_fp8

    if tensor.dtype not in QUANTIZABLE_DTYPES or tensor.dim() != 2:
        raise WeightSyncError(
            f"{name} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, but {fmt.describe()} "
            "stores it as an FP8 matrix: the trained model and the served checkpoint differ"
        )
    try:
        spec = fmt.scale_for(name, tuple(tensor.shape))
    except ValueError as err:
        raise WeightSyncError(str(err)) from None
    q, scale = quantize_fp8(tensor, fmt.strategy, fmt.block_size or DEFAULT_BLOCK_SIZE)
    return [(name, q), (spec.name, scale.to(TORCH_DTYPES[spec.dtype]).reshape(spec.shape))]


# ---- trainer rank 0 ---------------------------------------------------------------------------------


class WeightBroadcaster:
    """Trainer rank 0's end: holds one weight-update group at a time and sends weights over it."""

    def __init__(self) -> None:
        self.group: WeightGroup | None = None
        self.plan: dict[str, Any] | None = None
        self._new_threads()

    def _new_threads(self) -> None:
        """One thread runs the HTTP calls, one the blocking group operations; the caller's thread keeps
        the tensor-parallel gathers, which every rank runs in step. After a failure, a join or broadcast
        that an engine never took part in (or its HTTP call) stays blocked until its timeout: its thread
        is left behind rather than queue the next sync after it."""
        for pool in (getattr(self, "_http", None), getattr(self, "_torch", None)):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._http = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-sync-http")
        self._torch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-sync-group")

    def send(
        self, plan: dict[str, Any], request: dict[str, Any], weights: Iterable[tuple[str, torch.Tensor]]
    ) -> dict[str, float]:
        """Broadcast `weights` (HF names, full tensors) to the engines of `plan`; returns metrics.

        `request`: `weight_version`, `bucket_bytes`, `fp8` (`fp8_to_json`, None for plain weights),
        `flush_cache`. On failure the rest of `weights` is still drained (the other ranks gather in
        step) and the group is dropped: the next send builds it anew."""
        weights = iter(weights)
        try:
            t0 = time.perf_counter()
            self._ensure_group(plan)
            t1 = time.perf_counter()
            sent, buckets = self._send_all(request, weights)
            t2 = time.perf_counter()
        except BaseException:
            for _ in weights:
                pass
            self.close(notify=False)
            self._new_threads()
            raise
        logger.info(
            "weights %s broadcast to %d engine(s) over %s: %.1f MB in %d bucket(s), %.2f s",
            request["weight_version"],
            len(plan["engines"]),
            plan["group_name"],
            sent / 2**20,
            buckets,
            t2 - t1,
        )
        return {
            "sync/connect_s": t1 - t0,
            "sync/broadcast_s": t2 - t1,
            "sync/bytes": float(sent),
            "sync/buckets": float(buckets),
        }

    # ---- the group ------------------------------------------------------------------------------

    def _ensure_group(self, plan: dict[str, Any]) -> None:
        if self.group is not None and self.plan is not None and self.plan["group_name"] == plan["group_name"]:
            return
        self.close(notify=True)
        timeout = float(plan.get("timeout_s") or DEFAULT_TIMEOUT_S)
        # a trainer that died left its group of this name on the engines; SGLang refuses a name it holds
        self._engines(
            plan,
            lambda c, e: c.control(
                "/destroy_weights_update_group", destroy_body(plan["group_name"]), timeout=60
            ),
        ).result()
        try:
            store = host_store(int(plan.get("master_port") or 0), int(plan["world_size"]), timeout)
        except RuntimeError as err:
            raise WeightSyncError(
                f"trainer rank 0 cannot serve the weight-update group's store on port {plan.get('master_port')} "
                f"(storage.weight_sync_master_port): {err}"
            ) from err
        joined = self._torch.submit(
            join, store, 0, int(plan["world_size"]), plan["group_name"], plan["backend"], timeout
        )
        inits = self._engines(
            plan,
            lambda c, e: c.control(
                "/init_weights_update_group", init_group_body(plan, e, store.port), timeout=timeout
            ),
        )
        self._await(
            plan,
            inits,
            joined,
            f"joining the weight-update group {plan['group_name']} at {plan['master_address']}:{store.port}",
        )
        self.group, self.plan = joined.result(), dict(plan)
        logger.info(
            "weight-update group %s: trainer rank 0 and %d engine rank(s), %s, at %s:%d",
            plan["group_name"],
            int(plan["world_size"]) - 1,
            plan["backend"],
            plan["master_address"],
            store.port,
        )

    def _joined(self) -> tuple[WeightGroup, dict[str, Any]]:
        """The group and the plan it was made for, which `_ensure_group` sets before any sending."""
        assert self.group is not None and self.plan is not None, "no weight-update group joined yet"
        return self.group, self.plan

    def close(self, notify: bool = True) -> None:
        """Drop the group: on the engines too (best effort) with `notify`."""
        group, plan, self.group, self.plan = self.group, self.plan, None, None
        if group is None:
            return
        assert plan is not None  # set together with the group
        if notify:
            self._engines(
                plan,
                lambda c, e: c.control("/destroy_weights_update_group", destroy_body(group.name), timeout=60),
            ).result()
        group.close()

    def shutdown(self) -> None:
        self.close(notify=False)
        self._http.shutdown(wait=False, cancel_futures=True)
        self._torch.shutdown(wait=False, cancel_futures=True)

    # ---- sending ----------------------------------------------------------------------------------

    def _send_all(
        self, request: dict[str, Any], weights: Iterator[tuple[str, torch.Tensor]]
    ) -> tuple[int, int]:
        plan, fmt = self._joined()[1], fp8_from_json(request.get("fp8"))
        limit = max(1, int(request["bucket_bytes"]))
        begun = self._engines(plan, lambda c, e: c.control("/begin_weight_update", BEGIN_BODY)).result()
        sent = buckets = 0
        try:
            self._check(plan, begun, "/begin_weight_update")
            pending: list[tuple[str, torch.Tensor]] | None = (
                None  # held back: the last bucket carries the version
            )
            bucket: list[tuple[str, torch.Tensor]] = []
            size, quantized = 0, set()
            for name, tensor in weights:
                for out_name, out in cast_for_engines(name, tensor, fmt):
                    if out_name != name:
                        quantized.add(name)
                    nbytes = out.numel() * out.element_size()
                    if bucket and size + nbytes > limit and out_name == name:  # a scale stays with its weight
                        if pending is not None:
                            sent, buckets = sent + self._send_bucket(pending, None, False), buckets + 1
                        pending, bucket, size = bucket, [], 0
                    bucket.append((out_name, out))
                    size += nbytes
            if fmt is not None and fmt.scales is not None and set(fmt.scales) - quantized:
                missing = sorted(set(fmt.scales) - quantized)
                raise WeightSyncError(
                    f"the trainer has no weight for {missing[:3]} ({len(missing)} in all), which "
                    f"{fmt.source} stores as FP8: the trained model and the served checkpoint differ"
                )
            tail = [b for b in (pending, bucket) if b]
            if not tail:
                raise WeightSyncError("the trainer gave no weights to send")
            for b in tail[:-1]:
                sent, buckets = sent + self._send_bucket(b, None, False), buckets + 1
            sent += self._send_bucket(
                tail[-1], request["weight_version"], bool(request.get("flush_cache", True))
            )
            buckets += 1
        finally:
            ended = self._engines(plan, lambda c, e: c.control("/end_weight_update", END_BODY)).result()
        self._check(plan, ended, "/end_weight_update")
        return sent, buckets

    def _send_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], weight_version: str | None, flush_cache: bool
    ) -> int:
        group, plan = self._joined()
        body = update_body(bucket, plan["group_name"], flush_cache=flush_cache, weight_version=weight_version)
        timeout = float(plan.get("timeout_s") or DEFAULT_TIMEOUT_S)
        tensors = [t.to(group.device).contiguous() for _, t in bucket]
        received = self._engines(
            plan, lambda c, e: c.control("/update_weights_from_distributed", body, timeout=timeout)
        )
        broadcast = self._torch.submit(group.broadcast, tensors)
        self._await(plan, received, broadcast, f"broadcasting {len(bucket)} tensors from {bucket[0][0]}")
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- HTTP to every engine, beside the group's blocking calls -------------------------------------

    def _engines(
        self, plan: dict[str, Any], call: Callable[[Any, dict[str, Any]], Any]
    ) -> concurrent.futures.Future:
        """Run `call(client, engine)` on every engine of `plan` at once; the future gives (url, result or
        exception) pairs."""
        from slime_wf.rollout.engine_client import EngineSession

        async def run():
            urls = [e["url"] for e in plan["engines"]]
            key = plan.get("api_key")
            async with EngineSession(urls, api_key=key, admin_api_key=key) as session:
                results = await asyncio.gather(
                    *(call(session.client(e["url"]), e) for e in plan["engines"]), return_exceptions=True
                )
            return list(zip(urls, results, strict=True))

        return self._http.submit(asyncio.run, run())

    def _await(
        self,
        plan: dict[str, Any],
        http: concurrent.futures.Future,
        work: concurrent.futures.Future,
        doing: str,
    ) -> None:
        """Wait for both; an engine that refused (it will never take part) fails at once."""
        concurrent.futures.wait([http, work], return_when=concurrent.futures.FIRST_COMPLETED)
        if http.done():
            self._check(plan, http.result(), doing)
        try:
            work.result()
        except Exception as err:
            raise WeightSyncError(f"weight sync: {doing} failed on trainer rank 0: {err}") from err
        self._check(plan, http.result(), doing)

    @staticmethod
    def _check(plan: dict[str, Any], results: list[tuple[str, Any]], doing: str) -> None:
        failed = [
            (url, r)
            for url, r in results
            if isinstance(r, BaseException) or (isinstance(r, dict) and r.get("success") is False)
        ]
        if failed:
            details = "; ".join(
                f"{redact_url(url)}: {r.get('message') if isinstance(r, dict) else r}" for url, r in failed
            )
            raise WeightSyncError(f"weight sync over {plan['group_name']}: {doing} failed on {details}")
