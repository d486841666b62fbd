"""The PNG chart of a run (matplotlib, from the ``bench`` extra).

Four panels of horizontal bars, one bar per contender: round-trip p50 and p99, one-way
64 B messages per second, one-way MB/s for the larger sizes, and many-clients msg/s. The
baseline is drawn in grey, udskit's contenders in blue, the others in orange.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from .output import write_whole
from .plan import RTT_SIZE, Figure, size_label
from .results import Metric, Run, metric

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PLOT_REQUIRES", "draw", "plot_problem"]

PLOT_REQUIRES: Final = "matplotlib"

_BASELINE_COLOUR: Final = "#8c8c8c"
_UDSKIT_COLOUR: Final = "#1f77b4"
_OTHER_COLOUR: Final = "#ff7f0e"


def plot_problem() -> str | None:
    """Why a chart cannot be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'udskit[bench]')"
    return None


def _colour(run: Run, name: str) -> str:
    if name == run.baseline:
        return _BASELINE_COLOUR
    return _UDSKIT_COLOUR if name.startswith("udskit") else _OTHER_COLOUR


def _bars(
    axes: Axes,
    run: Run,
    series: Sequence[tuple[str, Figure, Metric]],
    title: str,
    unit: str,
    log: bool = False,
) -> None:
    """Grouped horizontal bars: one group per contender, one bar per series."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import EngFormatter

    names = [
        info.name
        for info in run.contenders
        if any(metric(run.outcome(info.name, f), m) is not None for _, f, m in series)
    ]
    height = 0.8 / max(len(series), 1)
    for index, (label, figure, name) in enumerate(series):
        found = [metric(run.outcome(c, figure), name) for c in names]
        values = [math.nan if value is None else value for value in found]
        positions = [row + index * height for row in range(len(names))]
        bars = axes.barh(
            positions,
            values,
            height=height * 0.9,
            color=[_colour(run, c) for c in names],
            alpha=1.0 - 0.45 * index / max(len(series) - 1, 1) if len(series) > 1 else 1.0,
            label=label,
        )
        labels = ["" if value is None else _short(value) for value in found]
        axes.bar_label(bars, labels=labels, fontsize=6, padding=2)
    axes.set_yticks([row + height * (len(series) - 1) / 2 for row in range(len(names))])
    axes.set_yticklabels(names, fontsize=7)
    axes.invert_yaxis()
    axes.set_title(title, fontsize=9)
    axes.set_xlabel(unit, fontsize=8)
    axes.tick_params(axis="x", labelsize=7)
    if log:
        axes.set_xscale("log")
    else:
        axes.xaxis.set_major_formatter(EngFormatter(sep=""))
    if len(series) > 1:
        # Legend swatches in neutral grey: the bars' colours say who, the shades say which.
        handles = [
            Patch(color="black", alpha=1.0 - 0.45 * i / (len(series) - 1))
            for i in range(len(series))
        ]
        axes.legend(handles, [label for label, _, _ in series], fontsize=6, loc="best")
    if not names:
        axes.text(0.5, 0.5, "no figures", ha="center", va="center", transform=axes.transAxes)


def _short(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.3g}"


def draw(run: Run, path: str) -> None:
    """Write the chart to ``path`` (PNG), atomically: a reader never sees half a file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as Canvas

    rows = sum(1 for info in run.contenders if info.available)
    canvas = Canvas(figsize=(14, max(6.0, 2.0 + 0.45 * rows)), dpi=110)
    FigureCanvasAgg(canvas)
    grid = canvas.subplots(2, 2)
    rtt = Figure("rtt", RTT_SIZE)
    _bars(
        grid[0][0],
        run,
        [("p50", rtt, "p50_us"), ("p99", rtt, "p99_us")],
        f"round trip {size_label(RTT_SIZE)} (shorter is faster)",
        "µs (log scale)",
        log=True,
    )
    smallest, *larger = sorted(run.plan.stream_sizes)
    small = Figure("stream", smallest)
    title = f"one-way {size_label(smallest)}"
    _bars(grid[0][1], run, [(size_label(smallest), small, "msgs_per_s")], title, "messages/s")
    large: list[tuple[str, Figure, Metric]] = [
        (size_label(size), Figure("stream", size), "mb_per_s") for size in larger
    ]
    _bars(grid[1][0], run, large, "one-way, larger messages", "payload MB/s")
    many: list[tuple[str, Figure, Metric]] = [
        (f"{n} clients", Figure("many", n), "msgs_per_s") for n in run.plan.clients
    ]
    _bars(grid[1][1], run, many, "many clients, 64 B echo", "aggregate messages/s")
    canvas.suptitle(
        f"udskit bench, {run.plan.name} run {run.started}: {run.host.get('cpu_model')}, "
        f"Python {run.host.get('python')}; {run.pinning.note}",
        fontsize=9,
    )
    canvas.tight_layout()
    write_whole(path, lambda out: canvas.savefig(out, format="png"), ".png")
