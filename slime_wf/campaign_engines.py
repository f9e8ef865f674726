"""The campaign's engine side: the fleet that generates, what rollout and evaluation use beside it,
and the weight sync into it.

`CampaignEngines` holds the `EngineFleet` (SGLang servers or the local engine server), the tokenizer
and the reward hub that rollout and evaluation share, and the distributed weight-update group over
the current fleet start. `launch` starts the engines without waiting, so that the trainer is built
while they load; `wait_ready` loads the tokenizer and makes the reward hub meanwhile (the hub starts
its grading workers on first use), then waits for the engines.

Weights reach the engines by `storage.weight_sync_mode`: `disk` exports them into scratch and has
every engine load that folder (older exports are pruned); `distributed` broadcasts them over one
weight-update group per fleet start, which also gives a restarted engine the current weights before
it serves again. `served` is the manifest's record of what the engines serve.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from slime_wf.campaign_trainer import CampaignTrainer
    from slime_wf.checkpoint.fp8_format import Fp8Format
    from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer
    from slime_wf.rollout.engines import EngineFleet
    from slime_wf.rollout.rm_hub import RewardHub
    from slime_wf.rollout.rollout import RolloutOutput
    from slime_wf.weight_sync.fleet_sync import DistributedWeightSync


class CampaignEngines:
    """The engine fleet of one campaign (`fleet`: None until `launch`), its tokenizer and reward hub."""

    def __init__(self, args: argparse.Namespace, scratch: str):
        self.args, self.scratch = args, scratch
        self.fleet: EngineFleet | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.reward_hub: RewardHub | None = None
        self._weight_group: DistributedWeightSync | None = None

    def launch(self, weights: str, version: str, *, log_dir: str) -> EngineFleet:
        """Start the engines on the HF folder `weights`, serving it as `version`, without waiting for them."""
        from slime_wf.rollout.engines import EngineFleet

        if self.fleet is not None:  # one fleet at a time: the old one's servers would run on unseen
            self.fleet.shutdown()
        self.fleet = EngineFleet(self.args, weights, log_dir=log_dir, weight_version=version)
        return self.fleet.start(wait=False)

    def wait_ready(self, hf_dir: str) -> EngineFleet:
        """Load the tokenizer (of the local checkpoint `hf_dir`) and make the reward hub while the engines
        load, then wait until every engine serves."""
        from slime_wf.rollout import rm_hub
        from slime_wf.rollout.dataset import load_tokenizer

        fleet = self.started()
        self.tokenizer = load_tokenizer(hf_dir)
        if self.reward_hub is None:
            self.reward_hub = rm_hub.RewardHub(self.args.rm_workers)
        return fleet.wait_ready()

    def started(self) -> EngineFleet:
        if self.fleet is None:
            raise RuntimeError(
                f"campaign {self.args.campaign}: the engines are not started: call start() first "
                "(open_for_evaluation() before evaluate_committed())"
            )
        return self.fleet

    # ---- what the steps do with them ------------------------------------------------------------

    def generate(self, rid: int, data_source: RolloutDataSourceWithBuffer) -> RolloutOutput:
        """Rollout `rid`: groups drawn from `data_source`, generated, rewarded and filtered."""
        from slime_wf.rollout.rollout import generate_rollout

        return generate_rollout(
            self.args, rid, data_source, self.started(), tokenizer=self.tokenizer, reward_hub=self.reward_hub
        )

    def evaluate(self, rid: int) -> dict[str, float]:
        """Per-dataset eval metrics (`eval.eval_datasets`) of the policy the engines serve, and `time/eval_s`."""
        from slime_wf.rollout.evaluation import evaluate

        t0 = time.perf_counter()
        metrics = evaluate(
            self.args, rid, self.started(), tokenizer=self.tokenizer, reward_hub=self.reward_hub
        )
        metrics["time/eval_s"] = time.perf_counter() - t0
        return metrics

    def sync_weights(self, trainer: CampaignTrainer, rid: int, *, fp8: Fp8Format | None) -> dict[str, float]:
        """Give every engine the trainer's current weights as version `rid`, cast to `fp8` when set."""
        from slime_wf.weight_sync.disk import prune_exports, sync_weights

        if self.args.weight_sync_mode == "distributed":
            return self._sync_distributed(trainer, rid, fp8)
        folder = os.path.join(self.scratch, "weights")
        out_dir = os.path.join(folder, f"{rid:06d}")
        metrics = sync_weights(
            self.started(),
            trainer.started(),
            out_dir,
            str(rid),
            fp8=fp8,
            verify=self.args.check_weight_update_equal,
        )
        prune_exports(folder, self.args.keep_weight_exports, out_dir)
        return metrics

    def _sync_distributed(
        self, trainer: CampaignTrainer, rid: int, fp8: Fp8Format | None
    ) -> dict[str, float]:
        from slime_wf.weight_sync.fleet_sync import DistributedWeightSync

        fleet, group = self.started(), self._weight_group
        if group is None or group.fleet is not fleet:
            group = self._weight_group = DistributedWeightSync(self.args, fleet)
            # the trainer of the moment: a recovery may rebuild it after the group was made
            fleet.after_restart = lambda url: group.rejoin(trainer.started(), url)
        verify = os.path.join(self.scratch, "weights", f"verify-{rid:06d}")
        return group.sync(
            trainer.started(),
            str(rid),
            fp8=fp8,
            verify_dir=verify if self.args.check_weight_update_equal else None,
        )

    def served(self) -> dict[str, Any]:
        """The manifest's record of what the engines serve: the folder a restarted engine loads, or after a
        distributed sync only the version (no folder holds it: a resume exports the committed policy again)."""
        fleet, group = self.started(), self._weight_group
        if group is not None and group.fleet is fleet and group.version is not None:
            return {"path": None, "version": group.version}
        return {"path": fleet.model_path, "version": fleet.weight_version}

    def shutdown(self) -> None:
        """Stop the engines and the reward hub's workers."""
        if self.fleet is not None:
            self.fleet.shutdown()
            self.fleet = None
        if self.reward_hub is not None:
            self.reward_hub.close()
            self.reward_hub = None
