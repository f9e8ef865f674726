"""How per-token values become one number: slime's `sum_of_sample_mean`, and its step normalizer.

slime's reducer returns a *sum* over the micro-batch's samples (each sample's masked mean), or,
with `calculate_per_token_loss`, the sum over all masked tokens; Megatron then divides by the
step's sample count, or by its token count (each sample counting at least one token). Here the
division is part of the reducer: `make_reducer(..., normalizer=step_normalizer(step_masks, ...))`
gives each micro-batch its exact share of the step's mean, so the micro-batch losses of one
step add up (gradients accumulate) to the loss of the whole step, with any micro-batch split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]


def _as_masks(loss_masks: Sequence[torch.Tensor | Sequence[float]], response_lengths: Sequence[int]):
    if len(loss_masks) != len(response_lengths):
        raise ValueError(f"{len(loss_masks)} loss_masks for {len(response_lengths)} samples")
    masks = []
    for i, (mask, r) in enumerate(zip(loss_masks, response_lengths, strict=True)):
        mask = torch.as_tensor(mask, dtype=torch.float32).reshape(-1)
        if mask.numel() != r:
            raise ValueError(f"sample {i}: loss_mask has {mask.numel()} entries but response_length is {r}")
        masks.append(mask)
    return masks


def _token_weights(
    response_lengths: Sequence[int], loss_masks: Sequence[torch.Tensor | Sequence[float]], per_token: bool
) -> torch.Tensor:
    lengths = [int(r) for r in response_lengths]
    masks = _as_masks(loss_masks, lengths)
    if not masks:
        return torch.zeros(0)
    if per_token:
        return torch.cat(masks)
    return torch.cat([m / m.sum().clamp_min(1) for m in masks])


def _weighted_sum(weights: torch.Tensor, scale: float = 1.0) -> Reducer:
    cache: dict[torch.device, torch.Tensor] = {}

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 1 or x.numel() != weights.numel():
            raise ValueError(
                f"the reducer takes the micro-batch's concatenated responses [{weights.numel()}], got {tuple(x.shape)}"
            )
        if x.device not in cache:
            cache[x.device] = weights.to(x.device) * scale
        return (x.float() * cache[x.device]).sum()

    return reduce


def get_sum_of_sample_mean(
    response_lengths: Sequence[int],
    loss_masks: Sequence[torch.Tensor | Sequence[float]],
    calculate_per_token_loss: bool = False,
) -> Reducer:
    """slime's reducer for a packed `[sum(response_lengths)]` tensor: the sum over samples of each
    sample's masked mean (a fully masked sample counts as 0), or the masked sum over all tokens.
    Computed as one weighted sum (weights mask_i / max(sum(mask_i), 1), or mask_i)."""
    return _weighted_sum(_token_weights(response_lengths, loss_masks, calculate_per_token_loss))


def step_normalizer(
    loss_masks: Sequence[torch.Tensor | Sequence[float]], calculate_per_token_loss: bool
) -> float:
    """The step's denominator: its number of samples, or its number of loss tokens (each sample
    counting at least one, as slime's `num_tokens`). Pass the masks of the whole step (every
    micro-batch, every data-parallel rank)."""
    if not calculate_per_token_loss:
        return float(len(loss_masks))
    return float(sum(max(float(torch.as_tensor(m, dtype=torch.float32).sum()), 1.0) for m in loss_masks))


def make_reducer(
    response_lengths: Sequence[int],
    loss_masks: Sequence[torch.Tensor | Sequence[float]],
    calculate_per_token_loss: bool = False,
    normalizer: float | None = None,
) -> Reducer:
    """`get_sum_of_sample_mean` divided by `normalizer` (default: this micro-batch's own
    `step_normalizer`, i.e. the micro-batch's mean)."""
    if normalizer is None:
        normalizer = step_normalizer(loss_masks, calculate_per_token_loss)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (samples or tokens in the step), got {normalizer}")
    weights = _token_weights(response_lengths, loss_masks, calculate_per_token_loss)
    return _weighted_sum(weights, 1.0 / float(normalizer))
