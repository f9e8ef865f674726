"""Megatron DDP + Megatron optimizer (Adam) for a model built by `build_gpt_model`.

Megatron DDP accumulates gradients into `param.main_grad` buffers, which only Megatron's
optimizer reads; the two therefore come as a pair. One optimizer step:

    ddp_model.zero_grad_buffer(); optimizer.zero_grad()
    loss = ...(forward_logits(ddp_model, ...)); loss.backward()
    megatron.core.distributed.finalize_model_grads([ddp_model])
    update_successful, grad_norm, _ = optimizer.step()

`finalize_model_grads` does DDP's `finish_grad_sync()` (the data-parallel all-reduce) and also
sums the q/k layernorm gradients over the tensor-parallel group: with `qk_layernorm` (Qwen3)
each tensor-parallel rank sees only its own heads' share of those replicated weights'
gradients, so `finish_grad_sync()` alone trains them wrongly at TP > 1.

The trainer calls `step_if_finite` in place of `optimizer.step()`: the same update, skipped
when the loss or the gradient norm is not finite; `build_scheduler` is the learning-rate schedule
that follows each step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slime_wf.training import cpu_shim
from slime_wf.training.model import unwrap_model


def build_optimizer(
    model,
    *,
    lr: float,
    min_lr: float | None = None,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    **optimizer_overrides,
):
    """Wrap `model` in Megatron DDP and build Megatron's Adam optimizer for it.

    Returns `(ddp_model, optimizer)`. Load weights into `model` before calling this: the
    mixed-precision optimizer keeps fp32 copies of the parameters made here.
    `optimizer_overrides` go to `OptimizerConfig`.
    """
    cpu_shim.install()  # before megatron's first import (see cpu_shim.import_megatron)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    gpt = unwrap_model(model)
    config = gpt.config
    cpu_shim.check_trainable(config.params_dtype, use_distributed_optimizer)
    ddp_model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        gpt,
    )
    options = dict(
        optimizer="adam",
        lr=lr,
        min_lr=lr if min_lr is None else min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=config.params_dtype == torch.bfloat16,
        fp16=config.params_dtype == torch.float16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    options.update(optimizer_overrides)
    optimizer = get_megatron_optimizer(OptimizerConfig(**options), [ddp_model])
    use_fused_adam(optimizer)
    return ddp_model, optimizer


_FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch documents its fused Adam kernel


def use_fused_adam(optimizer) -> None:
    """Run torch's fused Adam kernel under Megatron's optimizer where it falls back to torch's Adam (no
    Apex or Transformer Engine). Megatron builds that Adam without naming an implementation, and torch then
    picks the one-tensor-at-a-time loop on CPU: the fused kernel is the same update in one pass over each
    tensor (12m shape: 31 -> 10 ms a step). Call again after loading an optimizer state: torch restores the
    implementation flags a checkpoint was saved with."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if not all(p.device.type in _FUSED_ADAM_DEVICES and p.is_floating_point() for p in params):
            continue
        for group in inner.param_groups:
            if not group.get("differentiable"):
                group.update(fused=True, foreach=False)


def step_if_finite(optimizer, loss_is_finite: bool) -> tuple[bool, float]:
    """Megatron's `optimizer.step()` (ChainedOptimizer's sequence: prepare the gradients, their norm
    over the model-parallel group, clip, update) with a check between the norm and the update:
    a non-finite loss or norm leaves the parameters and the Adam state untouched. Returns
    (updated, grad_norm); every rank of the group takes the same decision, since the loss is
    reduced over the data-parallel ranks and the norm over the model-parallel ones."""
    # the module's clip function at call time: on CPU, cpu_shim replaces it there
    from megatron.core.optimizer import optimizer as megatron_optimizer

    found_inf = optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(part, "is_stub_optimizer", False):
            continue
        params = part.get_parameters()
        if params and part.config.clip_grad > 0.0:
            megatron_optimizer.clip_grad_by_total_norm_fp32(
                params,
                max_norm=part.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def build_scheduler(optimizer, args: Any):
    """Megatron's OptimizerParamScheduler: linear warmup from 0 over `lr_warmup_iters` steps, then
    `lr_decay_style` (constant, or cosine down to `min_lr` at `lr_decay_iters`). The current
    settings win over a checkpoint's; only the step count is restored from it."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = max(int(args.lr_decay_iters), int(args.lr_warmup_iters) + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=float(args.lr),
        min_lr=float(args.min_lr),
        lr_warmup_steps=int(args.lr_warmup_iters),
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=float(args.weight_decay),
        end_wd=float(args.weight_decay),
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
