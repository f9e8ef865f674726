"""The rollout loop: prompts in, one training batch out, with slime's dynamic sampling and partial rollout.

While fewer than `rollout_batch_size` groups are kept or in flight, `over_sampling_batch_size`
more groups are drawn from the data source. Each group is generated concurrently; completed groups
are rewarded and filtered in waves as they complete (a wave: the groups that completed while the
previous one was scored; the scorer that runs a wave is injected, `slime_wf.rollout.scoring`, and
may ask for fewer, larger waves with its `wave_wait_s`); once
`rollout_batch_size` groups are kept, everything still running is aborted. With `partial_rollout` the unfinished (and finished but unneeded) groups go
back to the buffer with their tokens, log-probs and loss masks, to be continued next time;
without it they are dropped with the reason `aborted`.

A group with a sample the engines could not generate (refused, aborted too often, unreachable)
is dropped with that sample's failure reason (`engine_rejected`, `engine_abort`, `failed`); the
rollout goes on. No group without rewards reaches the filter, the batch or the metrics.

The draw budget (`max_groups_drawn_per_rollout`) bounds a rollout whose filter keeps too little
(a policy that answers everything right gives only zero-std groups). When it is spent, the
rollout trains on the groups it kept, filled up with rejected groups the filter marked
`keep_when_insufficient`, and reports the shortfall; it fails only when it kept nothing. A short
batch rather than a failure, because a resume would meet the same policy and the same wall.

Every group drawn is accounted for in the rollout's ledger: trained, dropped (with a reason) or
sent to the buffer.

Size: over 400 lines because the loop is one state machine (draw, generate, score in waves,
filter, abort, fill up, account) whose steps all move the same ledger and counters; split across
modules, the accounting that `check_ledger` proves would be spread out too.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, cast

from tqdm import tqdm

from slime_wf.plugins import load_function
from slime_wf.rollout.filter_hub.base_types import (
    DropReasonCounter,
    load_dynamic_filter,
    should_drop_dynamic_filter_output,
)
from slime_wf.rollout.generate import (
    RolloutContext,
    failure_reason,
    generate_group,
    rollout_context,
    sampling_params_from_args,
)
from slime_wf.rollout.scoring import Scorer, WaveVerdicts, apply_verdict, current_scorer, score_wave
from slime_wf.types import Group, Sample

logger = logging.getLogger(__name__)

_ABORT_POLL_SECONDS = 0.5


@dataclass
class RolloutOutput:
    rollout_id: int
    groups: list[Group]
    ledger: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)


def new_ledger() -> dict[str, Any]:
    return {"drawn_new": [], "from_buffer": [], "trained": [], "to_buffer": [], "dropped": {}}


def _index_of(group: Group) -> int:
    """The index of a group the data source drew: it numbers every group it hands out."""
    gi = group[0].group_index
    assert gi is not None, "a drawn group has no group_index"
    return gi


def check_ledger(ledger: dict[str, Any]) -> None:
    """Every group drawn in the rollout is trained, dropped or buffered, exactly once."""
    drawn = ledger["drawn_new"] + ledger["from_buffer"]
    fates = ledger["trained"] + ledger["to_buffer"] + [g for gs in ledger["dropped"].values() for g in gs]
    if sorted(drawn) != sorted(fates) or len(set(drawn)) != len(drawn):
        missing = sorted(set(drawn) - set(fates))
        extra = sorted(set(fates) - set(drawn))
        raise AssertionError(f"rollout ledger does not balance: unaccounted {missing}, unexpected {extra}")


class _Loop:
    def __init__(
        self, args: Any, rollout_id: int, data_source: Any, ctx: RolloutContext, scorer: Scorer | None = None
    ):
        self.args = args
        self.scorer = scorer or current_scorer()
        self.unscored: list[tuple[Group, int]] = []  # completed, waiting for the next wave
        self.scoring: tuple[asyncio.Task, list[tuple[Group, int]]] | None = None  # the wave in flight
        self.waves = 0
        # How long a completed group may wait for others to join its wave (`scoring.Scorer.wave_wait_s`).
        self.wave_wait = float(getattr(self.scorer, "wave_wait_s", 0.0) or 0.0)
        self.unscored_since = 0.0  # when the oldest group of `unscored` completed (time.monotonic)
        self.rollout_id = rollout_id
        self.data_source = data_source
        self.ctx = ctx
        self.target = args.rollout_batch_size
        self.draw_size = args.over_sampling_batch_size or args.rollout_batch_size
        self.filter_fn = load_dynamic_filter(args.dynamic_sampling_filter_path)
        self.sampling_params = sampling_params_from_args(args)
        self.budget = args.max_groups_drawn_per_rollout or 20 * self.target
        self.ledger = new_ledger()
        self.drops = DropReasonCounter()
        self.pending: dict[asyncio.Task, int] = {}
        self.remaining = 0  # groups kept or still in flight, as slime counts them
        self.kept: list[Group] = []
        # Rejected groups the filter marked keep_when_insufficient, set aside (not dropped yet) in
        # case the draw budget runs out before the batch is full: (group, group index, reason).
        self.fallback: list[tuple[Group, int, str]] = []
        self.filled = 0  # fallback groups that went into the batch
        self.failure_examples: dict[str, str] = {}

    @property
    def drawn(self) -> int:
        return len(self.ledger["drawn_new"]) + len(self.ledger["from_buffer"])

    def _draw(self) -> bool:
        """Draw the next groups and start them; False once the draw budget is spent."""
        left = self.budget - self.drawn
        if left <= 0:
            return False
        first_new = self.data_source.sample_group_index
        self._submit(
            self.data_source.get_samples(min(self.draw_size, left), rollout_id=self.rollout_id), first_new
        )
        return True

    def _check_rewarded(self, group: Group, gi: int) -> None:
        """A group that reaches the filter has a reward on every sample, by construction: failed and
        aborted groups are dropped or buffered before this. A None here is a bug, reported as one
        rather than as a TypeError inside a filter or a metric."""
        for sample in group:
            if sample.status == Sample.Status.ABORTED or sample.get_reward_value(self.args) is None:
                generator = sample.generate_function_path or self.args.custom_generate_function_path
                raise RuntimeError(
                    f"rollout {self.rollout_id}: group {gi} finished with sample index={sample.index} in status "
                    f"{sample.status.value} and reward {sample.reward!r}; only groups whose every sample was "
                    "generated and rewarded may be filtered and trained. This is a bug in the rollout loop"
                    + (f" or in the generate function {generator}" if generator else "")
                )

    def _drop(self, group_index: int, reason: str) -> None:
        self.ledger["dropped"].setdefault(reason, []).append(group_index)
        self.drops.drop(reason)

    def _drop_failed(self, group: Group, group_index: int, reason: str) -> None:
        self._drop(group_index, reason)
        if reason not in self.failure_examples:  # the first message per reason, for the error that may follow
            failed = next(s for s in group if s.status == Sample.Status.FAILED)
            self.failure_examples[reason] = (
                f"sample index={failed.index}: {str(failed.metadata.get('failure'))[:300]}"
            )

    def _submit(self, groups: list[Group], first_new: int) -> None:
        for group in groups:
            gi = _index_of(group)
            (self.ledger["drawn_new"] if gi >= first_new else self.ledger["from_buffer"]).append(gi)
            task = asyncio.get_running_loop().create_task(
                generate_group(self.ctx, group, self.sampling_params)
            )
            self.pending[task] = gi
        self.remaining += len(groups)

    def _on_generated(self, group: Group, gi: int) -> None:
        reason = failure_reason(group)
        if reason is not None:  # dropped at once: a failed group is never scored
            self._drop_failed(group, gi, reason)
            self.remaining -= 1
            return
        if not self.unscored:
            self.unscored_since = time.monotonic()
        self.unscored.append((group, gi))

    def _wave_wait_left(self) -> float:
        """Seconds until the completed groups must be scored (0: now). With `wave_wait` 0 (the library's
        scorer), a wave starts as soon as the last one is scored. Otherwise completed groups wait for
        others to join them, but never past the moment they could matter: once they would fill the rest
        of the batch if all were kept, once nothing else is generating, or after `wave_wait` seconds."""
        if self.wave_wait <= 0 or not self.pending or len(self.unscored) >= self.target - len(self.kept):
            return 0.0
        return max(0.0, self.unscored_since + self.wave_wait - time.monotonic())

    def _start_wave(self) -> None:
        wave, self.unscored = self.unscored, []
        number, self.waves = self.waves, self.waves + 1

        async def score() -> WaveVerdicts:
            return await score_wave(self.ctx, wave, self.filter_fn, self._check_rewarded)

        indices = sorted(gi for _, gi in wave)
        coro = self.scorer(self.rollout_id, number, indices, score)
        self.scoring = (asyncio.ensure_future(coro), wave)

    def _on_scored(self, wave: list[tuple[Group, int]], verdicts: WaveVerdicts, pbar: tqdm) -> None:
        by_index = {v["group_index"]: v for v in verdicts}
        for group, gi in sorted(wave, key=lambda pair: pair[1]):
            self._on_group_done(group, gi, apply_verdict(group, by_index[gi]), pbar)

    def _on_group_done(self, group: Group, gi: int, output: Any, pbar: tqdm) -> None:
        if should_drop_dynamic_filter_output(
            output, remaining_batch_size=self.remaining, target_data_size=self.target
        ):
            self.remaining -= 1
            if output.keep_when_insufficient:
                self.fallback.append((group, gi, output.reason or "filtered"))
            else:
                self._drop(gi, output.reason or "filtered")
            return
        if len(self.kept) < self.target:
            self.kept.append(group)
            pbar.update(len(group))
        else:  # more groups finished in the same step than were needed
            self._surplus(group, gi)

    def _surplus(self, group: Group, gi: int) -> None:
        if self.args.partial_rollout and len(group) == self.args.n_samples_per_prompt:
            self._to_buffer(group, gi)
        else:
            self._drop(gi, "surplus")

    def _to_buffer(self, group: Group, gi: int) -> None:
        for sample in group:
            if sample.response and "start_rollout_id" not in sample.metadata:
                sample.metadata["start_rollout_id"] = self.rollout_id
        self.data_source.add_samples([group])
        self.ledger["to_buffer"].append(gi)

    async def run(self) -> list[Group]:
        pbar = tqdm(
            total=self.target * self.args.n_samples_per_prompt, desc=f"rollout {self.rollout_id}", leave=False
        )
        try:
            while len(self.kept) < self.target:
                while self.remaining < self.target and self._draw():
                    pass
                wave_due_in = None  # seconds until the waiting groups' wave starts
                if self.scoring is None and self.unscored:
                    wave_due_in = self._wave_wait_left()
                    if wave_due_in <= 0:
                        self._start_wave()
                        wave_due_in = None
                waiting = set(self.pending) | ({self.scoring[0]} if self.scoring else set())
                if not waiting:  # the draw budget is spent and every drawn group has been scored
                    break
                done, _ = await asyncio.wait(
                    waiting, timeout=wave_due_in, return_when=asyncio.FIRST_COMPLETED
                )
                for task in sorted(done & self.pending.keys(), key=lambda t: self.pending[t]):
                    gi = self.pending.pop(task)
                    self._on_generated(task.result(), gi)
                if self.scoring is not None and self.scoring[0] in done:
                    (scored, wave), self.scoring = self.scoring, None
                    self._on_scored(wave, scored.result(), pbar)
        finally:
            pbar.close()
            await self._abort()
        self._use_fallback()
        if len(self.kept) < self.target:
            self._report_shortfall()
        return self.kept

    def _use_fallback(self) -> None:
        """Fill a short batch with the set-aside groups, in the order they finished; drop the rest."""
        for group, gi, reason in self.fallback:
            if len(self.kept) < self.target:
                self.kept.append(group)
                self.filled += 1
            else:
                self._drop(gi, reason)
        self.fallback = []

    def _report_shortfall(self) -> None:
        drops = self.drops.counts()
        filter_path = self.args.dynamic_sampling_filter_path
        if not self.kept:
            raise RuntimeError(
                f"rollout {self.rollout_id}: drew {self.drawn} groups (filter.max_groups_drawn_per_rollout: "
                f"{self.budget}) but kept none of the {self.target} it needs (drops: {drops}). If the drops are the "
                f"dynamic filter's ({filter_path}), it rejects every group at these settings: use a filter that "
                "lets rejected groups fill a short batch (e.g. check_reward_nonzero_std_with_fallback), raise "
                "rollout_temperature or n_samples_per_prompt, or raise filter.max_groups_drawn_per_rollout. If they "
                "are engine_rejected / engine_abort / failed, see the engine logs and the dataset's prompts"
                + "".join(f"; {reason}: {example}" for reason, example in self.failure_examples.items())
            )
        logger.warning(
            "rollout %d: drew %d groups (filter.max_groups_drawn_per_rollout: %d) but kept only %d of %d; training "
            "on those (%d of them filled in from groups the filter allowed to fill a short batch). Drops: %s. The "
            "dynamic filter %s keeps too little at these settings",
            self.rollout_id,
            self.drawn,
            self.budget,
            len(self.kept),
            self.target,
            self.filled,
            drops,
            filter_path,
        )

    async def _abort(self) -> None:
        """Abort what is still running; buffer or drop it, so that every group is accounted for."""
        self.ctx.aborted = True
        for group, gi in self.unscored:  # completed after the batch was full
            self._surplus(group, gi)
        self.unscored = []
        if self.scoring is not None:  # only when the rollout failed: the batch waits for every wave
            scoring, wave = self.scoring
            self.scoring = None
            scoring.cancel()
            await asyncio.gather(scoring, return_exceptions=True)
            for _, gi in wave:
                self._drop(gi, "aborted")
        if not self.pending:
            return
        if not self.args.partial_rollout:
            for task in self.pending:
                task.cancel()
        tasks = set(self.pending)
        while tasks:
            await self.ctx.session.abort_all()
            done, tasks = await asyncio.wait(tasks, timeout=_ABORT_POLL_SECONDS)
            for task in done:
                gi = self.pending.pop(task)
                if task.cancelled() or not self.args.partial_rollout:
                    self._drop(gi, "aborted")
                    continue
                exc = task.exception()
                if exc is not None:
                    logger.error("group %d failed while aborting: %s", gi, exc)
                    self._drop(gi, "failed")
                    continue
                group = task.result()
                reason = failure_reason(group)
                if reason is not None:  # a FAILED sample cannot be continued: never buffered
                    self._drop_failed(group, gi, reason)
                elif len(group) != self.args.n_samples_per_prompt:
                    self._drop(gi, "aborted")
                else:
                    self._to_buffer(group, gi)


def rollout_metrics(args: Any, groups: list[Group], loop: _Loop, elapsed: float) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    # every sample passed _Loop._check_rewarded, so each reward is set
    rewards = [float(cast(float, s.get_reward_value(args))) for s in samples]
    lengths = [s.response_length for s in samples]
    response_tokens = sum(lengths)
    masked = sum(len(s.loss_mask or []) - sum(s.loss_mask or []) for s in samples)
    # the names and their meanings: slime_wf.metrics (time/rollout_s is the campaign's, overhead included)
    metrics = {
        "rollout/raw_reward": statistics.fmean(rewards) if rewards else 0.0,
        "rollout/raw_reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "rollout/response_len/mean": statistics.fmean(lengths) if lengths else 0.0,
        "rollout/response_len/max": float(max(lengths, default=0)),
        "rollout/truncated_ratio": (
            sum(s.status == Sample.Status.TRUNCATED for s in samples) / len(samples) if samples else 0.0
        ),
        "rollout/tokens_per_s": loop.ctx.generated_tokens / elapsed if elapsed > 0 else 0.0,
        "rollout/generated_tokens": float(loop.ctx.generated_tokens),
        "rollout/groups_drawn": float(loop.drawn),
        "filter/kept_groups": float(len(groups)),
        "filter/shortfall_groups": float(loop.target - len(groups)),
        "filter/filled_groups": float(loop.filled),
    }
    if getattr(args, "partial_rollout", False):  # without it these are zero by construction
        metrics.update(
            {
                "rollout/partial/continued_samples": float(sum(len(s.weight_versions) > 1 for s in samples)),
                "rollout/partial/to_buffer_groups": float(len(loop.ledger["to_buffer"])),
                "rollout/partial/from_buffer_groups": float(len(loop.ledger["from_buffer"])),
                "rollout/offpolicy_token_fraction": masked / response_tokens if response_tokens else 0.0,
            }
        )
    drops = loop.drops.counts()
    # surplus and aborted groups were never judged: they say how the batch filled, not what the filter did
    dropped = sum(n for reason, n in drops.items() if reason not in ("surplus", "aborted"))
    finished = len(groups) + dropped
    metrics["filter/drop_fraction"] = dropped / finished if finished else 0.0
    metrics.update(loop.drops.metrics())
    for name, count in loop.ctx.counters.items():
        metrics[f"rollout/{name}"] = float(count)
    return metrics


async def generate_rollout_async(
    args: Any,
    rollout_id: int,
    data_source: Any,
    session: Any,
    tokenizer: Any,
    *,
    reward_hub: Any = None,
    scorer: Scorer | None = None,
) -> RolloutOutput:
    """One rollout id on an open engine session. `reward_hub`: the campaign's; without one, a hub for
    this rollout alone, closed when it ends. `scorer`: runs each wave's scoring (default: the one
    `scoring.scoring_with` set, else `scoring.score_inline`)."""
    from slime_wf.rollout import rm_hub

    if reward_hub is None:
        async with rm_hub.RewardHub() as own_hub:
            return await generate_rollout_async(
                args, rollout_id, data_source, session, tokenizer, reward_hub=own_hub, scorer=scorer
            )
    hub = reward_hub
    hub.reset_cache()  # identical gradings are shared within a rollout, not across weight versions
    hub.metrics(reset=True)
    ctx = RolloutContext(
        args=args, session=session, tokenizer=tokenizer, rollout_id=rollout_id, reward_kwargs={"hub": hub}
    )
    with rollout_context(ctx), rm_hub.using_hub(hub):
        loop = _Loop(args, rollout_id, data_source, ctx, scorer)
        start = time.perf_counter()
        kept = await loop.run()
        elapsed = time.perf_counter() - start
    kept.sort(key=_index_of)
    loop.ledger["trained"] = [g[0].group_index for g in kept]
    for key in ("drawn_new", "from_buffer", "to_buffer"):
        loop.ledger[key].sort()
    loop.ledger["dropped"] = {r: sorted(v) for r, v in sorted(loop.ledger["dropped"].items())}
    check_ledger(loop.ledger)
    metrics = rollout_metrics(args, kept, loop, elapsed)
    metrics.update(hub.metrics(reset=True))
    return RolloutOutput(rollout_id, kept, loop.ledger, metrics)


def generate_rollout(
    args: Any,
    rollout_id: int,
    data_source: Any,
    engines: Any,
    *,
    tokenizer: Any = None,
    reward_hub: Any = None,
) -> RolloutOutput:
    """One rollout id on an `EngineFleet`: a batch of kept groups plus its ledger and metrics.

    The batch has `rollout_batch_size` groups, or fewer when the draw budget ran out first
    (`filter/shortfall_groups` says how many fewer).

    `reward_hub` is the campaign's `RewardHub`; without one, the rollout makes its own and closes it.
    `rollout_function_path` replaces this whole function with the user's (slime's signature).
    """
    if args.rollout_function_path:
        if engines is None:
            return _custom_rollout(args, rollout_id, data_source)
        return _custom_rollout_on_engines(args, rollout_id, data_source, engines, tokenizer, reward_hub)
    if tokenizer is None:
        from slime_wf.rollout.dataset import load_tokenizer

        tokenizer = load_tokenizer(engines.model_path)

    async def _run() -> RolloutOutput:
        async with engines.session() as session:
            try:
                return await generate_rollout_async(
                    args, rollout_id, data_source, session, tokenizer, reward_hub=reward_hub
                )
            finally:
                await engines.wait_restarts()

    return asyncio.run(_run())


def _custom_rollout_on_engines(
    args: Any, rollout_id: int, data_source: Any, engines: Any, tokenizer: Any, reward_hub: Any
) -> RolloutOutput:
    """The user's rollout function (synchronous, as slime's) in a worker thread, while this thread's
    event loop holds an engine session and a rollout context: slime's `GenerateState`,
    `generate_and_rm` and `abort` inside it then reach the campaign's engines, their coroutines
    submitted to this loop by slime's `run` (`slime_wf.compat.utils.async_utils`)."""
    import contextlib

    from slime_wf.rollout import rm_hub

    if tokenizer is None:
        from slime_wf.rollout.dataset import load_tokenizer

        tokenizer = load_tokenizer(engines.model_path)

    async def _run() -> RolloutOutput:
        async with contextlib.AsyncExitStack() as stack:
            hub = reward_hub or await stack.enter_async_context(rm_hub.RewardHub())
            hub.reset_cache()
            session = await stack.enter_async_context(engines.session())
            ctx = RolloutContext(
                args=args,
                session=session,
                tokenizer=tokenizer,
                rollout_id=rollout_id,
                reward_kwargs={"hub": hub},
            )
            ctx.plugin_state["event_loop"] = asyncio.get_running_loop()
            with rollout_context(ctx), rm_hub.using_hub(hub):
                try:
                    return await asyncio.to_thread(_custom_rollout, args, rollout_id, data_source)
                finally:
                    await engines.wait_restarts()

    return asyncio.run(_run())


def _custom_rollout(args: Any, rollout_id: int, data_source: Any) -> RolloutOutput:
    fn = load_function(args.rollout_function_path, num_positional=3, kind="rollout function")
    result = fn(args, rollout_id, data_source, evaluation=False)
    if isinstance(result, RolloutOutput):
        check_ledger(result.ledger)
        return result
    groups = getattr(result, "samples", result)
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise TypeError(
            f"rollout function {args.rollout_function_path} must return RolloutOutput or a list of groups, "
            f"got {type(result).__name__}"
        )
    indices = [g[0].group_index for g in groups]
    ledger = new_ledger()
    ledger["drawn_new"] = sorted(indices)
    ledger["trained"] = sorted(indices)
    metrics = dict(getattr(result, "metrics", None) or {})
    unrewarded = [s.index for g in groups for s in g if s.get_reward_value(args) is None]
    if unrewarded:
        raise ValueError(
            f"rollout function {args.rollout_function_path} returned samples without a reward (index "
            f"{unrewarded[:10]}); reward every sample it returns, or leave failed groups out"
        )
    rewards = [float(cast(float, s.get_reward_value(args))) for g in groups for s in g]  # none unrewarded
    metrics.setdefault("rollout/raw_reward", statistics.fmean(rewards) if rewards else 0.0)
    return RolloutOutput(rollout_id, groups, ledger, metrics)
