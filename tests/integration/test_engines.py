"""The engine fleet's processes and keys: sglang-router's metrics on loopback, servers that die with their
launcher, failed and repeated starts, the per-campaign API key.

SGLang itself needs a GPU, so its tests launch a stand-in through exactly SGLang's path (engine_type
sglang: under parent_watch, in its own process group, the key in a --config file); the stand-in answers
SGLang's health and generate endpoints and refuses requests without the key, as SGLang does.
sglang-router and the local engine server are the real programs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import weakref

import psutil
import pytest
from helpers.campaign_killer import wait_until
from helpers.tiny_models import make_tiny_model

from slime_wf.config import CampaignConfig
from slime_wf.rollout.engine_client import EngineError
from slime_wf.rollout.engines import EngineFleet, EngineStartError, engine_gpus, shown
from slime_wf.servers import free_port

STAND_IN = r'''
"""A stand-in for `python -m sglang.launch_server`: SGLang's flags it needs, its health endpoints, /generate,
and its key check (every path but /health* needs `Authorization: Bearer <api-key>`)."""
import argparse, http.server, json, sys
import yaml

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--config")
parser.add_argument("--api-key")
parser.add_argument("--exit-code", type=int)
args, _ = parser.parse_known_args()
if args.exit_code is not None:
    sys.exit(args.exit_code)
if args.config:  # SGLang's --config: flags from a YAML mapping
    args.api_key = yaml.safe_load(open(args.config)).get("api-key")


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self):
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        if not self.path.startswith("/health") and args.api_key and \
                self.headers.get("Authorization") != f"Bearer {args.api_key}":
            return self.answer(401, {"error": "Unauthorized"})
        if self.path == "/generate":
            return self.answer(200, {"text": "ok", "output_ids": [7], "meta_info": {
                "id": "r", "finish_reason": {"type": "stop", "matched": 7}, "prompt_tokens": 1,
                "completion_tokens": 1, "cached_tokens": 0, "weight_version": "0", "e2e_latency": 0.0}})
        return self.answer(200, {})

    do_GET = do_POST = handle_any

    def log_message(self, *a):
        pass


http.server.ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
'''


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp("stand-in") / "sglang_stand_in.py"
    path.write_text(STAND_IN)
    return str(path)


class StandInFleet(EngineFleet):
    """SGLang's launch path with the stand-in as the server; `exit_codes[i]` makes engine i exit at once."""

    def __init__(self, *args, script: str, exit_codes: dict[int, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.script, self.exit_codes, self.groups = script, exit_codes or {}, []

    def _server_cmd(self, port: int) -> list[str]:
        index = next((e.extra["index"] for e in self.engines if e.port == port), len(self.engines))
        code = self.exit_codes.get(index)
        return [
            sys.executable,
            self.script,
            "--host",
            self.args.engine_host,
            "--port",
            str(port),
            *self._key_args(),
            *(["--exit-code", str(code)] if code is not None else []),
        ]

    def _spawn(self, engine, env=None):
        super()._spawn(engine, env)
        self.groups.append(engine.process.pid)  # each server leads its own process group


def sglang_args(*overrides: str):
    return CampaignConfig.from_dict(
        {"engine": {"engine_type": "sglang", "engine_startup_timeout": 120}}, list(overrides)
    ).args()


def group_members(pgids) -> list[psutil.Process]:
    """The live (not zombie) processes of these process groups."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def assert_released(ref: weakref.ref) -> None:
    """Nothing (an exit handler above all) still holds a fleet that was shut down and dropped."""
    gc.collect()
    assert ref() is None, "the shut-down fleet is still referenced (an atexit handler that was not removed?)"


def http_status(url: str, body: dict | None = None, key: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, headers=headers), timeout=30
        ) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


GENERATE = {"text": "one plus one", "sampling_params": {"max_new_tokens": 2}}


def generate_through(fleet: EngineFleet) -> dict:
    async def go():
        async with fleet.session() as session:
            response, _ = await session.generate(dict(GENERATE), timeout=60)
            return response

    return asyncio.run(go())


def _sglang_config_parser() -> str | None:
    spec = importlib.util.find_spec("sglang")  # located, not imported (it needs a GPU stack)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "srt", "utils", "server_args_config_parser.py")
    return path if os.path.exists(path) else None


SGLANG_CONFIG_PARSER = _sglang_config_parser()


def sglang_reads(config_file: str) -> dict:
    """The key flags SGLang's `--config` merging (ConfigArgumentMerger) makes of a file."""
    spec = importlib.util.spec_from_file_location("sglang_config_parser", SGLANG_CONFIG_PARSER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    for flag in ("--api-key", "--admin-api-key", "--port", "--config"):
        parser.add_argument(flag)
    merged = parser.parse_args(
        module.ConfigArgumentMerger(parser).merge_config_with_args(["--port", "1", "--config", config_file])
    )
    return {"api_key": merged.api_key, "admin_api_key": merged.admin_api_key}


def listening(procs) -> list[tuple[str, int]]:
    out = []
    for proc in procs:
        try:
            out += [
                (c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            pass
    return out


# ---- no servers ------------------------------------------------------------------------------------


def test_command_lines_are_shown_without_the_key_or_url_credentials():
    cmd = [
        "python",
        "-m",
        "sglang.launch_server",
        "--api-key",
        "k-123",
        "--admin-api-key",
        "k-123",
        "--worker-urls",
        "http://user:pw-456@h:1",
    ]
    text = shown(cmd)
    assert "k-123" not in text and "pw-456" not in text
    assert "--api-key ***" in text and "http://***@h:1" in text


def test_missing_key_variable_is_named_and_a_failed_start_leaves_no_exit_handler(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIME_WF_TEST_ENGINE_KEY", raising=False)
    args = sglang_args(
        f"engine_urls=['http://127.0.0.1:{free_port()}']", "engine_api_key_env=SLIME_WF_TEST_ENGINE_KEY"
    )
    fleet = EngineFleet(args, "unused", log_dir=str(tmp_path))
    with pytest.raises(EngineStartError, match="SLIME_WF_TEST_ENGINE_KEY, which is not set"):
        fleet.start()
    assert not fleet.started
    ref = weakref.ref(fleet)
    del fleet
    assert_released(ref)


# ---- sglang-router and SGLang's launch path ---------------------------------------------------------


@pytest.mark.slow
def test_router_metrics_stay_on_loopback_and_two_fleets_run_at_once(stand_in, tmp_path):
    args = sglang_args("use_router=true")
    with (
        StandInFleet(args, "unused", log_dir=str(tmp_path / "a"), script=stand_in) as first,
        StandInFleet(args, "unused", log_dir=str(tmp_path / "b"), script=stand_in) as second,
    ):
        metrics_ports = []
        for fleet in (first, second):
            cmd = fleet.router.cmd
            metrics_port = int(cmd[cmd.index("--prometheus-port") + 1])
            metrics_ports.append(metrics_port)
            router_procs = group_members({fleet.router.process.pid})

            def metrics_listener(procs=router_procs, port=metrics_port):
                sockets = listening(procs)
                return sockets if port in {p for _, p in sockets} else None

            sockets = wait_until(metrics_listener, "the router's metrics listener")
            assert {fleet.router.port, metrics_port} <= {port for _, port in sockets}
            assert all(ip == "127.0.0.1" for ip, _ in sockets), sockets  # nothing on 0.0.0.0 / ::
            assert 29000 not in {port for _, port in sockets}
            assert http_status(f"http://127.0.0.1:{metrics_port}/metrics") == 200
            assert generate_through(fleet)["text"] == "ok"
        assert metrics_ports[0] != metrics_ports[1]


@pytest.mark.slow
def test_the_fleet_key_guards_engines_and_router_and_stays_off_command_lines(stand_in, tmp_path, caplog):
    caplog.set_level("DEBUG")
    with StandInFleet(
        sglang_args("use_router=true"), "unused", log_dir=str(tmp_path), script=stand_in
    ) as fleet:
        key = fleet.api_key
        assert key and len(key) >= 32
        key_file = fleet._key_args()[1]
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        if SGLANG_CONFIG_PARSER is not None:  # SGLang's own --config reader gets both key flags from it
            assert sglang_reads(key_file) == {"api_key": key, "admin_api_key": key}

        engine, router = fleet.urls[0], fleet.router_url
        assert http_status(engine + "/generate", GENERATE) == 401
        assert http_status(router + "/generate", GENERATE) == 401  # the router asks for the key too
        assert http_status(engine + "/health") == http_status(router + "/health") == 200
        assert generate_through(fleet)["text"] == "ok"  # through the router, which sends the key on
        assert all(fleet.check_health().values())

        processes = group_members(set(fleet.groups))
        assert len(processes) >= 4  # two watchers, the stand-in, the router
        for proc in processes:
            assert key not in " ".join(proc.cmdline()), proc.cmdline()
        for name in os.listdir(tmp_path):
            if name.endswith(".log"):
                assert key not in (tmp_path / name).read_text(errors="replace"), name
                assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert key not in caplog.text
    assert not os.path.exists(key_file)


@pytest.mark.slow
def test_attached_engines_take_the_key_from_the_named_variable(stand_in, tmp_path, monkeypatch):
    with StandInFleet(
        sglang_args(), "unused", log_dir=str(tmp_path / "launched"), script=stand_in
    ) as launched:
        monkeypatch.setenv("SLIME_WF_TEST_ENGINE_KEY", launched.api_key)
        attach = [f"engine_urls={launched.urls}", "use_router=true"]
        with EngineFleet(
            sglang_args(*attach, "engine_api_key_env=SLIME_WF_TEST_ENGINE_KEY"),
            "unused",
            log_dir=str(tmp_path / "attached"),
        ) as attached:
            assert attached.api_key == launched.api_key
            assert generate_through(attached)["text"] == "ok"  # through its router
            assert http_status(attached.router_url + "/generate", GENERATE) == 401
        with EngineFleet(sglang_args(*attach), "unused", log_dir=str(tmp_path / "keyless")) as keyless:
            assert keyless.api_key is None
            with pytest.raises(EngineError, match="401"):
                generate_through(keyless)


@pytest.mark.slow
def test_failed_start_stops_the_engines_it_had_started(stand_in, tmp_path):
    fleet = StandInFleet(
        sglang_args("num_engines=3"), "unused", log_dir=str(tmp_path), script=stand_in, exit_codes={0: 3}
    )
    with pytest.raises(EngineStartError, match="exited with code 3"):
        fleet.start()
    assert len(fleet.groups) == 3  # engines 1 and 2 were up or coming up when engine 0 failed
    assert group_members(set(fleet.groups)) == []
    assert fleet.engines == [] and not fleet.started
    ref = weakref.ref(fleet)
    del fleet
    assert_released(ref)


@pytest.mark.slow
def test_starting_a_started_fleet_raises_and_leaks_nothing(stand_in, tmp_path):
    fleet = StandInFleet(sglang_args(), "unused", log_dir=str(tmp_path), script=stand_in)
    fleet.start()
    first_key, first_groups = fleet.api_key, list(fleet.groups)
    with pytest.raises(RuntimeError, match="already started"):
        fleet.start()
    assert fleet.groups == first_groups and http_status(fleet.urls[0] + "/health") == 200
    fleet.shutdown()
    assert group_members(set(first_groups)) == []
    # shut down, it starts again, with a new key
    with fleet:
        assert fleet.api_key != first_key and generate_through(fleet)["text"] == "ok"
    assert group_members(set(fleet.groups)) == []
    ref = weakref.ref(fleet)
    del fleet
    assert_released(ref)


LAUNCHER = r"""
import json, os, sys, threading
from slime_wf.config import CampaignConfig
from slime_wf.rollout.engines import EngineFleet
from slime_wf.servers import wait_until

stand_in, log_dir = sys.argv[1], sys.argv[2]


class StandInFleet(EngineFleet):
    def _server_cmd(self, port):
        return [sys.executable, stand_in, "--port", str(port), *self._key_args()]


args = CampaignConfig.from_dict({"engine": {"engine_type": "sglang", "use_router": True}}).args()
fleet = StandInFleet(args, "unused", log_dir=log_dir)
# started from a thread that ends before the kill, as a Prefect task thread does
starter = threading.Thread(target=fleet.start)
starter.start()
starter.join()
# the OS thread itself is gone
wait_until(lambda: not os.path.exists(f"/proc/self/task/{starter.native_id}"), "the starter's OS thread to end",
           timeout_s=120, interval_s=0.01)
print(json.dumps({"groups": [fleet.engines[0].process.pid, fleet.router.process.pid],
                  "urls": [fleet.urls[0], fleet.router_url]}), flush=True)
threading.Event().wait()
"""


@pytest.mark.slow
def test_router_and_sglang_servers_die_with_their_launcher(stand_in, tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    launcher = subprocess.Popen(
        [sys.executable, str(script), stand_in, str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "launcher.err", "wb"),
    )
    try:
        line = launcher.stdout.readline()
        assert line, f"the launcher failed: {(tmp_path / 'launcher.err').read_text()[-3000:]}"
        info = json.loads(line)
        members = group_members(set(info["groups"]))
        names = " ".join(f"{p.name()} {' '.join(p.cmdline())}" for p in members)
        assert "sglang::router" in names and "sglang_stand_in" in names  # the router names itself so
        # alive and serving after the thread that launched them ended
        assert all(http_status(url + "/health") == 200 for url in info["urls"])
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()

    def all_gone():
        return not [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_until(all_gone, "the router and the server to exit after their launcher was killed")


# ---- the local engine server --------------------------------------------------------------------------


@pytest.mark.slow
def test_local_engines_require_the_fleet_key(tmp_path):
    model = str(make_tiny_model(tmp_path / "model", layers=1, hidden=32))
    args = CampaignConfig.from_dict({"engine": {"num_engines": 1, "local_engine_threads": 1}}).args()
    with EngineFleet(args, model, log_dir=str(tmp_path / "logs")) as fleet:
        url = fleet.urls[0]
        assert http_status(url + "/generate", GENERATE) == 401
        assert http_status(url + "/generate", GENERATE, key="not-the-key") == 401
        assert http_status(url + "/generate", GENERATE, key=fleet.api_key) == 200
        assert generate_through(fleet)["meta_info"]["completion_tokens"] >= 1
        assert all(fleet.check_health().values())


def test_sglang_engines_take_the_gpus_after_the_trainers():
    def args(**over):
        cfg = CampaignConfig.from_dict({}, [f"{k}={v}" for k, v in over.items()])
        return cfg.args()

    # slime's placement: the actor's GPUs first, then one group per engine
    two = args(actor_num_gpus_per_node=2, rollout_num_gpus_per_engine=2)
    assert [engine_gpus(two, i, {}) for i in range(2)] == [["2", "3"], ["4", "5"]]
    # indices count within the devices slime-wf was given
    assert engine_gpus(two, 0, {"CUDA_VISIBLE_DEVICES": "7,6,5,4,3"}) == ["5", "4"]
    with pytest.raises(EngineStartError, match=r"(?s)needs GPUs \[4, 5\].*has 5.*engine_base_gpu: 0"):
        engine_gpus(two, 1, {"CUDA_VISIBLE_DEVICES": "7,6,5,4,3"})
    # sharing the trainer's GPU, as on a one-GPU machine
    assert engine_gpus(args(engine_base_gpu=0), 0, {}) == ["0"]


def test_sglang_servers_run_with_the_configured_python(tmp_path):
    cfg = CampaignConfig.from_dict({}, ["engine_type=sglang", "sglang_python=/opt/sglang-env/bin/python"])
    fleet = EngineFleet(cfg.args(), str(tmp_path), log_dir=str(tmp_path / "logs"))
    assert fleet._server_cmd(30000)[:3] == ["/opt/sglang-env/bin/python", "-m", "sglang.launch_server"]


def test_a_local_engine_decodes_together_what_the_session_sends_it(tmp_path):
    """The session keeps sglang_server_concurrency requests in flight per engine (slime's default 512);
    a local engine runs that many at once, so a rollout's requests are decoded in one wave."""
    for overrides, running in (([], 512), (["sglang_server_concurrency=96"], 96)):
        cfg = CampaignConfig.from_dict({}, ["engine_type=local", *overrides])
        cmd = EngineFleet(cfg.args(), str(tmp_path), log_dir=str(tmp_path / "logs"))._server_cmd(30000)
        assert cmd[cmd.index("--max-running-requests") + 1] == str(running)
        assert cmd[cmd.index("--max-queued-requests") + 1] == str(4 * running)


@pytest.mark.parametrize(
    ("train_async", "engines", "set_threads", "engine_threads", "trainer_threads"),
    [
        (False, 1, None, 8, None),  # sync: the engines take every core, the trainer its own default
        (False, 2, None, 4, None),
        (True, 1, None, 4, 4),  # async: engines and trainer compute at the same time, half each
        (True, 2, None, 2, 4),
        (True, 1, 6, 6, 2),  # an explicit engine count is kept, the trainer gets what is left
        (True, 2, 5, 5, 1),  # never under one thread
    ],
)
def test_cpu_cores_are_shared_by_engines_and_an_async_trainer(
    monkeypatch, train_async, engines, set_threads, engine_threads, trainer_threads
):
    from slime_wf.campaign_trainer import trainer_cpu_threads
    from slime_wf.rollout.engines import local_engine_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = CampaignConfig.model_validate(
        {
            "campaign": "cores",
            "model": {"hf_checkpoint": "unused"},
            "data": {"prompt_data": "unused.jsonl"},
            "rollout": {"train_async": train_async, "max_weight_staleness": 1 if train_async else None},
            "engine": {"num_engines": engines, "local_engine_threads": set_threads},
        }
    ).args()
    assert local_engine_threads(args) == engine_threads
    assert trainer_cpu_threads(args) == trainer_threads
