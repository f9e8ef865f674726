"""Prefect artifacts of a campaign: per rollout id a metrics table and the curves so far; one progress bar."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

from slime_wf.plot import data_uri, line_chart
from slime_wf.store import RunStore


def artifact_key(*parts: Any) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(str(p) for p in parts).lower())).strip("-")


def progress(campaign: str, done: int, total: int) -> None:
    create_progress_artifact(
        progress=100.0 * done / max(total, 1),
        key=artifact_key(campaign, "progress"),
        description=f"campaign {campaign}: {done} of {total} rollout ids",
    )


def rollout_artifacts(campaign: str, store: RunStore, rollout_id: int, metrics: dict[str, Any]) -> None:
    rows = [{"metric": k, "value": v} for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    create_table_artifact(
        table=rows, key=artifact_key(campaign, "rollout", f"{rollout_id:06d}", "metrics"),
        description=f"campaign {campaign}, rollout {rollout_id}",
    )
    rewards, lengths = [], []
    for rid in range(rollout_id + 1):
        m = store.read_json(RunStore.rollout_file(rid, "metrics.json"), default={})
        rewards.append(m.get("rollout/raw_reward"))
        lengths.append(m.get("rollout/response_len/mean"))
    chart = data_uri(line_chart([rewards, lengths]))
    table = "\n".join(
        f"| {rid} | {r:.4f} | {n:.1f} |" for rid, (r, n) in enumerate(zip(rewards, lengths, strict=True))
        if r is not None and n is not None
    )
    create_markdown_artifact(
        key=artifact_key(campaign, "curves"),
        markdown=(
            f"## {campaign}: reward (blue) and response length (orange) by rollout id\n\n"
            f"![curves]({chart})\n\n| rollout | raw reward | response length |\n| --- | --- | --- |\n{table}\n"
        ),
        description=f"curves up to rollout {rollout_id}",
    )
