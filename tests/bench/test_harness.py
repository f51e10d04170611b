"""The benchmark harness's parsing and aggregation (no network, no processes)."""

from __future__ import annotations

import httpx
import pytest

from bench import compare, procstat, profile, stream_client, wrk


def test_stat_line_with_spaces_and_parentheses_in_the_command_name() -> None:
    fields = ["S", "41", *["0"] * 9, "250", "37", *["0"] * 30]
    line = "1234 (py (worker) 1) " + " ".join(fields)
    assert procstat.parse_stat(line) == (41, 287)


def test_wrk_result_line_is_parsed_into_milliseconds() -> None:
    output = "Running 3s test\nRESULT requests=900 seconds=3.000000 p50=1500 p95=2500 "
    output += "p99=4000 non2xx=2 timeouts=1\n"
    assert wrk.parse_result(output) == {
        "rps": 300.0,
        "p50_ms": 1.5,
        "p95_ms": 2.5,
        "p99_ms": 4.0,
        "non2xx": 2,
        "timeouts": 1,
        "requests": 900,
    }


def test_wrk_without_a_result_line_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no result"):
        wrk.parse_result("unable to connect")


def _run(rps: float, requests: int, cpu: dict[str, float], p50: float = 1.0) -> dict:
    return {
        "rps": rps,
        "requests": requests,
        "p50_ms": p50,
        "p99_ms": p50 * 3,
        "non2xx": 0,
        "timeouts": 0,
        "cpu_s": cpu,
    }


def test_a_cell_is_the_median_of_its_runs_and_cpu_is_per_completed_request() -> None:
    runs = [
        _run(100, 300, {"litellm": 3.0, "stub": 0.3}, p50=5),
        _run(120, 360, {"litellm": 1.8, "stub": 0.36}, p50=4),
        _run(90, 270, {"litellm": 2.7, "stub": 0.27}, p50=6),
    ]
    cell = compare.median_of_runs(runs)
    assert cell["rps"] == 100
    assert cell["p50_ms"] == 5
    assert cell["p99_ms"] == 15
    # 10, 5 and 10 CPU-ms per request: the median is 10; the stub 1 ms every time.
    assert cell["cpu_ms_per_request_by_process"] == {"litellm": 10.0, "stub": 1.0}


def test_a_cell_with_few_requests_per_connection_is_flagged() -> None:
    cell = compare.median_of_runs([_run(1, 40, {"x": 1.0}), _run(1, 100, {"x": 1.0})])
    assert cell["requests"] == 70
    assert compare.few_requests(cell, 32)
    assert not compare.few_requests(cell, 1)


def test_a_run_that_completed_nothing_gives_no_cpu_figure_rather_than_zero() -> None:
    cell = compare.median_of_runs([_run(0, 0, {"litellm": 2.0})])
    assert cell["cpu_ms_per_request_by_process"] == {"litellm": None}
    mixed = compare.median_of_runs([_run(0, 0, {"x": 2.0}), _run(10, 20, {"x": 0.1})])
    assert mixed["cpu_ms_per_request_by_process"] == {"x": 5.0}


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert compare.percentile(values, 50) == 50
    assert compare.percentile(values, 99) == 99
    assert compare.percentile([7.0], 99) == 7
    assert compare.percentile([], 50) != compare.percentile([], 50)  # nan


def test_summary_puts_the_32_connection_figures_and_own_cpu_on_top() -> None:
    target = compare.Target("litellm", "LiteLLM", "http://x", {}, {"plain": {}}, "litellm")
    c1 = compare.median_of_runs([_run(50, 100, {"litellm": 0.5, "stub": 0.1})])
    c32 = compare.median_of_runs([_run(200, 400, {"litellm": 4.0, "stub": 0.4}, p50=9)])
    summary = compare.summarise(
        {("litellm", "plain", 1): c1, ("litellm", "plain", 32): c32}, [target]
    )
    plain = summary["litellm"]["plain"]
    assert (plain["rps"], plain["cpu_ms_per_request"], plain["p50_ms"]) == (200, 10.0, 9)
    assert plain["by_connections"]["1"]["rps"] == 50
    assert "streamed" not in summary["litellm"]


def test_ratios_are_missing_rather_than_divided_by_zero() -> None:
    assert compare.ratio(491, 120) == 4.09
    assert compare.ratio(1.0, 0.0) is None
    assert compare.ratio(None, 2.0) is None


def test_exactness_counts_admitted_answers_and_the_tokens_they_report() -> None:
    ok = httpx.Response(200, json={"usage": {"total_tokens": 25}})
    refused = httpx.Response(429, json={"error": {"code": "rate_limit_exceeded"}})
    row = compare.exactness_row([ok] * 3 + [refused] * 2, budget=100, tokens_charged=None)
    assert row["admitted"] == 3
    assert row["statuses"] == {"200": 3, "429": 2}
    assert row["tokens_in_admitted_answers"] == 75
    assert row["budget_tokens"] == 100


def _chunked(*pieces: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    return head + b"transfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_reader_sees_the_first_event_and_the_end_of_a_chunked_stream(step: int) -> None:
    raw = _chunked(b'data: {"a": 1}\n\n', b'data: {"a": 2}\n\n', b"data: [DONE]\n\n")
    reader = stream_client.ResponseReader()
    first_at = None
    for offset in range(0, len(raw), step):
        reader.feed(raw[offset : offset + step])
        if first_at is None and reader.first_event:
            first_at = offset
    assert reader.done
    assert reader.status == 200
    assert reader.body.endswith(b"data: [DONE]\n\n")
    assert first_at is not None
    assert first_at < raw.index(b'data: {"a": 2}')


def test_reader_handles_a_content_length_body_and_a_bodiless_answer() -> None:
    reader = stream_client.ResponseReader()
    reader.feed(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 5\r\n\r\nno")
    assert not reader.done
    reader.feed(b"pe!")
    assert reader.done
    assert (reader.status, reader.body) == (429, b"nope!")
    empty = stream_client.ResponseReader()
    empty.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert empty.done


def test_profile_frames_are_grouped_by_library() -> None:
    site = "/x/.venv/lib/python3.11/site-packages"
    assert profile.category(f"{site}/sqlalchemy/engine/base.py") == "sqlalchemy"
    assert profile.category("/w/src/leaky_tokens/tokens/service.py") == "leaky_tokens.tokens"
    assert profile.category("/py/lib/python3.11/asyncio/events.py") == "stdlib:asyncio"
    assert profile.category("<frozen importlib._bootstrap>") == "stdlib:importlib"
    assert profile.category(f"{site}/typing_extensions.py") == "typing_extensions"


def test_profile_summary_counts_stdlib_frames_to_their_caller() -> None:
    site = "/v/lib/python3.11/site-packages"
    frames = [
        {"name": "main", "file": "/w/src/leaky_tokens/cli.py", "line": 1},
        {"name": "execute", "file": f"{site}/aiosqlite/core.py", "line": 2},
        {"name": "sqlite_call", "file": "/py/lib/python3.11/sqlite3/dbapi2.py", "line": 3},
        {"name": "route", "file": f"{site}/fastapi/routing.py", "line": 4},
    ]
    speedscope = {
        "shared": {"frames": frames},
        "profiles": [
            {"samples": [[0, 1, 2], [0, 1, 2], [0, 3]], "weights": [0.004, 0.004, 0.004]},
            {"samples": [[0]], "weights": [0.004]},
        ],
    }
    summary = profile.summarise(speedscope)
    assert summary["samples"] == 4
    assert dict(summary["by_library"]) == {
        "aiosqlite": 50.0,
        "fastapi": 25.0,
        "leaky_tokens.cli": 25.0,
    }
    assert summary["self"][0] == ("sqlite_call (sqlite3/dbapi2.py:3)", 50.0)
