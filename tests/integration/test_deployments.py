"""The Prefect deployments: served by `slime-wf serve-deployments` against a real Prefect server, a
run triggered with a parameter override; `deployments/prefect.yaml` deployed with `prefect deploy`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from helpers.prefect_fixtures import prefect_env
from helpers.tiny_models import make_tiny_model

from slime_wf.config import CampaignConfig, ConfigError
from slime_wf.servers import ProcessExited, wait_until
from slime_wf.store import RunStore

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
EXAMPLE = REPO / "examples" / "tiny-math" / "campaign.yaml"
CRON = "0 0 1 1 *"
FLOWS = ("train", "prepare", "evaluate")


# ---- the deployment descriptions (fast) ---------------------------------------------------------


def test_prefect_yaml_describes_the_three_flows_with_the_example_campaign():
    import flows.campaign
    from deployments.serve import deployment_name

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    by_flow = {d["entrypoint"].rsplit(":", 1)[1]: d for d in spec["deployments"]}
    assert sorted(by_flow) == sorted(FLOWS)
    expected = CampaignConfig.from_yaml(str(EXAMPLE))
    for name, d in by_flow.items():
        path, attr = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and getattr(flows.campaign, attr).name == name
        assert CampaignConfig.from_dict(d["parameters"]["config"]) == expected, (
            f"deployments/prefect.yaml ({name}) and {EXAMPLE.relative_to(REPO)} differ: copy the campaign over"
        )
        assert d["name"] == deployment_name(name, expected.campaign)  # as serve-deployments names them
        assert d["work_pool"]["name"]
    assert [s["cron"] for s in by_flow["train"]["schedules"]] and "schedules" not in by_flow["prepare"]


def test_serve_rejects_a_bad_cron_and_a_missing_server(monkeypatch):
    from deployments.serve import api_url, check_cron

    assert check_cron("0 3 * * *") == "0 3 * * *"
    with pytest.raises(ConfigError, match="--cron '61 3 \\* \\* \\*' is not a cron expression"):
        check_cron("61 3 * * *")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(ConfigError, match="PREFECT_API_URL is not set"),
    ):
        api_url()


# ---- against a real server (slow) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def campaign_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-campaign")
    model = make_tiny_model(root / "model", layers=2, hidden=64)
    data = root / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"what is {d} plus {d}", "label": str(2 * d)}) + "\n" for d in range(8))
    )
    config = {
        "campaign": "served",
        "model": {"hf_checkpoint": str(model), "cache_dir": str(root / "cache")},
        "data": {"prompt_data": str(data)},
        "rollout": {
            "num_rollout": 2,
            "rollout_batch_size": 2,
            "n_samples_per_prompt": 2,
            "rollout_max_response_len": 6,
        },
        "reward": {"rm_type": "math"},
        "engine": {"num_engines": 1, "local_engine_threads": 1},
        "train": {"lr": 1e-3, "micro_batch_size": 2},
        "storage": {"store": str(root / "store"), "scratch_dir": str(root / "scratch")},
    }
    path = root / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Client:  # a sync client bound to the test server, whatever the process's settings say
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: api})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return Client()


def _wait_for(
    what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
):
    try:
        return wait_until(check, what, timeout_s=timeout, interval_s=1.0, process=proc)
    except ProcessExited as err:
        raise AssertionError(f"{what}: the process exited with {err.returncode}:\n{_tail(log)}") from None
    except TimeoutError:
        raise AssertionError(f"{what}: not after {timeout:.0f} s\n{_tail(log)}") from None


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-4000:] if log and log.exists() else ""


def _stop_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGINT the serve process (its graceful stop); returns its descendants still alive afterwards
    (engines and trainers run in sessions of their own, so they are collected first)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(descendants, timeout=20)
    for p in alive:
        p.kill()
    return alive


def _processes_mentioning(folder: Path, timeout: float) -> list[psutil.Process]:
    """Processes whose command line names `folder` (the test's model and run store) still alive after
    `timeout`; they are killed, and returned for the assertion."""

    def mentioning():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and any(str(folder) in part for part in p.info["cmdline"] or []):
                found.append(p)
        return found

    _, alive = psutil.wait_procs(mentioning(), timeout=timeout)
    for p in alive:
        p.kill()
    return alive


def _runs_of(client, deployment) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    )


def _deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_served_train_deployment_runs_an_override_to_completion(prefect_server, campaign_file, tmp_path):
    from deployments.serve import deployment_name

    env = prefect_env(prefect_server, tmp_path / "prefect-home")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("slime-wf")),
                "serve-deployments",
                "--config",
                str(campaign_file),
                "--set",
                "train.seed=3",
                "--cron",
                CRON,
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    leftovers: list[psutil.Process] = []
    try:
        with _client(prefect_server) as client:
            deployments = _wait_for(
                "serve-deployments registers train, prepare and evaluate",
                lambda: (
                    all(d := [_deployment(client, f"{f}/{deployment_name(f, 'served')}") for f in FLOWS])
                    and d
                ),
                timeout=240,
                proc=serve,
                log=log,
            )
            train, prepare, evaluate = deployments
            defaults = CampaignConfig.model_validate(train.parameters["config"])
            assert defaults == CampaignConfig.from_yaml(str(campaign_file), ["train.seed=3"])
            assert [s.schedule.cron for s in train.schedules] == [CRON]
            assert prepare.schedules == [] and evaluate.schedules == []
            assert prepare.parameters == evaluate.parameters == train.parameters
            # one run of a campaign at a time: two would write the same run store
            assert [d.global_concurrency_limit.limit for d in deployments] == [1, 1, 1]
            # the schedule is live on a real server: its scheduler creates the upcoming runs
            upcoming = _wait_for(
                "the scheduler creates runs of the cron schedule",
                lambda: [r for r in _runs_of(client, train) if r.state_type.value == "SCHEDULED"],
                timeout=60,
                proc=serve,
                log=log,
            )
            assert upcoming[0].expected_start_time.month == 1 and upcoming[0].expected_start_time.day == 1

        # a run with a changed setting, the way the README says: the whole config as the `config` parameter
        params = subprocess.run(
            [
                sys.executable,
                "-m",
                "deployments.params",
                "--config",
                str(campaign_file),
                "--set",
                "train.seed=3",
                "--set",
                "num_rollout=1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        triggered = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "deployment",
                "run",
                "train/served-run-or-resume",
                "--params",
                "-",
            ],
            input=params,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        override = json.loads(params)["config"]

        with _client(prefect_server) as client:

            def finished():
                runs = [r for r in _runs_of(client, train) if r.state_type.value != "SCHEDULED"]
                return runs if runs and runs[0].state.is_final() else None

            (run,) = _wait_for("the triggered train run finishes", finished, timeout=420, proc=serve, log=log)
            assert run.state.is_completed(), f"{run.state}\n{_tail(log)}"
            assert run.parameters["config"]["rollout"]["num_rollout"] == 1
            assert run.name == "served@0" and "campaign:served" in run.tags
            keys = {a.key for a in client.read_artifacts()}
            assert {"served-rollout-000000-metrics", "served-curves", "served-progress"} <= keys, keys

        cfg = CampaignConfig.model_validate(override)
        store = RunStore.for_campaign(cfg)
        manifest = store.read_manifest()
        assert manifest["last_completed_rollout_id"] == 0 and manifest["num_rollout"] == 1
        assert store.exists(RunStore.rollout_file(0, "metrics.json"))
        for task in ("generate_rollout", "train_step", "sync_weights", "finish_rollout"):  # Prefect's results
            assert store.exists(f"prefect/rollout-000000-{task}.json"), task
        assert not store.exists(RunStore.rollout_file(1, "samples.jsonl"))  # the default, 2, did not apply
        assert (
            CampaignConfig.from_dict(yaml.safe_load(store.read_text(RunStore.CONFIG))).rollout.num_rollout
            == 1
        )
    finally:
        leftovers = _stop_tree(serve)
    assert serve.returncode is not None
    # engines and trainers run in sessions of their own: an orphan would no longer be a descendant
    leftovers += _processes_mentioning(campaign_file.parent, timeout=20)
    assert not leftovers, f"processes left running after serve-deployments stopped: {leftovers}"
    with _client(prefect_server) as client:
        assert client.read_deployment_by_name("train/served-run-or-resume").paused  # stopping serve pauses it


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prefect_yaml_deploys_to_a_process_work_pool(prefect_server, tmp_path):
    env = prefect_env(prefect_server, tmp_path / "prefect-home")

    def prefect(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    from deployments.serve import deployment_name

    prefect("work-pool", "create", "slime-wf", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML.relative_to(REPO)))
    example = CampaignConfig.from_yaml(str(EXAMPLE))
    with _client(prefect_server) as client:
        for flow in FLOWS:
            d = client.read_deployment_by_name(f"{flow}/{deployment_name(flow, example.campaign)}")
            assert d.work_pool_name == "slime-wf" and d.entrypoint == f"flows/campaign.py:{flow}"
            assert CampaignConfig.model_validate(d.parameters["config"]) == example
            # runs go to the directory deployed from, where the campaign's relative paths resolve
            (step,) = d.pull_steps
            assert Path(step["prefect.deployments.steps.set_working_directory"]["directory"]) == REPO
        train = client.read_deployment_by_name(f"train/{example.campaign}-run-or-resume")
        assert [(s.schedule.cron, s.active) for s in train.schedules] == [("0 3 * * *", False)]
