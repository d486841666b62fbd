"""The benchmark behind ``udskit bench``: udskit and its peers, side by side, in one run.

Each measurement runs two peer processes pinned to different CPUs (:mod:`.runner`); the
report (:mod:`.report`) shows every figure as a ratio to hand-written stdlib Python.

Nothing is imported here: each peer process imports only the few modules its role needs, so
that starting the hundred or so peers of a run stays cheap. Import the submodules.
"""

__all__: list[str] = []
