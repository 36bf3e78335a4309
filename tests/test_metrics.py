"""/metrics for operators (#11 §4): collectors, build info, closes, histograms,
the separate metrics listener, and the real process with JSON logs."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import triochat
from triochat import Server
from triochat.metrics import Histogram

from .conftest import client_of, running_server
from .server_process import run_server
from .sseclient import SseStream, tcp
from .test_http import fetch, handshake_bytes

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= set(ls))


async def scrape(server: Server) -> Samples:
    response = await fetch(server, "GET", "/metrics")
    assert response.status == 200, response
    return samples(response.body.decode())


async def until(check: Callable[[], bool]) -> None:
    """Wait for the server's side of a close, which has no event a test can await.

    Real sockets: a short poll, bounded by the caller's ``fail_after``.
    """
    while not check():  # noqa: ASYNC110
        await trio.sleep(0.01)


def test_metrics_histogram_buckets_are_cumulative_with_le_semantics():
    """An observation equal to a bound counts in that bound's bucket; +Inf holds all."""
    histogram = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    family = histogram.family("x_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}
    assert histogram.count == 4
    assert histogram.sum == pytest.approx(3.65)


async def test_metrics_process_gc_build_info_and_histograms_after_a_say():
    """/metrics has process_*, python_gc_*, triochat_build_info and, after a say
    with a ref, the say-to-ack, store commit and hub step histograms (#11 §4)."""
    with trio.fail_after(10):
        async with running_server() as server:
            async with client_of(server) as alice:
                await alice.join(name="alice")
                await alice.say("hello", ref="r1")
                await alice.expect("message", msg="hello")
                await alice.expect("ack", ref="r1")
            found = await scrape(server)
            text = (await fetch(server, "GET", "/metrics")).body.decode()
    names = {name for name, _ in found}
    assert "process_cpu_seconds_total" in names
    assert "process_resident_memory_bytes" in names
    assert "python_gc_collections_total" in names
    assert "python_info" in names
    version = (("version", triochat.__version__),)
    assert found[("triochat_build_info", version)] == 1
    for histogram in ("say_ack", "store_commit", "hub_step"):
        assert total(found, f"triochat_{histogram}_seconds_count") >= 1, histogram
        assert total(found, f"triochat_{histogram}_seconds_bucket", le="+Inf") >= 1
    assert total(found, "triochat_say_ack_seconds_sum") > 0
    # Every series of ours says what it is (no help text made from its name).
    helps = dict(re.findall(r"^# HELP (triochat_\w+) (.*)$", text, re.MULTILINE))
    assert helps["triochat_connections"] == "Chat connections open now."
    assert all(doc.endswith(".") for doc in helps.values()), helps


async def test_metrics_opened_is_open_plus_closed_with_and_without_a_code():
    """Every end is counted in triochat_closes_total: a close frame under its
    code, a dropped TCP connection or an SSE stream under code="none", so that
    opened = open + closed, per transport too (#11 §4)."""
    with trio.fail_after(10):
        async with running_server() as server:
            async with client_of(server) as kept:
                await kept.join(name="kept")
                async with client_of(server) as polite:
                    await polite.join(name="polite")
                    await polite.ws.aclose(1000, "bye")
                dropped = await trio.open_tcp_stream("127.0.0.1", server.port)
                await dropped.send_all(handshake_bytes(server))
                assert (await dropped.receive_some(4096)).startswith(b"HTTP/1.1 101")
                await trio.aclose_forcefully(dropped)
                stream = await SseStream.open(tcp(server.port))
                await stream.aclose()
                await until(lambda: server.stats.connections_opened == 4)
                await until(lambda: len(server.connections) == 1)
                found = await scrape(server)
    for transport in ("websocket", "sse"):
        opened = total(found, "triochat_connections_opened_total", transport=transport)
        live = total(found, "triochat_connections", transport=transport)
        closed = total(found, "triochat_closes_total", transport=transport)
        assert opened == live + closed, (transport, opened, live, closed)
    assert total(found, "triochat_connections_opened_total") == 4
    assert total(found, "triochat_connections", transport="websocket") == 1
    assert total(found, "triochat_closes_total", transport="websocket", code="1000") == 1
    assert total(found, "triochat_closes_total", transport="websocket", code="none") == 1
    assert total(found, "triochat_closes_total", transport="sse", code="none") == 1


async def test_metrics_on_their_own_port_and_404_on_the_public_one():
    """With --metrics-port, /metrics, /healthz and /readyz answer there and 404 on
    the public port; the page and chats answer 404 on the metrics port (#11 §4)."""
    with trio.fail_after(10):
        async with running_server(metrics_port=0) as server:
            metrics_port = server.metrics_port
            assert metrics_port is not None
            assert metrics_port != server.port
            for path in ("/metrics", "/healthz", "/readyz"):
                assert (await fetch(server, "GET", path)).status == 404, path
                assert (await fetch(server, "HEAD", path)).status == 404, path
            assert (await fetch(server, "GET", "/")).status == 200
            async with client_of(server) as alice:
                await alice.join(name="alice")
            operator = _OnPort(metrics_port)
            response = await fetch(operator, "GET", "/metrics")  # type: ignore[arg-type]
            assert response.status == 200
            assert b"triochat_build_info" in response.body
            for path, status in (("/healthz", 200), ("/readyz", 200), ("/", 404), ("/sse", 404)):
                answer = await fetch(operator, "GET", path)  # type: ignore[arg-type]
                assert answer.status == status, path
            upgrade = await trio.open_tcp_stream("127.0.0.1", metrics_port)
            async with upgrade:
                await upgrade.send_all(handshake_bytes(operator))  # type: ignore[arg-type]
                assert (await upgrade.receive_some(4096)).startswith(b"HTTP/1.1 404")
            assert f"metrics and health: http://127.0.0.1:{metrics_port}" in (
                server.startup_summary()
            )


class _OnPort:
    """Enough of a `Server` for the test_http helpers to talk to another port."""

    def __init__(self, port: int) -> None:
        self.port = port


# --- the real process -------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_metrics_e2e_process_json_logs_and_metrics_port():
    """`python -m triochat --log-format json --metrics-port N`: every stderr line
    is a JSON record, a chat's open and close carry its fields, requests get
    access lines, and /metrics answers on N only (#11 §4)."""
    with socket.socket() as probe:  # a free port for N (closed before the server binds it)
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    with run_server("--log-format", "json", "--metrics-port", str(metrics_port)) as proc:
        public = proc.base_url
        operator = f"http://127.0.0.1:{metrics_port}"
        assert _get(f"{public}/metrics")[0] == 404
        status, text = _get(f"{operator}/metrics?token=secret")
        assert status == 200
        assert "process_cpu_seconds_total" in text
        assert f'triochat_build_info{{version="{triochat.__version__}"}} 1.0' in text
        assert _get(f"{operator}/healthz") == (200, "ok\n")
        with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as chat:
            chat.sendall(handshake_bytes(_OnPort(proc.port)))  # type: ignore[arg-type]
            assert chat.recv(4096).startswith(b"HTTP/1.1 101")
        deadline = time.monotonic() + 5
        while '"close ' not in proc.output_text():  # the server's side of the close
            assert time.monotonic() < deadline, proc.output_text()
            time.sleep(0.02)
    records = _json_lines(proc.output_text())  # every line parses
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    (startup,) = [r for r in records if r["message"].startswith("triochat ")]
    assert f"metrics and health: {operator}" in startup["message"]
    (opened,) = [r for r in records if r["message"].startswith("open ")]
    (closed,) = [r for r in records if r["message"].startswith("close ")]
    assert opened["transport"] == closed["transport"] == "websocket"
    assert opened["conn"] == closed["conn"]
    assert opened["peer"] == closed["peer"]
    assert closed["code"] is None
    assert "(code none)" in closed["message"]
    access = [r for r in records if r["logger"] == "triochat.access"]
    paths = [(r["method"], r["path"], r["status"]) for r in access]
    assert ("GET", "/metrics", 404) in paths
    assert ("GET", "/metrics", 200) in paths  # without its query
    assert ("GET", "/healthz", 200) in paths
    assert "secret" not in proc.output_text()
    assert all(isinstance(r["duration_ms"], float) and r["bytes"] >= 0 for r in access)
