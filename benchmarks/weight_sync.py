"""Weight sync, disk mode against distributed mode: seconds per GB from the trainer to a serving engine,
on the same model and engine, in full precision and in FP8.

    python benchmarks/weight_sync.py [--layers 4] [--hidden 512] [--vocab 16384] [--repeats 3] [--bucket-mb 512]

disk: the trainer exports an HF checkpoint (cast to FP8 block-wise for the FP8 rows), then the engine
loads it with /update_weights_from_disk. distributed: trainer rank 0 broadcasts the weights over the
weight-update group (gloo, the local engine's backend) in buckets of --bucket-mb, cast per tensor for
the FP8 rows; the engine swaps them in at /end_weight_update. The two modes take turns on each repeat,
so both see the same load. The group is built once per engine start; its setup is shown apart.
Seconds per GB divide the whole sync by the bytes each mode moved (the checkpoint folder for disk, the
broadcast tensors for distributed); ratio = disk s/GB over distributed s/GB (above 1: distributed is
faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.tiny_models import make_tiny_model

from slime_wf.checkpoint.fp8_convert import convert_checkpoint
from slime_wf.checkpoint.fp8_format import Fp8Format
from slime_wf.config import CampaignConfig
from slime_wf.rollout.engines import EngineFleet
from slime_wf.training.trainer import Trainer
from slime_wf.weight_sync.disk import sync_weights
from slime_wf.weight_sync.fleet_sync import DistributedWeightSync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=512.0)
    ns = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(make_tiny_model(root / "model", layers=ns.layers, hidden=ns.hidden, vocab_size=ns.vocab))
        convert_checkpoint(model, str(root / "fp8"), "block", (128, 128), progress=False)
        args = CampaignConfig.from_dict(
            {
                "engine": {"num_engines": 1, "local_engine_threads": 1},
                "storage": {"weight_sync_mode": "distributed", "weight_sync_bucket_mb": ns.bucket_mb},
            }
        ).args()
        trainer = Trainer(args, model)
        try:
            for label, served, fmt in (
                ("float32", model, None),
                ("fp8 block 128", str(root / "fp8"), Fp8Format.of_checkpoint(root / "fp8")),
            ):
                disk, dist = [], []
                with EngineFleet(args, served, log_dir=str(root / "logs")) as fleet:
                    group = DistributedWeightSync(args, fleet)
                    connect = group.sync(trainer, "warm-up", fp8=fmt)["sync/connect_s"]
                    for i in range(ns.repeats):
                        disk.append(
                            sync_weights(fleet, trainer, str(root / f"w-{label[:3]}-{i}"), f"d{i}", fp8=fmt)
                        )
                        dist.append(group.sync(trainer, f"b{i}", fp8=fmt))
                rows.append((label, disk, dist, connect))
        finally:
            trainer.shutdown()

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    print(
        f"\nweight sync, disk against distributed ({ns.layers} layers, hidden {ns.hidden}, vocab {ns.vocab}, one "
        f"local engine, buckets of {ns.bucket_mb:g} MB; median of {ns.repeats})\n"
    )
    print(
        "| weights | disk MB | disk s (export + push) | disk s/GB | distributed MB | distributed s (group setup) "
        "| distributed s/GB | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, disk, dist, connect in rows:
        disk_s = med(disk, "sync/export_s") + med(disk, "sync/push_s")
        dist_s = med(dist, "sync/broadcast_s")
        print(
            f"| {label} | {med(disk, 'sync/bytes') / 2**20:.1f} | {disk_s:.2f} ({med(disk, 'sync/export_s'):.2f} + "
            f"{med(disk, 'sync/push_s'):.2f}) | {med(disk, 'sync/s_per_gb'):.2f} | "
            f"{med(dist, 'sync/bytes') / 2**20:.1f} | {dist_s:.2f} ({connect:.2f}) | {med(dist, 'sync/s_per_gb'):.2f} | "
            f"{med(disk, 'sync/s_per_gb') / med(dist, 'sync/s_per_gb'):.2f} |"
        )


if __name__ == "__main__":
    main()
