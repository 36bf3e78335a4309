"""The gauges of /metrics read from one node's chat state and backplane
(`Hub.gauges`; docs/operations.md lists them): rooms and the room cache
(docs/protocol.md §8), users, the store's bytes, the backplane's health.
"""

from __future__ import annotations

from collections.abc import Callable

from .backplane import Backplane
from .chat import ChatState
from .metrics import Gauge

__all__ = ["chat_gauges"]


def chat_gauges(chat: Callable[[], ChatState], backplane: Backplane) -> dict[str, Gauge]:
    """The gauges (a name ending ``_total`` is served as a counter), each read
    at scrape time: ``chat`` gives the chat state then (the hub makes it at start)."""
    gauges: dict[str, Gauge] = {
        "rooms": (
            "Rooms in memory: with members, subscribers or kept history (idle ones too).",
            lambda: len(chat().rooms),
        ),
        "rooms_idle": (
            "Rooms in memory only for their kept history (the room cache).",
            lambda: chat().room_cache.idle,
        ),
        "room_cache_bytes": (
            "What the history kept in memory costs, about (--room-cache-bytes bounds it).",
            lambda: chat().room_cache.bytes,
        ),
        "rooms_evicted_total": (
            "Idle rooms forgotten to stay within --room-cache and --room-cache-bytes.",
            lambda: chat().room_cache.evicted,
        ),
        "rooms_loaded_total": (
            "Rooms whose history was read from the store for a join or history request.",
            lambda: chat().room_cache.loads,
        ),
        "users": (
            "Names held: connected, or within their presence grace.",
            lambda: len(chat().users),
        ),
        "backplane_available": (
            "1 while says can be stored (history, or Redis, reachable), else 0.",
            backplane.available,
        ),
    }
    stats = backplane.store_stats
    if stats() is not None:  # (not with Redis: it bounds itself)
        gauges["stored_bytes"] = (
            "Bytes of history in the store (--max-stored-bytes bounds it).",
            lambda: (stats() or (0, 0))[0],
        )
        gauges["stored_trimmed_total"] = (
            "Messages the store deleted, oldest first, to stay within --max-stored-bytes.",
            lambda: (stats() or (0, 0))[1],
        )
    return gauges
