"""The rollout loop: prompts in, one training batch out, with slime's dynamic sampling and partial rollout.

While fewer than `rollout_batch_size` groups are kept or in flight, `over_sampling_batch_size`
more groups are drawn from the data source. Each group is generated concurrently, rewarded, and
filtered as soon as it completes; once `rollout_batch_size` groups are kept, everything still
running is aborted. With `partial_rollout` the unfinished (and finished but unneeded) groups go
back to the buffer with their tokens, log-probs and loss masks, to be continued next time;
without it they are dropped with the reason `aborted`.

Every group drawn is accounted for in the rollout's ledger: trained, dropped (with a reason) or
sent to the buffer.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from slime_wf.plugins import load_function
from slime_wf.rollout.filter_hub.base_types import call_dynamic_filter, should_drop_dynamic_filter_output
from slime_wf.rollout.generate import (
    RolloutContext,
    generate_and_reward_group,
    sampling_params_from_args,
    set_context,
)
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


def check_ledger(ledger: dict[str, Any]) -> None:
    """Every group drawn in the rollout is trained, dropped or buffered, exactly once."""
    drawn = ledger["drawn_new"] + ledger["from_buffer"]
    fates = ledger["trained"] + ledger["to_buffer"] + [g for gs in ledger["dropped"].values() for g in gs]
    if sorted(drawn) != sorted(fates) or len(set(drawn)) != len(drawn):
        missing = sorted(set(drawn) - set(fates))
        extra = sorted(set(fates) - set(drawn))
        raise AssertionError(f"rollout ledger does not balance: unaccounted {missing}, unexpected {extra}")


class _Loop:
    def __init__(self, args: Any, rollout_id: int, data_source: Any, ctx: RolloutContext):
        self.args = args
        self.rollout_id = rollout_id
        self.data_source = data_source
        self.ctx = ctx
        self.target = args.rollout_batch_size
        self.draw_size = args.over_sampling_batch_size or args.rollout_batch_size
        self.filter_fn = (
            load_function(args.dynamic_sampling_filter_path, num_positional=2, kind="dynamic sampling filter")
            if args.dynamic_sampling_filter_path
            else None
        )
        self.sampling_params = sampling_params_from_args(args)
        self.ledger = new_ledger()
        self.drops: Counter = Counter()
        self.pending: dict[asyncio.Task, int] = {}
        self.remaining = 0  # groups kept or still in flight, as slime counts them
        self.kept: list[Group] = []

    def _check_draw_budget(self) -> None:
        drawn = len(self.ledger["drawn_new"]) + len(self.ledger["from_buffer"])
        budget = self.args.max_groups_drawn_per_rollout or 20 * self.target
        if drawn >= budget:
            raise RuntimeError(
                f"rollout {self.rollout_id}: drew {drawn} groups but kept only {len(self.kept)} of "
                f"{self.target} (drops: {dict(self.drops)}). The dynamic filter "
                f"{self.args.dynamic_sampling_filter_path} keeps too little at these sampling settings; raise "
                "rollout_temperature or n_samples_per_prompt, change the filter, or raise "
                "filter.max_groups_drawn_per_rollout"
            )

    def _drop(self, group_index: int, reason: str) -> None:
        self.ledger["dropped"].setdefault(reason, []).append(group_index)
        self.drops[reason] += 1

    def _submit(self, groups: list[Group], first_new: int) -> None:
        for group in groups:
            gi = group[0].group_index
            (self.ledger["drawn_new"] if gi >= first_new else self.ledger["from_buffer"]).append(gi)
            task = asyncio.get_running_loop().create_task(
                generate_and_reward_group(self.ctx, group, self.sampling_params)
            )
            self.pending[task] = gi
        self.remaining += len(groups)

    def _on_group_done(self, group: Group, gi: int, pbar: tqdm) -> None:
        if any(s.status == Sample.Status.FAILED for s in group):
            self._drop(gi, "failed")
            self.remaining -= 1
            return
        output = call_dynamic_filter(self.filter_fn, self.args, group, path=self.args.dynamic_sampling_filter_path)
        if should_drop_dynamic_filter_output(output, remaining_batch_size=self.remaining, target_data_size=self.target):
            self._drop(gi, output.reason or "filtered")
            self.remaining -= 1
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
        pbar = tqdm(total=self.target * self.args.n_samples_per_prompt, desc=f"rollout {self.rollout_id}", leave=False)
        try:
            while len(self.kept) < self.target:
                while self.remaining < self.target:
                    self._check_draw_budget()
                    first_new = self.data_source.sample_group_index
                    self._submit(self.data_source.get_samples(self.draw_size, rollout_id=self.rollout_id), first_new)
                done, _ = await asyncio.wait(self.pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: self.pending[t]):
                    gi = self.pending.pop(task)
                    self._on_group_done(task.result(), gi, pbar)
        finally:
            pbar.close()
            await self._abort()
        return self.kept

    async def _abort(self) -> None:
        """Abort what is still running; buffer or drop it, so that every group is accounted for."""
        self.ctx.aborted = True
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
                if len(group) != self.args.n_samples_per_prompt:
                    self._drop(gi, "aborted")
                else:
                    self._to_buffer(group, gi)


def rollout_metrics(args: Any, groups: list[Group], loop: _Loop, elapsed: float) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    rewards = [float(s.get_reward_value(args)) for s in samples]
    lengths = [s.response_length for s in samples]
    response_tokens = sum(lengths)
    masked = sum(len(s.loss_mask or []) - sum(s.loss_mask or []) for s in samples)
    metrics = {
        "rollout/raw_reward": statistics.fmean(rewards) if rewards else 0.0,
        "rollout/raw_reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "rollout/response_len/mean": statistics.fmean(lengths) if lengths else 0.0,
        "rollout/response_len/max": float(max(lengths, default=0)),
        "rollout/truncated_ratio": (
            sum(s.status == Sample.Status.TRUNCATED for s in samples) / len(samples) if samples else 0.0
        ),
        "rollout/partial/continued_samples": float(sum(len(s.weight_versions) > 1 for s in samples)),
        "rollout/partial/to_buffer_groups": float(len(loop.ledger["to_buffer"])),
        "rollout/partial/from_buffer_groups": float(len(loop.ledger["from_buffer"])),
        "rollout/offpolicy_token_fraction": masked / response_tokens if response_tokens else 0.0,
        "rollout/tokens_per_s": loop.ctx.generated_tokens / elapsed if elapsed > 0 else 0.0,
        "rollout/generated_tokens": float(loop.ctx.generated_tokens),
        "rollout/groups_drawn": float(len(loop.ledger["drawn_new"]) + len(loop.ledger["from_buffer"])),
        "rollout/time_s": elapsed,
    }
    for reason, count in loop.drops.items():
        metrics[f"rollout/dynamic_filter/drop_{reason}"] = float(count)
    for name, count in loop.ctx.counters.items():
        metrics[f"rollout/{name}"] = float(count)
    return metrics


async def generate_rollout_async(
    args: Any, rollout_id: int, data_source: Any, session: Any, tokenizer: Any, *, reward_hub: Any = None
) -> RolloutOutput:
    from slime_wf.rollout import rm_hub

    hub = reward_hub if reward_hub is not None else rm_hub.default_hub()
    hub.reset_cache()  # identical gradings are shared within a rollout, not across weight versions
    hub.metrics(reset=True)
    ctx = RolloutContext(args=args, session=session, tokenizer=tokenizer, rollout_id=rollout_id,
                         reward_kwargs={"hub": hub})
    set_context(ctx)
    loop = _Loop(args, rollout_id, data_source, ctx)
    start = time.perf_counter()
    kept = await loop.run()
    elapsed = time.perf_counter() - start
    kept.sort(key=lambda g: g[0].group_index)
    loop.ledger["trained"] = [g[0].group_index for g in kept]
    for key in ("drawn_new", "from_buffer", "to_buffer"):
        loop.ledger[key].sort()
    loop.ledger["dropped"] = {r: sorted(v) for r, v in sorted(loop.ledger["dropped"].items())}
    check_ledger(loop.ledger)
    metrics = rollout_metrics(args, kept, loop, elapsed)
    metrics.update(hub.metrics(reset=True))
    return RolloutOutput(rollout_id, kept, loop.ledger, metrics)


def generate_rollout(
    args: Any, rollout_id: int, data_source: Any, engines: Any, *, tokenizer: Any = None, reward_hub: Any = None,
    validate=None,
) -> RolloutOutput:
    """One rollout id on an `EngineFleet`: a batch of `rollout_batch_size` kept groups plus its ledger and metrics.

    `rollout_function_path` replaces this whole function with the user's (slime's signature).
    """
    if args.rollout_function_path:
        return _custom_rollout(args, rollout_id, data_source)
    if tokenizer is None:
        from slime_wf.rollout.dataset import load_tokenizer

        tokenizer = load_tokenizer(engines.model_path)

    async def _run() -> RolloutOutput:
        async with engines.session(validate=validate) as session:
            try:
                return await generate_rollout_async(
                    args, rollout_id, data_source, session, tokenizer, reward_hub=reward_hub
                )
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
    rewards = [float(s.get_reward_value(args)) for g in groups for s in g]
    metrics.setdefault("rollout/raw_reward", statistics.fmean(rewards) if rewards else 0.0)
    return RolloutOutput(rollout_id, groups, ledger, metrics)

