"""Checks across the settings of several sections: the batch sizes a rollout splits into, and
the trainer's settings against the rollout (steps, data parallelism, the trainer group)."""

from __future__ import annotations

from typing import Any


def resolve_batch_sizes(
    rollout_batch_size: int,
    n_samples_per_prompt: int,
    global_batch_size: int | None,
    num_steps_per_rollout: int | None,
) -> tuple[int, int]:
    """(global_batch_size, num_steps_per_rollout) with the nulls derived, as slime derives them:
    a rollout's rollout_batch_size x n_samples_per_prompt samples make num_steps_per_rollout steps of
    global_batch_size. Raises ValueError naming the settings when they do not fit together."""
    total = rollout_batch_size * n_samples_per_prompt
    where = (
        f"rollout_batch_size x n_samples_per_prompt = {rollout_batch_size} x {n_samples_per_prompt} = {total}"
    )
    if global_batch_size is None:
        if num_steps_per_rollout is None:
            return total, 1
        if total % num_steps_per_rollout:
            raise ValueError(f"train.num_steps_per_rollout={num_steps_per_rollout} does not divide {where}")
        return total // num_steps_per_rollout, num_steps_per_rollout
    if total % global_batch_size:
        raise ValueError(f"train.global_batch_size={global_batch_size} does not divide {where}")
    steps = total // global_batch_size
    if num_steps_per_rollout is not None and num_steps_per_rollout != steps:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} x train.num_steps_per_rollout={num_steps_per_rollout} "
            f"differs from {where}; set one of them to null"
        )
    return global_batch_size, steps


def check_train_settings(
    train: Any, rollout_batch_size: int, n_samples_per_prompt: int, num_rollout: int
) -> None:
    """Cross-field checks of the train settings (`train` is a TrainConfig or a namespace with its leaves).
    Raises ValueError naming the settings. The tensor-parallel size is checked against the model's heads
    when the trainer builds the model; the objective options check themselves (`objective.py`)."""
    gbs, steps = resolve_batch_sizes(
        rollout_batch_size, n_samples_per_prompt, train.global_batch_size, train.num_steps_per_rollout
    )
    world = train.actor_num_nodes * train.actor_num_gpus_per_node
    tp = train.tensor_model_parallel_size
    if world % tp:
        raise ValueError(
            f"train.tensor_model_parallel_size={tp} does not divide the trainer's world size {world} (train.actor_num_nodes="
            f"{train.actor_num_nodes} x train.actor_num_gpus_per_node={train.actor_num_gpus_per_node}): make the world a "
            "multiple of it (data parallelism is the world size divided by it)"
        )
    if gbs < world // tp:
        raise ValueError(
            f"the global batch size {gbs} (samples per optimizer step) is smaller than the data-parallel size "
            f"{world // tp} (world size {world} / tensor_model_parallel_size {tp}): every data-parallel rank needs a "
            "sample per step; raise train.global_batch_size (or rollout_batch_size) or lower the data parallelism"
        )
    if train.actor_num_nodes > 1 and not train.trainer_rdzv_endpoint:
        raise ValueError(
            f"train.actor_num_nodes={train.actor_num_nodes} needs train.trainer_rdzv_endpoint: host:port of the "
            "campaign's node, reachable from the other trainer nodes, where they join the group"
        )
    if train.max_tokens_per_gpu is None and gbs % train.micro_batch_size:
        raise ValueError(
            f"train.micro_batch_size={train.micro_batch_size} does not divide the global batch size {gbs} "
            "(samples per optimizer step); change one, or set train.max_tokens_per_gpu"
        )
    if train.min_lr > train.lr:
        raise ValueError(f"train.min_lr={train.min_lr} is above train.lr={train.lr}")
    decay_iters = train.lr_decay_iters or max(num_rollout * steps, 1)
    if train.lr_decay_style == "cosine" and train.lr_warmup_iters >= decay_iters:
        raise ValueError(
            f"train.lr_warmup_iters={train.lr_warmup_iters} must be below the decay length {decay_iters} "
            "(train.lr_decay_iters, or num_rollout x num_steps_per_rollout)"
        )
    if train.loss_type == "value_loss":
        raise ValueError(
            "train.loss_type=value_loss: the value loss is the critic's, not the policy's; with "
            "advantage_estimator: ppo the trainer builds a critic and trains it on the value loss itself"
        )
    if train.num_critic_only_steps and train.advantage_estimator != "ppo":
        raise ValueError(
            f"train.num_critic_only_steps={train.num_critic_only_steps} needs advantage_estimator: ppo (only ppo has "
            "a critic)"
        )
