"""Rollout wall time per batch on a long-tailed response-length distribution:
partial rollout + over-sampling against plain batches, at the same rollout_batch_size.

    python benchmarks/rollout.py [--rollouts 6] [--batch 4] [--n 4]

A small Qwen3-shaped model is served by one local engine. Response lengths are made long-tailed
(roughly geometric, capped) by choosing as stop token one the model emits about once every
`--mean-len` tokens. Without partial rollout every batch waits for its slowest response; with it,
the rollout keeps the first `rollout_batch_size` groups to finish and parks the rest in the buffer,
to be continued next time. Engine (a), local server against transformers' generate, is in
benchmarks/rollout_engine.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.tiny_models import make_tiny_model

from slime_wf.config import CampaignConfig
from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer
from slime_wf.rollout.engines import EngineFleet
from slime_wf.rollout.rollout import generate_rollout


async def length_reward(args, sample):
    return float(sample.response_length)


def pick_stop_token(model_dir: str, mean_len: int) -> int:
    """A token the model samples with probability closest to 1/mean_len per step."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (16, 24), generator=gen)
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits.float(), dim=-1).mean(dim=(0, 1))
    probs[:4] = 0  # not a special token
    return int(torch.argmin((probs - 1.0 / mean_len).abs()))


def run(cfg_overrides: list[str], base: dict, fleet: EngineFleet, rollouts: int) -> list[float]:
    args = CampaignConfig.from_dict(base, cfg_overrides).args()
    ds = RolloutDataSourceWithBuffer(args)
    times = []
    generate_rollout(args, -1, ds, fleet)  # warm-up, not timed
    for rid in range(rollouts):
        t0 = time.perf_counter()
        generate_rollout(args, rid, ds, fleet)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="rollout_batch_size")
    ap.add_argument("--n", type=int, default=4, help="n_samples_per_prompt")
    ap.add_argument("--over", type=int, default=8, help="over_sampling_batch_size with partial rollout")
    ap.add_argument("--mean-len", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=480)
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = str(
            make_tiny_model(Path(tmp) / "model", layers=2, hidden=128, vocab_size=512, max_positions=1024)
        )
        stop = pick_stop_token(model, ns.mean_len)
        data = Path(tmp) / "prompts.jsonl"
        data.write_text(
            "".join(json.dumps({"prompt": f"what is {i} plus {i}", "label": i}) + "\n" for i in range(200))
        )
        base = {
            "model": {"hf_checkpoint": model},
            "data": {"prompt_data": str(data)},
            "rollout": {
                "rollout_batch_size": ns.batch,
                "n_samples_per_prompt": ns.n,
                "rollout_max_response_len": ns.max_len,
                "rollout_temperature": 1.0,
                "rollout_stop_token_ids": [stop],
            },
            "reward": {"custom_rm_path": f"{__name__}.length_reward"},
            "engine": {"num_engines": 1, "local_engine_threads": ns.threads},
        }
        fleet_args = CampaignConfig.from_dict(base).args()
        with EngineFleet(fleet_args, model, log_dir=str(Path(tmp) / "logs")) as fleet:
            plain = run([], base, fleet, ns.rollouts)
            partial = run(
                ["partial_rollout=true", f"over_sampling_batch_size={ns.over}"], base, fleet, ns.rollouts
            )

    rows = [("plain batches", plain), (f"partial rollout, over-sampling {ns.over}", partial)]
    ref, ref_mean = statistics.median(plain), statistics.fmean(plain)
    print(
        f"\nrollout wall time per batch ({ns.rollouts} rollouts, batch {ns.batch} x {ns.n}, lengths ~geometric "
        f"mean {ns.mean_len} capped {ns.max_len})"
    )
    print(f"{'mode':<36} {'median s':>9} {'mean s':>8} {'max s':>7} {'speed-up (median)':>18} {'(mean)':>7}")
    for name, times in rows:
        med, mean = statistics.median(times), statistics.fmean(times)
        print(
            f"{name:<36} {med:9.2f} {mean:8.2f} {max(times):7.2f} {ref / med:17.2f}x {ref_mean / mean:6.2f}x"
        )


if __name__ == "__main__":
    main()
