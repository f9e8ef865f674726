"""One rollout of RL training on a Megatron model: score, advantages, optimizer steps, metrics.

`train_rollout` is the whole algorithm for one rollout id, written top to bottom:

1. the rollout's samples become `TrainItem`s and are split into `num_steps_per_rollout`
   optimizer steps of `global_batch_size` samples (`batching`; a short rollout into fewer or
   smaller steps);
2. the reference model scores the responses when a KL term needs it, and the policy scores
   them before its first step when there is more than one step (the "old" policy; with one
   step the current log-probs, detached, are the old ones, as in slime); with ppo the critic
   scores them too (its values, for GAE and the value clip);
3. advantages from the raw rewards (`objectives.compute_advantages_and_returns`, which does
   the group normalization, or GAE with ppo);
4. per step: forward/backward of every micro-batch with `objectives.loss_function` (normalized
   so that the micro-batch losses add up to the step's mean), gradient all-reduce (Megatron
   DDP), clipping and Adam (Megatron's optimizer), then the learning-rate schedule; with ppo
   the critic takes the same step on the value loss (metrics under `critic/`), alone during
   the first `num_critic_only_steps` rollouts.

Nothing non-finite reaches the weights. A step whose inputs (rewards, advantages, the log-probs
and values the loss reads) are not all finite is skipped before its forward pass; a step whose
loss or gradient norm is not finite is skipped after its backward pass: gradients zeroed, no
Adam update, no learning-rate schedule step (as Megatron-LM's train loop does when its
optimizer reports an overflow). Each skip is counted; `max_consecutive_skipped_steps` skips in a
row, across rollouts too, raise `NonFiniteTrainingError`.

Every function takes the models and the optimizer as arguments; `trainer.Trainer` owns them.

Size: one module over 400 lines because it is the algorithm of one rollout id read top to bottom
(score, advantages, steps, metrics); the pieces that stand alone already live in `batching`,
`objectives` and `critic`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from slime_wf.training.batching import (
    PaddedBatch,
    TrainItem,
    make_micro_batches,
    pad_micro_batch,
    shard_for_data_parallel,
    split_steps,
)
from slime_wf.training.critic import Critic
from slime_wf.training.model import forward_logits
from slime_wf.training.nonfinite import NonFiniteTrainingError, describe, nonfinite_inputs, skip_message
from slime_wf.training.objectives import (
    ObjectiveOptions,
    compute_advantages_and_returns,
    loss_function,
    response_log_probs_and_entropy,
    slice_responses,
    step_normalizer,
)
from slime_wf.training.optimizer import step_if_finite
from slime_wf.training.train_args import needs_critic, needs_old_log_probs, needs_reference_model

logger = logging.getLogger(__name__)

_LOSS_SUM = "_loss_sum"  # the backpropagated losses' sum, whatever metrics the loss function returns


@dataclass
class DataParallel:
    """This rank's place among the data-parallel replicas."""

    rank: int = 0
    size: int = 1
    group: Any = None


def _forward(model, batch: PaddedBatch) -> torch.Tensor:
    return forward_logits(model, batch.input_ids, batch.attention_mask, batch.position_ids)


@torch.no_grad()
def _score(model, micro_batches: Sequence[PaddedBatch], key: str, per_response) -> None:
    """Store `per_response(output, micro_batch)` (one `[response_length]` tensor per sample) of
    the model in eval mode as `item.per_token[key]` (CPU, float32)."""
    was_training = model.training
    model.eval()
    try:
        for mb in micro_batches:
            for item, values in zip(mb.items, per_response(_forward(model, mb), mb), strict=True):
                item.per_token[key] = values.float().cpu()
    finally:
        model.train(was_training)


def score_log_probs(model, micro_batches: Sequence[PaddedBatch], args: Any, key: str) -> None:
    """Store the model's log-probs of each response token as `item.per_token[key]`."""

    def log_probs(logits, mb):
        return response_log_probs_and_entropy(
            logits,
            [it.tokens for it in mb.items],
            [it.total_length for it in mb.items],
            [it.response_length for it in mb.items],
            temperature=args.rollout_temperature,
            with_entropy=False,
            chunk_size=getattr(args, "log_probs_chunk_size", -1),
            layout="padded",
        )[0]

    _score(model, micro_batches, key, log_probs)


def score_values(critic_model, micro_batches: Sequence[PaddedBatch]) -> None:
    """Store the critic's value of each response token as `item.per_token["values"]`."""

    def values(output, mb):
        return slice_responses(
            output[..., 0],
            [it.total_length for it in mb.items],
            [it.response_length for it in mb.items],
            layout="padded",
        )

    _score(critic_model, micro_batches, "values", values)


def set_advantages(items: Sequence[TrainItem], args: Any, objective: ObjectiveOptions | None = None) -> None:
    """`item.per_token["advantages"]` for every item of the rollout (rewards are raw), and
    `returns` when the critic's `values` are there (the value loss's targets). `objective`: the
    objective options resolved from `args` (None: resolved here)."""

    def optional(key):
        if all(key in it.per_token for it in items):
            return [it.per_token[key] for it in items]
        return None

    values = optional("values")
    advantages, returns = compute_advantages_and_returns(
        args if objective is None else objective,
        [it.reward for it in items],
        log_probs=optional("log_probs"),
        ref_log_probs=optional("ref_log_probs"),
        loss_masks=[it.loss_mask for it in items],
        response_lengths=[it.response_length for it in items],
        n_samples_per_prompt=args.n_samples_per_prompt,
        rollout_log_probs=[cast(torch.Tensor, it.rollout_log_probs) for it in items]
        if items[0].rollout_log_probs is not None
        else None,  # all items carry them, or none
        values=values,
    )
    for item, adv, ret in zip(items, advantages, returns, strict=True):
        item.per_token["advantages"] = adv.float().cpu()
        if values is not None:
            item.per_token["returns"] = ret.float().cpu()


def _share_per_token(items: Sequence[TrainItem], keys: Sequence[str], dp: DataParallel) -> None:
    """Give every data-parallel rank the per-token values the other ranks computed for their shares."""
    if dp.size == 1 or not keys:
        return
    local = {it.index: {k: it.per_token[k] for k in keys if k in it.per_token} for it in items}
    local = {i: v for i, v in local.items() if v}
    gathered: list[Any] = [None] * dp.size
    dist.all_gather_object(gathered, local, group=dp.group)
    by_index = {it.index: it for it in items}
    for part in gathered:
        for index, values in part.items():
            by_index[index].per_token.update(values)


def _reduce_metrics(sums: dict[str, float], dp: DataParallel) -> dict[str, float]:
    if dp.size == 1:
        return sums
    gathered: list[Any] = [None] * dp.size
    dist.all_gather_object(gathered, sums, group=dp.group)
    total: dict[str, float] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else float("nan")


def optimizer_step(
    ddp_model,
    optimizer,
    micro_batches: Sequence[PaddedBatch],
    args: Any,
    *,
    normalizer: float,
    dp: DataParallel,
    device: torch.device,
    objective: ObjectiveOptions | None = None,
) -> dict[str, float]:
    """Forward/backward every micro-batch of this rank, all-reduce the gradients, clip, Adam.

    Each micro-batch's loss is its share of the step's mean (`normalizer` counts the samples or
    tokens of the whole step, every rank included), so the step's metrics are the sums of the
    shares. Megatron DDP averages gradients over the data-parallel ranks; scaling the loss by
    their number turns that average into the sum of the shares. When the step's loss or gradient
    norm is not finite the update is skipped (`update_skipped` 1) and the gradients are zeroed.
    `objective`: the objective options resolved from `args`, given to every micro-batch's loss.
    """
    from megatron.core.distributed import finalize_model_grads

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    sums: dict[str, torch.Tensor] = {}
    for mb in micro_batches:
        logits = _forward(ddp_model, mb)
        loss, metrics = loss_function(
            args, mb.loss_batch(device), logits, normalizer=normalizer, options=objective
        )
        (loss * dp.size).backward()
        sums[_LOSS_SUM] = sums.get(_LOSS_SUM, 0.0) + loss.detach().float()
        del logits, loss  # free the micro-batch's logits before the next forward
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
    # Not just ddp_model.finish_grad_sync(): at tensor-parallel size > 1 the replicated q/k
    # layernorm weights (Qwen3) get only their own heads' share of the gradient on each rank,
    # and finalize_model_grads sums those shares over the tensor-parallel group.
    finalize_model_grads([ddp_model])
    lr = _lr(optimizer)
    out = _reduce_metrics({k: float(v) for k, v in sums.items()}, dp)
    loss_sum = out.pop(_LOSS_SUM, 0.0)
    updated, grad_norm = step_if_finite(optimizer, math.isfinite(loss_sum))
    if not updated:
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
    if "entropy_loss" in out:
        out["entropy"] = out.pop("entropy_loss")
    out["grad_norm"] = grad_norm
    out["lr"] = lr
    out["update_skipped"] = float(not updated)
    return out


def train_rollout(
    *,
    ddp_model,
    optimizer,
    scheduler,
    ref_model,
    items: Sequence[TrainItem],
    args: Any,
    dp: DataParallel,
    device: torch.device,
    critic: Critic | None = None,
    train_actor: bool = True,
    rollout_id: int | None = None,
    consecutive_skipped_steps: int = 0,
    objective: ObjectiveOptions | None = None,
) -> dict[str, Any]:
    """Train on one rollout's items; returns the rollout's metrics (means over its steps, leaving
    out the non-finite values of skipped steps) and `steps`, the list of each step's metrics.
    `critic`: ppo's (see critic.py); `train_actor` False trains the critic alone.
    `consecutive_skipped_steps`: the skips in a row before this rollout (the trainer's count);
    the metrics give it after the rollout, and `NonFiniteTrainingError` is raised when it
    reaches `args.max_consecutive_skipped_steps`.
    `objective`: the objective options resolved once from `args` (the Trainer's; None: resolved
    here); the critic's are resolved from `critic.args`. Every loss and advantage call gets them
    as they are."""
    started = time.perf_counter()
    objective = ObjectiveOptions.from_args(args) if objective is None else objective
    critic_objective = None if critic is None else ObjectiveOptions.from_args(critic.args)
    for flag in ("use_rollout_logprobs", "use_tis"):
        if getattr(args, flag) and items and items[0].rollout_log_probs is None:
            raise ValueError(
                f"{flag} needs the engine's log-probs: the samples carry no rollout_log_probs "
                "(ask the engine for them, e.g. return_logprob)"
            )
    if args.global_batch_size < dp.size:
        raise ValueError(
            f"global_batch_size={args.global_batch_size} is smaller than the data-parallel size {dp.size}: "
            "every replica needs samples in every step"
        )
    steps = split_steps(items, args.global_batch_size, min_step_size=dp.size)
    if len(items) < args.global_batch_size * args.num_steps_per_rollout:
        logger.info(
            "short rollout: %d samples instead of %d, trained in %d steps of %s samples",
            len(items),
            args.global_batch_size * args.num_steps_per_rollout,
            len(steps),
            "/".join(str(len(step)) for step in steps),
        )
    plan = [
        [
            pad_micro_batch(mb, device=device)
            for mb in make_micro_batches(
                shard_for_data_parallel(step, dp.rank, dp.size),
                micro_batch_size=args.micro_batch_size,
                max_tokens_per_gpu=args.max_tokens_per_gpu,
            )
        ]
        for step in steps
    ]
    local_batches = [mb for step_batches in plan for mb in step_batches]

    shared_keys = []
    if needs_reference_model(args):
        if ref_model is None:
            raise RuntimeError("a KL term needs the reference model, but the trainer was built without one")
        score_log_probs(ref_model, local_batches, args, "ref_log_probs")
        shared_keys.append("ref_log_probs")
    if needs_old_log_probs(args, len(steps)):
        score_log_probs(ddp_model, local_batches, args, "log_probs")
        shared_keys.append("log_probs")
    if needs_critic(args):
        if critic is None:
            raise RuntimeError(
                "advantage_estimator ppo needs the critic, but the trainer was built without one"
            )
        score_values(critic.ddp_model, local_batches)
        shared_keys.append("values")
    elif not train_actor:
        raise ValueError("train_actor=False trains the critic alone; only advantage_estimator ppo has one")
    # Advantages normalize over the whole rollout: every rank needs every sample's log-probs.
    _share_per_token(items, shared_keys, dp)
    set_advantages(items, args, objective)
    scored = time.perf_counter()

    limit = int(args.max_consecutive_skipped_steps)
    consecutive = int(consecutive_skipped_steps)
    skips: list[str] = []
    applied = 0
    step_metrics = []
    for number, (step_items, micro_batches) in enumerate(zip(steps, plan, strict=True), start=1):
        step_start = time.perf_counter()
        metrics: dict[str, float] = {}
        # Every rank holds the whole step's items, so every rank skips the same steps.
        bad_inputs = nonfinite_inputs(step_items, args)
        if bad_inputs:
            reason = f"non-finite inputs: {describe(bad_inputs)}"
            if critic is not None:
                metrics.update({"critic/update_skipped": 1.0, "critic/lr": _lr(critic.optimizer)})
            if train_actor:
                metrics.update({"update_skipped": 1.0, "lr": _lr(optimizer)})
        else:
            reason = ""
            normalizer = step_normalizer([it.loss_mask for it in step_items], args.calculate_per_token_loss)
            if critic is not None:
                critic_metrics = optimizer_step(
                    critic.ddp_model,
                    critic.optimizer,
                    micro_batches,
                    critic.args,
                    normalizer=normalizer,
                    dp=dp,
                    device=device,
                    objective=critic_objective,
                )
                if critic_metrics["update_skipped"]:
                    reason = (
                        f"critic value loss {critic_metrics.get('value_loss', float('nan')):.4g}, "
                        f"grad_norm {critic_metrics['grad_norm']:.4g}"
                    )
                else:
                    critic.scheduler.step(1)
                    critic.step += 1
                metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
            if train_actor:
                actor_metrics = optimizer_step(
                    ddp_model,
                    optimizer,
                    micro_batches,
                    args,
                    normalizer=normalizer,
                    dp=dp,
                    device=device,
                    objective=objective,
                )
                if actor_metrics["update_skipped"]:
                    reason = "; ".join(
                        filter(
                            None,
                            [
                                reason,
                                f"loss {actor_metrics.get('loss', float('nan')):.4g}, "
                                f"grad_norm {actor_metrics['grad_norm']:.4g}",
                            ],
                        )
                    )
                else:
                    scheduler.step(1)
                    applied += 1
                metrics.update(actor_metrics)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        metrics["step_time_s"] = time.perf_counter() - step_start
        metrics["tokens"] = float(sum(it.total_length for it in step_items))
        metrics["samples"] = float(len(step_items))
        metrics["skipped"] = float(bool(reason))
        step_metrics.append(metrics)
        if reason:
            consecutive += 1
            skips.append(f"step {number}/{len(steps)}: {reason}")
            logger.warning(
                "rollout %s step %d/%d skipped (%d in a row): %s",
                rollout_id,
                number,
                len(steps),
                consecutive,
                reason,
            )
            if consecutive >= limit:
                raise NonFiniteTrainingError(
                    skip_message(rollout_id, skips, consecutive, limit),
                    rollout_id=rollout_id,
                    skips=skips,
                    consecutive=consecutive,
                    applied_steps=applied,
                )
        else:
            consecutive = 0
            logger.info(
                "step %d/%d: loss %.4g grad_norm %.4g lr %.3g value_loss %.4g (%.2fs)",
                number,
                len(steps),
                metrics.get("loss", float("nan")),
                metrics.get("grad_norm", float("nan")),
                metrics.get("lr", float("nan")),
                metrics.get("critic/value_loss", float("nan")),
                metrics["step_time_s"],
            )
    finished = time.perf_counter()

    summary: dict[str, Any] = {}
    for key in dict.fromkeys(k for m in step_metrics for k in m):  # a skipped step may lack some keys
        values = [m[key] for m in step_metrics if key in m]
        finite = [v for v in values if math.isfinite(v)]
        summary[key] = sum(finite) / len(finite) if finite else values[0]
    for key in ("lr", "critic/lr"):
        last = [m[key] for m in step_metrics if key in m]
        if last:
            summary[key] = last[-1]
    del summary["skipped"]
    train_time = finished - scored
    tokens = sum(it.total_length for it in items)
    padded_local = sum(mb.padded_tokens for mb in local_batches)
    real_local = sum(mb.num_tokens for mb in local_batches)
    rewards = [it.reward for it in items if math.isfinite(it.reward)]
    summary.update(
        tokens=float(tokens),
        samples=float(len(items)),
        num_steps=float(len(steps)),
        applied_steps=float(applied),
        skipped_steps=float(len(skips)),
        consecutive_skipped_steps=float(consecutive),
        tokens_per_s=tokens / train_time if train_time > 0 else float("nan"),
        train_time_s=train_time,
        score_time_s=scored - started,
        rollout_train_time_s=finished - started,
        padding_fraction=1.0 - real_local / padded_local if padded_local else 0.0,
        mean_reward=sum(rewards) / len(rewards) if rewards else float("nan"),
        steps=step_metrics,
    )
    return summary
