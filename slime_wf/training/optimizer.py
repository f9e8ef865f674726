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
"""

from __future__ import annotations

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
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cpu_shim.install()
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
    return ddp_model, optimizer
