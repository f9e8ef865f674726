"""Reward entry points: dispatch, custom functions, time limits, the worker pool, cache, remote_rm."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
from helpers.campaign_killer import wait_until

from slime_wf.rollout.rm_hub import (
    GraderPool,
    RewardError,
    RewardHub,
    async_rm,
    batched_async_rm,
    rules,
    using_hub,
)
from slime_wf.rollout.rm_hub.deepscaler import get_deepscaler_rule_based_reward
from slime_wf.rollout.rm_hub.f1 import f1_score
from slime_wf.rollout.rm_hub.math_dapo_utils import compute_score
from slime_wf.rollout.rm_hub.math_utils import extract_answer, grade_answer_verl
from slime_wf.types import Sample

PLUGINS = """
import asyncio

CALLS = []
EVENTS = []

async def constant(args, sample, **kwargs):
    return 0.25

async def by_index(args, sample, **kwargs):
    return float(sample.index)

async def with_kwargs(args, sample, **kwargs):
    return {"score": 1.0, "kw": sorted(kwargs)}

async def hang_on_two(args, sample, **kwargs):
    if sample.index == 2:
        EVENTS.append("2 started")
        try:
            await asyncio.sleep(3600)
        finally:
            EVENTS.append("2 abandoned")
    await asyncio.sleep(0)  # the others finish after the hanging one has started
    EVENTS.append(f"{sample.index} done")
    return 1.0

async def raise_on_three(args, sample, **kwargs):
    if sample.index == 3:
        raise ValueError("cannot grade this one")
    return 1.0

async def returns_text(args, sample, **kwargs):
    return "one"

async def group_rank(args, samples, **kwargs):
    CALLS.append([s.index for s in samples])
    return [float(i) / len(samples) for i in range(len(samples))]

async def group_too_short(args, samples, **kwargs):
    return [1.0]

def sync_marks(args, sample):
    sample.metadata["graded_in"] = "worker"
    return 2.0

def sync_spin(args, sample):
    if sample.index == 1:
        while True:
            pass
    return 3.0

def sync_raise(args, sample):
    raise RuntimeError("sync grader broke")

def sync_exit(args, sample):
    if sample.index == 0:
        import os
        os._exit(3)
    return 4.0

NON_FINITE = [1.0, float("nan"), float("inf"), float("-inf")]

async def non_finite(args, sample, **kwargs):
    return NON_FINITE[sample.index]

def sync_non_finite(args, sample):
    return NON_FINITE[sample.index]

async def dict_non_finite(args, sample, **kwargs):
    return {"score": NON_FINITE[sample.index], "acc": sample.index == 0}

async def group_non_finite(args, samples, **kwargs):
    return [NON_FINITE[s.index] for s in samples]

async def blocks_loop(args, sample, **kwargs):
    # 1.2 s of work that never yields, on the test loop's clock (ClockLoop): the loop runs nothing meanwhile
    asyncio.get_running_loop().work(1.2)
    return 5.0
"""


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_plugins")
    (root / "rm_test_plugins.py").write_text(PLUGINS)
    sys.path.insert(0, str(root))
    yield "rm_test_plugins"
    sys.path.remove(str(root))
    sys.modules.pop("rm_test_plugins", None)


def make_args(**overrides):
    base = dict(
        rm_type=None,
        reward_key=None,
        custom_rm_path=None,
        group_rm=False,
        rm_url=None,
        rm_timeout=60.0,
        rm_failure_reward=-7.0,
        rm_on_error="raise",
        rm_workers=None,
    )
    base.update(overrides)
    return argparse.Namespace(**base)


def run(coro):
    return asyncio.run(coro)


async def with_hub(fn, workers: int = 1, **hub_kwargs):
    async with RewardHub(num_workers=workers, **hub_kwargs) as hub:
        return await fn(hub)


# ---- dispatch ------------------------------------------------------------------------------

RESPONSES = [
    ("<think>let me see</think> so \\boxed{\\frac{1}{2}}", "0.5"),
    ("<think>hmm</think> the answer is \\boxed{3}", "4"),
    ("no think tags \\boxed{7}", "7"),
    ("reasoning\nAnswer: 12", "12"),
    ("the eiffel tower is in paris", "eiffel tower"),
]


def direct(rm_type, response, label):
    return {
        "deepscaler": lambda: get_deepscaler_rule_based_reward(response, label),
        "math": lambda: 1 if grade_answer_verl(response, label) else 0,
        "dapo": lambda: compute_score(response, label),
        "f1": lambda: f1_score(response, label)[0],
    }[rm_type]()


def test_dispatch_matches_each_grader_called_directly():
    async def body(hub):
        out = {}
        for rm_type in ("deepscaler", "math", "dapo", "f1"):
            labels = [lab if rm_type != "dapo" else "12" for _, lab in RESPONSES]
            samples = [
                Sample(index=i, response=r, label=lab)
                for i, ((r, _), lab) in enumerate(zip(RESPONSES, labels, strict=True))
            ]
            out[rm_type] = (await hub.batched_async_rm(make_args(rm_type=rm_type), samples), samples)
        return out

    for rm_type, (rewards, samples) in run(with_hub(body)).items():
        assert rewards == [direct(rm_type, s.response, s.label) for s in samples], rm_type
    # the cases above are not all-wrong: the comparison can fail
    assert (
        run(
            with_hub(
                lambda h: h.async_rm(make_args(rm_type="math"), Sample(response="\\boxed{1/2}", label="0.5"))
            )
        )
        == 1
    )


def test_math_verify_and_per_sample_rm_type_override():
    samples = [
        Sample(index=0, response="so $\\boxed{\\frac{1}{2}}$", label="0.5"),
        Sample(index=1, response="so $\\boxed{(x+1)^2}$", label="x^2+2x+1"),
        Sample(index=2, response="so $\\boxed{3}$", label="4"),
        Sample(
            index=3,
            response="it is the eiffel tower in paris",
            label="eiffel tower",
            metadata={"rm_type": "f1"},
        ),
    ]
    rewards = run(with_hub(lambda hub: hub.batched_async_rm(make_args(rm_type="math_verify"), samples)))
    assert rewards == [1, 1, 0, pytest.approx(0.5)]  # f1: precision 2/6, recall 1


def test_boxed_types_grade_only_the_last_box():
    args = make_args()

    def sample(response, label, rm_type):
        return Sample(index=0, response=response, label=label, metadata={"rm_type": rm_type})

    cases = [
        # the inner grader finds the boxed content although the response has no </think> or Answer:
        (sample("first \\boxed{5} then \\boxed{42}", "42", "boxed_math"), 1),
        (sample("no think tags here \\boxed{42}", "42", "boxed_deepscaler"), 1),
        (sample("no think tags here \\boxed{42}", "42", "deepscaler"), 0),
        (sample("the end \\boxed{42}", "42", "boxed_dapo"), {"score": 1.0, "acc": True, "pred": "42"}),
        (sample("junk words \\boxed{eiffel tower}", "the eiffel tower", "boxed_f1"), 1.0),
        (sample("no box at all: 42", "42", "boxed_math"), 0),
        (sample("no box at all: 42", "42", "boxed_dapo"), {"score": -1.0, "acc": False, "pred": "[INVALID]"}),
    ]
    rewards = run(with_hub(lambda hub: hub.batched_async_rm(args, [s for s, _ in cases])))
    assert rewards == [want for _, want in cases]


def test_bad_rm_type_and_missing_reward_model_name_the_sample():
    with pytest.raises(RewardError, match=r"index=4.*unknown rm_type 'maths'"):
        run(with_hub(lambda hub: hub.async_rm(make_args(), Sample(index=4, metadata={"rm_type": "maths"}))))
    with pytest.raises(RewardError, match=r"index=5: no reward model"):
        run(with_hub(lambda hub: hub.async_rm(make_args(), Sample(index=5))))


def test_calls_without_a_hub_use_the_rollouts_and_there_is_no_process_wide_one():
    args = make_args(rm_type="math")

    async def body(hub):
        with using_hub(hub):  # as the rollout loop does with the campaign's hub
            one = await async_rm(args, Sample(response="\\boxed{2}", label="2"))
            many = await batched_async_rm(args, [Sample(response="\\boxed{2}", label="3")])
        with pytest.raises(RuntimeError, match=r"no reward hub: outside a rollout, pass hub=RewardHub\(\)"):
            await async_rm(args, Sample(response="\\boxed{2}", label="2"))  # the block is over
        return one, many, hub.metrics()["rm/samples"]

    assert run(with_hub(body)) == (1, [0], 2.0)
    with pytest.raises(RuntimeError, match="no reward hub"):
        run(async_rm(args, Sample(response="\\boxed{2}", label="2")))


# ---- custom functions ------------------------------------------------------------------------


def test_custom_path_and_per_sample_override(plugins):
    args = make_args(rm_type="math", custom_rm_path=f"{plugins}.constant")
    samples = [
        Sample(index=0, response="\\boxed{1}", label="1"),
        Sample(index=1, custom_rm_path=f"{plugins}.by_index"),
    ]
    rewards = run(with_hub(lambda hub: hub.batched_async_rm(args, samples)))
    assert rewards == [0.25, 1.0]
    alone = run(with_hub(lambda hub: hub.async_rm(make_args(rm_type="math"), samples[1])))
    assert alone == 1.0
    kw = run(
        with_hub(
            lambda hub: hub.async_rm(make_args(custom_rm_path=f"{plugins}.with_kwargs"), samples[0], extra=1)
        )
    )
    assert kw == {"score": 1.0, "kw": ["extra"]}


def test_group_rm_calls_once_per_group(plugins):
    import rm_test_plugins

    rm_test_plugins.CALLS.clear()
    args = make_args(custom_rm_path=f"{plugins}.group_rank", group_rm=True)
    samples = [Sample(group_index=g, index=g * 4 + i) for g in range(2) for i in range(4)]
    rewards = run(with_hub(lambda hub: hub.batched_async_rm(args, samples)))
    assert sorted(rm_test_plugins.CALLS) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rewards == [0.0, 0.25, 0.5, 0.75] * 2
    with pytest.raises(RewardError, match="group_rm is on"):
        run(with_hub(lambda hub: hub.async_rm(args, samples[0])))
    short = make_args(custom_rm_path=f"{plugins}.group_too_short", group_rm=True)
    with pytest.raises(RewardError, match=r"index=\[0, 1, 2, 3\].*list of 4 rewards"):
        run(with_hub(lambda hub: hub.batched_async_rm(short, samples[:4])))


def test_hanging_custom_reward_does_not_stall_the_batch(plugins):
    import rm_test_plugins

    rm_test_plugins.EVENTS.clear()
    args = make_args(custom_rm_path=f"{plugins}.hang_on_two", rm_timeout=1.0)
    samples = [Sample(index=i) for i in range(5)]

    async def body(hub):
        rewards = await hub.batched_async_rm(args, samples)
        return rewards, hub.metrics()

    rewards, metrics = run(with_hub(body))
    assert rewards == [1.0, 1.0, -7.0, 1.0, 1.0]
    # the others were graded while the hanging call was running, and it was abandoned after them
    events = rm_test_plugins.EVENTS
    assert events[0] == "2 started" and events[-1] == "2 abandoned"
    assert sorted(events[1:-1]) == ["0 done", "1 done", "3 done", "4 done"]
    assert metrics["rm/timeouts"] == 1 and metrics["rm/failure_rewards"] == 1
    assert samples[2].metadata["rm_failure"].startswith("timeout")


def test_raising_custom_reward_raises_or_gives_failure_reward(plugins):
    path = f"{plugins}.raise_on_three"
    samples = [Sample(index=i) for i in range(5)]
    with pytest.raises(RewardError, match=rf"'{path}'.*index=3.*cannot grade this one"):
        run(with_hub(lambda hub: hub.batched_async_rm(make_args(custom_rm_path=path), samples)))

    async def lenient(hub):
        rewards = await hub.batched_async_rm(
            make_args(custom_rm_path=path, rm_on_error="failure_reward", reward_key="score"), samples
        )
        return rewards, hub.metrics()

    rewards, metrics = run(with_hub(lenient))
    assert rewards[3] == {"score": -7.0} and rewards[:3] == [1.0, 1.0, 1.0]
    assert metrics["rm/errors"] == 1
    assert "cannot grade this one" in samples[3].metadata["rm_failure"]
    with pytest.raises(RewardError, match="expected a number or a dict"):
        run(
            with_hub(
                lambda hub: hub.async_rm(make_args(custom_rm_path=f"{plugins}.returns_text"), samples[0])
            )
        )


def test_non_finite_rewards_get_the_failure_reward_and_are_counted(plugins):
    samples = [Sample(group_index=0, index=i) for i in range(4)]

    async def body(hub):
        out = {}
        for name, extra in [
            ("non_finite", {}),
            ("sync_non_finite", {}),
            ("group_non_finite", {"group_rm": True}),
            ("dict_non_finite", {"reward_key": "score"}),
        ]:
            for s in samples:
                s.metadata = {}
            args = make_args(custom_rm_path=f"{plugins}.{name}", **extra)
            rewards = await hub.batched_async_rm(args, samples)
            out[name] = rewards, [s.metadata.get("rm_failure") for s in samples], hub.metrics(reset=True)
        return out

    for name, (rewards, failures, metrics) in run(with_hub(body)).items():
        if name == "dict_non_finite":
            assert rewards == [{"score": 1.0, "acc": True}] + [{"score": -7.0}] * 3
        else:
            assert rewards == [1.0, -7.0, -7.0, -7.0], name
        assert failures[0] is None and all(f.startswith("non_finite") for f in failures[1:]), (name, failures)
        assert "nan" in failures[1] and "inf" in failures[2] and "-inf" in failures[3]
        assert metrics["rm/non_finite"] == 3 and metrics["rm/failure_rewards"] == 3, name


def test_non_finite_remote_reward_gets_the_failure_reward():
    async def body(hub):
        async with FlakyRewardServer([(200, {"score": float("nan")})]) as server:
            args = make_args(rm_type="remote_rm", rm_url=server.url, reward_key="score")
            sample = Sample(index=0)
            return await hub.async_rm(args, sample), sample.metadata, hub.metrics()

    reward, metadata, metrics = run(with_hub(body))
    assert reward == {"score": -7.0} and metrics["rm/non_finite"] == 1
    assert metadata["rm_failure"].startswith("non_finite") and "score=nan" in metadata["rm_failure"]


def test_plain_def_custom_reward_runs_in_killable_workers(plugins):
    async def body(hub):
        marked = Sample(index=0)
        got = await hub.async_rm(make_args(custom_rm_path=f"{plugins}.sync_marks"), marked)
        spin = make_args(custom_rm_path=f"{plugins}.sync_spin", rm_timeout=1.0)
        before = set(hub.pool().worker_pids())
        spinning = [Sample(index=i) for i in range(3)]
        rewards = await hub.batched_async_rm(spin, spinning)
        replaced = before - set(hub.pool().worker_pids())
        lenient = make_args(custom_rm_path=f"{plugins}.sync_raise", rm_on_error="failure_reward")
        failed = await hub.async_rm(lenient, Sample(index=9))
        crashing = [Sample(index=i) for i in range(3)]
        crashed = await hub.batched_async_rm(make_args(custom_rm_path=f"{plugins}.sync_exit"), crashing)
        return (
            got,
            marked.metadata,
            rewards,
            spinning[1].metadata,
            replaced,
            failed,
            crashed,
            crashing[0].metadata,
            hub.metrics(),
        )

    got, metadata, rewards, spin_meta, replaced, failed, crashed, crash_meta, metrics = run(
        with_hub(body, workers=2)
    )
    assert got == 2.0 and metadata == {"graded_in": "worker"}  # the worker's change came back
    # the endless loop was stopped by killing its worker (one of the two), the others were graded
    assert rewards == [3.0, -7.0, 3.0] and len(replaced) == 1
    assert spin_meta["rm_failure"].startswith("timeout: killed after")
    assert failed == -7.0
    assert crashed == [-7.0, 4.0, 4.0] and "exit code 3" in crash_meta["rm_failure"]
    assert metrics["rm/timeouts"] == 1 and metrics["rm/errors"] == 1
    assert metrics["rm/worker_crashes"] == 1


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a reward function can move on: `work(s)` stands for s seconds of
    blocking work, so a test of what a blocked loop reports waits for nothing."""

    worked = 0.0

    def time(self) -> float:
        return super().time() + self.worked

    def work(self, seconds: float) -> None:
        self.worked += seconds


def test_async_reward_that_blocks_the_loop_is_reported(plugins, caplog):
    args = make_args(custom_rm_path=f"{plugins}.blocks_loop", rm_timeout=0.5)

    async def body(hub):
        return await hub.async_rm(args, Sample(index=0)), hub.metrics()

    with asyncio.Runner(loop_factory=ClockLoop) as runner:
        reward, metrics = runner.run(with_hub(body))
    assert reward == 5.0 and metrics["rm/loop_stalls"] == 1
    assert "without yielding to the event loop" in caplog.text


# ---- the worker pool and the cache -------------------------------------------------------------

BOMB = "</think> \\boxed{9999999!x}"  # sympy computes a 65-million-digit factorial


def test_sympy_bomb_is_killed_and_the_worker_replaced():
    args = make_args(rm_type="math", rm_timeout=1.0)

    async def body(hub):
        await hub.async_rm(args, Sample(response="\\boxed{1}", label="1"))
        before = hub.pool().worker_pids()
        samples = [
            Sample(index=0, response="\\boxed{2}", label="2"),
            Sample(index=1, response=BOMB, label="x"),
        ]
        rewards = await hub.batched_async_rm(args, samples)
        after = await hub.async_rm(args, Sample(index=2, response="\\boxed{3}", label="3"))
        return rewards, after, before, hub.pool().worker_pids(), hub.metrics(), samples

    # the bomb would compute for minutes: the batch returning at all means its worker was killed
    rewards, after, before, pids, metrics, samples = run(with_hub(body))
    assert rewards == [1, -7.0] and after == 1
    assert pids and pids != before
    # the killed worker is reaped in the background
    wait_until(
        lambda: not os.path.exists(f"/proc/{before[0]}"), "the killed reward worker reaped", timeout_s=60
    )
    assert metrics["rm/timeouts"] == 1 and metrics["rm/max_seconds"] >= 1.0
    assert samples[1].metadata["rm_failure"].startswith("timeout: killed after")


def test_identical_gradings_are_computed_once():
    args = make_args(rm_type="math")
    group = [
        Sample(index=i, response=f"<think>{'step ' * i}</think>\\boxed{{{i % 2}}}", label="1")
        for i in range(8)
    ]

    async def body(hub):
        first = await hub.batched_async_rm(args, group)
        tasks_first = hub.pool().stats()["tasks"]
        again = await hub.batched_async_rm(args, group)
        tasks_again = hub.pool().stats()["tasks"]
        hub.reset_cache()
        await hub.batched_async_rm(args, group[:1])
        return first, again, tasks_first, tasks_again, hub.pool().stats()["tasks"], hub.metrics()

    first, again, n1, n2, n3, metrics = run(with_hub(body))
    assert first == again == [0, 1] * 4
    assert (n1, n2, n3) == (2, 2, 3)  # two distinct answers; the repeat is free; a reset forgets
    assert metrics["rm/cache_hits"] == 6 + 8
    assert metrics["rm/gradings"] == 3


class Unreadable:
    def __reduce__(self):
        return (int, ("not a number",))  # raises when unpickled


def test_pool_keeps_an_affinity_run_on_one_worker_and_fails_only_unsendable_tasks():
    with GraderPool(2) as pool:
        pool.submit([("os:getpid", (), 5.0)] * 4).result(timeout=60)  # both workers up
        pids = [o.value for o in pool.submit([("os:getpid", (), 5.0, "group-7")] * 8).result(timeout=60)]
        assert len(set(pids)) == 1
        outcomes = pool.submit([("os:getpid", (), 5.0), ("os:getpid", (lambda: 0,), 5.0)]).result(timeout=60)
        assert outcomes[0].status == "ok" and outcomes[1].status == "error"
        assert "cannot be sent to a worker" in outcomes[1].value
        # input that pickles here but not back in the worker fails its own task, not the chunk's
        mixed = [
            ("os:getpid", (), 5.0, "g"),
            ("os:getpid", (Unreadable(),), 5.0, "g"),
            ("os:getpid", (), 5.0, "g"),
        ]
        outcomes = pool.submit(mixed).result(timeout=60)
        assert [o.status for o in outcomes] == ["ok", "error", "ok"]
        assert "cannot read the task's input" in outcomes[1].value
        assert pool.stats()["crashes"] == 0


def test_a_grader_worker_that_cannot_start_fails_its_tasks_with_the_cause(caplog):
    """Workers that end before they are ready (as each does when a script without a `__main__` guard
    starts a campaign at import: Python's forkserver imports the main module again in every worker)
    are started again a few times, then fail the pool's tasks with the exit code and the hint, instead
    of crashing each task twice into a failure reward while replacements die the same way."""
    from slime_wf.rollout.rm_hub.pool import MAX_START_FAILURES

    with GraderPool(1) as pool:  # the fork server runs: the next pool's workers import their preload
        pool.submit([("os:getpid", (), 5.0)]).result(timeout=60)
    with GraderPool(1, preload=("helpers.grader_exits_at_start",)) as pool:
        future = pool.submit([("os:getpid", (), 5.0)])
        with pytest.raises(RuntimeError, match=r'(?s)exit code 3.*if __name__ == "__main__"'):
            future.result(timeout=120)
        assert pool.stats()["crashes"] == 0
    retried = [r for r in caplog.records if "in a row that failed" in r.getMessage()]
    assert len(retried) == MAX_START_FAILURES - 1


def test_uncached_hub_grades_every_sample():
    group = [Sample(index=i, response="\\boxed{1}", label="1") for i in range(4)]

    async def body(hub):
        await hub.batched_async_rm(make_args(rm_type="math"), group)
        return hub.pool().stats()["tasks"]

    assert run(with_hub(body, cache=False)) == 4


def _fuzz_response(rng: random.Random) -> str:
    pieces = [
        "<think>",
        "</think>",
        "###Response",
        "\\boxed{",
        "}",
        "{",
        "\\boxed 5",
        "\\fbox{2}",
        "Answer: ",
        "answer:\n",
        "\n",
        " 42",
        "\\frac{1}{2}",
        "x+1",
        "the",
        " ",
        "$",
        "0.5",
        "\\text{ cm}",
        "1,000",
    ]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))


def _verdict(rm_type, response, label):
    try:
        return rules.grade(rm_type, response, label)
    except Exception as err:  # a grader that raises must raise for the reduced text too
        return type(err).__name__


def test_cache_keys_are_exact_for_every_rule_type():
    """Grading the reduced text gives the full response's reward, and equal keys give equal rewards."""
    rng = random.Random(0)
    labels = ["42", "0.5", "\\frac{1}{2}", "1000", "x+1", "", 42, "\\boxed{42}"]
    types = ["deepscaler", "math", "dapo", "f1", "boxed_math", "boxed_deepscaler", "boxed_dapo", "boxed_f1"]
    seen: dict = {}
    for _ in range(600):
        response, label = _fuzz_response(rng), rng.choice(labels)
        assert rules.last_boxed_content(response) == extract_answer(response)
        for rm_type in types:
            inner, key, text = rules.reduce(rm_type, response)
            want = _verdict(rm_type, response, label)
            assert _verdict(inner, text, label) == want, (rm_type, response, label)
            assert seen.setdefault((inner, rules.label_key(label), key), want) == want, (rm_type, response)
    assert len(seen) > 200


# ---- remote_rm ---------------------------------------------------------------------------------


class FlakyRewardServer:
    """A raw HTTP server: 500, then a dropped connection, then the reward (a real socket each time)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        self.requests.append(json.loads(await reader.readexactly(length)))
        action = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if action == "drop":
            writer.transport.abort()
            return
        if action == "hang":  # no answer until the client gives up and closes the connection
            await reader.read()
            writer.close()
            return
        status, body = action
        data = json.dumps(body).encode()
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(data), data)
        )
        await writer.drain()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/score"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def test_remote_rm_retries_500_and_a_dropped_connection():
    async def body(hub):
        async with FlakyRewardServer([(500, {"error": "busy"}), "drop", (200, {"score": 0.75})]) as server:
            args = make_args(rm_type="remote_rm", rm_url=server.url, reward_key="score")
            sample = Sample(index=0, prompt="1+1?", response="2", label="2")
            reward = await hub.async_rm(args, sample)
            return reward, server.requests, hub.metrics()

    reward, requests, metrics = run(with_hub(body))
    assert reward == {"score": 0.75}
    assert requests == [{"prompt": "1+1?", "response": "2", "label": "2"}] * 3
    assert metrics["rm/remote_retries"] == 2 and metrics["rm/timeouts"] == 0


def test_remote_rm_is_bounded_and_4xx_is_not_retried():
    async def body(hub):
        script = [(503, "down"), (503, "down"), "hang"]
        async with FlakyRewardServer(script) as down, FlakyRewardServer([(400, "bad")]) as bad:
            sample = Sample(index=1)
            failed = await hub.async_rm(
                make_args(rm_type="remote_rm", rm_url=down.url, rm_timeout=4.0), sample
            )
            with pytest.raises(RewardError, match="HTTP 400"):
                await hub.async_rm(make_args(rm_type="remote_rm", rm_url=bad.url), Sample(index=2))
            return failed, sample.metadata, len(down.requests), len(bad.requests), hub.metrics()

    failed, metadata, n_down, n_bad, metrics = run(with_hub(body))
    # two retries, then an attempt that never answers: abandoned at the call's total time limit
    assert failed == -7.0 and n_down == 3
    assert metadata["rm_failure"].startswith("timeout") and "3 attempt(s)" in metadata["rm_failure"]
    assert "still running at the time limit" in metadata["rm_failure"]
    assert n_bad == 1 and metrics["rm/timeouts"] == 1


# ---- no orphans ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_exit_when_their_owner_dies_abruptly():
    script = textwrap.dedent(
        """
        import argparse, asyncio, os
        from slime_wf.rollout.rm_hub import RewardHub
        from slime_wf.types import Sample

        async def main():
            hub = RewardHub(num_workers=2)
            args = argparse.Namespace(rm_type="math", rm_timeout=60.0)
            await hub.async_rm(args, Sample(response="\\\\boxed{1}", label="2"))  # the pool is up
            bomb = Sample(response="</think> \\\\boxed{9999999!x}", label="x")
            task = asyncio.ensure_future(hub.batched_async_rm(args, [bomb, Sample(response="\\\\boxed{3}", label="2")]))
            await asyncio.sleep(1.0)
            print(" ".join(map(str, hub.pool().worker_pids())), flush=True)
            os._exit(0)  # no cleanup at all, one worker busy in sympy

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, out.stderr
    wait_until(
        lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), "the reward workers gone", timeout_s=60
    )


def test_closing_the_hub_stops_its_workers():
    async def body(hub):
        await hub.async_rm(make_args(rm_type="math"), Sample(response="\\boxed{1}", label="1"))
        return hub.pool().worker_pids()

    pids = run(with_hub(body, workers=2))
    assert pids
    assert not any(
        os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2] for p in pids
    )


# ---- remote_rm authentication ---------------------------------------------------------------------


class TokenCheckingRewardServer:
    """An aiohttp reward server that answers only `Authorization: Bearer <token>` (401 otherwise)."""

    def __init__(self, token: str):
        self.token = token
        self.seen: list[str | None] = []

    async def handle(self, request):
        from aiohttp import web

        await request.read()
        self.seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"score": 0.5})

    async def __aenter__(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/score", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/score"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def test_remote_rm_sends_the_token_named_by_rm_api_key_env(monkeypatch, caplog):
    token = "rm-token-6f1c2d"
    monkeypatch.setenv("SLIME_WF_TEST_RM_TOKEN", token)
    monkeypatch.delenv("SLIME_WF_TEST_RM_UNSET", raising=False)
    caplog.set_level("DEBUG")

    async def body(hub):
        async with TokenCheckingRewardServer(token) as server:
            args = make_args(
                rm_type="remote_rm",
                rm_url=server.url,
                reward_key="score",
                rm_api_key_env="SLIME_WF_TEST_RM_TOKEN",
            )
            reward = await hub.async_rm(args, Sample(index=0, prompt="1+1?", response="2", label="2"))
            errors = []
            for env in (None, "SLIME_WF_TEST_RM_UNSET"):
                with pytest.raises(RewardError) as err:
                    await hub.async_rm(
                        make_args(rm_type="remote_rm", rm_url=server.url, rm_api_key_env=env), Sample(index=1)
                    )
                errors.append(str(err.value))
            return reward, server.seen, errors

    reward, seen, (without_token, unset_variable) = run(with_hub(body))
    assert reward == {"score": 0.5}
    assert seen == [f"Bearer {token}", None]  # an unset variable stops the call before it is made
    assert "HTTP 401" in without_token and "reward.rm_api_key_env" in without_token
    assert "SLIME_WF_TEST_RM_UNSET, which is not set" in unset_variable
    assert token not in caplog.text and token not in without_token + unset_variable
