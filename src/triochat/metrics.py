"""Server counters, kept as plain ints on the hot path, exported to Prometheus.

A `prometheus_client.Counter.inc()` takes a lock; a delivery happens
millions of times, so the hot path bumps attributes of `Stats` and a
collector reads them at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Stats", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Stats:
    """Every counter of one server. Attribute bumps only: no I/O, no locks."""

    __slots__ = (
        "closes_by_code",
        "connections_opened",
        "frames_received",
        "frames_sent",
        "hosts_refused",
        "http_requests",
        "messages_stored",
        "pending_refused",
        "rate_limited",
        "slow_consumers",
        "storage_failures",
        "writes",
    )

    def __init__(self) -> None:
        self.connections_opened = 0
        self.frames_received = 0
        self.frames_sent = 0
        self.writes = 0  # send_all calls: frames_sent / writes = coalescing factor
        self.messages_stored = 0
        self.slow_consumers = 0
        self.rate_limited = 0
        self.storage_failures = 0
        self.http_requests = 0
        self.hosts_refused = 0  # 421: a Host this server does not answer for (#18)
        self.pending_refused = 0  # closed at accept: too many sockets not yet chats (#18)
        self.closes_by_code: dict[int, int] = {}


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, gauges: dict[str, Callable[[], float]]) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        counters = {
            "connections_opened": (s.connections_opened, "Chat connections accepted."),
            "frames_received": (s.frames_received, "Client frames received."),
            "frames_sent": (s.frames_sent, "Server frames written to clients."),
            "socket_writes": (s.writes, "Coalesced writes to client sockets."),
            "messages_stored": (s.messages_stored, "Room messages committed to history."),
            "slow_consumers": (s.slow_consumers, "Connections closed as slow consumers."),
            "rate_limited": (s.rate_limited, "Frames dropped by the rate limit."),
            "storage_failures": (s.storage_failures, "History batches that failed to commit."),
            "http_requests": (s.http_requests, "Plain HTTP requests answered."),
            "hosts_refused": (s.hosts_refused, "Requests refused with 421 for their Host."),
            "pending_refused": (
                s.pending_refused,
                "Connections closed at accept: too many sockets not yet chats.",
            ),
        }
        for name, (value, doc) in counters.items():
            yield CounterMetricFamily(f"triochat_{name}", doc, value=value)
        closes = CounterMetricFamily(
            "triochat_closes", "Chat connections closed, by close code.", labels=["code"]
        )
        for code, count in sorted(s.closes_by_code.items()):
            closes.add_metric([str(code)], count)
        yield closes
        for name, read in self._gauges.items():
            yield GaugeMetricFamily(f"triochat_{name}", name.replace("_", " "), value=read())


def render_metrics(stats: Stats, gauges: dict[str, Callable[[], float]]) -> bytes:
    """The Prometheus text exposition of ``stats`` and the live ``gauges``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, gauges))
    return generate_latest(registry)
