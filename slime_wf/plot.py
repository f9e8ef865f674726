"""Small line charts as PNG bytes, with no plotting library: for the Prefect artifacts' curves."""

from __future__ import annotations

import base64
import math
import struct
import zlib

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
_GRAY = (160, 160, 160)
_DOTS = {color: bytes(color) * 2 for color in (*_COLORS, _GRAY)}  # two pixels of a 2x2 dot's row


def _png(width: int, height: int, pixels: bytearray) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + bytes(pixels[y * width * 3 : (y + 1) * width * 3]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def line_chart(series: list[list[float]], width: int = 480, height: int = 200, margin: int = 12) -> bytes:
    """Each series drawn as a polyline (own color) over a shared x range, each scaled to its own y range."""
    pixels = bytearray([255]) * (width * height * 3)

    row = width * 3

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        """A 2x2 dot with its top-left corner at (x, y)."""
        if 0 <= x < width - 1 and 0 <= y < height - 1:
            i = (y * width + x) * 3
            pixels[i : i + 6] = _DOTS[color]
            pixels[i + row : i + row + 6] = _DOTS[color]

    for x in range(margin, width - margin):  # axes
        put(x, height - margin, _GRAY)
    for y in range(margin, height - margin):
        put(margin, y, _GRAY)
    n = max((len(s) for s in series), default=0)
    for k, values in enumerate(series):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            continue
        lo, hi = min(finite), max(finite)
        span = (hi - lo) or 1.0
        # Points that fall in one pixel column become one vertical stroke from their lowest to
        # their highest, joined to the neighbouring columns: a campaign of thousands of rollout
        # ids costs what its pixels cost, not points x pixels.
        columns: dict[int, list[float]] = {}  # x -> [first y, lowest, highest, last y]
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                continue
            x = round(margin + (width - 2 * margin) * (i / max(n - 1, 1)))
            level = height - margin - (height - 2 * margin) * (v - lo) / span
            column = columns.get(x)
            if column is None:
                columns[x] = [level, level, level, level]
            else:
                column[1], column[2], column[3] = min(column[1], level), max(column[2], level), level
        color = _COLORS[k % len(_COLORS)]
        previous = None
        for x, (first, low, high, last) in columns.items():
            for y in range(round(low), round(high) + 1):
                put(x, y, color)
            if previous is not None:
                (x0, y0), (x1, y1) = previous, (x, first)
                steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
                for t in range(steps + 1):
                    put(round(x0 + (x1 - x0) * t / steps), round(y0 + (y1 - y0) * t / steps), color)
            previous = (x, last)
    return _png(width, height, pixels)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
