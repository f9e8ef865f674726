"""Per-token loss terms of slime's objectives, on plain tensors.

Conventions, as in slime: `ppo_kl = old_log_probs - log_probs` (so the ratio pi/pi_old is
`exp(-ppo_kl)`), every function returns per-token values over the concatenated responses of a
micro-batch, and the reduction to a scalar is left to a reducer (see `reduction.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .options import KL_LOSS_TYPES


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    kl_loss_type: str,
    importance_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_base) from log-probs of tokens sampled from pi
    (Schulman's estimators): k1 = log r, k2 = (log r)^2 / 2, k3 = low_var_kl = 1/r - 1 + log r
    with log r = log_probs - log_probs_base. `importance_ratio` multiplies the estimate; only
    low_var_kl is then clamped to [-10, 10] (k3 is not, as in slime)."""
    if kl_loss_type not in KL_LOSS_TYPES:
        raise ValueError(f"kl_loss_type {kl_loss_type!r} is not one of {KL_LOSS_TYPES}")
    if log_probs.shape != log_probs_base.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and base {tuple(log_probs_base.shape)} differ")
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_loss_type == "k1":
        kl = log_ratio
    elif kl_loss_type == "k2":
        kl = log_ratio.pow(2) / 2.0
    else:
        kl = torch.expm1(-log_ratio) + log_ratio
    if importance_ratio is not None:
        kl = importance_ratio * kl
    if kl_loss_type == "low_var_kl":
        kl = kl.clamp(min=-10.0, max=10.0)
    return kl


def sequence_mean_ppo_kl(
    log_probs: Sequence[torch.Tensor],
    old_log_probs: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
) -> torch.Tensor:
    """GSPO's sequence-level `ppo_kl`: per sample, the masked mean of old - new log-probs (a fully
    masked sample gives 0), repeated on each of its tokens and concatenated. Its ratio
    exp(-ppo_kl) is the GSPO ratio (pi(y|x) / pi_old(y|x))^(1/|y|); gradients flow through it."""
    parts = []
    for i, (lp, old, mask) in enumerate(zip(log_probs, old_log_probs, loss_masks, strict=True)):
        if lp.shape != old.shape or lp.shape != mask.shape:
            raise ValueError(
                f"sample {i}: log_probs {tuple(lp.shape)}, old_log_probs {tuple(old.shape)}, "
                f"loss_mask {tuple(mask.shape)} must have one entry per response token"
            )
        mask = mask.float()
        seq_kl = ((old.float() - lp.float()) * mask).sum() / mask.sum().clamp_min(1)
        parts.append(seq_kl.expand(lp.shape[0]))
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def policy_loss(
    ppo_kl: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: max(-r A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) A),
    r = exp(-ppo_kl). With `eps_clip_c` (> 1, dual clip), a negative-advantage token's loss is
    further capped at -eps_clip_c * A = eps_clip_c * |A|.

    Returns `(pg_losses, clipfrac, dual_clipfrac)`: clipfrac marks tokens where the clipped term
    won (their gradient is zero), dual_clipfrac tokens where the dual-clip cap won.
    """
    if ppo_kl.shape != advantages.shape:
        raise ValueError(f"ppo_kl {tuple(ppo_kl.shape)} and advantages {tuple(advantages.shape)} differ")
    advantages = advantages.float()
    ratio = torch.exp(-ppo_kl.float())
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    pg_losses = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).float()
    dual_clipfrac = torch.zeros_like(clipfrac)
    if eps_clip_c is not None:
        if not eps_clip_c > 1.0:
            raise ValueError(f"eps_clip_c (dual-clip bound) must be > 1, got {eps_clip_c}")
        cap = -eps_clip_c * advantages
        negative = advantages < 0
        dual_clipfrac = (negative & (cap < pg_losses)).float()
        pg_losses = torch.where(negative, torch.minimum(cap, pg_losses), pg_losses)
    return pg_losses, clipfrac, dual_clipfrac


def cispo_loss(
    ppo_kl: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1): -sg(clip(r, 1 - eps_clip, 1 + eps_clip_high)) * A * log_probs. The
    gradient flows through the log-probs only, so clipped tokens still get one."""
    ratio = torch.exp(-ppo_kl.float())
    truncated = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    pg_losses = -truncated.detach() * advantages.float() * log_probs.float()
    return pg_losses, (truncated != ratio).float()


def tis_weights(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    tis_clip: float,
    tis_clip_low: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling between the trainer's (old) log-probs and the engine's:
    w = clamp(exp(train - rollout), tis_clip_low, tis_clip), detached (both inputs are fixed).

    Returns `(w, per-token metrics)`: `tis` (the raw ratio), `tis_clipfrac` (1 where clamped) and
    `tis_abs` (|ratio - 1|).
    """
    if train_log_probs.shape != rollout_log_probs.shape:
        raise ValueError(
            f"train log-probs {tuple(train_log_probs.shape)} and rollout log-probs "
            f"{tuple(rollout_log_probs.shape)} differ: the engine must report one log-prob per response token"
        )
    ratio = torch.exp(train_log_probs.detach().float() - rollout_log_probs.detach().float())
    weights = ratio.clamp(min=tis_clip_low, max=tis_clip)
    metrics = {
        "tis": ratio,
        "tis_clipfrac": (weights != ratio).float(),
        "tis_abs": (ratio - 1.0).abs(),
    }
    return weights, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: max((V_clip - R)^2, (V - R)^2) with V_clip the new
    value moved at most `value_clip` from the old one. Returns `(losses, clipfrac)`."""
    if not values.shape == old_values.shape == returns.shape:
        raise ValueError(
            f"values {tuple(values.shape)}, old values {tuple(old_values.shape)} and returns "
            f"{tuple(returns.shape)} must match"
        )
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    delta = values - old_values
    clipped = old_values + delta.clamp(-value_clip, value_clip)
    losses = torch.maximum((clipped - returns).pow(2), (values - returns).pow(2))
    return losses, (delta.abs() > value_clip).float()
