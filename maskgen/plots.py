"""Line charts drawn with PIL into PNG files (no plotting dependency): one panel per chart, side by side, each with
one or more named series of (x, y) points, its y range and x range labelled, and a legend when it has several."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def line_charts(panels: dict[str, dict[str, list[tuple[float, float]]]], out: str | Path, xlabel: str = "step",
                width: int = 420, height: int = 260) -> Path:
    """`panels`: {title: {series name: [(x, y), ...]}} -> PNG of len(panels) panels of width x height at `out`.
    A series keeps its colour across panels (the order of first appearance); a single point is drawn as a dot."""
    names = list(dict.fromkeys(n for series in panels.values() for n in series))
    colour = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
    pad_l, pad_r, pad_t, pad_b = 48, 12, 24, 28
    image = Image.new("RGB", (width * max(1, len(panels)), height), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, series) in enumerate(panels.items()):
        x0, y0, x1, y1 = k * width + pad_l, pad_t, (k + 1) * width - pad_r, height - pad_b
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 6), title, fill="black")
        points = [p for pts in series.values() for p in pts]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1.0
        left, right = min(xs), max(xs)
        span = right - left or 1.0

        def to_xy(p):
            return x0 + (p[0] - left) / span * (x1 - x0), y1 - (p[1] - lo) / (hi - lo) * (y1 - y0)

        for n, pts in series.items():
            xy = [to_xy(p) for p in sorted(pts)]
            if len(xy) > 1:
                draw.line(xy, fill=colour[n], width=2)
            for x, y in xy if len(xy) <= 12 else xy[:1]:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour[n])
        if len(series) > 1:
            for i, n in enumerate(series):
                draw.rectangle([x0 + 6, y0 + 6 + 12 * i, x0 + 14, y0 + 14 + 12 * i], fill=colour[n])
                draw.text((x0 + 18, y0 + 4 + 12 * i), n, fill="black")
        for v, y in ((hi, y0), (lo, y1)):
            draw.text((k * width + 2, y - 6), f"{v:.3g}", fill="black")
        draw.text((x0, y1 + 6), f"{xlabel} {left:g}", fill="black")
        draw.text((x1 - 90, y1 + 6), f"{xlabel} {right:g}", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
