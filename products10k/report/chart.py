"""The Table 1 chart as a PNG, drawn with OpenCV (already a dependency; no plotting library).

One group of bars per row: all / head / tail test top-1 (mean over seeds, the whisker one standard
deviation), and the paper's published number as a marked line across the row's "all" bar.
"""

from __future__ import annotations

import cv2
import numpy as np

WIDTH, HEIGHT = 960, 540
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 60, 130
LABEL_SCALE = 0.38  # row titles, wrapped to their group's width (at most LABEL_LINES lines)
LABEL_LINES = 3
COLOURS = {"all": (70, 130, 230), "head": (90, 190, 120), "tail": (230, 150, 60)}  # RGB
PAPER_COLOUR = (200, 40, 40)


def seeds_text(n: int) -> str:
    """``"1 seed"``, ``"3 seeds"``: the report's and the chart's wording."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _text(
    img, text: str, x: int, y: int, scale: float = 0.45, colour=(30, 30, 30), thickness: int = 1
) -> None:
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def _wrap(title: str, width: int) -> list[str]:
    """``title`` in lines no wider than ``width`` pixels (greedy, at most LABEL_LINES; OpenCV's
    Hershey font draws ASCII only, so tau is spelled out)."""
    words = title.replace("τ", "tau").replace("×", "x").split()
    lines: list[str] = []
    for word in words:
        candidate = f"{lines[-1]} {word}" if lines else word
        fits = cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 1)[0][0] <= width
        if lines and fits:
            lines[-1] = candidate
        else:
            lines.append(word)
    if len(lines) > LABEL_LINES:
        lines = [*lines[: LABEL_LINES - 1], " ".join(lines[LABEL_LINES - 1 :])]
        while (
            len(lines[-1]) > 3
            and cv2.getTextSize(lines[-1] + "..", cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 1)[0][0] > width
        ):
            lines[-1] = lines[-1][:-1]
        lines[-1] += ".."
    return lines


def draw_table1(report: dict) -> bytes:
    """PNG bytes of the report's rows (see the module docstring)."""
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    rows = report["rows"]
    plot_h = HEIGHT - TOP - BOTTOM

    def y_of(value: float) -> int:  # value in [0, 1]
        return int(round(TOP + plot_h * (1.0 - min(max(value, 0.0), 1.0))))

    for tick in np.linspace(0, 1, 6):
        y = y_of(tick)
        cv2.line(img, (LEFT, y), (WIDTH - RIGHT, y), (225, 225, 225), 1)
        _text(img, f"{100 * tick:.0f}", LEFT - 34, y + 5)
    group_w = (WIDTH - LEFT - RIGHT) / len(rows)
    bar_w = int(group_w / 5)
    for i, row in enumerate(rows):
        x0 = int(LEFT + i * group_w + bar_w / 2)
        for j, part in enumerate(("all", "head", "tail")):
            if part not in row:
                continue
            x = x0 + j * (bar_w + 6)
            mean, std = row[part]["top1"], row[part]["std"]
            cv2.rectangle(img, (x, y_of(mean)), (x + bar_w, y_of(0)), COLOURS[part][::-1], -1)
            cx = x + bar_w // 2
            cv2.line(img, (cx, y_of(mean - std)), (cx, y_of(mean + std)), (30, 30, 30), 1)
            _text(img, f"{100 * mean:.1f}", x, y_of(mean) - 6, 0.4)
        # the paper's figure for this row, across the "all" bar
        if "paper" in row:  # the long-tail methods' rows have no published figure
            py = y_of(row["paper"] / 100)
            cv2.line(img, (x0 - 4, py), (x0 + bar_w + 4, py), PAPER_COLOUR[::-1], 2)
        lines = _wrap(row["title"], int(group_w) - 6)
        for k, line in enumerate(lines):
            _text(img, line, int(LEFT + i * group_w + 4), HEIGHT - BOTTOM + 18 + 14 * k, LABEL_SCALE)
        gain = row.get("all", {}).get("gain")
        if gain:
            label = f"{100 * gain['estimate']:+.1f} [{100 * gain['low']:+.1f},{100 * gain['high']:+.1f}]"
            y = HEIGHT - BOTTOM + 22 + 14 * len(lines)
            _text(img, label, int(LEFT + i * group_w + 4), y, LABEL_SCALE, thickness=1)
    conf = round(100 * report["confidence"])
    _text(
        img,
        f"Table 1: test top-1 (%), single centre crop, {seeds_text(report['seeds'])} "
        f"({report['test_images']} test images); gain vs the row it builds on, {conf}% bootstrap CI",
        LEFT,
        30,
        0.5,
    )
    legend_y = HEIGHT - 30
    x = LEFT
    for part, colour in COLOURS.items():
        cv2.rectangle(img, (x, legend_y - 10), (x + 14, legend_y + 2), colour[::-1], -1)
        _text(img, part, x + 20, legend_y)
        x += 90
    cv2.line(img, (x, legend_y - 4), (x + 24, legend_y - 4), PAPER_COLOUR[::-1], 2)
    _text(img, "paper (EfficientNet-B3, real data)", x + 30, legend_y)
    _text(img, "whisker: +/- 1 sd over seeds", x + 330, legend_y)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
