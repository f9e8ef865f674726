"""The campaign's curves as one PNG, drawn with matplotlib (Agg canvas, no display): for the Prefect artifacts.

One panel per quantity, each on its own y axis with labelled ticks, the rollout id on x, and a
legend: reward (with each evaluation set's reward), response length, entropy, KL, gradient norm,
and the share of finished groups dropped (in all, and by reason). Series are chosen by the metric
names of `slime_wf.metrics`; a metric a campaign does not report leaves its panel saying so.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# A campaign id's metrics: name -> value (numbers only; a missing name is a gap in its curve).
History = Mapping[int, Mapping[str, float]]

_MARKERS_UP_TO = 60  # ids: beyond this, markers would blur into the line


@dataclass
class Series:
    label: str
    points: list[tuple[int, float]]  # (rollout id, value), finite values only
    sparse: bool = False  # measured at some ids only (evaluation): drawn with markers, joined


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    percent: bool = False


def _points(history: History, name: str) -> list[tuple[int, float]]:
    out = []
    for rid in sorted(history):
        value = history[rid].get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((rid, float(value)))
    return out


def _names(history: History, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted({k for metrics in history.values() for k in metrics if regex.fullmatch(k)})


def _drop_shares(history: History) -> dict[str, list[tuple[int, float]]]:
    """Per drop reason, its share of the groups that finished (kept plus dropped, surplus and aborted
    groups left out, as `filter/drop_fraction` counts them)."""
    reasons = [n.removeprefix("filter/drop_") for n in _names(history, r"filter/drop_.+")]
    reasons = [r for r in reasons if r not in ("fraction", "surplus", "aborted")]
    out: dict[str, list[tuple[int, float]]] = {r: [] for r in reasons}
    for rid in sorted(history):
        metrics = history[rid]
        kept = metrics.get("filter/kept_groups")
        if not isinstance(kept, (int, float)):
            continue
        counts = {r: float(metrics.get(f"filter/drop_{r}", 0.0) or 0.0) for r in reasons}
        finished = kept + sum(counts.values())
        if finished > 0:
            for r in reasons:
                out[r].append((rid, counts[r] / finished))
    return {r: pts for r, pts in out.items() if any(v > 0 for _, v in pts)}


def campaign_panels(history: History) -> list[Panel]:
    """The panels of the campaign chart, filled from `history` by metric name."""
    evals = [n.split("/")[1] for n in _names(history, r"eval/[^/]+/reward")]
    reward = Panel(
        "Reward",
        "mean reward",
        [Series("train (rollout/raw_reward)", _points(history, "rollout/raw_reward"))],
    )
    reward.series += [Series(f"eval: {s}", _points(history, f"eval/{s}/reward"), sparse=True) for s in evals]
    length = Panel(
        "Response length",
        "tokens",
        [
            Series("mean", _points(history, "rollout/response_len/mean")),
            Series("max", _points(history, "rollout/response_len/max")),
        ],
    )
    entropy = Panel(
        "Entropy", "nats per token", [Series("policy entropy", _points(history, "train/entropy"))]
    )
    kl = Panel(
        "KL",
        "KL",
        [
            Series("KL to reference (train/kl_loss)", _points(history, "train/kl_loss")),
            Series("engine vs trainer (train/rollout_kl)", _points(history, "train/rollout_kl")),
            Series("old vs new policy (train/ppo_kl)", _points(history, "train/ppo_kl")),
        ],
    )
    grad = Panel(
        "Gradient norm", "norm before clipping", [Series("grad norm", _points(history, "train/grad_norm"))]
    )
    drops = Panel(
        "Groups dropped",
        "share of finished groups",
        [Series("all reasons", _points(history, "filter/drop_fraction"))],
        percent=True,
    )
    drops.series += [Series(reason, pts) for reason, pts in _drop_shares(history).items()]
    return [reward, length, entropy, kl, grad, drops]


def chart_png(panels: list[Panel], title: str = "", *, columns: int = 2, dpi: int = 100) -> bytes:
    """The panels in a grid, as PNG bytes (1100 pixels wide at the default dpi)."""
    out = io.BytesIO()
    figure(panels, title, columns=columns, dpi=dpi).savefig(out, format="png", dpi=dpi)
    return out.getvalue()


def figure(panels: list[Panel], title: str = "", *, columns: int = 2, dpi: int = 100) -> Any:
    """The panels in a grid of `columns`, as a matplotlib Figure on an Agg canvas."""
    # a Figure on an Agg canvas, not pyplot: no display, no global state, safe in any thread
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(11, 2.9 * rows + (0.5 if title else 0)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=14)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        ax.set_title(panel.title, fontsize=12, loc="left")
        ax.set_xlabel("rollout id")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        drawn = 0
        for series in panel.series:
            if not series.points:
                continue
            xs, ys = zip(*series.points, strict=True)
            many = len(xs) > _MARKERS_UP_TO
            ax.plot(
                xs,
                ys,
                label=series.label,
                marker=None if many and not series.sparse else ("D" if series.sparse else "o"),
                markersize=5 if series.sparse else 3,
                linewidth=1.6,
                linestyle="--" if series.sparse else "-",
            )
            drawn += 1
        if drawn and panel.percent:
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 0.05))
        if drawn:
            ax.legend(fontsize=9, loc="best", framealpha=0.8)
        else:
            ax.text(
                0.5, 0.5, "not reported yet", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
