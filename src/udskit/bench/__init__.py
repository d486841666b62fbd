"""The benchmark behind ``udskit bench``: udskit and its peers, side by side, in one run.

Each measurement runs two peer processes pinned to different CPUs; the runner collects
their figures, and the report shows each as a ratio to hand-written stdlib Python.
"""

from .contenders import ALL, BASELINE, Contender, get, names
from .host import Pinning, choose_pinning
from .plan import FULL, QUICK, Figure, Plan
from .plot import draw, plot_problem
from .report import render
from .results import ContenderInfo, Outcome, Run, to_json, validate
from .runner import Progress, availability
from .runner import run as run_bench

__all__ = [
    "ALL",
    "BASELINE",
    "FULL",
    "QUICK",
    "Contender",
    "ContenderInfo",
    "Figure",
    "Outcome",
    "Pinning",
    "Plan",
    "Progress",
    "Run",
    "availability",
    "choose_pinning",
    "draw",
    "get",
    "names",
    "plot_problem",
    "render",
    "run_bench",
    "to_json",
    "validate",
]
