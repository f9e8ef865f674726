"""The sections of a campaign config but the trainer's (`train.py`) and the trackers' (`tracking.py`),
and the list of sections.

Leaf names follow slime's command-line flags in snake_case and are unique across sections
(`loading.leaf_sections`). Every field has a description: the README's configuration
reference is generated from them (`reference.py`).

Size: one module over 400 lines because it is declarations only, one short class per section whose
fields and descriptions are the reference itself; the sections with logic of their own (`train.py`,
`tracking.py`) and the checks across sections (`checks.py`) already live apart.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Section, env_var_name
from .objective import ROLLOUT_TEMPERATURE
from .tracking import TrackingConfig
from .train import CheckpointConfig, TrainConfig

RULE_RM_TYPES = ("deepscaler", "dapo", "math", "f1", "math_verify")
"""Rule-based reward models (each graded by `slime_wf.rollout.rm_hub.rules.GRADERS`);
`boxed_<type>` grades only the boxed answer with `<type>`."""
RM_TYPES = (*RULE_RM_TYPES, "remote_rm")


def rm_type_problem(value: str) -> str | None:
    """Why `value` names no reward model (the allowed ones, and a close match), or None when it does."""
    allowed = RULE_RM_TYPES if value.startswith("boxed_") else RM_TYPES
    if value.removeprefix("boxed_") in allowed:
        return None
    options = [*RM_TYPES, *(f"boxed_{t}" for t in RULE_RM_TYPES)]
    hint = difflib.get_close_matches(value, options, n=1)
    guess = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown rm_type {value!r}; allowed: {', '.join(options)}{guess}"


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
    hf_revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) to pin. null: main."
    )
    rollout_fp8: bool = Field(
        False,
        description="With a BF16 hf_checkpoint: serve rollouts from an FP8 copy of it (made by prepare with "
        "fp8_strategy and fp8_block_size) and cast every weight sync to that format; training stays in BF16/FP32. "
        "An FP8 hf_checkpoint is served as it is, in its own format, whatever this says.",
    )
    fp8_strategy: Literal["block", "channel", "tensor"] = Field(
        "block",
        description="FP8 scaling: 128x128 blocks with weight_scale_inv (SGLang's format), per channel or per tensor.",
    )
    fp8_block_size: list[int] = Field(
        [128, 128], min_length=2, max_length=2, description="FP8 block shape [rows, cols]."
    )
    cache_dir: str = Field(
        ".cache/slime-wf", description="Local folder for downloaded checkpoints and the FP8 rollout copy."
    )


class DataConfig(Section):
    prompt_data: str | None = Field(
        None,
        description="Prompt dataset: a .jsonl or .parquet file, local or s3://. Without it the data source serves only "
        "its buffer.",
    )
    input_key: str = Field(
        "prompt", description="Row key of the prompt: a string, or a list of chat messages."
    )
    label_key: str | None = Field(
        "label", description="Row key of the label; a row without it is a bad row. null: rows carry no label."
    )
    metadata_key: str | None = Field(
        "metadata",
        description="Row key of per-row metadata (a mapping, or a JSON string of one); optional per row.",
    )
    apply_chat_template: bool = Field(
        False, description="Render prompts with the tokenizer's chat template (generation prompt added)."
    )
    apply_chat_template_kwargs: dict[str, Any] = Field(
        {}, description="Extra keyword arguments for the tokenizer's apply_chat_template."
    )
    rollout_max_prompt_len: int | None = Field(
        None,
        gt=0,
        description="Drop prompts longer than this many tokens (counted and reported). null: keep all.",
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
    n_samples_per_prompt: int = Field(
        1, gt=0, description="Responses generated per prompt (the GRPO group size)."
    )
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
    train_async: bool = Field(
        False,
        description="slime's train_async: generate rollout id+1 while id trains, then sync the weights after each "
        "training step (once that generation has finished, so no response changes weights midway). A rollout is "
        "generated by the policy one version behind the one that trains on it (`rollout/weight_staleness_*`); "
        "consider train.use_tis.",
    )
    max_weight_staleness: int | None = Field(
        None,
        ge=0,
        description="How many weight versions behind the policy that trains on it a sample may be. A buffered "
        "partial group with older tokens is regenerated from its prompt (counted in "
        "`rollout/partial/stale_regenerated`). null: no bound. With train_async, at least 1.",
    )
    rollout_max_response_len: int = Field(256, gt=0, description="Most tokens generated per response.")
    rollout_temperature: float = ROLLOUT_TEMPERATURE
    rollout_top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    rollout_top_k: int = Field(-1, description="Top-k sampling (-1: all tokens).")
    rollout_stop: list[str] | None = Field(
        None, description="Stop strings (kept in the response, as slime does)."
    )
    rollout_stop_token_ids: list[int] | None = Field(
        None, description="Token ids that end a response besides EOS."
    )
    rollout_skip_special_tokens: bool = Field(False, description="Drop special tokens from response text.")
    sglang_server_concurrency: int = Field(
        512,
        gt=0,
        description="Requests in flight per engine at most (the rest wait in the client); slime's default. "
        "A local engine decodes this many together at most (its --max-running-requests): lower it for a "
        "large model on a small machine.",
    )
    rollout_request_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds one generate request may take; it is retried once, then marked FAILED.",
    )
    custom_generate_function_path: str | None = Field(
        None,
        description="Dotted path of async generate(args, sample, sampling_params) -> Sample | list[Sample], replacing "
        "the default single-turn generation, in rollouts and evaluations (a function with an `evaluation` argument is "
        "told which, as in slime). A sample's generate_function_path overrides it.",
    )
    rollout_function_path: str | None = Field(
        None,
        description="Dotted path of generate_rollout(args, rollout_id, data_source, evaluation=False) replacing the "
        "whole rollout loop (slime's signature).",
    )


class EvalDatasetConfig(Section):
    name: str = Field(
        ..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Name used in metrics (eval/<name>/...)."
    )
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
    eval_datasets: list[EvalDatasetConfig] = Field(
        [], description="Evaluation sets, each with its own sampling."
    )


class EngineConfig(Section):
    engine_type: Literal["local", "sglang"] = Field(
        "local", description="local: the CPU engine server of this project; sglang: SGLang servers on GPUs."
    )
    num_engines: int = Field(1, gt=0, description="Engine servers to launch (ignored with engine_urls).")
    rollout_num_gpus_per_engine: int = Field(
        1, gt=0, description="Tensor-parallel size of each SGLang server."
    )
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
        False,
        description="Put sglang-router in front of the engines for /generate (control calls go to each engine).",
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
        None,
        gt=0,
        description="torch threads per local engine. null: CPU cores / num_engines; with rollout.train_async, "
        "half of that, and a trainer on CPU gets the cores the engines leave (rollout and training run at "
        "the same time: more threads than cores slow both).",
    )
    local_engine_min_gflop_per_thread: float = Field(
        0.5,
        ge=0,
        description="A local engine's forward pass gets one of its threads per this many GFLOP of arithmetic "
        "(2 x the parameters each of its tokens goes through), at least one: its threads sleep between kernels, and "
        "waking them costs more than a small pass gains (a 1.2M-parameter decode of 64 rows runs faster on one "
        "thread). 0: every pass gets all of local_engine_threads.",
    )
    engine_startup_timeout: float = Field(
        300.0, gt=0, description="Seconds an engine may take to become healthy."
    )
    engine_health_timeout: float = Field(30.0, gt=0, description="Seconds /health_generate may take.")
    engine_max_restarts: int = Field(
        3, ge=0, description="Restarts of a dead engine per campaign before failing."
    )

    _engine_api_key_env = field_validator("engine_api_key_env")(env_var_name)

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
        None,
        description="Entry of a dict reward used as the scalar reward (dapo: score). null: the reward itself.",
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
    rm_timeout: float = Field(
        30.0, gt=0, description="Seconds one reward call may take before it is abandoned."
    )
    rm_failure_reward: float = Field(
        0.0,
        allow_inf_nan=False,
        description="Reward given to a sample whose grading timed out, returned NaN or inf (counted as "
        "rm/non_finite), or raised (with rm_on_error: failure_reward).",
    )
    rm_on_error: Literal["raise", "failure_reward"] = Field(
        "raise",
        description="When a reward raises (custom function, rule grader or remote_rm): raise names the sample and "
        "function; failure_reward gives rm_failure_reward and counts the event.",
    )
    rm_workers: int | None = Field(
        None, gt=0, description="Worker processes for rule-based grading. null: the number of CPU cores."
    )

    _rm_api_key_env = field_validator("rm_api_key_env")(env_var_name)

    @field_validator("rm_type")
    @classmethod
    def _known_rm_type(cls, value: str | None) -> str | None:
        problem = None if value is None else rm_type_problem(value)
        if problem:
            raise ValueError(problem)
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
        "filter/shortfall_groups. It fails only when it kept no group at all. null: 20 x rollout_batch_size.",
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
        None,
        description="S3 endpoint (e.g. a local S3 server). null: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS.",
    )
    s3_region: str | None = Field(None, description="S3 region. null: AWS_DEFAULT_REGION or the SDK default.")
    scratch_dir: str = Field(
        ".cache/slime-wf/scratch",
        description="Local folder for weight exports the engines load (/update_weights_from_disk) and for trainer "
        "checkpoints of an s3:// store before upload. Engines on other hosts need it on a shared filesystem.",
    )
    keep_weight_exports: int = Field(
        2, ge=1, description="Weight exports kept in scratch_dir (older ones are removed)."
    )
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
        0,
        ge=0,
        lt=65536,
        description="distributed mode: the port of the weight-update group's store on the trainer's rank 0. 0: a "
        "free port, chosen each time the group is built.",
    )
    weight_sync_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="distributed mode: the group's backend. auto: nccl with SGLang engines, gloo with local ones.",
    )
    weight_sync_bucket_mb: float = Field(
        512.0,
        gt=0,
        description="distributed mode: megabytes of weights per /update_weights_from_distributed call (slime's "
        "update_weight_buffer_size); the trainer's rank 0 holds about two buckets at a time.",
    )


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
    "tracking": TrackingConfig,
}
