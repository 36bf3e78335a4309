"""Server counters, kept as plain ints on the hot path, exported to Prometheus.

A `prometheus_client.Counter.inc()` takes a lock; a delivery happens
millions of times, so the hot path bumps attributes of `Stats` and a
collector reads them at scrape time. The histograms are ours for the same
reason (`Histogram.observe` is a bisect and two additions, no lock); they
are observed per hub step or per say, never per delivery.

Every series, its labels and its meaning: docs/operations.md, "Metrics".
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "NO_CODE",
    "TRANSPORTS",
    "Gauge",
    "Histogram",
    "Stats",
    "open_registry",
    "render_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The ``transport`` label's values: every series that has it shows both, from 0.
TRANSPORTS: Final = ("websocket", "sse")
#: The ``code`` of a close without a close code (the peer's TCP connection
#: lost, a peer that stopped reading), so every end is counted.
NO_CODE: Final = "none"
#: (help text, read at scrape time) of a live gauge the server supplies (one
#: named ``*_total`` is served as a counter).
Gauge = tuple[str, Callable[[], float]]

# Bucket upper bounds, in seconds. A say's ack waits for one commit (an
# fsync on SQLite, a round trip to Redis); a hub step is microseconds to
# milliseconds.
SAY_ACK_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
STORE_COMMIT_BUCKETS: Final = SAY_ACK_BUCKETS
HUB_STEP_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
# Pauses (pauses.py): a young collection is tens of microseconds, a full one
# grows with every object alive; 0.02 is the bound issue #16 sets (no stall
# over 20 ms), so it is a bucket's edge.
GC_PAUSE_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
LOOP_STALL_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class Histogram:
    """A Prometheus histogram without a lock: `observe` only bumps a list slot and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)  # upper bounds, ascending; +Inf is implied
        #: Observations per bucket (not cumulative); the last slot is over every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's `le` ("less or equal").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """This histogram as exposed: cumulative buckets, ``_sum`` and ``_count``."""
        return HistogramMetricFamily(
            name, documentation, buckets=self.buckets(), sum_value=self.sum
        )

    def buckets(self) -> list[tuple[str, float]]:
        """(``le``, cumulative count) of every bucket, +Inf last."""
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return buckets


class Stats:
    """Every counter of one server. Attribute bumps only: no I/O, no locks."""

    __slots__ = (
        "closes",
        "frames_received",
        "frames_sent",
        "gc_pause",
        "hosts_refused",
        "http_requests",
        "hub_step",
        "loop_stall",
        "messages_stored",
        "open",
        "opened",
        "pending_refused",
        "rate_limited",
        "say_ack",
        "slow_consumers",
        "storage_failures",
        "store_commit",
        "writes",
    )

    def __init__(self) -> None:
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
        # Chats by transport, so that opened == open + closed holds per transport
        # (`opened_one` and `closed_one` keep the three together).
        self.opened: dict[str, int] = dict.fromkeys(TRANSPORTS, 0)
        self.open: dict[str, int] = dict.fromkeys(TRANSPORTS, 0)
        #: Ends by (transport, close code or `NO_CODE`).
        self.closes: dict[tuple[str, str], int] = {}
        #: Seconds from the hub taking a say to its ack being handed to the socket.
        self.say_ack = Histogram(SAY_ACK_BUCKETS)
        #: Seconds one `Backplane.append` (a history commit) took.
        self.store_commit = Histogram(STORE_COMMIT_BUCKETS)
        #: Seconds one hub step took, from its first item to its flush.
        self.hub_step = Histogram(HUB_STEP_BUCKETS)
        #: Seconds each collection of the cyclic GC took, by generation (pauses.py).
        self.gc_pause = tuple(Histogram(GC_PAUSE_BUCKETS) for _ in gc.get_threshold())
        #: Seconds the event loop's watchdog woke late (pauses.py).
        self.loop_stall = Histogram(LOOP_STALL_BUCKETS)

    def opened_one(self, transport: str) -> None:
        """A chat connection opened (once per connection, not on the hot path)."""
        self.opened[transport] = self.opened.get(transport, 0) + 1
        self.open[transport] = self.open.get(transport, 0) + 1

    def closed_one(self, transport: str, code: int | None) -> None:
        """A chat connection ended, with its close code (None: none was exchanged)."""
        self.open[transport] -= 1
        key = (transport, NO_CODE if code is None else str(code))
        self.closes[key] = self.closes.get(key, 0) + 1

    @property
    def connections_opened(self) -> int:
        """Chat connections opened so far, over every transport."""
        return sum(self.opened.values())

    @property
    def closes_by_code(self) -> dict[int, int]:
        """Ends that had a close code, by code, over every transport."""
        by_code: dict[int, int] = {}
        for (_, code), count in self.closes.items():
            if code != NO_CODE:
                by_code[int(code)] = by_code.get(int(code), 0) + count
        return by_code


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, gauges: Mapping[str, Gauge], version: str) -> None:
        self._stats = stats
        self._gauges = gauges
        self._version = version

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        yield InfoMetricFamily(
            "triochat_build", "The running triochat's version.", value={"version": self._version}
        )
        counters = {
            "frames_received": (s.frames_received, "Client frames received."),
            "frames_sent": (s.frames_sent, "Server frames written to clients."),
            "socket_writes": (s.writes, "Coalesced writes to client sockets."),
            "messages_stored": (s.messages_stored, "Room messages committed to history."),
            "slow_consumers": (s.slow_consumers, "Connections closed as slow consumers."),
            "rate_limited": (s.rate_limited, "Frames refused by the rate limit."),
            "storage_failures": (s.storage_failures, "History batches that failed to commit."),
            "http_requests": (
                s.http_requests,
                "HTTP requests received with an allowed Host (upgrades included).",
            ),
            "hosts_refused": (s.hosts_refused, "Requests refused with 421 for their Host."),
            "pending_refused": (
                s.pending_refused,
                "Connections closed at accept: too many sockets not yet chats.",
            ),
        }
        for name, (value, doc) in counters.items():
            yield CounterMetricFamily(f"triochat_{name}", doc, value=value)
        opened = CounterMetricFamily(
            "triochat_connections_opened",
            "Chat connections opened (WebSocket handshakes done, SSE streams started).",
            labels=["transport"],
        )
        live = GaugeMetricFamily(
            "triochat_connections", "Chat connections open now.", labels=["transport"]
        )
        for transport in s.opened:
            opened.add_metric([transport], s.opened[transport])
            live.add_metric([transport], s.open.get(transport, 0))
        yield opened
        yield live
        closes = CounterMetricFamily(
            "triochat_closes",
            "Chat connections ended, by close code (none: the connection was lost "
            "without a close code); opened = open + closes.",
            labels=["transport", "code"],
        )
        for (transport, code), count in sorted(s.closes.items()):
            closes.add_metric([transport, code], count)
        yield closes
        yield s.say_ack.family(
            "triochat_say_ack_seconds",
            "Seconds from the hub taking a say with a ref to its ack being handed "
            "to the sender's socket (the commit included).",
        )
        yield s.store_commit.family(
            "triochat_store_commit_seconds",
            "Seconds one batch of says took to append to the history (one commit).",
        )
        yield s.hub_step.family(
            "triochat_hub_step_seconds",
            "Seconds one hub step took: applying what arrived, storing, flushing.",
        )
        gc_pause = HistogramMetricFamily(
            "triochat_gc_pause_seconds",
            "Seconds one collection of Python's cyclic garbage collector stopped the "
            "process, by generation (2: a full collection).",
            labels=["generation"],
        )
        for generation, histogram in enumerate(s.gc_pause):
            gc_pause.add_metric([str(generation)], histogram.buckets(), histogram.sum)
        yield gc_pause
        yield s.loop_stall.family(
            "triochat_loop_stall_seconds",
            "Seconds the event loop's watchdog woke later than due: how long nothing "
            "else could run (a long step, a GC pause, a busy CPU).",
        )
        for name, (doc, read) in self._gauges.items():
            # A read value named ``*_total`` only grows: a counter.
            family = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield family(f"triochat_{name}", doc, value=float(read()))


def open_registry(stats: Stats, gauges: Mapping[str, Gauge], *, version: str) -> CollectorRegistry:
    """The registry one server serves: its own series, ``gauges`` (read at each
    scrape) and prometheus-client's process, GC and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, gauges, version))
    # Registered here, not in the module-wide default REGISTRY: each server
    # (several in one test process) serves exactly its own registry.
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
