"""Small line charts as PNG bytes, with no plotting library: for the Prefect artifacts' curves."""

from __future__ import annotations

import base64
import math
import struct
import zlib

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _png(width: int, height: int, pixels: bytearray) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(pixels[y * width * 3 : (y + 1) * width * 3]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def line_chart(series: list[list[float]], width: int = 480, height: int = 200, margin: int = 12) -> bytes:
    """Each series drawn as a polyline (own color) over a shared x range, each scaled to its own y range."""
    pixels = bytearray([255]) * (width * height * 3)

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        for dx in (0, 1):
            for dy in (0, 1):
                px, py = x + dx, y + dy
                if 0 <= px < width and 0 <= py < height:
                    i = (py * width + px) * 3
                    pixels[i : i + 3] = bytes(color)

    for x in range(margin, width - margin):  # axes
        put(x, height - margin, (160, 160, 160))
    for y in range(margin, height - margin):
        put(margin, y, (160, 160, 160))
    n = max((len(s) for s in series), default=0)
    for k, values in enumerate(series):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            continue
        lo, hi = min(finite), max(finite)
        span = (hi - lo) or 1.0
        points = [
            (margin + (width - 2 * margin) * (i / max(n - 1, 1)), height - margin - (height - 2 * margin) * (v - lo) / span)
            for i, v in enumerate(values)
            if v is not None and math.isfinite(v)
        ]
        color = _COLORS[k % len(_COLORS)]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points, strict=False):
            steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
            for t in range(steps + 1):
                put(round(x0 + (x1 - x0) * t / steps), round(y0 + (y1 - y0) * t / steps), color)
    return _png(width, height, pixels)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
