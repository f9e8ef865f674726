"""The tiny-math demo campaign on a GPU machine: SGLang engines, a TP=2 Megatron trainer under
torchrun, and weights synced over NCCL with SGLang's weight-update group (`distributed` mode).

    python benchmarks/gpu_campaign.py [--num-rollout 20] [--store DIR] [--tp 2] [--num-engines 1]
        [--sglang-python PATH] [--sync disk|distributed] [--set key=value ...]

It runs the same campaign as `make demo` (examples/tiny-math/campaign.yaml: GRPO on single-digit
additions, FP8 rollout) through `Campaign.run`, the plain loop the Prefect flow also runs, with
`engine_type: sglang`, `actor_num_gpus_per_node = tensor_model_parallel_size = --tp` and
`weight_sync_mode: distributed`. The trainer takes GPUs 0..tp-1 and each engine the next one
(`engine.engine_base_gpu`), so it needs tp + num_engines GPUs. At the end it checks the ledger
invariant and prints, per phase, the median seconds per rollout id, the reward curve's ends and
the held-out reward (`eval/test/reward`).

Without CUDA, without SGLang (in this environment or at --sglang-python) or with too few GPUs it
says what is missing and exits with status 0; tests/e2e/test_gpu_campaign.py skips for the same reason.
How to carry the project to a GPU machine, in order, is in the README ("Running on GPUs").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny-math" / "campaign.yaml"
ASSETS = ROOT / "examples" / "tiny-math" / "assets"


def missing(tp: int, num_engines: int, sglang_python: str) -> str | None:
    """Why this machine cannot run the GPU campaign, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    need, have = tp + num_engines, torch.cuda.device_count()
    if have < need:
        return (
            f"{have} GPU(s), the layout needs {need}: {tp} for the trainer (TP={tp}) and one per engine; "
            f"run with --tp 1, or share a GPU with --set engine_base_gpu=0 --set sglang_mem_fraction_static=0.3"
        )
    probe = subprocess.run(
        [sglang_python, "-c", "import sglang.srt.entrypoints.http_server"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"SGLang's server does not import with {sglang_python}: {tail}"
    return None


def run(opts: argparse.Namespace) -> int:
    from slime_wf.campaign import Campaign
    from slime_wf.config import CampaignConfig
    from slime_wf.ledger import check_campaign_invariant
    from slime_wf.store import RunStore

    if not (ASSETS / "model").is_dir():
        subprocess.run(
            [sys.executable, str(CONFIG.parent / "make_assets.py"), "--out", str(ASSETS)], check=True
        )
    store = opts.store or tempfile.mkdtemp(prefix="slime-wf-gpu-")
    overrides = [
        f"num_rollout={opts.num_rollout}",
        f"store={store}",
        "campaign=gpu-demo",
        "engine_type=sglang",
        f"num_engines={opts.num_engines}",
        f"sglang_python={opts.sglang_python}",
        f"actor_num_gpus_per_node={opts.tp}",
        f"tensor_model_parallel_size={opts.tp}",
        f"weight_sync_mode={opts.sync}",
        *opts.set,
    ]
    os.chdir(ROOT)  # the example's paths are relative to the repository root
    cfg = CampaignConfig.from_yaml(str(CONFIG), overrides)
    Campaign(cfg).run()

    run_store = RunStore.for_campaign(cfg)
    counts = check_campaign_invariant(run_store)
    rows = [
        run_store.read_json(RunStore.rollout_file(rid, "metrics.json"))
        for rid in range(cfg.rollout.num_rollout)
    ]
    print(
        f"\nGPU campaign: {cfg.rollout.num_rollout} rollout ids, TP={opts.tp} trainer, {opts.num_engines} "
        f"SGLang engine(s), {opts.sync} weight sync; run store {run_store.uri}"
    )
    print(f"ledger invariant holds: {counts}")
    print("\n| phase | median s per rollout id | total s |\n| --- | ---: | ---: |")
    for phase in ("rollout", "train", "sync", "save", "eval"):
        values = [row[f"time/{phase}_s"] for row in rows if f"time/{phase}_s" in row]
        if values:
            print(f"| {phase} | {statistics.median(values):.2f} | {sum(values):.1f} |")
    rewards = [row.get("rollout/raw_reward") for row in rows]
    evals = [(row["rollout_id"], row["eval/test/reward"]) for row in rows if "eval/test/reward" in row]
    print(f"\nraw reward: first 3 {rewards[:3]}, last 3 {rewards[-3:]}")
    if evals:
        print(f"held-out: {evals[0]} -> {evals[-1]}")
    if opts.store is None:
        shutil.rmtree(store, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-rollout", type=int, default=20)
    ap.add_argument("--store", help="run store (default: a temporary folder, removed at the end)")
    ap.add_argument("--tp", type=int, default=2, help="trainer tensor-parallel size = its GPUs")
    ap.add_argument("--num-engines", type=int, default=1)
    ap.add_argument("--sync", choices=("disk", "distributed"), default="distributed")
    ap.add_argument(
        "--sglang-python",
        default=sys.executable,
        help="the Python of SGLang's environment (SGLang pins its own torch)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    opts = ap.parse_args(argv)
    why = missing(opts.tp, opts.num_engines, opts.sglang_python)
    if why:
        print(f"gpu_campaign: not run: {why}")
        return 0
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
