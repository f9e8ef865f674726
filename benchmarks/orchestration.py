"""What Prefect costs per rollout id: the `train` flow against the same library calls in a plain loop.

    .venv/bin/python benchmarks/orchestration.py [--rollouts 6] [--sizes 4x4x16 16x8x32]

A small campaign (tiny Qwen3, 2 layers, hidden 64; one local engine with one thread; math
reward) runs at each `--sizes` twice in this process, with fresh campaign names and run stores:

- plain: `Campaign(cfg).run()`, the library loop without Prefect;
- prefect: the `train` flow (`flows.campaign.train`), its tasks persisting JSON results and the
  flow writing its artifacts (metrics table, curves, progress), against a real `prefect server
  start` (started here when PREFECT_API_URL is unset, so the temporary server's start-up is not
  counted; against a running server, runs and artifacts stay there).

Start-up (engines, trainer, Prefect client) is excluded: a rollout id's wall time runs from the
start of its rollout to the start of the next one (for the last id, to the campaign's close), and
its step time is the sum of the `time/*` phases the library records in the id's metrics.json
(rollout, train, sync, save, eval). The rest is what neither phase timer sees: in the plain loop,
store writes between phases; in the flow, those plus Prefect's task runs, result files and
artifacts. Prefect's overhead per id is the flow's rest minus the plain loop's rest for that id,
shown in seconds and as a share of the flow's step time (goal: at most 1 s and 5 %). Prefect's
cost per id is about fixed, so its share falls as the step grows: the sizes show two points.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import make_tiny_model  # noqa: E402

from slime_wf.campaign import Campaign  # noqa: E402
from slime_wf.config import CampaignConfig  # noqa: E402
from slime_wf.store import RunStore  # noqa: E402

PHASES = ("time/rollout_s", "time/train_s", "time/sync_s", "time/save_s", "time/eval_s")
GOAL_SECONDS, GOAL_SHARE = 1.0, 0.05


class Clock:
    """Marks the start of every rollout id and the campaign's close; sums artifact time per id."""

    def __init__(self) -> None:
        self.marks: dict[str, list[tuple[int | None, float]]] = defaultdict(list)
        self.artifacts: dict[tuple[str, int], float] = defaultdict(float)
        self._current: dict[str, int] = {}

    def install(self) -> None:
        rollout, close = Campaign.rollout, Campaign.close
        clock = self

        def timed_rollout(campaign: Campaign, rid: int):
            clock.marks[campaign.cfg.campaign].append((rid, time.perf_counter()))
            clock._current[campaign.cfg.campaign] = rid
            return rollout(campaign, rid)

        def timed_close(campaign: Campaign):
            if campaign.fleet is not None:  # the first close of a started campaign
                clock.marks[campaign.cfg.campaign].append((None, time.perf_counter()))
            return close(campaign)

        Campaign.rollout, Campaign.close = timed_rollout, timed_close

    def time_artifacts(self, module) -> None:
        """Wrap the artifact writers the flow looks up in `module` (flows.campaign)."""
        for name in ("rollout_artifacts", "progress"):
            original = getattr(module, name)

            def timed(campaign, *args, _original=original, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(campaign, *args, **kwargs)
                finally:
                    rid = self._current.get(campaign)
                    if rid is not None:
                        self.artifacts[(campaign, rid)] += time.perf_counter() - t0

            setattr(module, name, timed)

    def walls(self, campaign: str) -> dict[int, float]:
        marks = self.marks[campaign]
        return {rid: t_next - t for (rid, t), (_, t_next) in zip(marks, marks[1:], strict=False) if rid is not None}


def make_assets(root: Path) -> dict[str, str]:
    model = make_tiny_model(root / "model", layers=2, hidden=64)
    data = root / "prompts.jsonl"
    rows = [{"prompt": f"what is {a} plus {b}", "label": str(a + b)} for a in range(10) for b in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "data": str(data)}


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        batch, samples, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: write PROMPTSxSAMPLESxTOKENS, e.g. 4x4x16") from None
    return batch, samples, length


def campaign_config(assets: dict[str, str], root: Path, name: str, rollouts: int, size: tuple[int, int, int]):
    batch, samples, length = size
    return CampaignConfig.from_dict({
        "campaign": name,
        "model": {"hf_checkpoint": assets["model"], "cache_dir": str(root / "cache")},
        "data": {"prompt_data": assets["data"], "rollout_shuffle": True},
        "rollout": {"num_rollout": rollouts, "rollout_batch_size": batch, "n_samples_per_prompt": samples,
                    "rollout_max_response_len": length},
        "reward": {"rm_type": "math"},
        "engine": {"num_engines": 1, "local_engine_threads": 1},
        "train": {"lr": 1e-3, "micro_batch_size": min(batch * samples, 16)},
        "storage": {"store": str(root / "store"), "scratch_dir": str(root / "scratch")},
    })


def phase_times(cfg: CampaignConfig) -> dict[int, dict[str, float]]:
    store = RunStore.for_campaign(cfg)
    out = {}
    for rid in range(cfg.rollout.num_rollout):
        metrics = store.read_json(RunStore.rollout_file(rid, "metrics.json"))
        out[rid] = {k: float(metrics.get(k, 0.0)) for k in PHASES}
    return out


def step_times(cfg: CampaignConfig) -> dict[int, float]:
    return {rid: sum(phases.values()) for rid, phases in phase_times(cfg).items()}


def run_plain(cfg: CampaignConfig) -> None:
    with Campaign(cfg) as campaign:
        campaign.run()


def run_prefect(cfg: CampaignConfig) -> None:
    import flows.campaign

    flows.campaign.train(cfg)


@contextlib.contextmanager
def prefect_api(home: Path):
    """The API the flow reports to: PREFECT_API_URL when set, else a server started here."""
    os.environ.update({"PREFECT_HOME": str(home / "client"), "DO_NOT_TRACK": "1",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"], 0.0
        return
    from deployments.local_server import local_prefect_server

    t0 = time.perf_counter()
    with local_prefect_server(home / "server") as api:
        os.environ["PREFECT_API_URL"] = api  # before prefect is imported: its settings read the environment
        try:
            yield api, time.perf_counter() - t0
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=6, help="rollout ids per campaign")
    parser.add_argument(
        "--sizes", type=parse_size, nargs="+", default=[(4, 4, 16), (16, 8, 32)], metavar="PxSxT",
        help="campaign sizes: prompts per rollout x samples per prompt x max response tokens (default 4x4x16 16x8x32)",
    )
    ns = parser.parse_args()

    clock = Clock()
    clock.install()
    results = []
    with tempfile.TemporaryDirectory(prefix="slime-wf-orchestration-") as tmp:
        root = Path(tmp)
        assets = make_assets(root / "assets")
        stamp = time.strftime("%H%M%S")
        with prefect_api(root / "prefect") as (api, server_start):
            print(f"Prefect API {api}" + (f" (server started in {server_start:.1f} s)" if server_start else ""),
                  flush=True)
            from prefect.logging.handlers import APILogHandler

            import flows.campaign

            clock.time_artifacts(flows.campaign)
            for i, size in enumerate(ns.sizes):
                tag = "x".join(map(str, size))
                plain = campaign_config(assets, root, f"bench-plain-{tag}-{stamp}", ns.rollouts, size)
                flow = campaign_config(assets, root, f"bench-prefect-{tag}-{stamp}", ns.rollouts, size)
                # alternate which goes first, so that neither always meets a warmer machine
                for name, cfg, run in (("plain loop", plain, run_plain), ("prefect flow", flow, run_prefect))[
                    :: 1 if i % 2 == 0 else -1
                ]:
                    t0 = time.perf_counter()
                    run(cfg)
                    print(f"{tag} {name}: {ns.rollouts} rollout ids in {time.perf_counter() - t0:.1f} s "
                          "(with start-up)", flush=True)
                results.append((size, plain, flow))
            APILogHandler().flush()  # the flow's last log lines, before the server goes

        for size, plain, flow in results:
            print_table(clock, plain, flow, ns.rollouts, size)
    return 0


def print_table(clock: Clock, plain_cfg: CampaignConfig, flow_cfg: CampaignConfig, rollouts: int, size) -> None:
    plain_wall, flow_wall = clock.walls(plain_cfg.campaign), clock.walls(flow_cfg.campaign)
    plain_step, flow_step = step_times(plain_cfg), step_times(flow_cfg)
    batch, samples, length = size
    print()
    print(f"campaign {batch}x{samples}x{length}: {rollouts} rollout ids x {batch} prompts x {samples} samples, "
          f"responses up to {length} tokens; tiny Qwen3 (2 layers, hidden 64), 1 local engine, 1 thread")
    header = ("rollout id", "plain wall s", "plain step s", "flow wall s", "flow step s", "overhead s",
              "% of step", "artifacts s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    rows = []
    for rid in range(rollouts):
        overhead = (flow_wall[rid] - flow_step[rid]) - (plain_wall[rid] - plain_step[rid])
        art = clock.artifacts.get((flow_cfg.campaign, rid), 0.0)
        rows.append((plain_wall[rid], plain_step[rid], flow_wall[rid], flow_step[rid], overhead,
                     overhead / flow_step[rid], art))
        _row(str(rid), rows[-1], header)
    mean = [statistics.fmean(r[i] for r in rows) for i in range(len(rows[0]))]
    share = mean[5] = mean[4] / mean[3]  # of the mean step, not a mean of per-id shares
    _row("mean", tuple(mean), header)
    plain_phases, flow_phases = phase_times(plain_cfg), phase_times(flow_cfg)
    print("mean phase s (plain / flow): " + ", ".join(
        f"{k.removeprefix('time/').removesuffix('_s')} {statistics.fmean(p[k] for p in plain_phases.values()):.3f}"
        f" / {statistics.fmean(p[k] for p in flow_phases.values()):.3f}"
        for k in PHASES if any(p[k] for p in plain_phases.values())
    ))
    print(f"Prefect overhead per rollout id: mean {mean[4]:.3f} s = {100 * share:.1f} % of the mean step "
          f"(worst id {max(r[4] for r in rows):.3f} s); goal <= {GOAL_SECONDS:.0f} s: "
          f"{'met' if mean[4] <= GOAL_SECONDS else 'NOT met'}, <= {100 * GOAL_SHARE:.0f} %: "
          f"{'met' if share <= GOAL_SHARE else 'NOT met'}")


def _row(label: str, values: tuple, header: tuple) -> None:
    cells = [label] + [f"{100 * v:.1f}" if i == 5 else f"{v:.3f}" for i, v in enumerate(values)]
    print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, header, strict=True)) + " |")


if __name__ == "__main__":
    sys.exit(main())
