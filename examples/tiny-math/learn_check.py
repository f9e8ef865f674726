"""Does the tiny-math campaign learn? Runs its steps in a plain loop (no Prefect) and measures.

    python examples/tiny-math/make_assets.py --out examples/tiny-math/assets
    python examples/tiny-math/learn_check.py [--config examples/tiny-math/campaign.yaml] [key=value ...]

Per rollout id: generate a rollout on the campaign's local engines (dynamic sampling, partial
rollout), train on it with the Megatron trainer, export the weights to a fresh folder and load
them into every engine (`/update_weights_from_disk`, weight version = the rollout id). It prints
the raw-reward curve and compares the mean `rollout/raw_reward` of the last 3 rollouts with the
first 3; the exit status is 1 when the gain is below --min-gain. It also reports how often the
policy answers right before and after, graded like the campaign (8 answers per prompt sampled at
temperature 1, and greedy), on the RL prompts and on the held-out test prompts: unlike the raw
reward of a rollout, which counts only the groups the dynamic filter keeps (never all right),
these are not capped below 1.

No checkpoints are saved and nothing is written to the run store: everything goes to --work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


async def push_weights(fleet, path: str, version: str) -> None:
    """Load the exported checkpoint into every engine, then record it on the fleet (restarts serve it)."""
    async with fleet.session() as session:
        results = await session.for_each_engine(
            lambda c: c.update_weights_from_disk(path, version), skip_down=False
        )
    for url, result in zip(fleet.urls, results, strict=True):
        if not (isinstance(result, dict) and result.get("success")):
            raise RuntimeError(f"engine {url} refused the weights at {path}: {result}")
    fleet.set_weights(path, version)


def run(cfg, work: Path, test_path: str | None, keep_weights: bool = False) -> dict:
    from make_assets import answer_accuracy

    from slime_wf.rollout import rm_hub
    from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer
    from slime_wf.rollout.dataset import load_tokenizer
    from slime_wf.rollout.engines import EngineFleet
    from slime_wf.rollout.rollout import generate_rollout
    from slime_wf.training.trainer import Trainer

    args = cfg.args()
    hf_dir = os.path.abspath(cfg.model.hf_checkpoint)
    args.hf_checkpoint = hf_dir
    train_rows = load_jsonl(cfg.data.prompt_data)
    test_rows = load_jsonl(test_path) if test_path else []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    before = {"train": answer_accuracy(hf_dir, train_rows)}
    if test_rows:
        before["test"] = answer_accuracy(hf_dir, test_rows)

    t0 = time.perf_counter()
    fleet = EngineFleet(args, hf_dir, log_dir=str(work / "logs"), weight_version="init")
    trainer = None
    hub = rm_hub.RewardHub(args.rm_workers)
    curve = []
    last_export = hf_dir
    try:
        fleet.start()
        timings["engine_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer = Trainer(cfg.args(), hf_dir)
        timings["trainer_start_s"] = time.perf_counter() - t0
        data_source = RolloutDataSourceWithBuffer(args)
        tokenizer = load_tokenizer(hf_dir)
        for rid in range(cfg.rollout.num_rollout):
            t0 = time.perf_counter()
            out = generate_rollout(args, rid, data_source, fleet, tokenizer=tokenizer, reward_hub=hub)
            t1 = time.perf_counter()
            metrics = trainer.train([s for group in out.groups for s in group], rid)
            t2 = time.perf_counter()
            export = str(work / "weights" / f"{rid:06d}")
            trainer.export_hf(export)
            asyncio.run(push_weights(fleet, export, str(rid)))
            if last_export != hf_dir and not keep_weights:
                shutil.rmtree(last_export, ignore_errors=True)
            last_export = export
            t3 = time.perf_counter()
            m = out.metrics
            row = {
                "rollout_id": rid,
                "raw_reward": m["rollout/raw_reward"],
                "groups_drawn": m["rollout/groups_drawn"],
                # the filter's reason names the common reward: zero_std_0 (all wrong) or zero_std_1 (all right)
                "dropped_all_wrong": sum(v for k, v in m.items() if k.startswith("filter/drop_zero_std_0")),
                "dropped_all_right": sum(v for k, v in m.items() if k.startswith("filter/drop_zero_std_1")),
                "from_buffer": m.get("rollout/partial/from_buffer_groups", 0.0),
                "grad_norm": metrics.get("grad_norm", float("nan")),
                "rollout_s": t1 - t0,
                "train_s": t2 - t1,
                "sync_s": t3 - t2,
            }
            curve.append(row)
            print(
                f"rollout {rid:3d}  raw_reward {row['raw_reward']:.3f}  drawn {row['groups_drawn']:3.0f} "
                f"(all wrong {row['dropped_all_wrong']:2.0f}, all right {row['dropped_all_right']:2.0f}, "
                f"from buffer {row['from_buffer']:2.0f})  grad norm {row['grad_norm']:.3f}  rollout {row['rollout_s']:.1f}s train {row['train_s']:.1f}s "
                f"sync {row['sync_s']:.1f}s",
                flush=True,
            )
    finally:
        fleet.shutdown()
        hub.close()
        if trainer is not None:
            trainer.shutdown()
    timings["loop_s"] = sum(r["rollout_s"] + r["train_s"] + r["sync_s"] for r in curve)
    after = {"train": answer_accuracy(last_export, train_rows)}
    if test_rows:
        after["test"] = answer_accuracy(last_export, test_rows)
    timings["total_s"] = time.perf_counter() - started
    return {"curve": curve, "before": before, "after": after, "timings": timings}


def summarize(result: dict, min_gain: float) -> tuple[bool, str]:
    rewards = [r["raw_reward"] for r in result["curve"]]
    if len(rewards) < 6:
        return False, f"only {len(rewards)} rollouts: the check compares the first 3 with the last 3"
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    gain = last - first
    lines = [
        "raw reward per rollout: " + " ".join(f"{r:.2f}" for r in rewards),
        f"first 3: {first:.3f}   last 3: {last:.3f}   gain: {gain:+.3f} (required {min_gain:+.3f})",
    ]
    for split in result["before"]:
        b, a = result["before"][split], result["after"][split]
        lines.append(
            f"{split} accuracy, sampled at T=1: {b['sampled']:.3f} -> {a['sampled']:.3f}; "
            f"greedy: {b['greedy']:.3f} -> {a['greedy']:.3f}; "
            f"greedy in the exact format: {b['greedy_canonical']:.3f} -> {a['greedy_canonical']:.3f}"
        )
    t = result["timings"]
    lines.append(
        f"time: engines up {t['engine_start_s']:.1f}s, trainer up {t['trainer_start_s']:.1f}s, "
        f"{len(rewards)} rollouts {t['loop_s']:.1f}s, total {t['total_s']:.1f}s"
    )
    return gain >= min_gain, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from slime_wf.config import CampaignConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(HERE / "campaign.yaml"), help="campaign file")
    parser.add_argument(
        "--test-data",
        default=None,
        help="held-out prompts for the accuracy report (default: test.jsonl beside prompt_data)",
    )
    parser.add_argument(
        "--work", default=None, help="folder for engine logs and weight exports (default: a temp dir)"
    )
    parser.add_argument(
        "--min-gain", type=float, default=0.15, help="required gain of the last 3 over the first 3"
    )
    parser.add_argument("--json", default=None, help="also write the curve and timings here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. num_rollout=10)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cfg = CampaignConfig.from_yaml(opts.config, opts.overrides)
    for what, path in (
        ("model.hf_checkpoint", cfg.model.hf_checkpoint),
        ("data.prompt_data", cfg.data.prompt_data),
    ):
        if not path or not os.path.exists(path):
            print(
                f"{what}={path!r} does not exist (paths are relative to {os.getcwd()}); make the assets first: "
                f"python examples/tiny-math/make_assets.py --out <assets folder>",
                file=sys.stderr,
            )
            return 2
    test_path = opts.test_data or os.path.join(os.path.dirname(cfg.data.prompt_data), "test.jsonl")
    test_path = test_path if os.path.exists(test_path) else None

    with tempfile.TemporaryDirectory(prefix="tiny-math-") as tmp:
        work = Path(opts.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(cfg, work, test_path, keep_weights=opts.work is not None)
    ok, text = summarize(result, opts.min_gain)
    print(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    print("LEARNS" if ok else "DOES NOT LEARN ENOUGH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
