"""Weight sync in disk mode: seconds per GB from the trainer to a serving engine, full precision and FP8.

    python benchmarks/weight_sync.py [--layers 4] [--hidden 512] [--vocab 16384] [--repeats 3]

Each sync exports the trainer's weights as an HF checkpoint (cast to FP8 block-wise for the FP8
row), then the engine loads it with /update_weights_from_disk. The table splits export and push,
and gives seconds per GB of the checkpoint written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import make_tiny_model  # noqa: E402

from slime_wf.checkpoint.sync import sync_weights  # noqa: E402
from slime_wf.config import CampaignConfig  # noqa: E402
from slime_wf.rollout.engines import EngineFleet  # noqa: E402
from slime_wf.training.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(Path(tmp) / "model", layers=ns.layers, hidden=ns.hidden, vocab_size=ns.vocab))
        args = CampaignConfig.from_dict({"engine": {"num_engines": 1, "local_engine_threads": 1}}).args()
        trainer = Trainer(args, model)
        rows = []
        with EngineFleet(args, model, log_dir=str(Path(tmp) / "logs")) as fleet:
            for label, fp8 in (("float32", None), ("fp8 block 128", {"strategy": "block", "block_size": [128, 128]})):
                runs = [
                    sync_weights(fleet, trainer, str(Path(tmp) / f"w-{label[:3]}-{i}"), f"{label[:3]}{i}", fp8=fp8)
                    for i in range(ns.repeats)
                ]
                rows.append((label, runs))
        trainer.shutdown()
    print(f"\nweight sync, disk mode ({ns.layers} layers, hidden {ns.hidden}, vocab {ns.vocab}; median of {ns.repeats})")
    print(f"{'weights':<16} {'MB':>8} {'export s':>9} {'push s':>8} {'s per GB':>9}")
    for label, runs in rows:
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"{label:<16} {med['sync/bytes'] / 2**20:8.1f} {med['sync/export_s']:9.2f} {med['sync/push_s']:8.2f} "
              f"{med['sync/s_per_gb']:9.2f}")


if __name__ == "__main__":
    main()
