"""Grouped bar charts as SVG, with no plotting library: bench/speed.py draws
its slowdown table with it (docs/performance.md shows the result).

A chart has one group of bars per row (a watch mode) and one bar per series
(a kernel and QEMU) in each group, on a logarithmic axis from 1x: the
slowdowns of the modes span three orders of magnitude.
"""

import math
from xml.sax.saxutils import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1")
BAR, GAP, LEFT, TOP, PLOT_HEIGHT, LEGEND_ROW = 16, 14, 150, 40, 260, 18


def log_ticks(top: float) -> list[float]:
    """1, 2, 5, 10, 20, 50 ... up to the first tick at or above top."""
    ticks, decade = [], 1
    while True:
        for multiple in (1, 2, 5):
            ticks.append(decade * multiple)
            if ticks[-1] >= top:
                return ticks
        decade *= 10


def bar_chart_svg(title: str, rows: list[str], series: list[str], values: dict[tuple[str, str], float]) -> str:
    """SVG text: for each row a bar per series whose value is in values
    (keyed (row, series)); a missing value leaves its place empty. Values
    below 1 are drawn at 1 (the axis starts at no slowdown)."""
    if not values:
        raise ValueError("a chart needs at least one value")
    ticks = log_ticks(max(values.values()))
    top = math.log10(ticks[-1]) or 1.0

    def y(value: float) -> float:
        return TOP + PLOT_HEIGHT * (1 - math.log10(max(value, 1.0)) / top)

    group_width = len(series) * BAR + GAP
    width = LEFT + len(rows) * group_width + 20
    height = TOP + PLOT_HEIGHT + 90 + LEGEND_ROW * len(series)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for tick in ticks:
        out.append(f'<line x1="{LEFT - 4}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}x</text>')
    for i, row in enumerate(rows):
        x0 = LEFT + i * group_width + GAP / 2
        for j, name in enumerate(series):
            value = values.get((row, name))
            if value is None:
                continue
            out.append(f'<rect class="bar" x="{x0 + j * BAR:.1f}" y="{y(value):.1f}" width="{BAR - 2}" '
                       f'height="{TOP + PLOT_HEIGHT - y(value):.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                       f'<title>{escape(row)}, {escape(name)}: {value:.2f}x</title></rect>')
        label_x, label_y = x0 + len(series) * BAR / 2, TOP + PLOT_HEIGHT + 12
        out.append(f'<text x="{label_x:.1f}" y="{label_y}" text-anchor="end" '
                   f'transform="rotate(-35 {label_x:.1f} {label_y})">{escape(row)}</text>')
    legend_y = TOP + PLOT_HEIGHT + 80
    for j, name in enumerate(series):
        row_y = legend_y + j * LEGEND_ROW
        out.append(f'<rect x="{LEFT}" y="{row_y - 10}" width="12" height="12" fill="{PALETTE[j % len(PALETTE)]}"/>'
                   f'<text x="{LEFT + 18}" y="{row_y}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
