"""`GET /v1/loads` in SGLang 0.5.23's shape (`srt/entrypoints/v1_loads.py`, `srt/managers/load_snapshot.py`).

The body is `{timestamp, version, accelerator, num_accelerators, loads: [...]}` with one entry per
data-parallel rank (here always one, `dp_rank` 0): the flat "core" fields of SGLang's
`LoadSnapshot` and, unless `?include=core`, the `queues` and `disaggregation` sections. slime's
abort loop polls `/v1/loads?include=core` after aborting and sums `num_running_reqs` and
`num_waiting_reqs` over `loads` until both are 0.

Without a KV-cache pool, the token fields count what the running requests hold: `num_used_tokens`
is their prompt plus output tokens and `max_total_num_tokens` is `max_running_requests` ×
context length. Fields about things this engine does not have (prefix cache, speculative decoding,
LoRA, memory pools) are 0 or absent, as SGLang reports them when unused. `?format=prometheus`
gives the same numbers as Prometheus gauges, and an unknown `include` section is a 400, as in SGLang.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

# SGLang's `LoadSnapshot` fields outside its sections, in its order (`_CORE_KEYS`).
CORE_KEYS = (
    "timestamp",
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_used_tokens",
    "num_total_tokens",
    "num_active_tokens",
    "num_prealloc_ready_tokens",
    "max_total_num_tokens",
    "max_running_requests",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "utilization",
    "total_prefill_uncached_tokens",
    "total_prefill_busy_us",
    "decode_moments",
)
VALID_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
# The report's version field; SGLang reports its package version, this engine its name.
ENGINE_VERSION = "local"


def snapshot(engine: Any) -> dict[str, Any]:
    """The engine's load as SGLang's `LoadSnapshot` would hold it: core fields and sections."""
    running, waiting = engine.token_load() if engine.ready.is_set() else ([], [])
    used = sum(running)
    capacity = engine.max_running_requests * int(getattr(engine, "context_length", 0) or 0)
    core: dict[str, Any] = {
        "timestamp": time.time(),
        "dp_rank": 0,
        "num_running_reqs": len(running),
        "num_waiting_reqs": len(waiting),
        "num_waiting_uncached_tokens": sum(waiting),  # no prefix cache: every waiting token is uncached
        "num_used_tokens": used,
        "num_total_tokens": used,
        "num_active_tokens": used,
        "num_prealloc_ready_tokens": 0,
        "max_total_num_tokens": capacity,
        "max_running_requests": engine.max_running_requests,
        "token_usage": round(used / capacity, 4) if capacity else 0.0,
        "gen_throughput": 0.0,
        "cache_hit_rate": 0.0,
        "utilization": round(len(running) / engine.max_running_requests, 4),
        "total_prefill_uncached_tokens": 0,
        "total_prefill_busy_us": 0,
        "decode_moments": None,
    }
    sections = {
        "disagg": (
            "disaggregation",
            {
                "mode": "null",
                "prefill_bootstrap_queue_reqs": 0,
                "prefill_inflight_queue_reqs": 0,
                "decode_prealloc_queue_reqs": 0,
                "decode_transfer_queue_reqs": 0,
                "decode_retracted_queue_reqs": 0,
                "kv_transfer_speed_gb_s": 0.0,
                "kv_transfer_latency_ms": 0.0,
            },
        ),
        "queues": (
            "queues",
            {
                "waiting": len(waiting),
                "grammar": 0,
                "paused": len(running) if engine.paused else 0,
                "retracted": 0,
                "prealloc_ready": 0,
            },
        ),
    }
    return {"core": core, "sections": sections}


def loads_body(engine: Any, include: str | None, dp_rank: int | None) -> dict[str, Any]:
    """The `/v1/loads` JSON body; raises ValueError (HTTP 400) for an unknown `include` section."""
    wanted = {s.strip() for s in include.split(",")} if include else None
    if wanted is not None and not wanted <= VALID_SECTIONS:
        raise ValueError(
            f"Invalid include sections: {wanted - VALID_SECTIONS}. Valid options: {sorted(VALID_SECTIONS)}"
        )
    loads = []
    if dp_rank is None or dp_rank == 0:
        snap = snapshot(engine)
        load = dict(snap["core"])
        for name, (field, section) in snap["sections"].items():
            if wanted is None or "all" in wanted or name in wanted:
                load[field] = section
        loads.append(load)
    return {
        "timestamp": datetime.now(UTC).isoformat(),
        "version": ENGINE_VERSION,
        "accelerator": None,
        "num_accelerators": 1,  # SGLang: tp_size × pp_size of one data-parallel rank
        "loads": loads,
    }


def prometheus_text(body: dict[str, Any]) -> str:
    """SGLang's `?format=prometheus`: one gauge per numeric field, sections prefixed."""
    prefixes = {"disaggregation": "disagg"}
    samples: dict[str, list[tuple[int, float]]] = {}
    for load in body["loads"]:
        load = dict(load)
        rank = load.pop("dp_rank")
        for key, value in load.items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    if isinstance(sub_value, (int, float)):
                        samples.setdefault(f"sglang_{prefixes.get(key, key)}_{sub}", []).append(
                            (rank, sub_value)
                        )
            elif isinstance(value, (int, float)):
                samples.setdefault(f"sglang_{key}", []).append((rank, value))
    lines = []
    for name, values in samples.items():
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f'{name}{{dp_rank="{rank}"}} {value}' for rank, value in values)
    return "\n".join(lines) + "\n"


def loads_response(engine: Any, query: Any) -> web.Response:
    """Answer `GET /v1/loads` with the query's `include`, `dp_rank` and `format`."""
    try:
        dp_rank = None if query.get("dp_rank") is None else int(query["dp_rank"])
        body = loads_body(engine, query.get("include"), dp_rank)
    except ValueError as err:
        error = {"object": "error", "message": str(err), "type": "400", "param": None, "code": 400}
        return web.json_response(error, status=400)
    if query.get("format") == "prometheus":
        return web.Response(text=prometheus_text(body), content_type="text/plain", charset="utf-8")
    return web.json_response(body)
