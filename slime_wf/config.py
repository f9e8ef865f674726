"""The campaign configuration: pydantic models loaded from YAML.

A campaign file has one mapping per section (`model`, `data`, `rollout`, `reward`, `filter`,
`buffer`, `storage`) plus the campaign's name. Leaf names follow slime's command-line flags in
snake_case and are unique across sections, so that:

- plugins get a flat `args` namespace (`args.n_samples_per_prompt`, `args.reward_key`), exactly
  what slime's plugins read;
- an override may name a leaf alone (`rollout_batch_size=16`) or with its section
  (`rollout.rollout_batch_size=16`).

Unknown keys and bad values raise `ConfigError`, which names the key, the value and what is
allowed. `python -m slime_wf.config` prints the configuration reference that README.md embeds.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import re
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slime_wf.redact import redact_url, redact_urls_in

RULE_RM_TYPES = ("deepscaler", "dapo", "math", "f1", "math_verify")
"""Rule-based reward models; `boxed_<type>` grades only the boxed answer with `<type>`."""
RM_TYPES = (*RULE_RM_TYPES, "remote_rm")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_var_name(value: str | None) -> str | None:
    """Fields ending in _env name an environment variable, so that the secret stays out of the config."""
    if value is not None and not ENV_NAME.fullmatch(value):
        raise ValueError(
            "must be the name of an environment variable (letters, digits and _), not the secret itself; "
            "export the secret under that name where the campaign runs"
        )
    return value


class ConfigError(ValueError):
    """A campaign configuration that cannot be used; the message says what to change."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    hf_checkpoint: str | None = Field(
        None,
        description="Hugging Face checkpoint of the policy: a local directory, a hub repo id, or s3://bucket/prefix. "
        "The engines serve it, and its tokenizer is used by apply_chat_template, rollout_max_prompt_len and the check "
        "of prompts against the engine's context length (max_position_embeddings). It may be an FP8 checkpoint "
        "(quantization_config fp8, block-wise or per-channel, e.g. Qwen/Qwen3-4B-FP8), as in slime's recipe: the "
        "engines serve it as it is, and every weight sync casts the trainer's weights to its own format (block size, "
        "scale names, modules_to_not_convert). The trainer starts from it only when neither load nor ref_load gives "
        "weights; an FP8 one is then dequantized, which is lossy (a warning, and the metric "
        "init_from_dequantized_fp8): give the BF16 weights in ref_load.",
    )
    hf_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin. null: main.")
    rollout_fp8: bool = Field(
        False,
        description="With a BF16 hf_checkpoint: serve rollouts from an FP8 copy of it (made by prepare with "
        "fp8_strategy and fp8_block_size) and cast every weight sync to that format; training stays in BF16/FP32. "
        "An FP8 hf_checkpoint is served as it is, in its own format, whatever this says.",
    )
    fp8_strategy: Literal["block", "channel", "tensor"] = Field(
        "block", description="FP8 scaling: 128x128 blocks with weight_scale_inv (SGLang's format), per channel or per tensor."
    )
    fp8_block_size: list[int] = Field([128, 128], min_length=2, max_length=2, description="FP8 block shape [rows, cols].")
    cache_dir: str = Field(
        ".cache/slime-wf", description="Local folder for downloaded checkpoints and the FP8 rollout copy."
    )


class DataConfig(Section):
    prompt_data: str | None = Field(
        None,
        description="Prompt dataset: a .jsonl or .parquet file, local or s3://. Without it the data source serves only "
        "its buffer.",
    )
    input_key: str = Field("prompt", description="Row key of the prompt: a string, or a list of chat messages.")
    label_key: str | None = Field(
        "label", description="Row key of the label; a row without it is a bad row. null: rows carry no label."
    )
    metadata_key: str | None = Field(
        "metadata", description="Row key of per-row metadata (a mapping, or a JSON string of one); optional per row."
    )
    apply_chat_template: bool = Field(
        False, description="Render prompts with the tokenizer's chat template (generation prompt added)."
    )
    apply_chat_template_kwargs: dict[str, Any] = Field(
        {}, description="Extra keyword arguments for the tokenizer's apply_chat_template."
    )
    rollout_max_prompt_len: int | None = Field(
        None, gt=0, description="Drop prompts longer than this many tokens (counted and reported). null: keep all."
    )
    rollout_shuffle: bool = Field(False, description="Shuffle the prompts at the start of every epoch.")
    rollout_seed: int = Field(42, description="Seed of the per-epoch shuffle (and of rollout sampling).")
    skip_bad_rows: bool = Field(
        False,
        description="Skip and count bad rows instead of failing on the first one: malformed rows, empty prompts, and "
        "prompts whose tokens plus rollout_max_response_len exceed the engine's context length (the counts are "
        "logged and kept in the dataset's stats).",
    )


class RolloutConfig(Section):
    num_rollout: int = Field(1, ge=0, description="Number of rollout ids (iterations) the campaign runs.")
    rollout_batch_size: int = Field(8, gt=0, description="Prompt groups per training batch.")
    n_samples_per_prompt: int = Field(1, gt=0, description="Responses generated per prompt (the GRPO group size).")
    over_sampling_batch_size: int | None = Field(
        None,
        gt=0,
        description="Groups drawn at a time while fewer than rollout_batch_size are kept; at least "
        "rollout_batch_size. null: rollout_batch_size.",
    )
    partial_rollout: bool = Field(
        False,
        description="Keep unfinished groups in the buffer at the end of a rollout and continue them in the next "
        "one, instead of dropping them.",
    )
    mask_offpolicy_in_partial_rollout: bool = Field(
        False,
        description="Give tokens generated by earlier policies (continued partial rollouts) loss_mask 0.",
    )
    rollout_max_response_len: int = Field(256, gt=0, description="Most tokens generated per response.")
    rollout_temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    rollout_top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    rollout_top_k: int = Field(-1, description="Top-k sampling (-1: all tokens).")
    rollout_stop: list[str] | None = Field(None, description="Stop strings (kept in the response, as slime does).")
    rollout_stop_token_ids: list[int] | None = Field(None, description="Token ids that end a response besides EOS.")
    rollout_skip_special_tokens: bool = Field(False, description="Drop special tokens from response text.")
    sglang_server_concurrency: int = Field(
        64, gt=0, description="Requests in flight per engine at most (the rest wait in the client)."
    )
    rollout_request_timeout: float = Field(
        600.0, gt=0, description="Seconds one generate request may take; it is retried once, then marked FAILED."
    )
    custom_generate_function_path: str | None = Field(
        None,
        description="Dotted path of async generate(args, sample, sampling_params) -> Sample | list[Sample], replacing "
        "the default single-turn generation. A sample's generate_function_path overrides it.",
    )
    rollout_function_path: str | None = Field(
        None,
        description="Dotted path of generate_rollout(args, rollout_id, data_source, evaluation=False) replacing the "
        "whole rollout loop (slime's signature).",
    )


class EvalDatasetConfig(Section):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Name used in metrics (eval/<name>/...).")
    path: str = Field(..., description="Prompt file (.jsonl or .parquet, local or s3://).")
    input_key: str | None = Field(None, description="Prompt key. null: data.input_key.")
    label_key: str | None = Field(None, description="Label key. null: data.label_key.")
    rm_type: str | None = Field(None, description="Reward model for this set. null: reward.rm_type.")
    n_samples_per_eval_prompt: int = Field(1, gt=0, description="Responses per prompt.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(-1, description="Top-k sampling (-1: all tokens).")
    max_response_len: int | None = Field(None, gt=0, description="null: rollout.rollout_max_response_len.")


class EvalConfig(Section):
    eval_interval: int | None = Field(
        None, gt=0, description="Evaluate every this many rollout ids (and after the last). null: never."
    )
    eval_datasets: list[EvalDatasetConfig] = Field([], description="Evaluation sets, each with its own sampling.")


class EngineConfig(Section):
    engine_type: Literal["local", "sglang"] = Field(
        "local", description="local: the CPU engine server of this project; sglang: SGLang servers on GPUs."
    )
    num_engines: int = Field(1, gt=0, description="Engine servers to launch (ignored with engine_urls).")
    rollout_num_gpus_per_engine: int = Field(1, gt=0, description="Tensor-parallel size of each SGLang server.")
    engine_urls: list[str] = Field(
        [], description="Attach to running servers (http://host:port) instead of launching them."
    )
    engine_api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the engines' API key (SGLang's --api-key and "
        "--admin-api-key, sent as a bearer token; also given to sglang-router). Needed to attach to engine_urls "
        "started with a key; launched engines use it instead of a random key. null: launched engines get a fresh "
        "random key at every start, attached engines none. The key itself never goes into the config.",
    )
    use_router: bool = Field(
        False, description="Put sglang-router in front of the engines for /generate (control calls go to each engine)."
    )
    router_policy: Literal["cache_aware", "round_robin", "random"] = Field(
        "cache_aware", description="sglang-router's load-balancing policy."
    )
    engine_host: str = Field("127.0.0.1", description="Address launched engines and the router listen on.")
    engine_base_port: int = Field(
        0, ge=0, lt=65536, description="First port for launched engines (then +1 each). 0: free ports."
    )
    sglang_mem_fraction_static: float | None = Field(
        None, gt=0, lt=1, description="SGLang's --mem-fraction-static. null: SGLang's default."
    )
    sglang_python: str | None = Field(
        None,
        description="Python interpreter that launches SGLang servers (engine_type sglang). SGLang pins its own torch "
        "(0.5.23: torch 2.14.1), so on a GPU machine it usually lives in a virtual environment of its own: give "
        "that environment's bin/python. null: this interpreter.",
    )
    engine_base_gpu: int | None = Field(
        None,
        ge=0,
        description="First GPU of the launched SGLang servers (engine i takes rollout_num_gpus_per_engine GPUs from "
        "engine_base_gpu + i x rollout_num_gpus_per_engine; indices count within CUDA_VISIBLE_DEVICES when it is "
        "set). null: right after the trainer's GPUs on this node (train.actor_num_gpus_per_node), as slime places "
        "rollout GPUs after the actor's. 0 with sglang_mem_fraction_static: share the trainer's GPUs.",
    )
    sglang_server_args: dict[str, Any] = Field(
        {},
        description="Extra SGLang server flags, passed through as --key value (true: a bare flag), e.g. "
        "{enable-deterministic-inference: true}. Not api-key / admin-api-key: see engine_api_key_env.",
    )
    local_engine_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="Compute dtype of the local engine."
    )
    local_engine_threads: int | None = Field(
        None, gt=0, description="torch threads per local engine. null: CPU cores / num_engines."
    )
    engine_startup_timeout: float = Field(300.0, gt=0, description="Seconds an engine may take to become healthy.")
    engine_health_timeout: float = Field(30.0, gt=0, description="Seconds /health_generate may take.")
    engine_max_restarts: int = Field(3, ge=0, description="Restarts of a dead engine per campaign before failing.")

    _engine_api_key_env = field_validator("engine_api_key_env")(_env_var_name)

    @field_validator("sglang_server_args")
    @classmethod
    def _no_api_key_in_server_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if str(key).replace("_", "-").lstrip("-") in ("api-key", "admin-api-key"):
                raise ValueError(
                    f"sglang_server_args sets {key!r}: the fleet gives launched engines their own key, and a key in "
                    "the config would be stored in config.yaml and Prefect; name an environment variable that "
                    "holds it in engine.engine_api_key_env instead"
                )
        return value


class RewardConfig(Section):
    rm_type: str | None = Field(
        None,
        description=f"Reward model: one of {', '.join(RM_TYPES)}, or boxed_<type> to grade only the boxed answer. "
        "A sample's metadata['rm_type'] overrides it.",
    )
    reward_key: str | None = Field(
        None, description="Entry of a dict reward used as the scalar reward (dapo: score). null: the reward itself."
    )
    custom_rm_path: str | None = Field(
        None,
        description="Dotted path of a custom reward function: async rm(args, sample) -> float | dict, or with "
        "group_rm async rm(args, samples) -> list. A sample's own custom_rm_path overrides it.",
    )
    group_rm: bool = Field(False, description="Reward whole groups at once (GRPO-style relative rewards).")
    rm_url: str | None = Field(None, description="URL that remote_rm POSTs {prompt, response, label} to.")
    rm_api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the reward server's token, sent by remote_rm as "
        "Authorization: Bearer <token>. Keeps the token out of rm_url, config.yaml and Prefect's flow parameters. "
        "null: no Authorization header.",
    )
    rm_timeout: float = Field(30.0, gt=0, description="Seconds one reward call may take before it is abandoned.")
    rm_failure_reward: float = Field(
        0.0,
        allow_inf_nan=False,
        description="Reward given to a sample whose grading timed out, returned NaN or inf (counted as "
        "rollout/rm/non_finite), or raised (with rm_on_error: failure_reward).",
    )
    rm_on_error: Literal["raise", "failure_reward"] = Field(
        "raise",
        description="When a reward raises (custom function, rule grader or remote_rm): raise names the sample and "
        "function; failure_reward gives rm_failure_reward and counts the event.",
    )
    rm_workers: int | None = Field(
        None, gt=0, description="Worker processes for rule-based grading. null: the number of CPU cores."
    )

    _rm_api_key_env = field_validator("rm_api_key_env")(_env_var_name)

    @field_validator("rm_type")
    @classmethod
    def _known_rm_type(cls, value: str | None) -> str | None:
        if value is None:
            return value
        base = value.removeprefix("boxed_") if value.startswith("boxed_") else value
        allowed = RULE_RM_TYPES if value.startswith("boxed_") else RM_TYPES
        if base not in allowed:
            options = [*RM_TYPES, *(f"boxed_{t}" for t in RULE_RM_TYPES)]
            hint = difflib.get_close_matches(value, options, n=1)
            raise ValueError(
                f"unknown rm_type {value!r}; allowed: {', '.join(options)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        return value


class FilterConfig(Section):
    dynamic_sampling_filter_path: str | None = Field(
        None,
        description="Dotted path of the dynamic-sampling filter (args, samples, **kwargs) -> DynamicFilterOutput, "
        "e.g. slime_wf.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std. null: keep all.",
    )
    max_groups_drawn_per_rollout: int | None = Field(
        None,
        gt=0,
        description="Draw budget: a rollout that has drawn this many groups without keeping rollout_batch_size "
        "stops drawing and trains on the groups it kept, filled up with rejected groups the filter marked "
        "keep_when_insufficient; the shortfall is logged with the drop reasons and recorded as "
        "rollout/filter/shortfall_groups. It fails only when it kept no group at all. null: 20 x rollout_batch_size.",
    )


class BufferConfig(Section):
    buffer_filter_path: str | None = Field(
        None,
        description="Dotted path of the buffer filter (args, rollout_id, buffer, num_samples) -> groups. "
        "null: pop_first (FIFO).",
    )


class StorageConfig(Section):
    store: str = Field("runs", description="Run store root: a local folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. a local S3 server). null: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS."
    )
    s3_region: str | None = Field(None, description="S3 region. null: AWS_DEFAULT_REGION or the SDK default.")
    scratch_dir: str = Field(
        ".cache/slime-wf/scratch",
        description="Local folder for weight exports the engines load (/update_weights_from_disk) and for trainer "
        "checkpoints of an s3:// store before upload. Engines on other hosts need it on a shared filesystem.",
    )
    keep_weight_exports: int = Field(2, ge=1, description="Weight exports kept in scratch_dir (older ones are removed).")
    lease_timeout_s: float = Field(
        120.0,
        gt=0,
        description="`train` holds a lease on its campaign (lease.json in the run store), renewed every quarter of "
        "this; a second `train` of the campaign is refused while the holder lives. A holder whose process is gone "
        "on this host is taken over at once; one on another host once its last heartbeat is this old.",
    )
    check_weight_update_equal: bool = Field(
        False,
        description="After each weight sync, check that every engine serves exactly the exported weights (greedy "
        "tokens and log-probs against a reference forward pass). Debug mode; costs a model load per sync.",
    )
    weight_sync_mode: Literal["disk", "distributed"] = Field(
        "disk",
        description="How trained weights reach the engines. disk: an HF export in scratch_dir, loaded with "
        "/update_weights_from_disk (the trainer's rank 0 and the engines need a shared filesystem). distributed: "
        "SGLang's weight-update group; trainer rank 0 broadcasts the weights in buckets (NCCL to SGLang, gloo to "
        "the local engine); every engine must reach weight_sync_master_address:weight_sync_master_port, and rank 0 "
        "the engines' HTTP ports. A restarted engine is given the current weights before it serves again.",
    )
    weight_sync_master_address: str = Field(
        "127.0.0.1",
        description="distributed mode: the address of the trainer's rank 0 as the engines reach it (the host of "
        "the weight-update group's store). Set it to that host's address when engines run on other hosts.",
    )
    weight_sync_master_port: int = Field(
        0, ge=0, lt=65536,
        description="distributed mode: the port of the weight-update group's store on the trainer's rank 0. 0: a "
        "free port, chosen each time the group is built.",
    )
    weight_sync_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="distributed mode: the group's backend. auto: nccl with SGLang engines, gloo with local ones."
    )
    weight_sync_bucket_mb: float = Field(
        512.0, gt=0,
        description="distributed mode: megabytes of weights per /update_weights_from_distributed call (slime's "
        "update_weight_buffer_size); the trainer's rank 0 holds about two buckets at a time.",
    )


class TrainConfig(Section):
    # The objective options mirror slime_wf.training.objectives.OBJECTIVE_OPTIONS (same names, defaults and
    # meaning; a test keeps them in sync). rollout_temperature, which the objectives also read, is in `rollout`.
    advantage_estimator: Literal[
        "grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"
    ] = Field("grpo", description="Advantage estimator. ppo: GAE over the values of a critic the trainer builds "
            "(a value-head copy of the policy, trained with the clipped value loss; see critic_*).")
    rewards_normalization: bool = Field(
        True, description="Subtract each group's mean reward (grpo, gspo, cispo, reinforce_plus_plus_baseline)."
    )
    grpo_std_normalization: bool = Field(
        True, description="Also divide by the group's (unbiased) reward std + 1e-6 (grpo, gspo, cispo); false is Dr.GRPO."
    )
    normalize_advantages: bool = Field(
        False,
        description="Whiten advantages over all loss-masked tokens of the batch (required by reinforce_plus_plus*).",
    )
    kl_coef: float = Field(
        0.0, description="Per-token KL(actor||ref) penalty folded into the rewards before the advantages."
    )
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = Field(
        "k1", description="KL estimator for the reward penalty and the KL loss."
    )
    use_kl_loss: bool = Field(False, description="Add kl_loss_coef * KL(actor||ref) to the loss (GRPO's KL term).")
    kl_loss_coef: float = Field(0.0, description="Weight of the KL loss term.")
    use_unbiased_kl: bool = Field(False, description="Weight the KL loss by the importance ratio pi/pi_old (DeepSeek-V3.2).")
    entropy_coef: float = Field(0.0, description="Weight of the entropy bonus (subtracted from the loss).")
    eps_clip: float = Field(0.2, ge=0, description="PPO clip: the ratio is clipped below at 1 - eps_clip.")
    eps_clip_high: float | None = Field(
        None, ge=0, description="PPO clip above at 1 + eps_clip_high (DAPO clip-higher). null: eps_clip."
    )
    eps_clip_c: float | None = Field(
        None, gt=1, description="Dual-clip PPO bound (> 1) on the loss of negative-advantage tokens. null: off."
    )
    value_clip: float = Field(0.2, ge=0, description="Clip of the value update around the old values (value loss).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor (ppo GAE, reinforce_plus_plus).")
    lambd: float = Field(1.0, ge=0, le=1, description="GAE lambda (ppo).")
    calculate_per_token_loss: bool = Field(
        False, description="Average the loss over all tokens of the step instead of per sample, then over samples."
    )
    use_tis: bool = Field(False, description="Truncated importance sampling between the trainer's and the engine's log-probs.")
    tis_clip: float = Field(2.0, ge=0, description="Upper clamp of the TIS weight.")
    tis_clip_low: float = Field(0.0, ge=0, description="Lower clamp of the TIS weight.")
    use_rollout_logprobs: bool = Field(
        False, description="Use the engine's log-probs as the old policy in the ratio and the KL."
    )
    loss_type: Literal["policy_loss", "value_loss", "sft_loss", "custom_loss"] = Field(
        "policy_loss", description="The policy's loss. value_loss is the critic's, which ppo trains on its own."
    )
    custom_loss_function_path: str | None = Field(
        None,
        description="Dotted path of a loss (args, batch, logits, sum_of_sample_mean) -> (loss, metrics) for custom_loss.",
    )
    log_probs_chunk_size: int = Field(
        -1, description="Rows per chunk when computing log-probs from logits; -1: automatic (2^26 float32 values)."
    )
    # Optimizer and schedule (Megatron's Adam and OptimizerParamScheduler).
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of a cosine decay.")
    lr_warmup_iters: int = Field(
        0, ge=0, description="Optimizer steps of linear warmup from 0 to lr (Megatron's: the first step has lr 0)."
    )
    lr_decay_style: Literal["constant", "cosine"] = Field("constant", description="Learning-rate schedule after warmup.")
    lr_decay_iters: int | None = Field(
        None, gt=0, description="Optimizer steps of the cosine decay. null: num_rollout x num_steps_per_rollout."
    )
    weight_decay: float = Field(0.01, ge=0, description="Adam weight decay (not applied to norms and biases).")
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
    micro_batch_size: int = Field(1, gt=0, description="Samples per forward/backward pass (without max_tokens_per_gpu).")
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
            raise ValueError(f"{value!r} is not host:port (e.g. 10.0.0.1:29500): the address of the campaign's node "
                             "that the other trainer nodes reach, and a free TCP port there")
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
    critic_lr_warmup_iters: int = Field(0, ge=0, description="ppo: optimizer steps of the critic's linear warmup.")
    num_critic_only_steps: int = Field(
        0, ge=0, description="ppo: the first this many rollout ids train the critic alone (the policy stays fixed)."
    )


class CheckpointConfig(Section):
    save: str | None = Field(
        None, description="Folder of trainer checkpoints (<save>/<rollout_id:06d>/). null: the run store's checkpoints/."
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
        1, gt=0, description="Save a trainer checkpoint every this many rollout ids, and after the last. null: only after the last."
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=1,
        description="Trainer checkpoints kept in the run store: after each commit all but the newest this many are "
        "removed, never the committed one. null: keep all.",
    )


def resolve_batch_sizes(
    rollout_batch_size: int, n_samples_per_prompt: int, global_batch_size: int | None, num_steps_per_rollout: int | None
) -> tuple[int, int]:
    """(global_batch_size, num_steps_per_rollout) with the nulls derived, as slime derives them:
    a rollout's rollout_batch_size x n_samples_per_prompt samples make num_steps_per_rollout steps of
    global_batch_size. Raises ValueError naming the settings when they do not fit together."""
    total = rollout_batch_size * n_samples_per_prompt
    where = f"rollout_batch_size x n_samples_per_prompt = {rollout_batch_size} x {n_samples_per_prompt} = {total}"
    if global_batch_size is None and num_steps_per_rollout is None:
        return total, 1
    if global_batch_size is None:
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


def check_train_settings(train: Any, rollout_batch_size: int, n_samples_per_prompt: int, num_rollout: int) -> None:
    """Cross-field checks of the train settings (`train` is a TrainConfig or a namespace with its leaves).
    Raises ValueError naming the settings. The tensor-parallel size is checked against the model's heads
    when the trainer builds the model."""
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
    if train.advantage_estimator.startswith("reinforce_plus_plus") and not train.normalize_advantages:
        raise ValueError(f"train.advantage_estimator={train.advantage_estimator} requires train.normalize_advantages: true")
    if train.loss_type == "custom_loss" and not train.custom_loss_function_path:
        raise ValueError("train.loss_type=custom_loss needs train.custom_loss_function_path (a dotted path)")
    if train.tis_clip_low > train.tis_clip:
        raise ValueError(f"train.tis_clip_low={train.tis_clip_low} is above train.tis_clip={train.tis_clip}")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "engine": EngineConfig,
    "eval": EvalConfig,
    "reward": RewardConfig,
    "filter": FilterConfig,
    "buffer": BufferConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "storage": StorageConfig,
}


class CampaignConfig(BaseModel):
    """One RL campaign: what to train, on what, and where its run store lives."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, title="Campaign")

    campaign: str = Field(
        "default",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Campaign name: the run store folder (lowercase letters, digits, - and _).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _consistent(self) -> CampaignConfig:
        ro = self.rollout
        if ro.over_sampling_batch_size is not None and ro.over_sampling_batch_size < ro.rollout_batch_size:
            raise ValueError(
                f"rollout.over_sampling_batch_size={ro.over_sampling_batch_size} is smaller than "
                f"rollout.rollout_batch_size={ro.rollout_batch_size}; allowed: >= rollout_batch_size, or null"
            )
        if self.reward.rm_type == "remote_rm" and not self.reward.rm_url:
            raise ValueError("reward.rm_type=remote_rm needs reward.rm_url (the URL of the reward server)")
        return self

    @model_validator(mode="after")
    def _train_consistent(self) -> CampaignConfig:
        check_train_settings(self.train, self.rollout.rollout_batch_size, self.rollout.n_samples_per_prompt,
                             self.rollout.num_rollout)
        return self

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, overrides: list[str] | None = None) -> CampaignConfig:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"a campaign config must be a mapping of sections, got {type(data).__name__}")
        data = json.loads(json.dumps(data, default=str))  # detached copy; overrides must not touch the caller's
        _check_keys(data)
        for item in overrides or []:
            _apply_override(data, item)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err)) from None

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None) -> CampaignConfig:
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"campaign config {path} does not exist") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"campaign config {path} is not valid YAML: {err}") from None
        try:
            return cls.from_dict(data, overrides)
        except ConfigError as err:
            raise ConfigError(f"campaign config {path}: {err}") from None

    def to_yaml(self, *, redact: bool = True) -> str:
        """The config as YAML. With `redact` (for config.yaml, logs and printing), credentials inside
        URLs are masked (see `slime_wf.redact`), so the text cannot be loaded back as a working config."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(redact_urls_in(data) if redact else data, sort_keys=False)

    def config_hash(self) -> str:
        """A short, stable hash of the settings (to notice a config change on resume)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- the flat view plugins get --------------------------------------------------------

    def args(self) -> argparse.Namespace:
        """Every leaf as a flat attribute, as slime's plugins expect (`args.n_samples_per_prompt`)."""
        flat: dict[str, Any] = {"campaign": self.campaign}
        for name in SECTIONS:
            flat.update(getattr(self, name).model_dump())
        return argparse.Namespace(**flat)


# ---- key checking, overrides, error messages ------------------------------------------------


def leaf_sections() -> dict[str, str]:
    """Leaf name -> its section."""
    out: dict[str, str] = {}
    for section, model in SECTIONS.items():
        for leaf in model.model_fields:
            out[leaf] = section
    return out


def _valid_keys() -> list[str]:
    keys = ["campaign", *SECTIONS]
    for section, model in SECTIONS.items():
        keys += [f"{section}.{leaf}" for leaf in model.model_fields]
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    leaves = leaf_sections()
    bare = key.rsplit(".", 1)[-1]
    if bare in leaves and key != f"{leaves[bare]}.{bare}":
        return ConfigError(f"unknown key {key!r}: did you mean '{leaves[bare]}.{bare}'?")
    candidates = _valid_keys() + list(leaves)
    hint = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6) or difflib.get_close_matches(
        bare, list(leaves), n=1, cutoff=0.6
    )
    if hint:
        best = hint[0] if "." in hint[0] or hint[0] in ("campaign", *SECTIONS) else f"{leaves[hint[0]]}.{hint[0]}"
        return ConfigError(f"unknown key {key!r}: did you mean {best!r}?")
    return ConfigError(f"unknown key {key!r}; valid sections: campaign, {', '.join(SECTIONS)}")


def _check_keys(data: dict[str, Any]) -> None:
    for key, value in data.items():
        if key == "campaign":
            continue
        if key not in SECTIONS:
            raise _unknown_key_error(str(key))
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"section {key!r} must be a mapping of settings, got {value!r}")
        for leaf in value:
            if leaf not in SECTIONS[key].model_fields:
                raise _unknown_key_error(f"{key}.{leaf}")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. rollout_batch_size=16)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if key == "campaign":
        data["campaign"] = str(value) if value is not None else value
        return
    parts = key.split(".")
    if len(parts) == 1:
        section = leaf_sections().get(key)
        if section is None:
            raise _unknown_key_error(key)
        parts = [section, key]
    if len(parts) != 2 or parts[0] not in SECTIONS or parts[1] not in SECTIONS[parts[0]].model_fields:
        raise _unknown_key_error(key)
    section_data = data.get(parts[0]) or {}
    section_data[parts[1]] = value
    data[parts[0]] = section_data


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{loc}: required setting is missing")
        elif loc == "config":
            lines.append(msg)
        elif "input" not in e or isinstance(e["input"], dict) or loc.endswith("_env"):  # _env: maybe a pasted secret
            lines.append(f"{loc}: {msg}")
        else:
            lines.append(f"{loc} = {redact_url(repr(e['input']))}: {msg}")
    return "invalid campaign config:\n  " + "\n  ".join(lines)


# ---- reference documentation ----------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)  # module paths of nested models
    text = text.replace("NoneType", "None").replace("None", "null").replace(" | ", " or ")
    return re.sub(r"Literal\[(.*)\]", r"one of \1", text)


def config_reference_markdown() -> str:
    """The configuration reference as markdown tables, one per section."""
    out = [
        "Top level: `campaign` (str, default `default`): "
        + CampaignConfig.model_fields["campaign"].description,
        "",
    ]
    tables = [(f"`{name}`", model) for name, model in SECTIONS.items()]
    tables.insert(list(SECTIONS).index("eval") + 1, ("each entry of `eval.eval_datasets`", EvalDatasetConfig))
    for title, model in tables:
        out += [f"### {title}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for leaf, info in model.model_fields.items():
            if info.is_required():
                shown = "required"
            else:
                default = info.get_default(call_default_factory=True)
                shown = "`null`" if default is None else f"`{json.dumps(default)}`"
            desc = (info.description or "").replace("|", "\\|")
            out.append(f"| `{leaf}` | {_type_name(info.annotation)} | {shown} | {desc} |")
        out.append("")
    return "\n".join(out)


README_BEGIN = "<!-- config-reference:begin (generated by `make docs`; do not edit by hand) -->"
README_END = "<!-- config-reference:end -->"


def update_readme(path: str) -> bool:
    """Rewrite the configuration reference between the README's markers; True if it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise ValueError(f"{path} lacks the config-reference markers")
    new = f"{head}{README_BEGIN}\n\n{config_reference_markdown()}\n{README_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write-readme"]:
        update_readme(sys.argv[2])
    else:
        print(config_reference_markdown())
