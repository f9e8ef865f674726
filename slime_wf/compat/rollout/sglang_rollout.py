"""`slime.rollout.sglang_rollout`: the generation API slime's plugins call, bound to the rollout in progress.

slime keeps one `GenerateState` per process (its Ray actor runs every rollout on one event loop).
Here each rollout and evaluation has its own engine session and event loop, so `GenerateState(args)`
is the state of the rollout it is called in: its tokenizer, a semaphore sized like slime's
(`sglang_server_concurrency` x engines), its sampling parameters and its abort flag. Called outside a
rollout it raises, naming what to do.

`generate` is slime-wf's own (`slime_wf.rollout.generate.generate`: same signature, continues
partial samples, fails a sample the engines refuse); `generate_and_rm` and `generate_and_rm_group`
run the sample's or the campaign's custom generate function and reward with the rollout's reward
hub; `abort` aborts every engine and collects what was submitted through `submit_generate_tasks`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import random
import uuid
from collections.abc import Iterator
from typing import Any

from slime_wf.plugins import load_function
from slime_wf.rollout import rm_hub
from slime_wf.rollout.dataset import Dataset
from slime_wf.rollout.generate import RolloutContext, current_context, generate, sampling_params_from_args
from slime_wf.types import Group, Sample

from ..utils.http_utils import get_rollout_num_engines
from .base_types import RolloutFnEvalOutput

_STATE_KEY = "slime.rollout.sglang_rollout.GenerateState"


def _context() -> RolloutContext:
    try:
        return current_context()
    except RuntimeError:
        raise RuntimeError(
            "slime's GenerateState / generate_and_rm / abort run only inside a slime-wf rollout or evaluation "
            "(a custom generate function, reward or filter called by the campaign); there is no engine "
            "outside one"
        ) from None


class GenerateState:
    """The generation state of the rollout in progress (slime's per-process singleton)."""

    def __new__(cls, args: Any = None) -> GenerateState:
        ctx = _context()
        state = ctx.plugin_state.get(_STATE_KEY)
        if state is None:
            state = super().__new__(cls)
            state._bind(ctx)
            ctx.plugin_state[_STATE_KEY] = state
        return state

    def __init__(self, args: Any = None) -> None:
        pass  # bound once per rollout, in __new__

    def _bind(self, ctx: RolloutContext) -> None:
        self._ctx = ctx
        args = ctx.args
        self.args = args
        self.tokenizer = ctx.tokenizer
        self.processor = None  # text models only: the local engine and the trainer take no images
        self.semaphore = asyncio.Semaphore(
            int(getattr(args, "sglang_server_concurrency", 512)) * max(1, get_rollout_num_engines(args))
        )
        self.sampling_params: dict[str, Any] = sampling_params_from_args(args)
        seed = int(getattr(args, "rollout_seed", 0) or 0)
        self.group_sampling_seeds = [seed + i for i in range(int(getattr(args, "n_samples_per_prompt", 1)))]
        self.dp_counts = [0] * (getattr(args, "sglang_dp_size", None) or 1)
        self.dp_rank = 0
        self.reset()

    @property
    def aborted(self) -> bool:
        return self._ctx.aborted

    @aborted.setter
    def aborted(self, value: bool) -> None:
        self._ctx.aborted = value

    @contextlib.contextmanager
    def dp_rank_context(self) -> Iterator[int]:
        low = min(self.dp_counts)
        rank = random.choice([i for i, n in enumerate(self.dp_counts) if n == low])
        self.dp_counts[rank] += 1
        self.dp_rank = rank
        try:
            yield rank
        finally:
            self.dp_counts[rank] -= 1

    def reset(self) -> None:
        self.remaining_batch_size = 0
        self.pendings: set[asyncio.Task] = set()

    def submit_generate_tasks(self, samples: list[Group]) -> None:
        for group in samples:
            self.pendings.add(
                asyncio.get_running_loop().create_task(
                    generate_and_rm_group(self.args, group, self.sampling_params.copy(), evaluation=False)
                )
            )
        self.remaining_batch_size += len(samples)


def get_model_url(args: Any, model_name: str, endpoint: str = "/generate") -> str:
    """The URL of `endpoint` for a named model: one model is served, so the campaign's router address."""
    return f"http://{args.sglang_router_ip}:{args.sglang_router_port}{endpoint}"


async def _run_generate(args: Any, sample: Sample, sampling_params: dict[str, Any], evaluation: bool) -> Any:
    path = sample.generate_function_path or getattr(args, "custom_generate_function_path", None)
    if path is None:
        return await generate(args, sample, sampling_params)
    fn = load_function(path, num_positional=3, kind="generate function")
    if "evaluation" in inspect.signature(fn).parameters:
        return await fn(args, sample, sampling_params, evaluation=evaluation)
    return await fn(args, sample, sampling_params)


async def generate_and_rm(
    args: Any, sample: Sample, sampling_params: dict[str, Any], evaluation: bool = False
) -> Sample | list[Sample]:
    """Generate one sample (the custom generate function when one is set) and reward it, unless group_rm."""
    if args.partial_rollout and args.mask_offpolicy_in_partial_rollout and sample.response_length > 0:
        sample.loss_mask = [0] * sample.response_length  # tokens of an earlier policy carry no loss
    if sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED):
        return sample
    state = GenerateState(args)
    async with state.semaphore:
        if state.aborted:
            sample.status = Sample.Status.ABORTED
            return sample
        with state.dp_rank_context():
            result = await _run_generate(args, sample, dict(sampling_params), evaluation)
    if args.group_rm:
        return result
    samples = result if isinstance(result, list) else [result]
    if any(s.status in (Sample.Status.ABORTED, Sample.Status.FAILED) for s in samples):
        return result
    todo = [s for s in samples if s.reward is None]
    if todo:
        for s, reward in zip(todo, await rm_hub.batched_async_rm(args, todo), strict=True):
            s.reward = reward
    return result


async def generate_and_rm_group(
    args: Any, group: Group, sampling_params: dict[str, Any], evaluation: bool = False
) -> Any:
    """Generate and reward a group concurrently; with group_rm, reward the whole group at the end."""
    state = GenerateState(args)
    if state.aborted:
        return group
    for sample in group:
        if sample.session_id is None:
            sample.session_id = str(uuid.uuid4())
    tasks = []
    for i, sample in enumerate(group):
        params = dict(sampling_params)
        if getattr(args, "sglang_enable_deterministic_inference", False):
            params["sampling_seed"] = state.group_sampling_seeds[i]
        tasks.append(generate_and_rm(args, sample, params, evaluation=evaluation))
    done = list(await asyncio.gather(*tasks))
    if not state.aborted and args.group_rm:
        flat = [s for d in done for s in (d if isinstance(d, list) else [d])]
        for sample, reward in zip(flat, await rm_hub.batched_async_rm(args, flat), strict=True):
            sample.reward = reward
    return done


async def abort(args: Any, rollout_id: int) -> list[Group]:
    """Abort every engine and wait for the submitted groups; with partial_rollout, return them."""
    ctx = _context()
    state = GenerateState(args)
    state.aborted = True
    await ctx.session.abort_all()
    collected: list[Group] = []
    while state.pendings:
        done, state.pendings = await asyncio.wait(state.pendings, return_when=asyncio.FIRST_COMPLETED)
        if not args.partial_rollout:
            continue
        for task in done:
            group = task.result()
            for sample in group:
                if sample.response and "start_rollout_id" not in sample.metadata:
                    sample.metadata["start_rollout_id"] = rollout_id
            collected.append(group)
    return collected


async def eval_rollout(args: Any, rollout_id: int) -> tuple[RolloutFnEvalOutput, list[Group]]:
    """Every prompt of each `eval_datasets` entry, generated and rewarded on the rollout's engines:
    `{name: {"rewards", "truncated", "samples"}}` per dataset, as slime's."""
    ctx = _context()
    if args.group_rm:
        raise ValueError("eval_rollout: group_rm is not supported in evaluation (as in slime)")
    results: dict[str, dict[str, Any]] = {}
    for cfg in getattr(args, "eval_datasets", None) or []:
        cfg = dict(cfg)
        dataset = Dataset(
            cfg["path"],
            tokenizer=ctx.tokenizer,
            prompt_key=cfg.get("input_key") or args.input_key,
            label_key=cfg.get("label_key") or args.label_key,
            metadata_key=args.metadata_key,
            apply_chat_template=args.apply_chat_template,
            apply_chat_template_kwargs=args.apply_chat_template_kwargs,
            s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
            s3_region=getattr(args, "s3_region", None),
        )
        params = sampling_params_from_args(args)
        params.update(
            temperature=cfg["temperature"],
            top_p=cfg["top_p"],
            top_k=cfg["top_k"],
            max_new_tokens=cfg.get("max_response_len") or args.rollout_max_response_len,
        )
        n = int(cfg["n_samples_per_eval_prompt"])
        samples = []
        for i, prompt in enumerate(dataset.samples):
            for j in range(n):
                sample = prompt.clone()
                sample.index = i * n + j
                samples.append(sample)
        done = await asyncio.gather(*(generate_and_rm(args, s, params, evaluation=True) for s in samples))
        flat: list[Sample] = sorted(
            (s for d in done for s in (d if isinstance(d, list) else [d])), key=lambda s: s.index or 0
        )
        reward_key = getattr(args, "eval_reward_key", None) or args.reward_key
        results[cfg["name"]] = {
            "rewards": [s.get_reward_value(argparse.Namespace(reward_key=reward_key)) for s in flat],
            "truncated": [s.status == Sample.Status.TRUNCATED for s in flat],
            "samples": flat,
        }
    return RolloutFnEvalOutput(data=results), []


__all__ = [
    "GenerateState",
    "abort",
    "eval_rollout",
    "generate",
    "generate_and_rm",
    "generate_and_rm_group",
    "get_model_url",
]
