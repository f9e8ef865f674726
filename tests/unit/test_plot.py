"""The PNG line chart of the curves artifact: a valid image whose lines span the x range, for a
handful of rollout ids and for thousands."""

from __future__ import annotations

import math
import struct
import zlib

import pytest

from slime_wf.plot import _COLORS, data_uri, line_chart


def decode(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of a PNG written by line_chart (8-bit RGB, filter 0)."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    data, pos = b"", 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            data += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(data)
    stride = 1 + 3 * width
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows]


def columns_with(color: tuple[int, int, int], width: int, rows: list[bytes]) -> set[int]:
    want = bytes(color)
    return {x for row in rows for x in range(width) if row[3 * x : 3 * x + 3] == want}


@pytest.mark.parametrize("n", [6, 3000])
def test_each_series_spans_the_x_range(n):
    rewards = [0.3 + 0.5 * (1 - math.exp(-i / max(n / 4, 1))) + 0.05 * math.sin(i) for i in range(n)]
    lengths = [40.0 - 0.01 * i for i in range(n)]
    lengths[n // 2] = None  # a rollout without the metric is a gap, not an error
    for k, series in enumerate([[rewards, []], [[], lengths]]):  # one at a time: a crossing hides a line
        width, height, rows = decode(line_chart(series, width=200, height=80, margin=10))
        assert (width, height) == (200, 80)
        drawn = columns_with(_COLORS[k], width, rows)
        assert set(range(10, 190)) <= drawn, sorted(set(range(10, 190)) - drawn)[:10]


def test_rising_series_is_drawn_rising():
    width, height, rows = decode(line_chart([[0.0, 0.5, 1.0]], width=100, height=60, margin=6))
    blue = bytes(_COLORS[0])
    ys = {x: [y for y, row in enumerate(rows) if row[3 * x : 3 * x + 3] == blue] for x in (8, 50, 92)}
    assert min(ys[8]) > min(ys[50]) > min(ys[92])  # image y grows downwards


def test_data_uri_and_empty_input():
    assert data_uri(line_chart([[], [None, float("nan")]])).startswith("data:image/png;base64,")
