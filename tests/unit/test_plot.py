"""The campaign chart (matplotlib): a panel per quantity chosen by metric name, each with labelled axes,
tick values and a legend; evaluation reward beside the training reward; drop shares by reason; a PNG
of a readable size, for a handful of rollout ids and for thousands."""

from __future__ import annotations

import io
import math

import pytest
from matplotlib.image import imread

from slime_wf.plot import campaign_panels, chart_png, data_uri, figure


def history(n: int, eval_every: int = 5) -> dict[int, dict[str, float]]:
    out = {}
    for i in range(n):
        metrics = {
            "rollout/raw_reward": 0.3 + 0.5 * (1 - math.exp(-i / max(n / 4, 1))),
            "rollout/response_len/mean": 3.2 + 0.5 * math.sin(i),
            "rollout/response_len/max": 8.0,
            "train/entropy": 1.2 - 0.001 * i,
            "train/rollout_kl": 0.0005,
            "train/ppo_kl": 0.0,
            "train/grad_norm": 0.5 + 0.1 * math.cos(i),
            "filter/kept_groups": 16.0,
            "filter/drop_fraction": 7 / 23,
            "filter/drop_zero_std_0": 3.0,
            "filter/drop_zero_std_1": 4.0,
            "filter/drop_surplus": 2.0,  # not a share of the finished groups
        }
        if i % eval_every == eval_every - 1:
            metrics["eval/test/reward"] = 0.6 + 0.01 * i
            metrics["eval/hard/reward"] = 0.1
        out[i] = metrics
    out[n // 2].pop("rollout/raw_reward")  # an id without the metric is a gap, not an error
    out[n // 2]["train/grad_norm"] = float("nan")
    return out


def labels(panel) -> list[str]:
    return [s.label for s in panel.series if s.points]


def test_series_are_chosen_by_metric_name():
    panels = {p.title: p for p in campaign_panels(history(20))}
    assert list(panels) == ["Reward", "Response length", "Entropy", "KL", "Gradient norm", "Groups dropped"]
    reward = panels["Reward"]
    assert labels(reward) == ["train (rollout/raw_reward)", "eval: hard", "eval: test"]
    train, _, test = reward.series
    assert len(train.points) == 19 and 10 not in dict(train.points)
    assert [rid for rid, _ in test.points] == [4, 9, 14, 19] and test.sparse
    assert labels(panels["KL"]) == [
        "engine vs trainer (train/rollout_kl)",
        "old vs new policy (train/ppo_kl)",
    ]
    assert len(panels["Gradient norm"].series[0].points) == 19  # NaN left out
    drops = panels["Groups dropped"]
    assert labels(drops) == ["all reasons", "zero_std_0", "zero_std_1"] and drops.percent
    assert drops.series[1].points[0] == (0, pytest.approx(3 / 23))


@pytest.mark.parametrize("n", [6, pytest.param(3000, marks=pytest.mark.slow)])  # 3000 ids: seconds
def test_every_panel_has_labelled_axes_ticks_and_a_legend(n):
    fig = figure(campaign_panels(history(n)), "demo")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 6
    for ax in axes:
        assert ax.get_title(loc="left") and ax.get_xlabel() == "rollout id" and ax.get_ylabel()
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
        fig.canvas.draw()
        assert [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        xticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert xticks and all(t.lstrip("−-").isdigit() for t in xticks)  # whole rollout ids
        low, high = ax.get_xlim()
        assert low <= 0 and high >= n - 1
    reward = axes[0]
    assert reward.get_ylim()[0] < 0.31 and reward.get_ylim()[1] > 0.6  # both curves on one y scale


def test_png_is_readable_at_the_ui_width_and_a_panel_without_data_says_so():
    png = chart_png(campaign_panels({0: {"rollout/raw_reward": 0.5}}))
    image = imread(io.BytesIO(png))
    height, width = image.shape[:2]
    assert 1000 <= width <= 1400 and height >= 600
    fig = figure(campaign_panels({0: {"rollout/raw_reward": 0.5}}))
    entropy = [ax for ax in fig.axes if ax.get_title(loc="left") == "Entropy"][0]
    assert [t.get_text() for t in entropy.texts] == ["not reported yet"]
    assert data_uri(png).startswith("data:image/png;base64,iVBOR")
