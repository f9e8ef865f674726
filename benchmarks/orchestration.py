"""What Prefect costs per rollout id: the `train` flow against the same library calls in a plain loop.

    .venv/bin/python benchmarks/orchestration.py [--rollouts 6] [--sizes 4x4x16 16x8x32] [--storage-lookup]
    .venv/bin/python benchmarks/orchestration.py --sizes --config examples/tiny-math/campaign.yaml

A small campaign (tiny Qwen3, 2 layers, hidden 64; one local engine with one thread; math
reward) runs at each `--sizes` twice in this process, with fresh campaign names and run stores:

- plain: `Campaign(cfg).run()`, the library loop without Prefect;
- prefect: the `train` flow (`flows.campaign.train`), its tasks persisting JSON results and the
  flow publishing its artifacts (metrics table, curves, progress) from a background thread,
  against a real `prefect server start` (started here when PREFECT_API_URL is unset, so the
  temporary server's start-up is not counted; against a running server, runs and artifacts stay
  there).

Start-up (engines, trainer, Prefect client) is excluded: a rollout id's wall time runs from the
start of its rollout to the start of the next one (for the last id, to the campaign's close), and
its step time is the sum of the `time/*` phases the library records in the id's metrics.json
(rollout, train, sync, save, eval). The rest is what neither phase timer sees: in the plain loop,
store writes between phases; in the flow, those plus Prefect's task runs, result files and
queueing the artifacts. Prefect's overhead per id is the flow's rest minus the plain loop's rest
for that id, shown in seconds and as a share of the flow's step time (goal: at most 1 s and 5 %).
Prefect's cost per id is about fixed, so its share falls as the step grows: the sizes show two
points. `--config` measures a campaign file as it is (its model, data, engines and reward; the
demo's file needs its assets: `make demo` or `examples/tiny-math/make_assets.py`), cut to
`--rollouts` ids, with its run store in a temporary folder.

The artifacts column is what the flow's thread spends on them (queueing, in ms); the API calls
happen in the publisher's thread. Below each table: how many artifacts the publisher sent, how
many queued snapshots a newer one replaced, the wait for the last ones at the flow's end (after
the campaign closed), and what the Prefect API holds for the campaign, read back at the end, so
that nothing dropped goes unseen. `--storage-lookup` adds one persisted task run timed with its
result storage given as a saved block's name (loaded from the API on every task run) against the
saved block itself.

The reward-and-filter task runs (one per wave of completed groups, submitted from the rollout
loop) are measured before and after, side by side, in the same run: each size also runs the flow
with each wave scored inline (`PrefectScorer` answering by awaiting the work itself, as the flow
did before the waves were task runs). The table gives both flows' step times per id, the waves,
and the task runs' own cost: each wave's time around the task run minus the time of the work
inside it, summed per id. That sum bounds what the task runs add to the step (the loop keeps
generating while a wave is scored); the goal is at most 5 % of steps of 2 s or more.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers.tiny_models import make_tiny_model  # noqa: E402

from slime_wf.campaign import Campaign  # noqa: E402
from slime_wf.config import CampaignConfig  # noqa: E402
from slime_wf.store import RunStore  # noqa: E402

PHASES = ("time/rollout_s", "time/train_s", "time/sync_s", "time/save_s", "time/eval_s")
GOAL_SECONDS, GOAL_SHARE = 1.0, 0.05
SCORING_GOAL_STEP_S = 2.0  # the scoring task runs' goal (GOAL_SHARE) holds for steps this long or longer


class Clock:
    """Marks the start of every rollout id and the campaign's close; sums artifact time per id."""

    def __init__(self) -> None:
        self.marks: dict[str, list[tuple[int | None, float]]] = defaultdict(list)
        self.artifacts: dict[tuple[str, int], float] = defaultdict(float)
        self.flushes: dict[str, tuple[float, dict[str, int]]] = {}
        self._current: dict[str, int] = {}
        self.waves: dict[tuple[str, int], int] = defaultdict(int)
        self.wave_cost: dict[tuple[str, int], float] = defaultdict(
            float
        )  # around the task run minus the work
        self.inline_scoring = False  # the flow as before: waves scored without task runs

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

    def time_artifacts(self, publisher_class) -> None:
        """Time what the flow's thread spends in the publisher (queueing), per rollout id, and its
        flush at the flow's end; keep the publisher's counts."""
        clock = self
        for name in ("rollout", "progress"):
            original = getattr(publisher_class, name)

            def timed(publisher, *args, _original=original, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(publisher, *args, **kwargs)
                finally:
                    rid = clock._current.get(publisher.campaign)
                    if rid is not None:
                        clock.artifacts[(publisher.campaign, rid)] += time.perf_counter() - t0

            setattr(publisher_class, name, timed)
        close = publisher_class.close

        def timed_close(publisher, *args, **kwargs):
            t0 = time.perf_counter()
            counts = close(publisher, *args, **kwargs)
            clock.flushes.setdefault(publisher.campaign, (time.perf_counter() - t0, counts))
            return counts

        publisher_class.close = timed_close

    def time_scoring(self, scorer_class) -> None:
        """Count the waves per id and time each one's task run around its work; with `inline_scoring`,
        await the work directly instead (no task run)."""
        clock = self
        original = scorer_class.__call__

        async def timed(scorer, rollout_id, wave, group_indices, score):
            key = (scorer.campaign_name, rollout_id)
            clock.waves[key] += 1
            if clock.inline_scoring:
                return await score()
            inside = 0.0

            async def work():
                nonlocal inside
                t0 = time.perf_counter()
                try:
                    return await score()
                finally:
                    inside += time.perf_counter() - t0

            t0 = time.perf_counter()
            try:
                return await original(scorer, rollout_id, wave, group_indices, work)
            finally:
                clock.wave_cost[key] += time.perf_counter() - t0 - inside

        scorer_class.__call__ = timed

    def walls(self, campaign: str) -> dict[int, float]:
        marks = self.marks[campaign]
        return {
            rid: t_next - t
            for (rid, t), (_, t_next) in zip(marks, marks[1:], strict=False)
            if rid is not None
        }


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
        raise argparse.ArgumentTypeError(
            f"size {text!r}: write PROMPTSxSAMPLESxTOKENS, e.g. 4x4x16"
        ) from None
    return batch, samples, length


def campaign_config(assets: dict[str, str], root: Path, name: str, rollouts: int, size: tuple[int, int, int]):
    batch, samples, length = size
    return CampaignConfig.from_dict(
        {
            "campaign": name,
            "model": {"hf_checkpoint": assets["model"], "cache_dir": str(root / "cache")},
            "data": {"prompt_data": assets["data"], "rollout_shuffle": True},
            "rollout": {
                "num_rollout": rollouts,
                "rollout_batch_size": batch,
                "n_samples_per_prompt": samples,
                "rollout_max_response_len": length,
            },
            "reward": {"rm_type": "math"},
            "engine": {"num_engines": 1, "local_engine_threads": 1},
            "train": {"lr": 1e-3, "micro_batch_size": min(batch * samples, 16)},
            "storage": {"store": str(root / "store"), "scratch_dir": str(root / "scratch")},
        }
    )


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


def prefect_inline_scoring(clock: Clock):
    def run(cfg: CampaignConfig) -> None:
        clock.inline_scoring = True
        try:
            run_prefect(cfg)
        finally:
            clock.inline_scoring = False

    return run


@contextlib.contextmanager
def prefect_api(home: Path):
    """The API the flow reports to: PREFECT_API_URL when set, else a server started here."""
    os.environ.update(
        {
            "PREFECT_HOME": str(home / "client"),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    )
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"], 0.0
        return
    from helpers.prefect_server import local_prefect_server

    t0 = time.perf_counter()
    with local_prefect_server(home / "server") as api:
        os.environ["PREFECT_API_URL"] = api  # before prefect is imported: its settings read the environment
        try:
            yield api, time.perf_counter() - t0
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollouts", type=int, default=6, help="rollout ids per campaign")
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="*",
        default=[(4, 4, 16), (16, 8, 32)],
        metavar="PxSxT",
        help="campaign sizes: prompts per rollout x samples per prompt x max response tokens (default 4x4x16 16x8x32)",
    )
    parser.add_argument(
        "--storage-lookup",
        action="store_true",
        help="also time one persisted task run with its result storage given as a saved block's name "
        "against the saved block itself (what the flow passes for s3:// stores)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="also measure this campaign file (repeatable); its assets must exist",
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
            print(
                f"Prefect API {api}" + (f" (server started in {server_start:.1f} s)" if server_start else ""),
                flush=True,
            )
            from prefect.logging.handlers import APILogHandler

            from flows.artifacts import ArtifactPublisher
            from tasks.campaign_tasks import PrefectScorer

            clock.time_artifacts(ArtifactPublisher)
            clock.time_scoring(PrefectScorer)
            runs = [("x".join(map(str, size)), size, None) for size in ns.sizes]
            runs += [(Path(path).parent.name or Path(path).stem, None, path) for path in ns.config]
            for i, (tag, size, path) in enumerate(runs):
                sides = ("plain", "prefect", "inline")
                if path is None:
                    plain, flow, inline = (
                        campaign_config(assets, root, f"bench-{side}-{tag}-{stamp}", ns.rollouts, size)
                        for side in sides
                    )
                else:
                    plain, flow, inline = (
                        file_config(path, root, f"bench-{side}-{tag}-{stamp}", ns.rollouts) for side in sides
                    )
                variants = (
                    ("plain loop", plain, run_plain),
                    ("prefect flow", flow, run_prefect),
                    ("prefect flow, waves scored inline", inline, prefect_inline_scoring(clock)),
                )
                # alternate the order, so that none always meets a warmer machine
                for name, cfg, run in variants[:: 1 if i % 2 == 0 else -1]:
                    t0 = time.perf_counter()
                    run(cfg)
                    print(
                        f"{tag} {name}: {ns.rollouts} rollout ids in {time.perf_counter() - t0:.1f} s "
                        "(with start-up)",
                        flush=True,
                    )
                results.append((describe(plain, path), plain, flow, inline, stored_artifacts(flow.campaign)))
            lookup = storage_lookup(root / "lookup") if ns.storage_lookup else None
            APILogHandler().flush()  # the flow's last log lines, before the server goes

        for title, plain, flow, inline, stored in results:
            print_table(clock, plain, flow, ns.rollouts, title)
            print_artifacts(clock, flow.campaign, ns.rollouts, stored)
            print_scoring(clock, inline, flow, ns.rollouts)
        if lookup:
            print_storage_lookup(lookup)
    return 0


def storage_lookup(folder: Path, runs: int = 30) -> dict[str, float]:
    """Median seconds per persisted task run (a trivial body) with the result storage given as a
    saved block's name, which Prefect loads from the API on every task run, or as the block itself."""
    from prefect import flow
    from prefect.filesystems import LocalFileSystem

    from tasks.campaign_tasks import _persisted

    def noop(campaign, rollout_id: int) -> dict[str, float]:
        return {"rollout_id": float(rollout_id)}

    step = _persisted(noop, "lookup")
    campaign = SimpleNamespace(cfg=SimpleNamespace(campaign="lookup"))  # all the result key reads of it
    out: dict[str, list[float]] = defaultdict(list)

    @flow(name="storage-lookup")
    def measure(by: str) -> None:
        block = LocalFileSystem(basepath=str(folder))
        block.save("slime-wf-bench-lookup", overwrite=True)
        timed = step.with_options(
            result_storage=block if by == "block" else "local-file-system/slime-wf-bench-lookup"
        )
        for rid in range(runs):
            t0 = time.perf_counter()
            timed(campaign, rid)
            out[by].append(time.perf_counter() - t0)

    for by in ("name", "block", "name", "block"):
        measure(by)
    return {by: statistics.median(times) for by, times in out.items()}


def print_storage_lookup(lookup: dict[str, float]) -> None:
    print()
    print("one persisted task run (trivial body), by how its result storage is given:")
    print("| result storage | ms per task run | ratio |")
    print("|----------------|-----------------|-------|")
    for by, label in (("name", "block name"), ("block", "saved block")):
        print(f"| {label:>14} | {1e3 * lookup[by]:15.1f} | {lookup[by] / lookup['block']:5.1f} |")


def stored_artifacts(campaign: str) -> list:
    """Every version of every artifact of `campaign` that the Prefect API holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import artifact_key

    prefix, found, page = artifact_key(campaign) + "-", [], 200
    with get_client(sync_client=True) as client:
        while True:
            batch = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=prefix)),
                limit=page,
                offset=len(found),
            )
            found += batch
            if len(batch) < page:
                break
    return sorted((a for a in found if a.key and a.key.startswith(prefix)), key=lambda a: a.created)


def print_artifacts(clock: Clock, campaign: str, rollouts: int, stored: list) -> None:
    from flows.artifacts import artifact_key

    flush, counts = clock.flushes.get(campaign, (float("nan"), {}))
    per_id = {
        artifact_key(campaign, "rollout", f"{rid:06d}", kind)
        for rid in range(rollouts)
        for kind in ("metrics", "samples")
    }
    by_key: dict[str, list] = defaultdict(list)
    for artifact in stored:
        by_key[artifact.key].append(artifact)
    summary, curves, progress = (
        by_key.get(artifact_key(campaign, name), []) for name in ("summary", "curves", "progress")
    )
    rows = json.loads(summary[-1].data) if summary and isinstance(summary[-1].data, str) else []
    summary_complete = [row.get("rollout") for row in rows] == list(range(rollouts))
    complete = (
        per_id <= set(by_key)
        and summary_complete
        and bool(curves)
        and f"rollout ids 0 to {rollouts - 1}" in str(curves[-1].data)
        and bool(progress)
        and progress[-1].data == 100.0
    )
    print(
        f"artifacts: publisher queued {counts.get('queued')}, sent {counts.get('sent')}, replaced by a newer "
        f"snapshot {counts.get('replaced')}, failed {counts.get('failed')}, unsent {counts.get('unsent')}; "
        f"flush at the flow's end {flush:.3f} s"
    )
    print(
        f"artifacts in the Prefect API: metrics tables and sample viewers for {len(per_id & set(by_key)) // 2}/"
        f"{rollouts} ids; summary ({len(summary)} artifact(s), rows for every id: {'yes' if summary_complete else 'NO'}), "
        f"curves ({len(curves)}), progress ({len(progress)}, at {progress[-1].data if progress else None} %), "
        f"each updated in place: {'all arrived' if complete else 'INCOMPLETE'}"
    )


def describe(cfg: CampaignConfig, path: str | None) -> str:
    r = cfg.rollout
    what = (
        f"{r.rollout_batch_size}x{r.n_samples_per_prompt}x{r.rollout_max_response_len}: {r.num_rollout} rollout "
        f"ids x {r.rollout_batch_size} prompts x {r.n_samples_per_prompt} samples, responses up to "
        f"{r.rollout_max_response_len} tokens; "
    )
    if path is None:
        return what + "tiny Qwen3 (2 layers, hidden 64), 1 local engine, 1 thread"
    return what + f"{path} ({cfg.engine.num_engines} engines, rm_type {cfg.reward.rm_type})"


def file_config(path: str, root: Path, name: str, rollouts: int) -> CampaignConfig:
    """A campaign file as it is, renamed, cut to `rollouts` ids, with its run store under `root`."""
    return CampaignConfig.from_yaml(
        path,
        [
            f"campaign={name}",
            f"num_rollout={rollouts}",
            f"store={root / 'store'}",
            f"scratch_dir={root / 'scratch' / name}",
        ],
    )


def print_table(
    clock: Clock, plain_cfg: CampaignConfig, flow_cfg: CampaignConfig, rollouts: int, title: str
) -> None:
    plain_wall, flow_wall = clock.walls(plain_cfg.campaign), clock.walls(flow_cfg.campaign)
    plain_step, flow_step = step_times(plain_cfg), step_times(flow_cfg)
    print()
    print(f"campaign {title}")
    header = (
        "rollout id",
        "plain wall s",
        "plain step s",
        "flow wall s",
        "flow step s",
        "overhead s",
        "% of step",
        "artifacts queue ms",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    rows = []
    for rid in range(rollouts):
        overhead = (flow_wall[rid] - flow_step[rid]) - (plain_wall[rid] - plain_step[rid])
        art = clock.artifacts.get((flow_cfg.campaign, rid), 0.0)
        rows.append(
            (
                plain_wall[rid],
                plain_step[rid],
                flow_wall[rid],
                flow_step[rid],
                overhead,
                overhead / flow_step[rid],
                art,
            )
        )
        _row(str(rid), rows[-1], header)
    mean = [statistics.fmean(r[i] for r in rows) for i in range(len(rows[0]))]
    share = mean[5] = mean[4] / mean[3]  # of the mean step, not a mean of per-id shares
    _row("mean", tuple(mean), header)
    plain_phases, flow_phases = phase_times(plain_cfg), phase_times(flow_cfg)
    print(
        "mean phase s (plain / flow): "
        + ", ".join(
            f"{k.removeprefix('time/').removesuffix('_s')} {statistics.fmean(p[k] for p in plain_phases.values()):.3f}"
            f" / {statistics.fmean(p[k] for p in flow_phases.values()):.3f}"
            for k in PHASES
            if any(p[k] for p in plain_phases.values())
        )
    )
    print(
        f"Prefect overhead per rollout id: mean {mean[4]:.3f} s = {100 * share:.1f} % of the mean step "
        f"(worst id {max(r[4] for r in rows):.3f} s); goal <= {GOAL_SECONDS:.0f} s: "
        f"{'met' if mean[4] <= GOAL_SECONDS else 'NOT met'}, <= {100 * GOAL_SHARE:.0f} %: "
        f"{'met' if share <= GOAL_SHARE else 'NOT met'}"
    )


def print_scoring(clock: Clock, before: CampaignConfig, after: CampaignConfig, rollouts: int) -> None:
    """The flow with each wave scored inline (before) and as a reward-and-filter task run (after)."""
    before_step, after_step = step_times(before), step_times(after)
    after_rollout = {rid: p["time/rollout_s"] for rid, p in phase_times(after).items()}
    print()
    print(
        "reward-and-filter task runs: the flow before (waves scored inline) and after (a task run per wave)"
    )
    header = (
        "rollout id",
        "before step s",
        "after step s",
        "after rollout s",
        "waves",
        "task runs s",
        "% of step",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    rows = []
    for rid in range(rollouts):
        key = (after.campaign, rid)
        cost = clock.wave_cost.get(key, 0.0)
        rows.append(
            (
                before_step[rid],
                after_step[rid],
                after_rollout[rid],
                clock.waves.get(key, 0),
                cost,
                cost / after_step[rid],
            )
        )
        cells = [
            str(rid),
            *(f"{v:.3f}" for v in rows[-1][:3]),
            str(rows[-1][3]),
            f"{cost:.3f}",
            f"{100 * rows[-1][5]:.1f}",
        ]
        print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, header, strict=True)) + " |")
    mean = [statistics.fmean(r[i] for r in rows) for i in range(5)]
    share = mean[4] / mean[1]
    print(
        f"mean: before step {mean[0]:.3f} s, after step {mean[1]:.3f} s ({100 * (mean[1] / mean[0] - 1):+.1f} %, "
        f"both noisy on a shared machine); {mean[3]:.1f} waves per id; their task runs cost {mean[4]:.3f} s per id "
        f"= {100 * share:.1f} % of the step"
        + (
            f"; goal <= {100 * GOAL_SHARE:.0f} % on steps of {SCORING_GOAL_STEP_S:.0f} s or more: "
            f"{'met' if share <= GOAL_SHARE else 'NOT met'}"
            if mean[1] >= SCORING_GOAL_STEP_S
            else f" (steps under {SCORING_GOAL_STEP_S:.0f} s: outside the goal's range)"
        )
    )


def _row(label: str, values: tuple, header: tuple) -> None:
    cells = [label] + [
        f"{100 * v:.1f}" if i == 5 else f"{1e3 * v:.2f}" if i == 6 else f"{v:.3f}"
        for i, v in enumerate(values)
    ]
    print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, header, strict=True)) + " |")


if __name__ == "__main__":
    sys.exit(main())
