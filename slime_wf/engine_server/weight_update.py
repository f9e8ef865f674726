"""The local engine's end of SGLang's weight-update group (the `distributed` weight sync mode).

Endpoints, with SGLang 0.5.23's request bodies (`srt/managers/io_struct.py`) and answers
(`{"success", "message"}`, HTTP 200 or 400), all behind the admin key like SGLang's:

- `POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name,
  backend}`: join the group whose rank 0 (the trainer) serves its store at
  `master_address:master_port`, as rank `rank_offset` (one rank: the local engine has no tensor
  parallelism). Blocks until every rank has joined. Only `backend: gloo` (the engine runs on CPU).
- `POST /destroy_weights_update_group {group_name}`.
- `POST /begin_weight_update {selector}` ... `POST /end_weight_update {}`: a weight-update session.
- `POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache,
  weight_version, abort_all_requests, ...}` (inside a session, as SGLang requires): receive one
  broadcast per tensor, in order, from group rank 0.
- `GET|POST /get_weights_by_name {name, truncate_size}`: the served tensor as float32 lists, its first
  `truncate_size` rows, as SGLang answers (tests read served weights with it).

What differs from SGLang: received tensors are staged and swapped in together at
`/end_weight_update`, between two decode steps, like `/update_weights_from_disk`; so generation goes
on during a sync and never runs on half-updated weights, a session that fails keeps the old weights,
and `weight_version` (the last one a bucket carried) changes at that swap. An engine serving an FP8
checkpoint receives FP8 weights plus their scales under the checkpoint's names and dequantizes them
as it loads FP8 checkpoints (`checkpoint.fp8.dequantize_state_dict`). There is no prefix cache, so
`flush_cache` has nothing to drop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import torch
from aiohttp import web

from slime_wf.checkpoint.dtypes import torch_dtype
from slime_wf.weight_group import WeightGroup, connect

logger = logging.getLogger(__name__)

GROUP_TIMEOUT_S = 600.0
PATHS = (
    "/init_weights_update_group",
    "/destroy_weights_update_group",
    "/begin_weight_update",
    "/end_weight_update",
    "/update_weights_from_distributed",
    "/get_weights_by_name",
)


class WeightReceiver:
    """The weight-update groups and the open session of one `LocalEngine`."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.groups: dict[str, WeightGroup] = {}
        self._staged: dict[str, torch.Tensor] | None = None  # None: no session open
        self._version: str | None = None
        self._lock = threading.Lock()

    def init_group(self, body: dict[str, Any]) -> tuple[bool, str]:
        try:
            address, port = _field(body, "master_address", str), _field(body, "master_port", int)
            rank, world = _field(body, "rank_offset", int), _field(body, "world_size", int)
            name, backend = body.get("group_name", "weight_update_group"), body.get("backend", "nccl")
        except ValueError as err:
            return False, str(err)
        if not isinstance(name, str) or not name:
            return False, "group_name must be a non-empty string"
        if backend != "gloo":
            return False, (
                f"backend {backend!r}: the local engine runs on CPU and joins weight-update groups over "
                "gloo; the trainer must use backend gloo with local engines"
            )
        if name in self.groups:
            return False, f"a weight-update group named {name!r} exists already; destroy it first"
        logger.info(
            "joining weight-update group %s at %s:%d as rank %d of %d", name, address, port, rank, world
        )
        try:
            group = connect(address, port, rank, world, name, backend, GROUP_TIMEOUT_S)
        except Exception as err:
            return False, f"Failed to initialize custom process group: {err}."
        self.groups[name] = group
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, body: dict[str, Any]) -> tuple[bool, str]:
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return False, "The group to be destroyed does not exist."
        group.close()
        return True, "Succeeded to destroy custom process group."

    def begin(self, body: dict[str, Any]) -> tuple[bool, str]:
        with self._lock:
            if self._staged is not None:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self._staged, self._version = {}, None
        return True, "Success"

    def receive(self, body: dict[str, Any]) -> tuple[bool, str]:
        if self._staged is None:
            return (
                False,
                "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()",
            )
        name = body.get("group_name", "weight_update_group")
        group = self.groups.get(name)
        if group is None:
            return (
                False,
                f"Group {name} not in {sorted(self.groups)}. Please call `init_weights_update_group` first.",
            )
        try:
            tensors = _announced(body)
        except ValueError as err:
            return False, f"Failed to receive weights: {err}"
        if body.get("abort_all_requests"):
            self.engine.abort(abort_all=True)
        try:
            group.broadcast(list(tensors.values()))
        except Exception as err:
            return False, f"Failed to receive weights: {err}"
        version = body.get("weight_version")
        with self._lock:
            if self._staged is None:
                return False, "the weight-update session was closed while the weights were being received"
            self._staged.update(tensors)
            if version is not None:
                self._version = str(version)
        message = "Succeeded to update parameter online."
        return True, message + (f" Weight version updated to {version}." if version is not None else "")

    def end(self, body: dict[str, Any]) -> tuple[bool, str]:
        with self._lock:
            staged, version, self._staged, self._version = self._staged, self._version, None, None
        if staged is None:
            return False, "no weight-update session is open; call begin_weight_update() first"
        if not staged:
            return True, "Success"
        from slime_wf.checkpoint.fp8 import dequantize_state_dict
        from slime_wf.engine_server.model import check_state_dict, read_config

        try:
            quant = read_config(self.engine.model_path).get("quantization_config")
            state = dequantize_state_dict(staged, quant, dtype=torch.float32)
            checked = check_state_dict(self.engine.model, state, partial=True)
        except Exception as err:  # the old weights keep serving
            logger.warning("weight update over a weight-update group failed: %s", err)
            return False, f"Failed to load the received weights: {err}. The old weights keep serving."
        self.engine.swap_weights(checked, version)
        logger.info(
            "weights swapped in: %d tensors received%s",
            len(staged),
            f", version {version}" if version is not None else "",
        )
        return True, "Success"

    def weights_by_name(self, body: dict[str, Any]) -> list | None:
        name, truncate = body.get("name"), body.get("truncate_size", 100)
        own = self.engine.model.state_dict()
        if not isinstance(name, str) or name not in own or not isinstance(truncate, int):
            return None
        return own[name].detach().to(torch.float32).tolist()[:truncate]


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} is required and must be {kind.__name__}, got {value!r}")
    return value


def _announced(body: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Empty tensors of the announced names, dtypes and shapes, in broadcast order."""
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError("names, dtypes and shapes must be lists")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(
            f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ in length"
        )
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        kind = torch_dtype(str(dtype), f"{name}: dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{name}: shape {shape!r} is not a list of sizes")
        if name in out:
            raise ValueError(f"{name} is announced twice")
        out[name] = torch.empty(shape, dtype=kind)
    return out


# ---- HTTP -------------------------------------------------------------------------------------------

RECEIVER = web.AppKey("weight_receiver", WeightReceiver)


async def _body(request: web.Request) -> dict[str, Any] | None:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _answer(method: str):
    async def handler(request: web.Request) -> web.Response:
        body = await _body(request)
        if body is None:
            return web.json_response(
                {"success": False, "message": f"the body of {request.path} must be a JSON object"}, status=400
            )
        receiver = request.app[RECEIVER]
        if not receiver.engine.ready.is_set() or receiver.engine.load_error is not None:
            return web.json_response({"success": False, "message": "the model is not loaded"}, status=400)
        success, message = await asyncio.to_thread(getattr(receiver, method), body)
        return web.json_response({"success": success, "message": message}, status=200 if success else 400)

    return handler


async def _get_weights_by_name(request: web.Request) -> web.Response:
    body: dict[str, Any] | None = await _body(request) if request.can_read_body else dict(request.query)
    if (
        body
        and "truncate_size" in body
        and isinstance(body["truncate_size"], str)
        and body["truncate_size"].isdigit()
    ):
        body["truncate_size"] = int(body["truncate_size"])
    receiver = request.app[RECEIVER]
    result = None if body is None or not receiver.engine.ready.is_set() else receiver.weights_by_name(body)
    if result is None:
        return web.json_response({"error": {"message": "Get parameter by name failed"}}, status=400)
    return web.json_response(result)


def add_routes(app: web.Application, engine: Any) -> None:
    """Serve the weight-update group endpoints of `engine` on `app`."""
    app[RECEIVER] = WeightReceiver(engine)
    for path, method in zip(
        PATHS[:5], ("init_group", "destroy_group", "begin", "end", "receive"), strict=True
    ):
        app.router.add_post(path, _answer(method))
    app.router.add_route("*", "/get_weights_by_name", _get_weights_by_name)
