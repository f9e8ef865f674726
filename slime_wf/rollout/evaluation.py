"""Evaluation: every prompt of each `eval.eval_datasets` entry, with that set's own sampling and reward."""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any, cast

from tqdm import tqdm

from slime_wf.rollout.data_source import engine_context_length
from slime_wf.rollout.dataset import Dataset
from slime_wf.rollout.generate import (
    RolloutContext,
    generate_sample,
    reward_samples,
    rollout_context,
    sampling_params_from_args,
)
from slime_wf.types import Sample


def _eval_args(args: Any, ds_cfg: dict[str, Any]) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    if ds_cfg.get("rm_type"):
        out.rm_type = ds_cfg["rm_type"]
    out.group_rm = False
    return out


def _eval_params(args: Any, ds_cfg: dict[str, Any]) -> dict[str, Any]:
    params = sampling_params_from_args(args)
    params.update(
        temperature=ds_cfg["temperature"],
        top_p=ds_cfg["top_p"],
        top_k=ds_cfg["top_k"],
        max_new_tokens=ds_cfg.get("max_response_len") or args.rollout_max_response_len,
    )
    return params


async def _generate_and_reward(
    ctx: RolloutContext, sample: Sample, params: dict[str, Any], pbar: tqdm
) -> Sample:
    # the campaign's generate function (multi-turn, tools) runs here too, told that this is an evaluation
    result = await generate_sample(ctx, sample, params, evaluation=True)
    if isinstance(result, list):
        raise TypeError(
            f"generate function {sample.generate_function_path or ctx.args.custom_generate_function_path} "
            f"returned {len(result)} samples for evaluation prompt {sample.index}; an evaluation takes one "
            "Sample per prompt and sample (set n_samples_per_eval_prompt for more)"
        )
    sample = result
    if sample.status != Sample.Status.FAILED:
        await reward_samples(ctx, [sample], whole_group=False)
    pbar.update(1)
    return sample


async def evaluate_async(
    args: Any, rollout_id: int, session: Any, tokenizer: Any, *, reward_hub: Any = None
) -> dict:
    """Per-dataset eval metrics on an open engine session. `reward_hub`: the campaign's; without one, a
    hub for this evaluation alone, closed when it ends."""
    from slime_wf.rollout import rm_hub

    if reward_hub is None:
        async with rm_hub.RewardHub() as own_hub:
            return await evaluate_async(args, rollout_id, session, tokenizer, reward_hub=own_hub)
    hub = reward_hub
    metrics: dict[str, float] = {}
    for ds_cfg in args.eval_datasets:
        ds_cfg = dict(ds_cfg)
        eval_args = _eval_args(args, ds_cfg)
        dataset = Dataset(
            ds_cfg["path"],
            tokenizer=tokenizer,
            prompt_key=ds_cfg.get("input_key") or args.input_key,
            label_key=ds_cfg.get("label_key") or args.label_key,
            metadata_key=args.metadata_key,
            apply_chat_template=args.apply_chat_template,
            apply_chat_template_kwargs=args.apply_chat_template_kwargs,
            skip_bad_rows=args.skip_bad_rows,
            # a prompt the engines would refuse is a bad row here too, named at load
            context_length=engine_context_length(args),
            max_response_len=ds_cfg.get("max_response_len") or args.rollout_max_response_len,
            s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
            s3_region=getattr(args, "s3_region", None),
        )
        ctx = RolloutContext(
            args=eval_args,
            session=session,
            tokenizer=tokenizer,
            rollout_id=rollout_id,
            reward_kwargs={"hub": hub},
        )
        params = _eval_params(args, ds_cfg)
        samples = []
        for i, prompt in enumerate(dataset.samples):
            for j in range(ds_cfg["n_samples_per_eval_prompt"]):
                s = prompt.clone()
                s.index = i * ds_cfg["n_samples_per_eval_prompt"] + j
                samples.append(s)
        with (
            rollout_context(ctx),
            rm_hub.using_hub(hub),
            tqdm(total=len(samples), desc=f"eval {ds_cfg['name']}", leave=False) as pbar,
        ):
            done = await asyncio.gather(*(_generate_and_reward(ctx, s, params, pbar) for s in samples))
        scored = [s for s in done if s.status != Sample.Status.FAILED]
        # reward_samples rewarded every sample that did not fail
        rewards = [float(cast(float, s.get_reward_value(eval_args))) for s in scored]
        name = ds_cfg["name"]
        metrics[f"eval/{name}/reward"] = statistics.fmean(rewards) if rewards else 0.0
        metrics[f"eval/{name}/truncated_ratio"] = (
            sum(s.status == Sample.Status.TRUNCATED for s in scored) / len(scored) if scored else 0.0
        )
        metrics[f"eval/{name}/response_len/mean"] = (
            statistics.fmean(s.response_length for s in scored) if scored else 0.0
        )
        metrics[f"eval/{name}/failed"] = float(len(done) - len(scored))
    return metrics


def evaluate(
    args: Any, rollout_id: int, engines: Any, *, tokenizer: Any, reward_hub: Any = None
) -> dict[str, float]:
    """Per-dataset eval metrics (`eval/<name>/reward`, ...) on an `EngineFleet`."""

    async def _run() -> dict[str, float]:
        async with engines.session() as session:
            return await evaluate_async(args, rollout_id, session, tokenizer, reward_hub=reward_hub)

    return asyncio.run(_run())
