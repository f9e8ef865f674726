"""Advantages and returns per response token, for slime's advantage estimators.

Inputs are per-sample lists (variable lengths): `rewards` holds one scalar per sample, in group
order (the `n_samples_per_prompt` responses of a prompt are adjacent), and every per-token list
holds `[response_length_i]` tensors.

The group normalization that slime applies to the rewards on the rollout side
(`_post_process_rewards`) happens here, in `post_process_rewards`, so the rewards given to
`compute_advantages_and_returns` are the raw ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .losses import compute_approx_kl
from .options import ObjectiveOptions

GROUP_NORMALIZED = ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")
STD_NORMALIZED = ("grpo", "gspo", "cispo")


def resolve_group_sizes(
    num_samples: int, n_samples_per_prompt: int | None = None, group_sizes: Sequence[int] | None = None
) -> list[int]:
    """The size of each group of adjacent samples: `group_sizes` when given, else equal groups of
    `n_samples_per_prompt`."""
    if group_sizes is not None:
        sizes = [int(g) for g in group_sizes]
        if any(g <= 0 for g in sizes) or sum(sizes) != num_samples:
            raise ValueError(f"group_sizes {sizes} must be positive and add up to the {num_samples} samples")
        return sizes
    if not n_samples_per_prompt or n_samples_per_prompt <= 0:
        raise ValueError("group normalization needs n_samples_per_prompt (> 0) or explicit group_sizes")
    if num_samples % n_samples_per_prompt:
        raise ValueError(
            f"{num_samples} samples do not split into groups of n_samples_per_prompt={n_samples_per_prompt}; "
            "pass group_sizes for unequal groups"
        )
    return [n_samples_per_prompt] * (num_samples // n_samples_per_prompt)


def group_normalize(
    rewards: torch.Tensor | Sequence[float],
    group_sizes: Sequence[int],
    *,
    std_normalization: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(r - group mean), divided by (group std + eps) when `std_normalization`. The std is the
    unbiased one (torch.std); a group of one sample has no spread and gets 0."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    out = []
    for group in rewards.split([int(g) for g in group_sizes]):
        centered = group - group.mean()
        if std_normalization:
            std = group.std() if group.numel() > 1 else group.new_zeros(())
            centered = centered / (std + eps)
        out.append(centered)
    return torch.cat(out) if out else rewards


def post_process_rewards(
    args: Any,
    rewards: torch.Tensor | Sequence[float],
    *,
    n_samples_per_prompt: int | None = None,
    group_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """slime's reward post-processing: group mean subtraction for grpo, gspo, cispo and
    reinforce_plus_plus_baseline (when `rewards_normalization`), plus std division for grpo, gspo
    and cispo (when `grpo_std_normalization`); other estimators get the rewards unchanged.
    `args`: the `ObjectiveOptions`, or a namespace to resolve them from."""
    if n_samples_per_prompt is None:
        n_samples_per_prompt = getattr(args, "n_samples_per_prompt", None)
    args = ObjectiveOptions.from_args(args)
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if args.advantage_estimator not in GROUP_NORMALIZED or not args.rewards_normalization:
        return rewards
    sizes = resolve_group_sizes(rewards.numel(), n_samples_per_prompt, group_sizes)
    return group_normalize(
        rewards,
        sizes,
        std_normalization=args.advantage_estimator in STD_NORMALIZED and args.grpo_std_normalization,
    )


def broadcast_to_tokens(
    values: torch.Tensor | Sequence[float], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each sample's scalar repeated over its response tokens (shaped like `like[i]`)."""
    values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    return [
        torch.full_like(t, float(v), dtype=torch.float32) for v, t in zip(values.tolist(), like, strict=True)
    ]


def reinforce_plus_plus_returns(
    rewards: torch.Tensor | Sequence[float],
    kl: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
    kl_coef: float,
    gamma: float,
) -> list[torch.Tensor]:
    """REINFORCE++ returns: token rewards -kl_coef * kl, plus the sequence reward on the last
    loss-masked token, discounted backwards: G_t = r_t + gamma * G_{t+1}. As in slime, the KL
    penalty of every response token counts, masked or not."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    out = []
    for i, (reward, kl_i, mask) in enumerate(zip(rewards.tolist(), kl, loss_masks, strict=True)):
        token_rewards = -kl_coef * kl_i.detach().float()
        nonzero = torch.as_tensor(mask).reshape(-1).nonzero()
        if nonzero.numel() == 0:
            raise ValueError(
                f"sample {i} is fully loss-masked: REINFORCE++ has no token to put its reward on"
            )
        token_rewards = token_rewards.clone()
        token_rewards[int(nonzero[-1])] += reward
        out.append(_discounted_cumsum(token_rewards, gamma))
    return out


def _discounted_cumsum(x: torch.Tensor, gamma: float) -> torch.Tensor:
    out = torch.empty_like(x)
    running = x.new_zeros(())
    for t in range(x.numel() - 1, -1, -1):
        running = x[t] + gamma * running
        out[t] = running
    return out


def reinforce_plus_plus_baseline_advantages(
    rewards: torch.Tensor | Sequence[float], kl: Sequence[torch.Tensor], kl_coef: float
) -> list[torch.Tensor]:
    """REINFORCE++-baseline, before whitening: the (group-centered) reward on every token, minus
    kl_coef * kl."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    return [
        torch.full_like(k, r, dtype=torch.float32) - kl_coef * k.detach().float()
        for r, k in zip(rewards.tolist(), kl, strict=True)
    ]


def ppo_token_rewards(
    rewards: torch.Tensor | Sequence[float], kl: Sequence[torch.Tensor], kl_coef: float
) -> list[torch.Tensor]:
    """PPO's token rewards: -kl_coef * kl on every token, plus the sequence reward on the last
    response token (slime puts it on the last position, not the last loss-masked one)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    out = []
    for i, (reward, kl_i) in enumerate(zip(rewards.tolist(), kl, strict=True)):
        if kl_i.numel() == 0:
            raise ValueError(f"sample {i} has an empty response: PPO has no token to put its reward on")
        token_rewards = (-kl_coef * kl_i.detach().float()).clone()
        token_rewards[-1] += reward
        out.append(token_rewards)
    return out


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over one response: delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0),
    A_t = delta_t + gamma * lambd * A_{t+1}; returns are A + V. Both detached."""
    rewards, values = rewards.detach().float().reshape(-1), values.detach().float().reshape(-1)
    if rewards.shape != values.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must match per token"
        )
    next_values = torch.cat([values[1:], values.new_zeros(1)])
    deltas = rewards + gamma * next_values - values
    advantages = _discounted_cumsum(deltas, gamma * lambd)
    return advantages, advantages + values


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    epsilon: float = 1e-8,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + epsilon) with the mean and the unbiased variance of the masked
    entries; summed over `process_group` when torch.distributed is initialized and a group is
    given. `shift_mean=False` adds the mean back."""
    mask = mask.float().to(values.device)
    stats = torch.stack([(values * mask).sum(), (values.pow(2) * mask).sum(), mask.sum()]).float()
    if process_group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, group=process_group)
    total, total_sq, count = stats.unbind()
    if count.item() == 0:
        raise ValueError("cannot whiten advantages: no token of the batch has a nonzero loss mask")
    mean = total / count
    var = total_sq / count - mean.pow(2)
    if count.item() >= 2:
        var = var * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + epsilon)
    return whitened if shift_mean else whitened + mean


def _per_token_list(
    name: str, xs: Sequence[torch.Tensor] | None, lengths: Sequence[int]
) -> list[torch.Tensor] | None:
    if xs is None:
        return None
    if len(xs) != len(lengths):
        raise ValueError(f"{name} has {len(xs)} entries for {len(lengths)} samples")
    out = []
    for i, (x, r) in enumerate(zip(xs, lengths, strict=True)):
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
        if x.numel() != r:
            raise ValueError(f"{name}[{i}] has {x.numel()} entries but response_length is {r}")
        out.append(x)
    return out


def compute_advantages_and_returns(
    args: Any,
    rewards: torch.Tensor | Sequence[float],
    *,
    log_probs: Sequence[torch.Tensor] | None = None,
    ref_log_probs: Sequence[torch.Tensor] | None = None,
    loss_masks: Sequence[torch.Tensor],
    response_lengths: Sequence[int],
    n_samples_per_prompt: int | None = None,
    values: Sequence[torch.Tensor] | None = None,
    rollout_log_probs: Sequence[torch.Tensor] | None = None,
    group_sizes: Sequence[int] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-sample `(advantages, returns)`, each `[response_length_i]`, as slime computes them.

    `rewards` are raw (group normalization is applied here per `post_process_rewards`);
    `log_probs` are the trainer's log-probs of the policy that generated the batch (slime's
    `log_probs`), `rollout_log_probs` the engine's (used instead when `use_rollout_logprobs`);
    `ref_log_probs` are needed when `kl_coef != 0`; `values` (the critic's, per token) for ppo.
    The per-token KL(actor||ref) (`kl_loss_type` estimator) is a reward penalty for ppo and the
    reinforce_plus_plus estimators; grpo/gspo/cispo ignore `kl_coef` (use `use_kl_loss`).
    With `normalize_advantages`, advantages are whitened over all loss-masked tokens (over
    `process_group` too when given). `args`: the `ObjectiveOptions` (resolved once by the
    trainer), or a namespace to resolve them from (`n_samples_per_prompt` is read from it too).
    """
    if n_samples_per_prompt is None:
        n_samples_per_prompt = getattr(args, "n_samples_per_prompt", None)
    args = ObjectiveOptions.from_args(args)
    lengths = [int(r) for r in response_lengths]
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if rewards.numel() != len(lengths):
        raise ValueError(f"{rewards.numel()} rewards for {len(lengths)} samples: give one reward per sample")
    masks = _per_token_list("loss_masks", loss_masks, lengths)
    assert masks is not None  # loss_masks is a required argument
    policy_lp = _per_token_list(
        "rollout_log_probs" if args.use_rollout_logprobs else "log_probs",
        rollout_log_probs if args.use_rollout_logprobs else log_probs,
        lengths,
    )
    values = _per_token_list("values", values, lengths)

    device = next((xs[0].device for xs in (policy_lp, values, masks) if xs), torch.device("cpu"))
    if args.kl_coef == 0 or policy_lp is None:
        kl = [torch.zeros(r, device=device) for r in lengths]
    else:
        ref = _per_token_list("ref_log_probs", ref_log_probs, lengths)
        if ref is None:
            raise ValueError(
                "kl_coef != 0 needs ref_log_probs (the reference model's log-probs per response token)"
            )
        kl = [compute_approx_kl(lp, rf, args.kl_loss_type) for lp, rf in zip(policy_lp, ref, strict=True)]

    shaped = post_process_rewards(
        args, rewards, n_samples_per_prompt=n_samples_per_prompt, group_sizes=group_sizes
    )
    shaped = shaped.to(device)
    estimator = args.advantage_estimator
    if estimator in ("grpo", "gspo", "cispo"):
        returns = broadcast_to_tokens(shaped, kl)
        advantages = [r.clone() for r in returns]
    elif estimator == "reinforce_plus_plus":
        returns = reinforce_plus_plus_returns(shaped, kl, masks, args.kl_coef, args.gamma)
        advantages = [r.clone() for r in returns]
    elif estimator == "reinforce_plus_plus_baseline":
        advantages = reinforce_plus_plus_baseline_advantages(shaped, kl, args.kl_coef)
        returns = [a.clone() for a in advantages]
    else:  # ppo
        if values is None:
            raise ValueError("advantage_estimator ppo needs the critic's values per response token")
        token_rewards = ppo_token_rewards(shaped, kl, args.kl_coef)
        pairs = [
            compute_gae(r, v, args.gamma, args.lambd) for r, v in zip(token_rewards, values, strict=True)
        ]
        advantages, returns = [a for a, _ in pairs], [g for _, g in pairs]

    if args.normalize_advantages and lengths:
        flat = masked_whiten(torch.cat(advantages), torch.cat(masks), process_group=process_group)
        advantages = list(flat.split(lengths))
    return advantages, returns
