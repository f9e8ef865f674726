"""Weight sync in `distributed` mode: SGLang's weight-update group between trainer rank 0 and the engines.

The request bodies are checked against SGLang's own request structs and its own group constructor; the
engines serve exactly the trainer's weights after a sync (bit for bit, read back with
/get_weights_by_name), in FP32 and in FP8, from a TP=2 torchrun trainer; a restarted engine gets the
current weights before it serves again; a campaign in this mode runs to its end."""

from __future__ import annotations

import ast
import asyncio
import datetime
import json
import os
import re
import signal
import sys
import threading
import types
import typing

import pytest
import torch
from helpers.tiny_campaign import campaign_dict, make_assets
from helpers.tiny_models import make_tiny_model

from slime_wf.config import CampaignConfig
from slime_wf.engine_server.schema import SchemaUnavailableError, load_sglang_file
from slime_wf.rollout.engines import EngineFleet, EngineStartError
from slime_wf.weight_group import host_store, join
from slime_wf.weight_sync import distributed as wd
from slime_wf.weight_sync.fleet_sync import DistributedWeightSync

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:megatron.*",
    "ignore::FutureWarning:torch.*",
    "ignore::FutureWarning:megatron.*",
)

IO_STRUCTS = (
    "InitWeightsUpdateGroupReqInput",
    "UpdateWeightsFromDistributedReqInput",
    "DestroyWeightsUpdateGroupReqInput",
    "BeginWeightUpdateReqInput",
    "EndWeightUpdateReqInput",
    "GetWeightsByNameReqInput",
)


def _sglang_source(relative: str) -> str:
    try:
        return load_sglang_file(relative, source_only=True)
    except SchemaUnavailableError as err:
        pytest.skip(str(err))


def sglang_request_structs() -> dict[str, type]:
    """SGLang's request structs for these endpoints, from its io_struct.py (which cannot be imported here:
    it needs the GPU runtime), rebuilt over a base that refuses unknown keys and takes JSON objects."""
    msgspec = pytest.importorskip("msgspec")
    tree = ast.parse(_sglang_source("srt/managers/io_struct.py"))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in IO_STRUCTS]
    assert {c.name for c in classes} == set(IO_STRUCTS)

    class BaseReq(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        rid: typing.Optional[str] = None  # noqa: UP045 (SGLang's own spelling)
        http_worker_ipc: typing.Optional[str] = None  # noqa: UP045

    # msgspec resolves the (postponed) annotations through the module the classes say they live in
    module = types.ModuleType("_sglang_io_struct_requests")
    module.__dict__.update(BaseReq=BaseReq, **{name: getattr(typing, name) for name in typing.__all__})
    sys.modules[module.__name__] = module
    exec(compile(ast.Module(body=classes, type_ignores=[]), "io_struct.py", "exec"), module.__dict__)
    return {name: getattr(module, name) for name in IO_STRUCTS}


def test_request_bodies_follow_sglangs_own_structs_and_endpoints():
    import msgspec

    structs = sglang_request_structs()
    plan = {"master_address": "10.0.0.5", "world_size": 3, "group_name": "slime-wf-x-1", "backend": "nccl"}
    bucket = [
        ("model.layers.0.mlp.down_proj.weight", torch.zeros(4, 8, dtype=torch.float8_e4m3fn)),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", torch.ones(1, 1)),
        ("model.norm.weight", torch.ones(8, dtype=torch.bfloat16)),
    ]
    bodies = {
        "/init_weights_update_group": (
            "InitWeightsUpdateGroupReqInput",
            wd.init_group_body(plan, {"url": "u", "rank_offset": 2}, 29500),
        ),
        "/update_weights_from_distributed": (
            "UpdateWeightsFromDistributedReqInput",
            wd.update_body(bucket, "slime-wf-x-1", flush_cache=True, weight_version="7"),
        ),
        "/destroy_weights_update_group": (
            "DestroyWeightsUpdateGroupReqInput",
            wd.destroy_body("slime-wf-x-1"),
        ),
        "/begin_weight_update": ("BeginWeightUpdateReqInput", wd.BEGIN_BODY),
        "/end_weight_update": ("EndWeightUpdateReqInput", wd.END_BODY),
    }
    server = _sglang_source("srt/entrypoints/http_server.py")
    for path, (struct, body) in bodies.items():
        msgspec.convert(
            json.loads(json.dumps(body)), structs[struct]
        )  # raises on a wrong, missing or unknown key
        assert re.search(rf'@app\.(post|api_route)\(\s*"{path}"', server), f"SGLang does not serve {path}"
    update = msgspec.convert(
        bodies["/update_weights_from_distributed"][1], structs["UpdateWeightsFromDistributedReqInput"]
    )
    assert update.dtypes == ["float8_e4m3fn", "float32", "bfloat16"] and update.shapes == [
        [4, 8],
        [1, 1],
        [8],
    ]
    assert all(
        isinstance(getattr(torch, d), torch.dtype) for d in update.dtypes
    )  # SGLang's getattr(torch, dtype)
    assert update.weight_version == "7" and update.flush_cache is True
    no_version = wd.update_body(bucket, "g", flush_cache=False, weight_version=None)
    assert msgspec.convert(no_version, structs["UpdateWeightsFromDistributedReqInput"]).weight_version is None
    msgspec.convert({"name": "model.norm.weight", "truncate_size": 5}, structs["GetWeightsByNameReqInput"])
    with pytest.raises(msgspec.ValidationError):  # the check itself bites
        msgspec.convert(
            {**bodies["/init_weights_update_group"][1], "master_port": "29500"},
            structs["InitWeightsUpdateGroupReqInput"],
        )


def sglang_init_custom_process_group():
    """SGLang's own `init_custom_process_group` (srt/utils/common.py), the function its engines join the group
    with, taken from the installed source (the module imports the GPU runtime)."""
    source = _sglang_source("srt/utils/common.py")
    fn = next(
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and n.name == "init_custom_process_group"
    )
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    namespace = {"torch": torch, "torch_release": release}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "common.py", "exec"), namespace)
    return namespace["init_custom_process_group"]


def test_the_trainers_group_is_the_one_sglang_joins():
    """Trainer rank 0's end (`weight_group`) and an engine rank built by SGLang's `init_custom_process_group`
    meet in one group and pass tensors: the store address and key prefixes are SGLang's."""
    init_custom_process_group = sglang_init_custom_process_group()
    store = host_store(0, 2, timeout_s=60)
    sent = [torch.randn(5, 3), torch.arange(4, dtype=torch.int64)]
    got: dict[str, object] = {}

    def engine_rank():
        try:
            pg = init_custom_process_group(
                backend="gloo",
                init_method=f"tcp://127.0.0.1:{store.port}",
                world_size=2,
                rank=1,
                group_name="slime-wf-test-1",
                timeout=datetime.timedelta(seconds=60),
            )
            out = [torch.empty_like(t) for t in sent]
            for t in out:
                torch.distributed.broadcast(t, src=0, group=pg)
            got["tensors"] = out
        except Exception as err:  # reported by the assertion below
            got["error"] = err

    thread = threading.Thread(target=engine_rank)
    thread.start()
    group = join(store, 0, 2, "slime-wf-test-1", "gloo", timeout_s=60)
    group.broadcast(sent)
    thread.join(60)
    group.close()
    assert "error" not in got, got.get("error")
    assert all(torch.equal(a, b) for a, b in zip(got["tensors"], sent, strict=True))


def test_fp8_layout_survives_the_trip_to_the_trainer(tmp_path):
    from slime_wf.checkpoint.fp8_convert import convert_checkpoint
    from slime_wf.checkpoint.fp8_format import Fp8Format

    model = make_tiny_model(tmp_path / "model", layers=1, hidden=64)
    convert_checkpoint(str(model), str(tmp_path / "fp8"), "block", (32, 32), progress=False)
    fmt = Fp8Format.of_checkpoint(tmp_path / "fp8")
    back = wd.fp8_from_json(json.loads(json.dumps(wd.fp8_to_json(fmt))))
    assert (back, back.scales, back.quantization_config, back.source) == (
        fmt,
        fmt.scales,
        fmt.quantization_config,
        fmt.source,
    )
    w = torch.randn(64, 128)  # down_proj: [hidden, intermediate]
    (name, q), (scale_name, scale) = wd.cast_for_engines("model.layers.0.mlp.down_proj.weight", w, back)
    assert (name, q.dtype, scale_name, scale.dtype, tuple(scale.shape)) == (
        "model.layers.0.mlp.down_proj.weight",
        torch.float8_e4m3fn,
        "model.layers.0.mlp.down_proj.weight_scale_inv",
        torch.float32,
        (2, 4),
    )
    assert wd.cast_for_engines("model.norm.weight", torch.ones(64), back)[0][0] == "model.norm.weight"


# ---- against running engines ------------------------------------------------------------------------


def engine_args(**storage):
    return CampaignConfig.from_dict(
        {
            "engine": {"num_engines": storage.pop("num_engines", 1), "local_engine_threads": 1},
            "storage": {"weight_sync_mode": "distributed", "weight_sync_bucket_mb": 0.1, **storage},
        }
    ).args()


def served(fleet, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Per engine: every named tensor as /get_weights_by_name gives it (all rows), and the weight version."""

    async def run():
        async with fleet.session() as session:
            tensors, versions = {}, {}
            for url in fleet.urls:
                client = session.client(url)
                tensors[url] = {
                    n: torch.tensor(
                        await client.control("/get_weights_by_name", {"name": n, "truncate_size": 1 << 30})
                    )
                    for n in names
                }
                versions[url] = (await client.model_info())["weight_version"]
            return tensors, versions

    return asyncio.run(run())


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor.to(torch.float32)), name


def export(trainer, folder, fp8=None) -> dict[str, torch.Tensor]:
    """What a disk sync would make the engines serve: the export, dequantized as the engine loads it."""
    from slime_wf.engine_server.model import read_state_dict
    from slime_wf.weight_sync.disk import export_weights

    export_weights(trainer, str(folder), fp8=fp8)
    return read_state_dict(folder)


@pytest.mark.slow
def test_engines_serve_a_tp2_trainers_weights_exactly_in_fp32_and_fp8(tmp_path):
    from helpers.trainer_samples import BASE, random_samples

    from slime_wf.checkpoint.fp8_convert import convert_checkpoint
    from slime_wf.checkpoint.fp8_format import Fp8Format
    from slime_wf.training.trainer_client import RemoteTrainer

    model = make_tiny_model(tmp_path / "model", arch="qwen3", seed=1)
    convert_checkpoint(str(model), str(tmp_path / "fp8"), "block", (32, 32), progress=False)
    fmt = Fp8Format.of_checkpoint(tmp_path / "fp8")
    trainer = RemoteTrainer(
        {**BASE, "tensor_model_parallel_size": 2, "micro_batch_size": 2},
        model,
        nproc_per_node=2,
        work_dir=tmp_path / "service",
        threads_per_rank=1,
        startup_timeout=300,
        command_timeout=300,
    )
    try:
        trainer.train(
            random_samples(8, seed=3), 0
        )  # the weights now differ from the checkpoints engines start from
        plain, cast = export(trainer, tmp_path / "disk"), export(trainer, tmp_path / "disk-fp8", fmt)
        args = engine_args(num_engines=2)
        with EngineFleet(args, str(model), log_dir=str(tmp_path / "logs")) as fleet:
            before, _ = served(fleet, list(plain))
            assert not torch.equal(
                before[fleet.urls[0]]["model.layers.0.mlp.up_proj.weight"],
                plain["model.layers.0.mlp.up_proj.weight"],
            )
            group = DistributedWeightSync(args, fleet)
            metrics = group.sync(trainer, "1")
            assert metrics["sync/buckets"] > 1 and metrics["sync/bytes"] == sum(
                t.numel() * t.element_size() for t in plain.values()
            )
            tensors, versions = served(fleet, list(plain))
            assert versions == dict.fromkeys(fleet.urls, "1")
            for url in fleet.urls:  # both engine ranks of the group got every bucket
                assert_bit_equal(tensors[url], plain)
            group.sync(trainer, "2")  # the group is reused
            assert served(fleet, [])[1] == dict.fromkeys(fleet.urls, "2")

        args = engine_args()
        with EngineFleet(args, str(tmp_path / "fp8"), log_dir=str(tmp_path / "logs-fp8")) as fleet:
            DistributedWeightSync(args, fleet).sync(
                trainer, "3", fp8=fmt
            )  # the trainer leaves its first group
            tensors, versions = served(fleet, list(cast))
            assert versions == {fleet.urls[0]: "3"}
            assert_bit_equal(tensors[fleet.urls[0]], cast)  # what a disk sync in FP8 would serve, to the bit
            assert not torch.equal(
                cast["model.layers.0.mlp.up_proj.weight"], plain["model.layers.0.mlp.up_proj.weight"]
            )
    finally:
        trainer.shutdown()


@pytest.mark.slow
def test_a_restarted_engine_rejoins_with_the_current_weights(tmp_path):
    from slime_wf.training.trainer import Trainer

    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64)
    args = engine_args()
    trainer = Trainer(args, str(model))
    try:
        with torch.no_grad():
            for param in trainer.actor.parameters():
                param.add_(0.01)
        want = export(trainer, tmp_path / "disk")
        with EngineFleet(args, str(model), log_dir=str(tmp_path / "logs")) as fleet:
            url = fleet.urls[0]

            async def call(path, body):
                async with fleet.session() as session:
                    return await session.client(url).control(path, body)

            from slime_wf.rollout.engine_client import EngineRejected

            with pytest.raises(EngineRejected, match="between begin_weight_update"):
                asyncio.run(
                    call("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []})
                )
            with pytest.raises(EngineRejected, match="gloo"):
                asyncio.run(
                    call(
                        "/init_weights_update_group",
                        {
                            "master_address": "127.0.0.1",
                            "master_port": 1,
                            "rank_offset": 1,
                            "world_size": 2,
                            "backend": "nccl",
                        },
                    )
                )

            group = DistributedWeightSync(args, fleet)
            fleet.after_restart = lambda u: group.rejoin(trainer, u)
            group.sync(trainer, "1")
            os.killpg(fleet.engines[0].process.pid, signal.SIGKILL)
            fleet.engines[0].process.wait()
            fleet.restart(url)  # launched from the model, then given version 1 before it returns
            tensors, versions = served(fleet, list(want))
            assert versions == {url: "1"}
            assert_bit_equal(tensors[url], want)
            group.sync(trainer, "2")  # a new group of all engines
            assert served(fleet, [])[1] == {url: "2"}

            def refuse(u):
                raise RuntimeError("no weights today")

            fleet.after_restart = refuse
            with pytest.raises(EngineStartError, match="no weights today"):
                fleet.restart(url)
            assert fleet.engines[0].process.poll() is not None  # never serves the launch weights as current
    finally:
        trainer.shutdown()


@pytest.mark.slow
def test_a_campaign_with_distributed_sync_runs_to_its_end(tmp_path, monkeypatch):
    from slime_wf.campaign import Campaign, check_campaign_invariant
    from slime_wf.store import RunStore

    make_assets(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = campaign_dict(tmp_path, str(tmp_path / "store"), "dist")
    config["storage"].update(
        weight_sync_mode="distributed", weight_sync_bucket_mb=0.1, check_weight_update_equal=True
    )
    cfg = CampaignConfig.from_dict(config)
    with Campaign(cfg) as campaign:
        manifest = campaign.run()
        assert manifest["last_completed_rollout_id"] == 1
        assert manifest["weights"] == {"path": None, "version": "1"}  # no export holds the synced weights
        metrics = campaign.store.read_json(RunStore.rollout_file(1, "metrics.json"))
        assert metrics["sync/buckets"] >= 1 and metrics["sync/max_logprob_diff"] < 1e-3
        assert served(campaign.fleet, [])[1] == dict.fromkeys(campaign.fleet.urls, "1")
        check_campaign_invariant(campaign.store)
