"""Server-rendered SVG bar charts for the dashboard: geometry only, the template draws it."""

from __future__ import annotations

from dataclasses import dataclass

PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#dc2626", "#0891b2", "#4b5563", "#db2777")
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 640, 220, 56, 28, 12


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    label: str


@dataclass
class Chart:
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # y position, label
    x_labels: list[tuple[float, str]]
    legend: list[tuple[str, str]]  # colour, name
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom_y: int = HEIGHT - BOTTOM


def stacked(dates: list, series: dict[str, list[float]], unit: str, fmt=lambda v: f"{v:.3g}") -> Chart:
    """Stacked bars, one per date, one colour per series."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(dates))]
    top = max(totals + [0]) or 1
    plot_height = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / max(len(dates), 1)
    bars, legend = [], []
    for number, (name, values) in enumerate(series.items()):
        colour = PALETTE[number % len(PALETTE)]
        legend.append((colour, name))
        for i, value in enumerate(values):
            if not value:
                continue
            below = sum(list(series.values())[k][i] for k in range(number))
            height = value / top * plot_height
            y = HEIGHT - BOTTOM - (below / top * plot_height) - height
            label = f"{dates[i]}: {name} {fmt(value)} {unit}"
            bars.append(Bar(LEFT + i * slot + slot * 0.15, y, slot * 0.7, max(height, 1), colour, label))
    ticks = [(HEIGHT - BOTTOM - plot_height * f, fmt(top * f)) for f in (0, 0.5, 1)]
    every = max(1, len(dates) // 7)
    x_labels = [(LEFT + i * slot + slot / 2, d.strftime("%d %b")) for i, d in enumerate(dates) if i % every == 0]
    return Chart(bars, ticks, x_labels, legend)
