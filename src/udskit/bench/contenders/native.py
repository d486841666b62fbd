"""The C reference peer: the command line that runs one role of ``udsbench``.

The runner compiles ``benchmarks/udsbench.c`` (:mod:`udskit.bench.cbuild`) and puts the
binary's path in ``job.options["binary"]``; ``busy`` and ``buffer`` options select the
busy-polling and large-buffer variants. The binary is also the many-clients load generator
(role ``load``), for every contender's echo server.
"""

from __future__ import annotations

from ..wire import Job

__all__ = ["command"]


def command(job: Job) -> list[str]:
    argv = [
        str(job.options["binary"]),
        job.role,
        job.address,
        "--size",
        str(job.size),
        "--count",
        str(job.count),
        "--warmup",
        str(job.warmup),
        "--seconds",
        repr(float(job.seconds)),
    ]
    if job.cpu is not None:
        argv += ["--cpu", str(job.cpu)]
    if job.option("busy", False):
        argv.append("--busy")
    buffer = job.option("buffer", 0)
    if buffer:
        argv += ["--buffer", str(int(buffer))]
    if job.clients:
        argv += ["--clients", str(job.clients)]
    if job.option("transport", "unix") == "tcp":
        argv.append("--tcp")
    return argv
