"""The per-micro-batch loss entry points, with slime's signatures.

A train step calls `loss_function(args, batch, logits, normalizer=..., options=...)` once per
micro-batch and back-propagates the returned loss. It dispatches on `loss_type` to
`policy_loss_function`, `value_loss_function`, `sft_loss_function` or the user's
`custom_loss_function_path`, all called as `func(args, batch, logits, sum_of_sample_mean) ->
(loss, metrics)`; the built-in ones read only the objective options, so they take an
`ObjectiveOptions` as `args` (a namespace is resolved on the call).

`batch` is a dict of per-sample lists (slime's micro-batch keys):

- `tokens` (or `unconcat_tokens`): full sequences, prompt + response, each `[total_length_i]`;
- `total_lengths`, `response_lengths`: ints (total_lengths default to the token counts);
- `loss_masks`: `[response_length_i]` each (1 = trained);
- `advantages` (policy loss), `returns` and `values` (value loss): `[response_length_i]` each;
- optional `log_probs` (the trainer's log-probs of the policy that generated the batch, the
  "old" policy), `rollout_log_probs` (the engine's), `ref_log_probs` (for `use_kl_loss`);
- optional `layout`: "packed" or "padded" for the logits (see `logprobs.slice_responses`).

`logits` is the model output over the whole micro-batch (packed `[T, V]` / `[1, T, V]` or padded
`[B, L, V]`), or a `PolicyOutputs` with response log-probs the caller computed itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...plugins import load_function
from .logprobs import per_sample_tokens, response_log_probs_and_entropy, slice_responses
from .losses import cispo_loss, compute_approx_kl, policy_loss, sequence_mean_ppo_kl, tis_weights, value_loss
from .options import ObjectiveOptions
from .reduction import Reducer, make_reducer

LossFunction = Callable[[Any, Mapping[str, Any], Any, Reducer], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class PolicyOutputs:
    """Response log-probs (and entropies) per sample, each `[response_length_i]`, float32, with
    their autograd graph; for models whose log-probs are computed outside these functions."""

    log_probs: list[torch.Tensor]
    entropy: list[torch.Tensor] | None = None


def _lengths(batch: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    if "response_lengths" not in batch:
        raise KeyError("batch needs 'response_lengths' (one int per sample)")
    response_lengths = [int(r) for r in batch["response_lengths"]]
    total_lengths = batch.get("total_lengths")
    if total_lengths is None:
        tokens = batch.get("unconcat_tokens", batch.get("tokens"))
        if tokens is None or isinstance(tokens, torch.Tensor):
            raise KeyError("batch needs 'total_lengths', or 'tokens' as a list of per-sample sequences")
        total_lengths = [len(t) for t in tokens]
    return [int(n) for n in total_lengths], response_lengths


def per_token_list(
    batch: Mapping[str, Any], key: str, lengths: list[int], *, device=None
) -> list[torch.Tensor] | None:
    """`batch[key]` as float32 `[response_length_i]` tensors, checked; None when absent or empty."""
    xs = batch.get(key)
    if xs is None or len(xs) == 0:
        return None
    if len(xs) != len(lengths):
        raise ValueError(f"batch[{key!r}] has {len(xs)} entries for {len(lengths)} samples")
    out = []
    for i, (x, r) in enumerate(zip(xs, lengths, strict=True)):
        x = torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1)
        if x.numel() != r:
            raise ValueError(f"batch[{key!r}][{i}] has {x.numel()} entries but response_length is {r}")
        out.append(x)
    return out


def _require(
    batch: Mapping[str, Any], key: str, lengths: list[int], why: str, device=None
) -> list[torch.Tensor]:
    xs = per_token_list(batch, key, lengths, device=device)
    if xs is None:
        raise KeyError(f"batch[{key!r}] is missing: {why}")
    return xs


def compute_policy_outputs(
    args: Any, batch: Mapping[str, Any], logits: Any, *, with_entropy: bool = True, entropy_grad: bool = True
) -> PolicyOutputs:
    """The micro-batch's response log-probs (and entropies) from `logits`, or `logits` itself
    when it already is a `PolicyOutputs` (checked against the response lengths)."""
    total_lengths, response_lengths = _lengths(batch)
    if isinstance(logits, PolicyOutputs):
        outputs = logits
    elif isinstance(logits, torch.Tensor):
        tokens = batch.get("unconcat_tokens", batch.get("tokens"))
        if tokens is None:
            raise KeyError("batch needs 'tokens' (prompt + response per sample) to score logits")
        log_probs, entropy = response_log_probs_and_entropy(
            logits,
            per_sample_tokens(tokens, total_lengths),
            total_lengths,
            response_lengths,
            temperature=getattr(args, "rollout_temperature", 1.0),
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            chunk_size=getattr(args, "log_probs_chunk_size", -1),
            layout=batch.get("layout"),
        )
        return PolicyOutputs(log_probs, entropy)
    else:
        raise TypeError(f"logits must be a tensor or PolicyOutputs, got {type(logits).__name__}")
    if len(outputs.log_probs) != len(response_lengths) or any(
        lp.numel() != r for lp, r in zip(outputs.log_probs, response_lengths, strict=False)
    ):
        raise ValueError(
            f"PolicyOutputs.log_probs lengths {[lp.numel() for lp in outputs.log_probs]} do not match "
            f"response_lengths {response_lengths}"
        )
    if with_entropy and outputs.entropy is None:
        raise ValueError(
            "PolicyOutputs.entropy is needed for the entropy term and metric; compute it with the log-probs"
        )
    return outputs


def policy_loss_function(
    args: Any, batch: Mapping[str, Any], logits: Any, sum_of_sample_mean: Reducer
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip / GSPO / CISPO policy loss with the optional entropy bonus, KL loss and TIS.

    loss = pg_loss - entropy_coef * entropy + kl_loss_coef * KL(actor||ref) (when use_kl_loss).
    Metrics (detached scalars, each reduced like the loss): loss, pg_loss, entropy_loss,
    pg_clipfrac, pg_dual_clipfrac, ppo_kl; kl_loss with use_kl_loss; tis, tis_clipfrac, tis_abs
    and ois with use_tis; train_rollout_logprob_abs_diff and train_rollout_kl (k3 estimate of
    KL(rollout||train)) whenever the batch has rollout_log_probs.
    """
    args = ObjectiveOptions.from_args(args)
    _, lengths = _lengths(batch)
    outputs = compute_policy_outputs(
        args, batch, logits, with_entropy=True, entropy_grad=args.entropy_coef != 0
    )
    device = outputs.log_probs[0].device if outputs.log_probs else torch.device("cpu")
    masks = _require(batch, "loss_masks", lengths, "one 0/1 mask per response token", device)
    advantages = (
        torch.cat(_require(batch, "advantages", lengths, "compute them first", device)) if lengths else None
    )
    log_probs = torch.cat(outputs.log_probs) if lengths else torch.zeros(0, device=device)
    rollout_lp = per_token_list(batch, "rollout_log_probs", lengths, device=device)
    trainer_old_lp = per_token_list(batch, "log_probs", lengths, device=device)
    if args.use_rollout_logprobs:
        if rollout_lp is None:
            raise KeyError("use_rollout_logprobs needs batch['rollout_log_probs'] (the engine's log-probs)")
        old_lp = rollout_lp
    else:
        # Without recomputed old log-probs the batch is on-policy: the ratio is 1 with its gradient.
        old_lp = trainer_old_lp or [lp.detach() for lp in outputs.log_probs]
    if advantages is None:
        advantages = torch.zeros(0, device=device)

    if args.advantage_estimator == "gspo":
        ppo_kl = sequence_mean_ppo_kl(outputs.log_probs, old_lp, masks).to(device)
    else:
        ppo_kl = (torch.cat(old_lp) if old_lp else log_probs.detach()) - log_probs
    if args.advantage_estimator == "cispo":
        pg, clipfrac = cispo_loss(ppo_kl, log_probs, advantages, args.eps_clip, args.eps_clip_high)
        dual_clipfrac = torch.zeros_like(clipfrac)
    else:
        pg, clipfrac, dual_clipfrac = policy_loss(
            ppo_kl, advantages, args.eps_clip, args.eps_clip_high, args.eps_clip_c
        )

    metrics: dict[str, torch.Tensor] = {}
    if args.use_tis:
        if rollout_lp is None:
            raise KeyError(
                "use_tis needs batch['rollout_log_probs'] (the engine's log-probs per response token)"
            )
        train_lp = torch.cat(trainer_old_lp) if trainer_old_lp else log_probs.detach()
        weights, tis_metrics = tis_weights(train_lp, torch.cat(rollout_lp), args.tis_clip, args.tis_clip_low)
        pg = pg * weights
        for key, value in tis_metrics.items():
            metrics[key] = sum_of_sample_mean(value).detach()
        metrics["ois"] = sum_of_sample_mean(torch.exp(-ppo_kl.detach())).detach()

    pg_loss = sum_of_sample_mean(pg)
    assert outputs.entropy is not None  # computed above with with_entropy=True
    entropy_loss = sum_of_sample_mean(torch.cat(outputs.entropy) if lengths else log_probs.detach())
    loss = pg_loss - args.entropy_coef * entropy_loss

    if args.use_kl_loss:
        ref_lp = _require(
            batch, "ref_log_probs", lengths, "use_kl_loss needs the reference model's log-probs", device
        )
        with_grad = float(args.kl_loss_coef) != 0.0
        current = log_probs if with_grad else log_probs.detach()
        old_cat = torch.cat(old_lp) if old_lp else current.detach()
        ratio = torch.exp(current - old_cat) if args.use_unbiased_kl else None
        kl = compute_approx_kl(
            current, torch.cat(ref_lp) if lengths else current.detach(), args.kl_loss_type, ratio
        )
        kl_loss = sum_of_sample_mean(kl)
        if with_grad:
            loss = loss + float(args.kl_loss_coef) * kl_loss
        metrics["kl_loss"] = kl_loss.detach()

    if rollout_lp is not None:
        compared = log_probs.detach() if args.use_rollout_logprobs else torch.cat(old_lp).detach()
        rollout_cat = torch.cat(rollout_lp)
        metrics["train_rollout_logprob_abs_diff"] = sum_of_sample_mean(
            (compared - rollout_cat).abs()
        ).detach()
        metrics["train_rollout_kl"] = sum_of_sample_mean(
            compute_approx_kl(rollout_cat, compared, "k3")
        ).detach()

    if log_probs.numel() == 0 and isinstance(logits, torch.Tensor):
        loss = loss + 0.0 * logits.sum()  # keeps every parameter in the graph for an empty micro-batch

    return loss, {
        "loss": loss.detach(),
        "pg_loss": pg_loss.detach(),
        "entropy_loss": entropy_loss.detach(),
        "pg_clipfrac": sum_of_sample_mean(clipfrac).detach(),
        "pg_dual_clipfrac": sum_of_sample_mean(dual_clipfrac).detach(),
        "ppo_kl": sum_of_sample_mean(ppo_kl.detach()).detach(),
        **metrics,
    }


def value_loss_function(
    args: Any, batch: Mapping[str, Any], values: Any, sum_of_sample_mean: Reducer
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of a critic. `values` is the value head's output over the micro-batch
    (packed `[T]`, `[T, 1]`, `[1, T, 1]` or padded `[B, L, 1]`, sliced like logits) or a list of
    per-sample `[response_length_i]` tensors; the batch holds the old `values` and the `returns`."""
    args = ObjectiveOptions.from_args(args)
    total_lengths, lengths = _lengths(batch)
    if isinstance(values, torch.Tensor):
        rows = slice_responses(values, total_lengths, lengths, layout=batch.get("layout"))
        new_values = [v.reshape(-1) for v in rows]
    else:
        new_values = [torch.as_tensor(v).reshape(-1) for v in values]
    if [v.numel() for v in new_values] != lengths:
        raise ValueError(
            f"value lengths {[v.numel() for v in new_values]} do not match response_lengths {lengths}"
        )
    device = new_values[0].device if new_values else torch.device("cpu")
    old = torch.cat(_require(batch, "values", lengths, "the critic's values when the batch was made", device))
    returns = torch.cat(_require(batch, "returns", lengths, "compute advantages and returns first", device))
    losses, clipfrac = value_loss(torch.cat(new_values), old, returns, args.value_clip)
    loss = sum_of_sample_mean(losses)
    if losses.numel() == 0 and isinstance(values, torch.Tensor):
        loss = loss + 0.0 * values.sum()
    return loss, {"value_loss": loss.detach(), "value_clipfrac": sum_of_sample_mean(clipfrac).detach()}


def sft_loss_function(
    args: Any, batch: Mapping[str, Any], logits: Any, sum_of_sample_mean: Reducer
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the loss-masked response tokens."""
    args = ObjectiveOptions.from_args(args)
    outputs = compute_policy_outputs(args, batch, logits, with_entropy=False)
    log_probs = torch.cat(outputs.log_probs) if outputs.log_probs else torch.zeros(0)
    loss = -sum_of_sample_mean(log_probs)
    if log_probs.numel() == 0 and isinstance(logits, torch.Tensor):
        loss = loss + 0.0 * logits.sum()
    return loss, {"loss": loss.detach()}


@functools.lru_cache(maxsize=16)
def _custom_loss(path: str) -> LossFunction:
    return load_function(path, num_positional=4, kind="custom loss function")


def loss_function(
    args: Any,
    batch: Mapping[str, Any],
    logits: Any,
    *,
    normalizer: float | None = None,
    options: ObjectiveOptions | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch, per `args.loss_type`, and its metrics.

    `normalizer` is the step's sample count, or its token count with `calculate_per_token_loss`
    (`reduction.step_normalizer` over every micro-batch of the step); the losses of the step's
    micro-batches then add up to the step's mean loss, and so do the metrics. Without it, the
    micro-batch is its own step.

    `options` are the objective options resolved once from `args` (the trainer passes them, so
    nothing is checked again per micro-batch); without them they are resolved from `args` here.
    The built-in losses take the options; a custom loss gets `args` itself, slime's namespace
    with every flag, its own ones included.
    """
    options = ObjectiveOptions.from_args(args) if options is None else options
    _, lengths = _lengths(batch)
    masks = _require(batch, "loss_masks", lengths, "one 0/1 mask per response token")
    reducer = make_reducer(lengths, masks, options.calculate_per_token_loss, normalizer)
    builtin: LossFunction | None = {
        "policy_loss": policy_loss_function,
        "value_loss": value_loss_function,
        "sft_loss": sft_loss_function,
    }.get(options.loss_type)
    if builtin is not None:
        loss, metrics = builtin(options, batch, logits, reducer)
    else:
        loss, metrics = _custom_loss(options.custom_loss_function_path)(args, batch, logits, reducer)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(
            f"loss function for loss_type {options.loss_type!r} must return a scalar tensor, got {loss!r}"
        )
    if not isinstance(metrics, Mapping):
        raise TypeError(f"loss function for loss_type {options.loss_type!r} must return (loss, metrics dict)")
    return loss, dict(metrics)
