"""The runner-peer protocol: jobs and results survive JSON; bad answers are named."""

from __future__ import annotations

import pytest

from udskit.bench.wire import Job, decode_line, parse_load, parse_rtt, parse_send, parse_stream


def test_job_round_trips_through_json() -> None:
    job = Job(
        "pipe",
        "udskit.bench.contenders.pipes",
        "rtt_client",
        "pipes",
        size=64,
        count=10,
        warmup=2,
        seconds=0.5,
        clients=0,
        cpu=1,
        fds=(5, 6),
        options={"spin": 200, "loop": "uvloop", "busy": True},
    )
    again = Job.from_json(job.to_json())
    assert again == job
    assert again.fds == (5, 6)
    assert dict(again.options) == {"spin": 200, "loop": "uvloop", "busy": True}
    assert (again.role, again.cpu, again.seconds) == ("rtt_client", 1, 0.5)
    assert again.option("spin", 0) == 200
    assert again.option("missing", "default") == "default"


def test_decode_line_wants_a_json_object() -> None:
    assert decode_line('{"ready": "/x"}') == {"ready": "/x"}
    with pytest.raises(ValueError, match="peer printed 'hello', not a JSON object"):
        decode_line("hello")
    with pytest.raises(ValueError, match="not a JSON object"):
        decode_line("[1, 2]")
    with pytest.raises(ValueError, match=r"\.\.\."):
        decode_line("x" * 200)


def test_results_parse_and_refuse_the_wrong_shapes() -> None:
    assert parse_rtt({"samples_ns": [1, 2]}).samples_ns == [1, 2]
    assert parse_stream({"messages": 3, "last_ns": 9}).last_ns == 9
    assert parse_send({"messages": 3, "started_ns": 4, "warmup": 2}).warmup == 2
    with pytest.raises(ValueError, match="'warmup' must be an integer"):
        parse_send({"messages": 3, "started_ns": 4})
    load = parse_load(
        {
            "clients": 2,
            "messages": 5,
            "seconds": 1,
            "samples_ns": [1],
            "errors": 0,
            "first_error": "",
        }
    )
    assert (load.clients, load.seconds) == (2, 1.0)
    with pytest.raises(ValueError, match="integer samples_ns"):
        parse_rtt({"samples_ns": [1.5]})
    with pytest.raises(ValueError, match="'messages' must be an integer"):
        parse_stream({"messages": True, "last_ns": 1})
    with pytest.raises(ValueError, match="'seconds' must be a number"):
        parse_load({"clients": 1, "messages": 1, "seconds": "x", "samples_ns": [], "errors": 0})
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_send([1])
