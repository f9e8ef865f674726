"""The rollout loop against real local engine servers: dynamic sampling, partial rollout, faults, router."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import threading
import urllib.request

import pytest
from helpers.tiny_models import make_tiny_model

from slime_wf.config import CampaignConfig
from slime_wf.engine_server.schema import (
    schema_available,
    validate_generate_request,
    validate_generate_response,
)
from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer
from slime_wf.rollout.dataset import load_tokenizer
from slime_wf.rollout.engine_client import EngineBusy, EngineError, EngineSession
from slime_wf.rollout.engines import EngineFleet, EngineStartError
from slime_wf.rollout.filter_hub import DynamicFilterOutput
from slime_wf.rollout.generate import (
    MAX_ENGINE_ABORT_RETRIES,
    RolloutContext,
    current_context,
    generate,
    rollout_context,
    sampling_params_from_args,
)
from slime_wf.rollout.rollout import check_ledger, generate_rollout, generate_rollout_async
from slime_wf.servers import free_port, wait_until
from slime_wf.types import Sample

pytestmark = pytest.mark.slow

FILTER = "slime_wf.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"


async def word_reward(args, sample):
    """A toy reward with spread: the share of response words that are numbers words."""
    words = sample.response.split()
    return sum(w in {"one", "two", "three", "yes"} for w in words) / max(1, len(words))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("rollout-model"), layers=2, hidden=64))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("rollout-data") / "prompts.jsonl"
    words = "one two three four five six seven eight nine ten".split()
    path.write_text(
        "".join(
            json.dumps({"prompt": f"what is {w} plus {w}", "label": i}) + "\n" for i, w in enumerate(words)
        )
    )
    return str(path)


def make_args(model_dir, prompts, *overrides):
    return CampaignConfig.from_dict(
        {
            "model": {"hf_checkpoint": model_dir},
            "data": {"prompt_data": prompts},
            "rollout": {
                "rollout_batch_size": 3,
                "n_samples_per_prompt": 4,
                "rollout_max_response_len": 24,
                "rollout_temperature": 1.0,
            },
            "reward": {"custom_rm_path": f"{__name__}.word_reward"},
            "engine": {"num_engines": 2, "local_engine_threads": 1},
        },
        list(overrides),
    ).args()


@pytest.fixture(scope="module")
def fleet(model_dir, prompts, tmp_path_factory):
    args = make_args(model_dir, prompts)
    with EngineFleet(args, model_dir, log_dir=str(tmp_path_factory.mktemp("logs"))) as fleet:
        yield fleet


@pytest.fixture
def sglang_contract(monkeypatch):
    """Every `/generate` body the rollout sends, and every answer, checked against SGLang's own schema;
    the list of checked requests comes back, one entry per prompt (a batched request, a group's fresh
    samples, answers a list), so a test can see that the check ran."""
    if not schema_available():
        pytest.skip("SGLang's schema (sglang --no-deps) is not installed")
    send = EngineSession.generate
    checked: list[dict] = []

    async def generate_checked(self, payload, *, timeout=None):
        validate_generate_request(payload)
        response, url = await send(self, payload, timeout=timeout)
        answers = response if isinstance(response, list) else [response]
        for answer in answers:
            validate_generate_response(answer)
        checked.extend([payload] * len(answers))
        return response, url

    monkeypatch.setattr(EngineSession, "generate", generate_checked)
    return checked


def test_rollout_with_dynamic_sampling(fleet, model_dir, prompts, sglang_contract):
    args = make_args(
        model_dir, prompts, "over_sampling_batch_size=5", f"dynamic_sampling_filter_path={FILTER}"
    )
    ds = RolloutDataSourceWithBuffer(args)
    out = generate_rollout(args, 0, ds, fleet)
    assert len(sglang_contract) >= 12  # every sample's request was checked
    assert len(out.groups) == 3 and all(len(g) == 4 for g in out.groups)
    check_ledger(out.ledger)
    assert out.ledger["trained"] == sorted(g[0].group_index for g in out.groups)
    for group in out.groups:
        rewards = [s.reward for s in group]
        assert max(rewards) - min(rewards) > 1e-6  # the filter kept only groups with spread
        for s in group:
            assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
            assert len(s.tokens) > s.response_length == len(s.loss_mask) == len(s.rollout_log_probs)
            assert s.weight_versions == ["0"] and all(lp <= 0 for lp in s.rollout_log_probs)
            if s.status == Sample.Status.TRUNCATED:
                assert s.response_length == 24
    # without partial rollout, whatever was still running is dropped as aborted
    assert out.ledger["to_buffer"] == [] and ds.get_buffer_length() == 0
    assert out.metrics["rollout/groups_drawn"] == len(out.ledger["drawn_new"]) >= 3
    assert 0 <= out.metrics["rollout/raw_reward"] <= 1 and out.metrics["rollout/tokens_per_s"] > 0


def test_partial_rollout_buffers_and_continues(fleet, model_dir, prompts):
    args = make_args(
        model_dir,
        prompts,
        "partial_rollout=true",
        "mask_offpolicy_in_partial_rollout=true",
        "over_sampling_batch_size=8",
        "rollout_batch_size=2",
        "rollout_max_response_len=40",
    )
    ds = RolloutDataSourceWithBuffer(args)
    first = generate_rollout(args, 0, ds, fleet)
    check_ledger(first.ledger)
    assert first.ledger["to_buffer"], "over-sampling 8 groups for 2 must leave groups to continue"
    assert ds.get_buffer_length() == len(first.ledger["to_buffer"])
    buffered = {g[0].group_index: [s.clone() for s in g] for g in ds.buffer}
    partial = [s for g in buffered.values() for s in g if s.status == Sample.Status.ABORTED]
    for s in partial:
        assert s.metadata["start_rollout_id"] == 0 and len(s.rollout_log_probs) == s.response_length

    second = generate_rollout(args, 1, ds, fleet)
    check_ledger(second.ledger)
    assert second.ledger["from_buffer"] == sorted(buffered)[: len(second.ledger["from_buffer"])]
    continued = 0
    for group in second.groups:
        before = buffered.get(group[0].group_index)
        if before is None:
            continue
        for old, new in zip(before, group, strict=True):
            # continued, not restarted: the old tokens and log-probs are a prefix of the new ones
            assert new.tokens[: len(old.tokens)] == old.tokens
            assert new.rollout_log_probs[: old.response_length] == old.rollout_log_probs
            if old.status == Sample.Status.ABORTED and old.response_length:
                continued += 1
                assert new.loss_mask[: old.response_length] == [0] * old.response_length  # off-policy masked
                assert new.response_length <= 40 and len(new.weight_versions) == 2
    if continued:
        assert second.metrics["rollout/offpolicy_token_fraction"] > 0


def test_filter_that_keeps_nothing_fails_clearly(fleet, model_dir, prompts):
    args = make_args(
        model_dir,
        prompts,
        "rollout_temperature=0",
        f"dynamic_sampling_filter_path={FILTER}",
        "max_groups_drawn_per_rollout=6",
        "rollout_max_response_len=4",
    )
    with pytest.raises(
        RuntimeError,
        match=r"drew 6 groups .* kept none of the 3 .*zero_std.*with_fallback.*"
        r"rollout_temperature.*max_groups_drawn_per_rollout",
    ):
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)


def keep_few_filter(args, samples, **kwargs):
    """Of every 6 groups: keeps one, lets one fill a short batch, rejects the other four outright."""
    slot = samples[0].group_index % 6
    if slot == 0:
        return DynamicFilterOutput(keep=True)
    return DynamicFilterOutput(
        keep=False, reason="fallback" if slot == 1 else "rejected", keep_when_insufficient=slot == 1
    )


def test_filter_that_keeps_too_little_trains_on_what_it_kept(fleet, model_dir, prompts, caplog):
    args = make_args(
        model_dir,
        prompts,
        f"dynamic_sampling_filter_path={__name__}.keep_few_filter",
        "over_sampling_batch_size=6",
        "max_groups_drawn_per_rollout=6",
    )
    ds = RolloutDataSourceWithBuffer(args)
    state = ds.state_dict()
    with caplog.at_level(logging.WARNING, logger="slime_wf.rollout.rollout"):
        out = generate_rollout(args, 0, ds, fleet)
    check_ledger(out.ledger)
    # group 0 kept, group 1 filled in (whether it finished early and was set aside, or late), 2-5 dropped
    assert out.ledger["trained"] == [0, 1] and [g[0].group_index for g in out.groups] == [0, 1]
    assert out.ledger["dropped"] == {"rejected": [2, 3, 4, 5]} and out.ledger["drawn_new"] == list(range(6))
    assert out.metrics["filter/shortfall_groups"] == 1 and out.metrics["filter/kept_groups"] == 2
    assert out.metrics["filter/drop_rejected"] == 4
    assert "kept only 2 of 3" in caplog.text and "'rejected': 4" in caplog.text
    assert all(s.reward is not None for g in out.groups for s in g)
    # a retry or resume of the same rollout, with the same policy, trains on the same groups again
    again = RolloutDataSourceWithBuffer(args)
    again.load_state_dict(state)
    assert generate_rollout(args, 0, again, fleet).ledger["trained"] == [0, 1]
    # and the next rollout goes on from where this one stopped
    assert generate_rollout(args, 1, ds, fleet).ledger["trained"] == [6, 7]


def _long_prompt_group(ds, tokenizer, context_length):
    """A group already drawn (so in the ledger as from_buffer) whose prompt exceeds the engine's context."""
    (group,) = ds.get_samples(1)
    prompt = "one " * (context_length + 10)
    assert len(tokenizer.encode(prompt, add_special_tokens=False)) > context_length
    for sample in group:
        sample.prompt, sample.tokens = prompt, []
    ds.add_samples([group])
    return group[0].group_index


def test_prompt_the_engine_rejects_drops_only_its_group(fleet, model_dir, prompts):
    args = make_args(model_dir, prompts)
    ds = RolloutDataSourceWithBuffer(args)
    bad = _long_prompt_group(ds, load_tokenizer(model_dir), context_length=512)
    out = generate_rollout(args, 0, ds, fleet)
    check_ledger(out.ledger)
    assert len(out.groups) == 3 and bad not in out.ledger["trained"]
    assert out.ledger["dropped"]["engine_rejected"] == [bad] and out.ledger["from_buffer"] == [bad]
    assert set(out.ledger["dropped"]) <= {
        "engine_rejected",
        "aborted",
        "surplus",
    }  # the others: not needed once 3 were kept
    assert out.metrics["rollout/request_rejected"] == 4  # every sample of the group was refused, once
    assert out.metrics["filter/drop_engine_rejected"] == 1


def test_unrequested_engine_abort_is_continued(fleet, model_dir, prompts):
    """Another client aborts everything on an engine while the rollout's requests run there."""
    args = make_args(model_dir, prompts, "rollout_max_response_len=200", "over_sampling_batch_size=6")
    aborted: list[str] = []
    stop = threading.Event()

    def abort_when_busy():
        async def main():
            async with fleet.session() as session:
                while not stop.is_set():
                    for url in fleet.urls:
                        client = session.client(url)
                        states = (await client._request("GET", "/server_info", timeout=30))[
                            "internal_states"
                        ][0]
                        if states["num_running_reqs"] > 0:
                            await client.abort(abort_all=True)
                            aborted.append(url)
                            return
                    await asyncio.sleep(0.01)

        asyncio.run(main())

    thread = threading.Thread(target=abort_when_busy, daemon=True)
    thread.start()
    try:
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)
    finally:
        stop.set()
        thread.join()
    assert aborted, "the rollout finished before any request was seen running"
    check_ledger(out.ledger)
    assert len(out.groups) == 3 and out.metrics["rollout/request_engine_aborts"] >= 1
    assert "engine_abort" not in out.ledger["dropped"]
    for s in (s for g in out.groups for s in g):
        assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and s.reward is not None
        assert len(s.tokens) > s.response_length == len(s.loss_mask) == len(s.rollout_log_probs)
        assert all(m == 1 for m in s.loss_mask)  # continued within the rollout: on-policy, nothing masked


def rollout_through(fleet, args, wrap):
    """Rollout 0 through `wrap(real_session, first_prompt_ids)`: a session in front of the real engines
    that misbehaves for the first prompt's requests."""
    tokenizer = load_tokenizer(args.hf_checkpoint)
    ds = RolloutDataSourceWithBuffer(args)
    first_prompt_ids = tokenizer.encode(ds.dataset.samples[0].prompt, add_special_tokens=False)

    async def run():
        async with fleet.session() as real:
            return await generate_rollout_async(args, 0, ds, wrap(real, first_prompt_ids), tokenizer)

    return asyncio.run(run())


class AbortingSession:
    """Real engines, except that every request for one prompt is aborted after one token, as an
    engine that keeps aborting a request would do."""

    def __init__(self, session, prompt_ids):
        self.session, self.prompt_ids = session, prompt_ids
        self.aborted_payloads: list[dict] = []

    async def generate(self, payload, *, timeout=None):
        if payload["input_ids"][: len(self.prompt_ids)] != self.prompt_ids:
            return await self.session.generate(payload, timeout=timeout)
        self.aborted_payloads.append(payload)
        one = {**payload, "sampling_params": {**payload["sampling_params"], "max_new_tokens": 1}}
        output, url = await self.session.generate(one, timeout=timeout)
        output["meta_info"]["finish_reason"] = {"type": "abort", "message": "Aborted"}
        return output, url

    async def abort_all(self):
        await self.session.abort_all()


class BatchAbortingSession(AbortingSession):
    """`AbortingSession` that takes a group's fresh samples in one batched request, as the real session
    does: the first prompt's items of a batch are aborted after one token, and so is every request that
    continues them."""

    takes_batches = True

    async def generate(self, payload, *, timeout=None):
        if not isinstance(payload["input_ids"][0], list):
            return await super().generate(payload, timeout=timeout)
        items = [
            {"input_ids": ids, "sampling_params": params, "rid": rid}
            for ids, params, rid in zip(
                *(payload[k] for k in ("input_ids", "sampling_params", "rid")), strict=True
            )
        ]
        mine = [item["input_ids"][: len(self.prompt_ids)] == self.prompt_ids for item in items]
        self.aborted_payloads += [item for item, m in zip(items, mine, strict=True) if m]
        params = [
            {**item["sampling_params"], "max_new_tokens": 1} if m else item["sampling_params"]
            for item, m in zip(items, mine, strict=True)
        ]
        outputs, url = await self.session.generate({**payload, "sampling_params": params}, timeout=timeout)
        for output, m in zip(outputs, mine, strict=True):
            if m:
                output["meta_info"]["finish_reason"] = {"type": "abort", "message": "Aborted"}
        return outputs, url


@pytest.mark.parametrize("session_type", [AbortingSession, BatchAbortingSession])
def test_engine_that_keeps_aborting_drops_the_group_as_engine_abort(fleet, model_dir, prompts, session_type):
    """Whether a group's samples go one request each or in one batched request, an engine abort is
    continued from the partial tokens, and a sample aborted 1 + MAX_ENGINE_ABORT_RETRIES times fails."""
    sessions = []
    out = rollout_through(
        fleet,
        make_args(model_dir, prompts),
        lambda real, ids: sessions.append(session_type(real, ids)) or sessions[-1],
    )
    payloads = sessions[0].aborted_payloads
    check_ledger(out.ledger)
    assert len(out.groups) == 3 and out.ledger["dropped"]["engine_abort"] == [0]
    assert set(out.ledger["dropped"]) <= {"engine_abort", "aborted", "surplus"}
    assert out.metrics["rollout/request_engine_aborts"] == 4 * (1 + MAX_ENGINE_ABORT_RETRIES)
    # each retry continued the sample from its partial tokens, with the budget that was left
    by_sample: dict = {}
    for payload in payloads:
        by_sample.setdefault(payload["rid"].split("-")[1], []).append(payload)
    assert len(by_sample) == 4
    for tries in by_sample.values():
        assert len(tries) == 1 + MAX_ENGINE_ABORT_RETRIES
        for before, after in itertools.pairwise(tries):
            assert (
                after["input_ids"][:-1] == before["input_ids"]
                and len(after["input_ids"]) == len(before["input_ids"]) + 1
            )
            assert (
                after["sampling_params"]["max_new_tokens"] == before["sampling_params"]["max_new_tokens"] - 1
            )


class FailingSession:
    """Real engines, except that one prompt's requests get `error` (after `passes` such answers
    the request goes through), as an engine that fails or stays busy for one request would answer."""

    def __init__(self, session, prompt_ids, error, passes=None):
        self.session, self.prompt_ids, self.error, self.passes = session, prompt_ids, error, passes
        self.failures = 0

    async def generate(self, payload, *, timeout=None):
        if payload["input_ids"][: len(self.prompt_ids)] == self.prompt_ids and (
            self.passes is None or self.failures < self.passes
        ):
            self.failures += 1
            raise self.error
        return await self.session.generate(payload, timeout=timeout)

    async def abort_all(self):
        await self.session.abort_all()


@pytest.mark.parametrize(
    ("error", "passes", "reason"),
    [
        (EngineError("POST /generate -> HTTP 500: engine error", 500), None, "engine_error"),
        (EngineError("POST /generate -> HTTP 500: engine error", 500), 2, None),  # a passing fault
        (EngineBusy("POST /generate -> HTTP 503: The request queue is full.", 503), None, "engine_busy"),
    ],
)
def test_a_request_the_engine_fails_or_cannot_take_drops_only_its_group(
    fleet, model_dir, prompts, error, passes, reason
):
    out = rollout_through(
        fleet, make_args(model_dir, prompts), lambda real, ids: FailingSession(real, ids, error, passes)
    )
    check_ledger(out.ledger)
    assert len(out.groups) == 3
    if reason is None:
        assert 0 in out.ledger["trained"] and out.metrics["rollout/request_engine_errors"] == 2
    else:
        assert out.ledger["dropped"][reason] == [0]


async def passes_aborts_on(args, sample, sampling_params):
    """A custom generate function that hands back an engine abort of group 0 instead of continuing it."""
    from slime_wf.rollout.generate import generate as default_generate

    sample = await default_generate(args, sample, sampling_params)
    if sample.group_index == 0:
        sample.status = Sample.Status.ABORTED
    return sample


def test_abort_from_a_custom_generate_function_never_reaches_the_filter(fleet, model_dir, prompts):
    args = make_args(
        model_dir,
        prompts,
        f"custom_generate_function_path={__name__}.passes_aborts_on",
        f"dynamic_sampling_filter_path={FILTER}",
    )
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)
    check_ledger(out.ledger)
    assert out.ledger["dropped"]["engine_abort"] == [0] and 0 not in out.ledger["trained"]
    assert all(s.reward is not None for g in out.groups for s in g)


def unrewarded_rollout(args, rollout_id, data_source, evaluation=False):
    groups = data_source.get_samples(args.rollout_batch_size)
    for s in groups[1]:
        s.response, s.status = "yes", Sample.Status.COMPLETED  # forgot the reward
    return groups


def test_custom_rollout_without_rewards_is_named(model_dir, prompts):
    args = make_args(model_dir, prompts, f"rollout_function_path={__name__}.unrewarded_rollout")
    with pytest.raises(
        ValueError, match=r"unrewarded_rollout returned samples without a reward \(index \[0, 1"
    ):
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), None)


def test_request_timeout_is_retried_once_then_failed(fleet, model_dir, prompts):
    args = make_args(model_dir, prompts, "rollout_request_timeout=0.001", "rollout_max_response_len=200")
    from transformers import AutoTokenizer

    async def run():
        async with fleet.session() as session:
            ctx = RolloutContext(
                args=args, session=session, tokenizer=AutoTokenizer.from_pretrained(model_dir), rollout_id=0
            )
            with rollout_context(ctx):
                sample = await generate(
                    args, Sample(index=0, prompt="what is one plus one"), sampling_params_from_args(args)
                )
            return sample, ctx

    sample, ctx = asyncio.run(run())
    assert sample.status == Sample.Status.FAILED and "timed out" in sample.metadata["failure"]
    assert ctx.counters["request_timeouts"] == 2


def test_unreachable_engine_is_named(model_dir, prompts, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    args = make_args(model_dir, prompts, f"engine_urls=['{url}']")
    with pytest.raises(EngineStartError, match=f"engine {url} .* unreachable"):
        EngineFleet(args, model_dir, log_dir=str(tmp_path)).start()


def test_engine_that_fails_to_start_shows_its_log(prompts, tmp_path):
    args = make_args(str(tmp_path / "no-model"), prompts, "num_engines=1", "engine_startup_timeout=60")
    with pytest.raises(EngineStartError, match="exited with code"):
        EngineFleet(args, str(tmp_path / "no-model"), log_dir=str(tmp_path)).start()


def test_router_in_front_of_two_engines(fleet, model_dir, prompts, tmp_path, monkeypatch, sglang_contract):
    monkeypatch.setenv("ROLLOUT_TEST_ENGINE_KEY", fleet.api_key)  # attached engines: their key comes by name
    args = make_args(
        model_dir,
        prompts,
        f"engine_urls={fleet.urls}",
        "use_router=true",
        "engine_api_key_env=ROLLOUT_TEST_ENGINE_KEY",
    )
    with EngineFleet(args, model_dir, log_dir=str(tmp_path)) as routed:
        assert routed.router_url is not None
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), routed)
        assert sglang_contract
        assert len(out.groups) == 3
        check_ledger(out.ledger)

        async def control():
            async with routed.session() as session:
                await session.abort_all()  # control calls go to each engine, not the router
                infos = await session.for_each_engine(lambda c: c.model_info())
                return infos

        assert len(asyncio.run(control())) == 2


def test_dead_engine_is_restarted_and_the_rollout_completes(fleet, model_dir, prompts):
    args = make_args(model_dir, prompts, "rollout_max_response_len=200", "over_sampling_batch_size=6")
    victim = fleet.engines[0]
    ds = RolloutDataSourceWithBuffer(args)

    def victim_busy() -> bool:
        try:
            request = urllib.request.Request(
                victim.url + "/get_server_info", headers={"Authorization": f"Bearer {fleet.api_key}"}
            )
            with urllib.request.urlopen(request, timeout=2) as r:
                states = json.load(r)["internal_states"][0]
        except OSError:
            return False
        return states["num_running_reqs"] + states["num_waiting_reqs"] > 0

    def killer():
        # mid-generation on the victim: it holds requests that the rollout must retry elsewhere
        with contextlib.suppress(TimeoutError):
            wait_until(victim_busy, "requests on the victim engine", timeout_s=30, interval_s=0.02)
        os.killpg(victim.process.pid, signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    out = generate_rollout(args, 0, ds, fleet)
    check_ledger(out.ledger)
    assert len(out.groups) == 3
    assert victim.restarts == 1 and fleet.check_health()[victim.url]
    assert out.metrics.get("rollout/request_retries_engine_down", 0) >= 1


async def echo_generate(args, sample, sampling_params):
    """A custom generate function (slime's signature) that wraps the default one and tags the sample."""
    from slime_wf.rollout.generate import generate as default_generate

    sample = await default_generate(args, sample, sampling_params)
    sample.metadata["custom_generate"] = sampling_params["max_new_tokens"]
    return sample


def fixed_rollout(args, rollout_id, data_source, evaluation=False):
    """A custom rollout function (slime's signature): groups straight from the data source, rewarded 1."""
    groups = data_source.get_samples(args.rollout_batch_size)
    for group in groups:
        for s in group:
            s.response, s.reward, s.status = "yes", 1.0, Sample.Status.COMPLETED
    return groups


def test_custom_generate_function(fleet, model_dir, prompts):
    args = make_args(model_dir, prompts, f"custom_generate_function_path={__name__}.echo_generate")
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)
    assert all(s.metadata["custom_generate"] == 24 and s.response_length > 0 for g in out.groups for s in g)


def test_custom_rollout_function(fleet, model_dir, prompts):
    args = make_args(model_dir, prompts, f"rollout_function_path={__name__}.fixed_rollout")
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)
    assert len(out.groups) == 3 and out.ledger["trained"] == [0, 1, 2]
    assert out.metrics["rollout/raw_reward"] == 1.0


def test_evaluation_per_dataset(fleet, model_dir, prompts):
    from transformers import AutoTokenizer

    from slime_wf.rollout.evaluation import evaluate

    args = make_args(
        model_dir,
        prompts,
        f"eval.eval_datasets=[{{name: greedy, path: '{prompts}', n_samples_per_eval_prompt: 1, max_response_len: 6}},"
        f" {{name: sampled, path: '{prompts}', n_samples_per_eval_prompt: 2, temperature: 1.0}}]",
    )
    metrics = evaluate(args, 0, fleet, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    for name in ("greedy", "sampled"):
        assert 0.0 <= metrics[f"eval/{name}/reward"] <= 1.0
        assert metrics[f"eval/{name}/failed"] == 0
    assert metrics["eval/greedy/response_len/mean"] <= 6
    # greedy decoding is deterministic: a second evaluation gives the same reward
    again = evaluate(args, 1, fleet, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    assert again["eval/greedy/reward"] == metrics["eval/greedy/reward"]


EVALUATION_CALLS: list[bool] = []


async def generate_told_if_evaluating(args, sample, sampling_params, evaluation=False):
    """A custom generate function with slime's optional `evaluation` argument."""
    from slime_wf.rollout.generate import generate as default_generate

    EVALUATION_CALLS.append(evaluation)
    return await default_generate(args, sample, sampling_params)


def test_evaluation_runs_the_campaigns_generate_function(fleet, model_dir, prompts):
    """As slime's eval_rollout: a multi-turn or tool generate function evaluates as it rolls out, told so."""
    from transformers import AutoTokenizer

    from slime_wf.rollout.evaluation import evaluate

    args = make_args(
        model_dir,
        prompts,
        f"custom_generate_function_path={__name__}.generate_told_if_evaluating",
        f"eval.eval_datasets=[{{name: greedy, path: '{prompts}', max_response_len: 4}}]",
    )
    EVALUATION_CALLS.clear()
    metrics = evaluate(args, 0, fleet, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    assert metrics["eval/greedy/failed"] == 0
    assert EVALUATION_CALLS and all(EVALUATION_CALLS)
    EVALUATION_CALLS.clear()
    generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)
    assert EVALUATION_CALLS and not any(EVALUATION_CALLS)


def test_rollout_and_evaluation_leave_no_context_behind(fleet, model_dir, prompts):
    """The rollout context and the reward hub that a rollout or an evaluation sets for its tasks are reset
    when it returns; the campaign's hub it was given stays open."""
    from slime_wf.rollout import rm_hub
    from slime_wf.rollout.evaluation import evaluate_async

    args = make_args(
        model_dir,
        prompts,
        "rollout_max_response_len=4",
        f"eval.eval_datasets=[{{name: e, path: '{prompts}', n_samples_per_eval_prompt: 1}}]",
    )
    tokenizer = load_tokenizer(model_dir)

    async def run():
        async with fleet.session() as session, rm_hub.RewardHub() as hub:
            for step in (
                generate_rollout_async(
                    args, 0, RolloutDataSourceWithBuffer(args), session, tokenizer, reward_hub=hub
                ),
                evaluate_async(args, 0, session, tokenizer, reward_hub=hub),
            ):
                await step
                with pytest.raises(RuntimeError, match="no engine context"):
                    current_context()
                with pytest.raises(RuntimeError, match="no reward hub"):
                    await rm_hub.async_rm(args, Sample(index=0, response="one", label="1"))
            assert not hub.closed

    asyncio.run(run())


def test_evaluation_refuses_prompts_over_the_engines_context(fleet, model_dir, prompts):
    """An eval prompt the engines would refuse (prompt plus max_response_len over the 512-token context) is a
    bad row named at load, as in the training data."""
    from transformers import AutoTokenizer

    from slime_wf.rollout.dataset import DataError
    from slime_wf.rollout.evaluation import evaluate

    args = make_args(
        model_dir, prompts, f"eval.eval_datasets=[{{name: long, path: '{prompts}', max_response_len: 510}}]"
    )
    with pytest.raises(DataError, match=r"prompts.jsonl:1: .*over the engine's context length of 512"):
        evaluate(args, 0, fleet, tokenizer=AutoTokenizer.from_pretrained(model_dir))


def _real_sglang_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import sglang.srt.entrypoints.http_server  # noqa: F401  (the runtime, not just the schema)
    except Exception:
        return False
    return True


@pytest.mark.skipif(
    not _real_sglang_available(),
    reason="real SGLang needs the sglang package with its runtime and a CUDA GPU; the local engine covers the API here",
)
def test_real_sglang_server_launch(model_dir, prompts, tmp_path, sglang_contract):
    args = make_args(
        model_dir, prompts, "engine_type=sglang", "num_engines=1", "sglang_mem_fraction_static=0.3"
    )
    with EngineFleet(args, model_dir, log_dir=str(tmp_path)) as fleet:
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args), fleet)
        assert sglang_contract
        assert len(out.groups) == 3


class CountingScorer:
    """Scores inline and records each wave's group indices; `wave_wait_s` as an orchestrator's scorer sets it."""

    def __init__(self, wave_wait_s: float):
        self.wave_wait_s = wave_wait_s
        self.waves: list[list[int]] = []

    async def __call__(self, rollout_id, wave, group_indices, score):
        self.waves.append(list(group_indices))
        return await score()


@pytest.mark.parametrize(
    "overrides", [(), ("over_sampling_batch_size=5", f"dynamic_sampling_filter_path={FILTER}")]
)
def test_a_scorer_with_a_wave_wait_gets_the_groups_in_few_waves(fleet, model_dir, prompts, overrides):
    """A scorer whose waves cost something of their own (a task run) asks the loop to wait for groups to
    join a wave. However long it asks, the loop starts a wave once the waiting groups could fill the batch
    or nothing else is generating, so the rollout completes; without a filter that is one wave."""
    args = make_args(model_dir, prompts, *overrides)
    tokenizer = load_tokenizer(args.hf_checkpoint)
    ds = RolloutDataSourceWithBuffer(args)
    scorer = CountingScorer(wave_wait_s=1e6)

    async def run():
        async with fleet.session() as session:
            return await generate_rollout_async(args, 0, ds, session, tokenizer, scorer=scorer)

    out = asyncio.run(run())
    check_ledger(out.ledger)
    assert len(out.groups) == args.rollout_batch_size
    scored = [gi for wave in scorer.waves for gi in wave]
    assert len(scored) == len(set(scored)) and set(out.ledger["trained"]) <= set(scored)
    if not overrides:
        assert len(scorer.waves) == 1 and len(scorer.waves[0]) == args.rollout_batch_size
