"""Grouped bar charts for the benchmark scripts (matplotlib, headless), and the spread their
tables report for repeated timings."""

from __future__ import annotations

import statistics


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> tuple[float, dict]:
    """One bar per (group, series), series side by side within each group, groups labelled on
    the x axis. Returns the bar width and each series' bars."""
    width = 0.8 / max(len(series), 1)
    bars = {name: ax.bar([j + i * width for j in range(len(groups))], ys, width, label=name)
            for i, (name, ys) in enumerate(series.items())}
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    return width, bars


def env_line(gpu: str, torch: str, triton: str) -> str:
    """What a plot was measured on: the GPU and the versions, one line."""
    return f"{gpu}, torch {torch}, triton {triton}"


def save(fig, ax, ylabel: str, path: str, env: str | None = None) -> None:
    """Label the y axis, add the legend, title the figure with `env` (env_line), and write the
    figure to `path`."""
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if env:
        fig.suptitle(env, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def spread(values: list[float]) -> str:
    """(max − min) / median of repeated timings, in percent; "—" for fewer than two."""
    if not values or len(values) < 2:
        return "—"
    return f"{(max(values) - min(values)) / statistics.median(values) * 100:.1f}"
