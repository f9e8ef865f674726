"""Scoring a wave of completed groups: their rewards, then the dynamic filter's verdict on each.

The rollout loop generates groups concurrently and, as they complete, hands them over in waves: a
wave is every group that completed while the previous wave was being scored, so groups are still
scored and filtered as they complete (slime's streaming), and the rest is aborted once enough are
kept. How a wave is run is the scorer's business. The library's scorer (`score_inline`) awaits the
work directly; an orchestrator can supply one that wraps it (the Prefect layer runs each wave as a
task run with a persisted result and retries), without the library knowing about it:

    async def scorer(rollout_id, wave, group_indices, score):
        return await score()          # the verdicts of the wave, a JSON-able list (WaveVerdicts)

    with scoring_with(scorer):        # for the rollouts started in this block (and its threads' copies)
        generate_rollout(...)

`score()` may be called again after it raised (a retry): samples whose reward a failed attempt
already set are not graded again (with `group_rm` the whole group is), and the filter then sees the
rewards of the successful attempt. The verdicts are what the loop trains on: it sets each sample's
reward from them (`apply_verdict`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

from slime_wf.rollout.filter_hub.base_types import DynamicFilterOutput, call_dynamic_filter
from slime_wf.rollout.generate import RolloutContext, reward_samples
from slime_wf.types import Group

# One entry per group of the wave, in group-index order:
# {"group_index": int, "rewards": [reward per sample], "keep": bool, "reason": str | None,
#  "keep_when_insufficient": bool}
WaveVerdicts = list[dict[str, Any]]


class Scorer(Protocol):
    """Runs one wave's scoring. A scorer whose every wave has a fixed cost of its own (a task run of an
    orchestrator) may set `wave_wait_s`: how long a completed group may wait for others to join its
    wave. The loop never waits past the moment the groups could matter (they would fill the batch, or
    nothing else is generating), so the abort of the rest is not delayed; without the attribute (the
    library's scorer) each wave starts as soon as the last one is scored."""

    def __call__(
        self,
        rollout_id: int,
        wave: int,
        group_indices: list[int],
        score: Callable[[], Awaitable[WaveVerdicts]],
    ) -> Awaitable[WaveVerdicts]: ...


async def score_inline(
    rollout_id: int, wave: int, group_indices: list[int], score: Callable[[], Awaitable[WaveVerdicts]]
) -> WaveVerdicts:
    """The library's scorer: the wave's work, awaited in the rollout's event loop."""
    return await score()


_scorer: contextvars.ContextVar[Scorer] = contextvars.ContextVar("slime_wf_scorer", default=score_inline)


def current_scorer() -> Scorer:
    return _scorer.get()


@contextlib.contextmanager
def scoring_with(scorer: Scorer) -> Iterator[Scorer]:
    """Make `scorer` the scorer of the rollouts run in this block; restored on the way out."""
    token = _scorer.set(scorer)
    try:
        yield scorer
    finally:
        _scorer.reset(token)


def _plain(value: Any) -> Any:
    """A numpy / torch scalar reward as a Python number, so that the verdicts stay JSON."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


async def score_wave(
    ctx: RolloutContext,
    wave: list[tuple[Group, int]],
    filter_fn: Callable[..., Any] | None,
    check: Callable[[Group, int], None],
) -> WaveVerdicts:
    """Reward every group of `wave` ((group, group index) pairs) concurrently, then ask the filter about
    each; `check` raises for a group that cannot be filtered (a sample left without a reward)."""
    args = ctx.args
    await asyncio.gather(*(reward_samples(ctx, group, whole_group=args.group_rm) for group, _ in wave))
    verdicts: WaveVerdicts = []
    for group, gi in sorted(wave, key=lambda pair: pair[1]):
        check(group, gi)
        output = call_dynamic_filter(filter_fn, args, group, path=args.dynamic_sampling_filter_path)
        verdicts.append(
            {
                "group_index": gi,
                "rewards": [_plain(s.reward) for s in group],
                "keep": output.keep,
                "reason": output.reason,
                "keep_when_insufficient": bool(output.keep_when_insufficient),
            }
        )
    return verdicts


def apply_verdict(group: Group, verdict: dict[str, Any]) -> DynamicFilterOutput:
    """Set the group's rewards from its verdict (what the scorer returned is what is trained on) and
    return the filter's output."""
    for sample, reward in zip(group, verdict["rewards"], strict=True):
        sample.reward = reward
    return DynamicFilterOutput(
        keep=verdict["keep"],
        reason=verdict["reason"],
        keep_when_insufficient=verdict["keep_when_insufficient"],
    )
