"""Plugin files written exactly as slime's users write them (`from slime.utils.types import Sample`,
`from slime.rollout.sglang_rollout import GenerateState`, `from slime.utils.http_utils import post`),
loaded by dotted path and run in a short campaign: a custom reward, a dynamic filter returning
slime's DynamicFilterOutput with a tensor `keep`, a buffer filter, and a multi-turn generate function."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

from slime_wf.campaign import Campaign
from slime_wf.config import CampaignConfig
from slime_wf.store import RunStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore::DeprecationWarning:megatron.*",
        "ignore::DeprecationWarning:torch.*",
        "ignore::FutureWarning:torch.*",
        "ignore::FutureWarning:megatron.*",
    ),
]

ROOT = Path(__file__).resolve().parents[2]

PLUGINS = """
import asyncio
import json
import os

import torch

from slime.rollout.base_types import RolloutFnTrainOutput
from slime.rollout.data_source import pop_first
from slime.rollout.filter_hub.base_types import DynamicFilterOutput
from slime.rollout.rm_hub import grade_answer_verl
from slime.rollout.sglang_rollout import GenerateState, abort, generate
from slime.utils.async_utils import run
from slime.utils.http_utils import get, post
from slime.utils.types import Sample


def _log(**record):
    with open(os.environ["SLIME_PLUGIN_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")


async def reward_func(args, sample, **kwargs):
    if not isinstance(sample, Sample):
        raise TypeError("Sample must be an instance of Sample class.")
    return 1.0 if grade_answer_verl(sample.response, sample.label) else float(sample.response_length % 2)


def keep_all_filter(args, samples, **kwargs):
    rewards = [sample.get_reward_value(args) for sample in samples]
    for sample in samples:
        sample.metadata["filtered"] = True
    keep = torch.tensor(rewards, dtype=torch.float64).std() >= 0
    return DynamicFilterOutput(keep=keep, reason=None)


def buffer_filter(args, rollout_id, buffer, num_samples):
    _log(kind="buffer_filter", rollout_id=rollout_id, buffered=len(buffer), asked=num_samples,
         samples=all(isinstance(s, Sample) for group in buffer for s in group))
    groups = pop_first(args, rollout_id, buffer, num_samples)
    for group in groups:
        for sample in group:
            sample.metadata["buffer_filter_rollout"] = rollout_id
    return groups


async def multi_turn_generate(args, sample: Sample, sampling_params) -> Sample:
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    # a buffered partial sample starts over
    sample.tokens, sample.response, sample.response_length = [], "", 0
    sample.loss_mask, sample.rollout_log_probs = None, None
    sample.status = Sample.Status.PENDING

    sample = await generate(args, sample, sampling_params)  # the first turn: slime's generate
    if sample.status == Sample.Status.ABORTED:
        return sample
    observation = "<|im_end|>\\n<|im_start|>user\\nthe answer is 7<|im_end|>\\n<|im_start|>assistant\\n"
    observation_ids = state.tokenizer(observation, add_special_tokens=False)["input_ids"]
    sample.append_response_tokens(args, tokens=observation_ids, trainable=False, text=observation)

    payload = {"input_ids": sample.tokens, "sampling_params": sampling_params, "return_logprob": True}
    output = await post(url, payload)  # the second turn: straight to the router address
    if output["meta_info"]["finish_reason"]["type"] == "abort":
        sample.status = Sample.Status.ABORTED
        return sample
    pairs = output["meta_info"]["output_token_logprobs"]
    sample.append_response_tokens(
        args,
        tokens=[item[1] for item in pairs],
        log_probs=[item[0] for item in pairs],
        trainable=True,
        meta_info=output["meta_info"],
        text=output["text"],
    )
    sample.metadata["observation_tokens"] = len(observation_ids)
    return sample


def custom_rollout(args, rollout_id, data_source, evaluation=False):
    return run(_custom_rollout_async(args, rollout_id, data_source))


async def _custom_rollout_async(args, rollout_id, data_source):
    state = GenerateState(args)
    state.submit_generate_tasks(data_source.get_samples(args.rollout_batch_size))
    data = []
    while state.pendings:
        done, state.pendings = await asyncio.wait(state.pendings, return_when=asyncio.FIRST_COMPLETED)
        data += [task.result() for task in done]
    assert await abort(args, rollout_id) == []
    state.reset()
    data.sort(key=lambda group: group[0].index)
    workers = await get(f"http://{args.sglang_router_ip}:{args.sglang_router_port}/workers")
    return RolloutFnTrainOutput(
        samples=data, metrics={"custom/groups": len(data), "custom/workers": len(workers["workers"])}
    )
"""


def _make_assets_module():
    spec = importlib.util.spec_from_file_location(
        "tiny_math_make_assets", ROOT / "examples/tiny-math/make_assets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    ma = _make_assets_module()
    out = tmp_path_factory.mktemp("slime-plugins")
    settings = ma.Settings()
    ma.build_tokenizer(out / "tokenizer")
    train, _test = ma.make_problems(settings)
    ma.write_jsonl(out / "train.jsonl", train)
    ma.make_base_model(out / "model", out / "tokenizer", settings)
    (out / "my_slime_plugins.py").write_text(textwrap.dedent(PLUGINS))
    return out


def _config(assets, tmp_path, **sections):
    cfg = {
        "campaign": "slime-plugins",
        "model": {"hf_checkpoint": str(assets / "model"), "cache_dir": str(tmp_path / "cache")},
        "data": {"prompt_data": str(assets / "train.jsonl"), "apply_chat_template": True},
        "engine": {"num_engines": 1, "local_engine_threads": 1},
        "train": {"lr": 1e-3, "micro_batch_size": 4},
        "storage": {"store": str(tmp_path / "store"), "scratch_dir": str(tmp_path / "scratch")},
    }
    return CampaignConfig.from_dict(cfg | sections)


def test_slime_plugin_files_run_unchanged_in_a_campaign(assets, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(assets))
    log = tmp_path / "plugins.log"
    monkeypatch.setenv("SLIME_PLUGIN_LOG", str(log))
    cfg = CampaignConfig.from_dict(
        {
            "campaign": "slime-plugins",
            "model": {"hf_checkpoint": str(assets / "model"), "cache_dir": str(tmp_path / "cache")},
            "data": {"prompt_data": str(assets / "train.jsonl"), "apply_chat_template": True},
            "rollout": {
                "num_rollout": 2,
                "rollout_batch_size": 2,
                "n_samples_per_prompt": 2,
                "over_sampling_batch_size": 4,  # two groups more than a batch: they wait in the buffer
                "partial_rollout": True,
                "rollout_max_response_len": 6,
                "custom_generate_function_path": "my_slime_plugins.multi_turn_generate",
            },
            "reward": {"custom_rm_path": "my_slime_plugins.reward_func"},
            "filter": {"dynamic_sampling_filter_path": "my_slime_plugins.keep_all_filter"},
            "buffer": {"buffer_filter_path": "my_slime_plugins.buffer_filter"},
            "engine": {"num_engines": 1, "local_engine_threads": 1},
            "train": {"lr": 1e-3, "micro_batch_size": 4},
            "storage": {"store": str(tmp_path / "store"), "scratch_dir": str(tmp_path / "scratch")},
        }
    )
    with Campaign(cfg) as campaign:
        manifest = campaign.run()
    assert manifest["last_completed_rollout_id"] == 1
    store = RunStore.for_campaign(cfg)

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(c["kind"] == "buffer_filter" and c["rollout_id"] == 1 and c["buffered"] > 0 for c in calls), (
        calls
    )
    assert all(c["samples"] for c in calls)
    trained = [s for rid in (0, 1) for s in store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl"))]
    assert trained and all(s["metadata"]["filtered"] for s in trained)
    from_buffer = [s for s in trained if s["metadata"].get("buffer_filter_rollout") == 1]
    ledger = store.read_json(RunStore.rollout_file(1, "ledger.json"))
    assert len(from_buffer) == 2 * len(set(ledger["from_buffer"]) & set(ledger["trained"]))
    for s in trained:
        n, obs = s["response_length"], s["metadata"]["observation_tokens"]
        assert len(s["loss_mask"]) == len(s["rollout_log_probs"]) == n
        assert s["loss_mask"].count(0) == obs  # the observation, and only it, carries no loss
        first = s["loss_mask"].index(0)
        assert s["loss_mask"][first : first + obs] == [0] * obs
        assert s["rollout_log_probs"][first : first + obs] == [0.0] * obs
        assert s["reward"] in (0.0, 1.0)
    metrics = store.read_json(RunStore.rollout_file(0, "metrics.json"))
    diff = next(v for k, v in metrics.items() if k.endswith("rollout_logprob_abs_diff"))
    assert diff < 1e-3


def test_a_slime_rollout_function_drives_the_campaign_engines(assets, tmp_path, monkeypatch):
    """slime's custom rollout function shape: synchronous, `run(...)` over GenerateState's
    submit_generate_tasks, generate_and_rm_group and abort, returning RolloutFnTrainOutput."""
    monkeypatch.syspath_prepend(str(assets))
    cfg = _config(
        assets,
        tmp_path,
        rollout={
            "num_rollout": 1,
            "rollout_batch_size": 2,
            "n_samples_per_prompt": 2,
            "rollout_max_response_len": 6,
            "rollout_function_path": "my_slime_plugins.custom_rollout",
        },
        reward={"custom_rm_path": "my_slime_plugins.reward_func"},
    )
    with Campaign(cfg) as campaign:
        assert campaign.run()["last_completed_rollout_id"] == 0
    store = RunStore.for_campaign(cfg)
    samples = store.read_jsonl(RunStore.rollout_file(0, "samples.jsonl"))
    assert len(samples) == 4
    assert all(s["session_id"] and s["reward"] in (0.0, 1.0) and s["response_length"] > 0 for s in samples)
    metrics = store.read_json(RunStore.rollout_file(0, "metrics.json"))
    assert (metrics["custom/groups"], metrics["custom/workers"]) == (2, 1)
