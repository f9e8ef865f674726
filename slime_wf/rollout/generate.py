"""Generating one sample, or one group, on the engines; continuing partial samples.

`generate(args, sample, sampling_params)` keeps slime's signature so a user's
`custom_generate_function_path` can wrap it. The engines it talks to come from the rollout
context (`current_context()`), which the rollout loop sets for the tasks it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from slime_wf.plugins import load_function
from slime_wf.rollout.engine_client import (
    EngineBusy,
    EngineError,
    EngineRejected,
    EngineSession,
    EngineTimeout,
    EngineUnavailable,
)
from slime_wf.types import Group, Sample

logger = logging.getLogger(__name__)

_MAX_UNAVAILABLE_RETRIES = 8  # reconnects to other (or restarted) engines before a sample is FAILED
# Continuations of one sample after aborts the rollout did not ask for. An engine that aborts the
# same request this often is not having a passing fault (a restart, a memory squeeze).
MAX_ENGINE_ABORT_RETRIES = 3
# 4xx answers that say nothing about the request itself (a missing key, a wrong URL): every request
# would get them, so they fail the rollout with the engine's message instead of dropping groups.
_NOT_ABOUT_THE_REQUEST = (401, 403, 404, 405)
# Drop reasons of groups whose sample failed at the engine.
ENGINE_ABORT = "engine_abort"
ENGINE_REJECTED = "engine_rejected"
ENGINE_BUSY = "engine_busy"
ENGINE_ERROR = "engine_error"
# HTTP 500 answers to one request (the engine failed computing it, and answered the others) that are
# retried before the sample is FAILED: a passing fault goes away, a request that breaks the engine does not.
MAX_ENGINE_ERROR_RETRIES = 2


@dataclass
class RolloutContext:
    """What the generation of one rollout (or evaluation) shares: engines, tokenizer, counters."""

    args: Any
    session: EngineSession
    tokenizer: Any
    rollout_id: int
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    aborted: bool = False
    counters: Counter = field(default_factory=Counter)
    generated_tokens: int = 0
    # per-rollout state of slime's plugin API (`slime_wf.compat`): its GenerateState; "event_loop", the loop
    # that a custom rollout function's coroutines run on
    plugin_state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # slime's plugins post to f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate";
        # that address is the router, else the first engine (slime_wf.compat's `post` spreads
        # requests to it over every engine of the session).
        urls = getattr(self.session, "worker_urls", None)
        address = getattr(self.session, "router_url", None) or (urls[0] if urls else None)
        if address:
            parsed = urllib.parse.urlsplit(address)
            self.args.sglang_router_ip, self.args.sglang_router_port = parsed.hostname, parsed.port


_context: contextvars.ContextVar[RolloutContext] = contextvars.ContextVar("slime_wf_rollout_context")


def current_context() -> RolloutContext:
    try:
        return _context.get()
    except LookupError:
        raise RuntimeError("generate() runs only inside a rollout (no engine context is set)") from None


@contextlib.contextmanager
def rollout_context(ctx: RolloutContext) -> Iterator[RolloutContext]:
    """Make `ctx` the rollout context of this block (and of the tasks it starts); reset on the way out."""
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)


def sampling_params_from_args(args: Any) -> dict[str, Any]:
    """The campaign's sampling parameters in SGLang's `sampling_params` shape."""
    params: dict[str, Any] = {
        "temperature": args.rollout_temperature,
        "top_p": args.rollout_top_p,
        "top_k": args.rollout_top_k,
        "max_new_tokens": args.rollout_max_response_len,
        "skip_special_tokens": args.rollout_skip_special_tokens,
        # keep the stop string/token in the response, so the trained tokens are what was sampled
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    if args.rollout_stop:
        params["stop"] = list(args.rollout_stop)
    if args.rollout_stop_token_ids:
        params["stop_token_ids"] = list(args.rollout_stop_token_ids)
    return params


def prompt_token_ids(tokenizer: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, list):  # chat messages that were not rendered when the dataset was loaded
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def _append_response(sample: Sample, output: dict[str, Any]) -> int:
    meta = output.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs") or []
    tokens = [int(p[1]) for p in pairs]
    if not tokens and output.get("output_ids"):
        raise EngineError(
            "engine returned output_ids without output_token_logprobs; return_logprob is required"
        )
    sample.tokens = sample.tokens + tokens
    sample.response = (sample.response or "") + (output.get("text") or "")
    sample.response_length += len(tokens)
    sample.loss_mask = (sample.loss_mask or []) + [1] * len(tokens)
    sample.rollout_log_probs = (sample.rollout_log_probs or []) + [float(p[0]) for p in pairs]
    sample.update_from_meta_info(meta)
    return len(tokens)


def _payload(ctx: RolloutContext, sample: Sample, sampling_params: dict[str, Any]) -> dict[str, Any] | None:
    """The `/generate` body that generates (or continues) `sample`; None when its token budget is spent."""
    params = dict(sampling_params)
    params["max_new_tokens"] = params["max_new_tokens"] - sample.response_length
    if params["max_new_tokens"] <= 0:
        return None
    if params.get("temperature", 1.0) > 0 and "sampling_seed" not in params:
        # reproducible given the weights; a continuation gets a fresh seed
        params["sampling_seed"] = (
            ctx.args.rollout_seed * 1_000_003 + (sample.index or 0) * 7919 + sample.response_length
        ) % (2**31)
    return {
        "input_ids": sample.tokens,
        "sampling_params": params,
        "return_logprob": True,
        "rid": f"r{ctx.rollout_id}-s{sample.index}-{uuid.uuid4().hex[:8]}",
    }


async def generate(
    args: Any, sample: Sample, sampling_params: dict[str, Any], *, _engine_aborts: int = 0
) -> Sample:
    """Generate (or continue) one sample's response in place; returns the sample.

    A request the engine aborts without the rollout asking (an engine restart, another client's
    `/abort_request`, SGLang's own aborts under memory pressure) is continued from its partial
    tokens, up to `MAX_ENGINE_ABORT_RETRIES` times; then the sample is FAILED (`engine_abort`).
    A request the engine refuses (4xx: too long for the context, empty) fails only its sample
    (`engine_rejected`): sending it again cannot help.
    """
    ctx = current_context()
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        raise ValueError(
            f"sample {sample.index} has status {sample.status.value}; only pending or aborted ones generate"
        )
    if not sample.tokens:
        sample.tokens = prompt_token_ids(ctx.tokenizer, sample.prompt)

    timeouts = unavailable = engine_errors = 0
    engine_aborts = _engine_aborts  # a sample a batched request saw aborted comes with one
    while True:
        if ctx.aborted:
            sample.status = Sample.Status.ABORTED
            return sample
        payload = _payload(ctx, sample, sampling_params)
        if payload is None:
            sample.status = Sample.Status.TRUNCATED
            return sample
        try:
            output, _url = await ctx.session.generate(payload, timeout=args.rollout_request_timeout)
        except EngineTimeout as err:
            timeouts += 1
            ctx.counters["request_timeouts"] += 1
            if timeouts >= 2:
                logger.warning("sample %s: %s (twice); marking it FAILED", sample.index, err)
                return _fail(sample, "failed", str(err))
            continue
        except EngineUnavailable as err:
            unavailable += 1
            ctx.counters["request_retries_engine_down"] += 1
            if unavailable > _MAX_UNAVAILABLE_RETRIES:
                return _fail(sample, "failed", str(err))
            await asyncio.sleep(min(0.1 * unavailable, 1.0))
            continue
        except EngineRejected as err:
            if err.status in _NOT_ABOUT_THE_REQUEST:
                raise
            ctx.counters["request_rejected"] += 1
            logger.warning(
                "sample %s: the engine refused its request; marking it FAILED: %s", sample.index, err
            )
            return _fail(sample, ENGINE_REJECTED, str(err))
        except EngineBusy as err:  # the client already backed off and retried: the engines stay overloaded
            ctx.counters["request_busy"] += 1
            logger.warning("sample %s: the engines stayed busy; marking it FAILED: %s", sample.index, err)
            return _fail(sample, ENGINE_BUSY, str(err))
        except EngineError as err:
            if err.status != 500:
                raise
            engine_errors += 1
            ctx.counters["request_engine_errors"] += 1
            if engine_errors > MAX_ENGINE_ERROR_RETRIES:
                logger.warning(
                    "sample %s: the engine failed its request %d times; marking it FAILED: %s",
                    sample.index,
                    engine_errors,
                    err,
                )
                return _fail(sample, ENGINE_ERROR, str(err))
            continue
        ctx.generated_tokens += _append_response(sample, output)
        if sample.status != Sample.Status.ABORTED or ctx.aborted:
            return sample
        engine_aborts += 1
        ctx.counters["request_engine_aborts"] += 1
        message = ((output.get("meta_info") or {}).get("finish_reason") or {}).get("message") or "abort"
        if engine_aborts > MAX_ENGINE_ABORT_RETRIES:
            logger.warning(
                "sample %s: the engine aborted its request %d times without the rollout asking (%s); marking it FAILED",
                sample.index,
                engine_aborts,
                message,
            )
            return _fail(
                sample, ENGINE_ABORT, f"aborted by the engine {engine_aborts} times (last: {message})"
            )


def _fail(sample: Sample, reason: str, message: str) -> Sample:
    """Mark a sample FAILED; `reason` becomes its group's drop reason in the rollout ledger."""
    sample.status = Sample.Status.FAILED
    sample.metadata["failure"] = message
    sample.metadata["failure_reason"] = reason
    return sample


def failure_reason(group: Group) -> str | None:
    """The drop reason of a group with a FAILED sample (the first one's), or None if none failed."""
    for sample in group:
        if sample.status == Sample.Status.FAILED:
            return sample.metadata.get("failure_reason") or "failed"
    return None


async def generate_sample(
    ctx: RolloutContext, sample: Sample, sampling_params: dict[str, Any], *, evaluation: bool = False
) -> Sample | list[Sample]:
    """One sample through the generate function that applies to it: the sample's own
    `generate_function_path`, else `custom_generate_function_path`, else `generate`. A custom function
    that takes `evaluation` is told whether this is an evaluation (slime's `generate_and_rm` does the same)."""
    args = ctx.args
    if args.partial_rollout and args.mask_offpolicy_in_partial_rollout and sample.response_length > 0:
        # tokens from an earlier policy do not count for the loss
        sample.loss_mask = [0] * sample.response_length
    if sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED):
        return sample  # finished in an earlier rollout (kept in the buffer with its reward)
    custom_path = sample.generate_function_path or args.custom_generate_function_path
    if custom_path is None:
        return await generate(args, sample, dict(sampling_params))
    fn = load_function(custom_path, num_positional=3, kind="generate function")
    kwargs = {"evaluation": evaluation} if "evaluation" in inspect.signature(fn).parameters else {}
    result = await fn(args, sample, dict(sampling_params), **kwargs)
    if not isinstance(result, (Sample, list)):
        raise TypeError(
            f"generate function {custom_path} returned {type(result).__name__}, not Sample | list[Sample]"
        )
    return result


async def reward_samples(ctx: RolloutContext, samples: list[Sample], *, whole_group: bool) -> None:
    """Fill `reward` for the samples that have none (all of them with group_rm)."""
    from slime_wf.rollout import rm_hub

    args = ctx.args
    if whole_group:
        rewards = await rm_hub.batched_async_rm(args, samples, **ctx.reward_kwargs)
        for sample, reward in zip(samples, rewards, strict=True):
            sample.reward = reward
        return
    todo = [s for s in samples if s.reward is None]
    if todo:
        rewards = await rm_hub.batched_async_rm(args, todo, **ctx.reward_kwargs)
        for sample, reward in zip(todo, rewards, strict=True):
            sample.reward = reward


async def _generate_fresh_in_one_request(
    ctx: RolloutContext, group: Group, sampling_params: dict[str, Any]
) -> list[Sample]:
    """The group's fresh samples (no response yet, generated by `generate`) in one batched `/generate`:
    a group is n samples of one prompt, and one request instead of n saves the per-request cost of
    HTTP, JSON and the servers' handlers, which on small steps is a large share of the rollout.

    Only an answer for every sample is applied. Anything else (an error, a refusal, a timeout, a dead
    engine) leaves the samples as they were, and `generate` then sends them one by one, with its
    retries and failure reasons per sample; a sample the engine aborted is continued there too.
    Only a session that says it takes batched requests (`EngineSession.takes_batches`: not through a
    router, which spreads requests itself) gets them. Returns the samples it generated."""
    args = ctx.args
    if not getattr(ctx.session, "takes_batches", False) or args.custom_generate_function_path:
        return []
    fresh = [
        s
        for s in group
        if s.status == Sample.Status.PENDING and not s.response_length and not s.generate_function_path
    ]
    if len(fresh) < 2 or ctx.aborted:
        return []
    encoded: list[tuple[Any, list[int]]] = []  # a group's samples share their prompt: encode it once
    for sample in fresh:
        if not sample.tokens:
            ids = next((ids for prompt, ids in encoded if prompt == sample.prompt), None)
            if ids is None:
                ids = prompt_token_ids(ctx.tokenizer, sample.prompt)
                encoded.append((sample.prompt, ids))
            sample.tokens = list(ids)
    payloads = [p for p in (_payload(ctx, sample, sampling_params) for sample in fresh) if p is not None]
    if len(payloads) < len(fresh):  # fresh samples have their whole budget, unless max_new_tokens is 0
        return []
    body: dict[str, Any] = {
        key: [p[key] for p in payloads] for key in ("input_ids", "sampling_params", "rid")
    }
    body["return_logprob"] = True
    try:
        outputs, _url = await ctx.session.generate(body, timeout=args.rollout_request_timeout)
    except EngineError as err:
        # counted as `generate` counts its own; the one-by-one requests that follow are the retry
        if isinstance(err, EngineUnavailable):
            ctx.counters["request_retries_engine_down"] += 1
        elif isinstance(err, EngineTimeout):
            ctx.counters["request_timeouts"] += 1
        logger.debug(
            "group of sample %s: the batched request failed (%s); sending its samples one by one",
            fresh[0].index,
            err,
        )
        return []
    if not isinstance(outputs, list) or len(outputs) != len(fresh):
        return []
    for sample, output in zip(fresh, outputs, strict=True):
        ctx.generated_tokens += _append_response(sample, output)
        if sample.status == Sample.Status.ABORTED and not ctx.aborted:
            ctx.counters["request_engine_aborts"] += 1  # `generate` continues it
    return fresh


async def generate_group(ctx: RolloutContext, group: Group, sampling_params: dict[str, Any]) -> Group:
    """Generate every sample of a group concurrently, without rewarding them: the rollout loop scores
    completed groups in waves (`slime_wf.rollout.rollout`). Fresh samples go to the engine in one
    batched request (`_generate_fresh_in_one_request`); the rest, and any the batch did not finish,
    one request each."""
    batched = {id(s) for s in await _generate_fresh_in_one_request(ctx, group, sampling_params)}

    async def one(sample: Sample) -> Sample | list[Sample]:
        if id(sample) not in batched:
            return await generate_sample(ctx, sample, sampling_params)
        if sample.status == Sample.Status.ABORTED:  # continued (the tokens are this policy's: no masking)
            return await generate(ctx.args, sample, dict(sampling_params), _engine_aborts=1)
        return sample

    results = await asyncio.gather(*(one(s) for s in group))
    flat: Group = []
    for r in results:
        flat.extend(r if isinstance(r, list) else [r])
    if ctx.aborted:
        return flat
    for sample in flat:
        if sample.status == Sample.Status.ABORTED:  # a custom generate function passed an engine abort on
            ctx.counters["request_engine_aborts"] += 1
            _fail(
                sample, ENGINE_ABORT, "aborted by the engine, and the generate function did not continue it"
            )
    return flat


async def generate_and_reward_group(
    ctx: RolloutContext, group: Group, sampling_params: dict[str, Any]
) -> Group:
    """Generate every sample of a group concurrently, then reward them (unless the rollout aborted)."""
    flat = await generate_group(ctx, group, sampling_params)
    if ctx.aborted or any(s.status == Sample.Status.FAILED for s in flat):
        return flat
    await reward_samples(ctx, flat, whole_group=ctx.args.group_rm)
    return flat
