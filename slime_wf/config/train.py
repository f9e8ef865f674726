"""The trainer's sections: `train` (the objective options of `objective.py`, then the optimizer
and schedule, batching, the trainer group and the critic) and `checkpoint`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section
from .objective import ObjectiveFields


class TrainConfig(ObjectiveFields):
    # The objective options come first, from ObjectiveFields; the checks across sections are in checks.py.
    # Optimizer and schedule (Megatron's Adam and OptimizerParamScheduler).
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of a cosine decay.")
    lr_warmup_iters: int = Field(
        0,
        ge=0,
        description="Optimizer steps of linear warmup from 0 to lr (Megatron's: the first step has lr 0).",
    )
    lr_decay_style: Literal["constant", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warmup."
    )
    lr_decay_iters: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps of the cosine decay. null: num_rollout x num_steps_per_rollout.",
    )
    weight_decay: float = Field(
        0.01, ge=0, description="Adam weight decay (not applied to norms and biases)."
    )
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="Adam beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    clip_grad: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: no clipping).")
    max_consecutive_skipped_steps: int = Field(
        3,
        gt=0,
        description="An optimizer step whose loss, gradient norm, rewards or advantages are not finite is skipped "
        "(no update, no learning-rate step); this many skips in a row, counted across rollouts and kept in "
        "checkpoints, stop the campaign with NonFiniteTrainingError.",
    )
    # Batching.
    micro_batch_size: int = Field(
        1, gt=0, description="Samples per forward/backward pass (without max_tokens_per_gpu)."
    )
    max_tokens_per_gpu: int | None = Field(
        None,
        gt=0,
        description="Dynamic micro-batches: samples grouped by length so that each padded micro-batch holds at most "
        "this many tokens (a longer sample goes alone). null: micro_batch_size samples per micro-batch.",
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Samples per optimizer step. null: rollout_batch_size x n_samples_per_prompt / num_steps_per_rollout.",
    )
    num_steps_per_rollout: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps per rollout. null: rollout_batch_size x n_samples_per_prompt / global_batch_size "
        "(1 when both are null).",
    )
    tensor_model_parallel_size: int = Field(
        1, gt=0, description="Tensor-parallel size; the trainer's world size must be a multiple of it."
    )
    # The trainer group (slime's flags): world size = actor_num_nodes x actor_num_gpus_per_node, data
    # parallelism = world size / tensor_model_parallel_size. A world of one trains in the campaign's process.
    actor_num_nodes: int = Field(
        1,
        ge=1,
        description="Trainer nodes. Above 1 the campaign's node is node 0 (it runs global rank 0) and waits at "
        "trainer_rdzv_endpoint for the others, which join with the `slime-wf trainer-node` command it prints.",
    )
    actor_num_gpus_per_node: int = Field(
        1,
        ge=1,
        description="Trainer processes per node: one per GPU (on a machine without CUDA, CPU processes). Above 1 "
        "(or with actor_num_nodes above 1) the trainer runs as a torchrun group.",
    )
    trainer_rdzv_endpoint: str | None = Field(
        None,
        description="host:port where the head node's torchrun agent waits for the other trainer nodes (torchrun's "
        "static rendezvous: --rdzv-endpoint with --node-rank). host must be an address of the campaign's node that "
        "the other nodes reach, port a free TCP port there. Required when actor_num_nodes > 1; unused otherwise.",
    )
    trainer_rdzv_timeout_s: float = Field(
        900.0,
        gt=0,
        description="How long each start (and restart after a fault) of a many-node trainer group waits for every "
        "node to join before it fails.",
    )

    @field_validator("trainer_rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{value!r} is not host:port (e.g. 10.0.0.1:29500): the address of the campaign's node "
                "that the other trainer nodes reach, and a free TCP port there"
            )
        return value

    seed: int = Field(1234, description="Seed of the trainer's weight initialization and random streams.")
    params_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Parameter dtype of the trained model. auto: bfloat16 on GPU, float32 on CPU."
    )
    ref_load: str | None = Field(
        None,
        description="slime's --ref-load: an HF checkpoint directory (BF16; an FP8 one is dequantized, lossy) or a "
        "trainer checkpoint (or the latest one under this folder). It is the reference model of KL terms, and the "
        "trainer's initial weights when load holds neither a trainer checkpoint nor an HF directory. null: the "
        "reference is the trainer's initial weights. Megatron-LM torch_dist checkpoints (slime's converter) are "
        "refused: give the HF BF16 directory they were converted from.",
    )
    # The critic (advantage_estimator: ppo).
    critic_load: str | None = Field(
        None,
        description="ppo: initial critic, a trainer checkpoint with a critic/ folder (or the latest under this folder, "
        "or that critic/ folder itself). null: the body of hf_checkpoint with a zero value head. A checkpoint the "
        "campaign resumes from gives its own critic.",
    )
    critic_lr: float | None = Field(None, gt=0, description="ppo: the critic's peak learning rate. null: lr.")
    critic_lr_warmup_iters: int = Field(
        0, ge=0, description="ppo: optimizer steps of the critic's linear warmup."
    )
    num_critic_only_steps: int = Field(
        0,
        ge=0,
        description="ppo: the first this many rollout ids train the critic alone (the policy stays fixed).",
    )


class CheckpointConfig(Section):
    save: str | None = Field(
        None,
        description="Folder of trainer checkpoints (<save>/<rollout_id:06d>/). null: the run store's checkpoints/.",
    )
    load: str | None = Field(
        None,
        description="Where the trainer starts, by slime's rules: a trainer checkpoint here (or the latest one under "
        "this folder) is resumed (weights, optimizer, schedule, step); an HF checkpoint directory gives the initial "
        "weights; otherwise (e.g. the campaign's own checkpoint folder before its first save) the trainer starts from "
        "ref_load, else from hf_checkpoint (dequantized when that is FP8: lossy). Megatron-LM torch_dist checkpoints "
        "(slime's converter) are refused: give the HF BF16 directory instead. A campaign with a committed rollout "
        "resumes from its run store's last checkpoint instead.",
    )
    save_interval: int | None = Field(
        1,
        gt=0,
        description="Save a trainer checkpoint every this many rollout ids, and after the last. null: only after the last.",
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=1,
        description="Trainer checkpoints kept in the run store: after each commit all but the newest this many are "
        "removed, never the committed one. null: keep all.",
    )
