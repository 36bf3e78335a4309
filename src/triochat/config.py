"""The server's configuration: one frozen object, every limit in one place.

Times are in seconds (floats), sizes in bytes or characters as named.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import urllib.parse
from pathlib import Path
from typing import Final

from .errors import ConfigError

__all__ = ["MIN_STORED_BYTES", "Config", "redact_url"]

#: The smallest ``--max-stored-bytes`` (other than 0, off): a bound below a
#: few batches of long messages would delete what was just stored.
MIN_STORED_BYTES: Final = 1 << 20


def redact_url(url: str) -> str:
    """``url`` without its password (for logs and errors): ``redis://user:***@host:port/db``.

    Here, not in server.py: the backplane logs its ``--redis`` URL too and
    must not import the server.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything `serve` needs; `cli.py` builds it from options and env."""

    host: str = "127.0.0.1"
    port: int = 8181
    data_dir: Path = Path("triochat-data")
    memory: bool = False
    allow_origins: tuple[str, ...] = ()

    max_frame_bytes: int = 65536
    # permessage-deflate (RFC 7692, docs/protocol.md §1.1) when a client offers it.
    # Off by default: without context takeover a chat-sized frame shrinks by
    # 18-38 % only, for CPU on every message (docs/performance.md).
    compression: bool = False
    max_msg_chars: int = 2000
    rate: float = 10.0  # say/typing/whisper per second; 0 = off
    burst: int = 20
    outbox_frames: int = 256  # backlog bound per connection, in frames...
    outbox_bytes: int = 1 << 20  # ...and in bytes (1 MiB, Centrifugo's default)
    max_rooms: int = 32
    max_conns_per_ip: int = 256  # 0 = off
    history_size: int = 1000
    # Global caps (#18, docs/protocol.md §8-§9). Idle rooms (kept history, nobody
    # in them) held in memory, by count and by what their history costs; past
    # either the least recently used is evicted and read again when joined.
    room_cache: int = 1000
    room_cache_bytes: int = 64 << 20
    # Bytes of history the store keeps in all (SQLite or --memory); past it the
    # oldest messages of any room go. 0 = off.
    max_stored_bytes: int = 1 << 30
    # Hostile clients (#18, docs/protocol.md §1 and §9). Host names a request may
    # name besides localhost and IP literals (DNS rebinding); `*` allows any.
    allow_hosts: tuple[str, ...] = ()
    # Sockets not yet a chat (request head, body or keep-alive idle), per client
    # address and overall: over either, a new connection is closed at accept. 0 = off.
    max_pending_per_ip: int = 32
    max_pending: int = 1024
    # Behind a proxy (#11 §3, docs/protocol.md §1): networks whose X-Forwarded-For
    # and Forwarded headers name the client, for --max-conns-per-ip and the log.
    # None by default: any client can send those headers.
    trusted_proxies: tuple[str, ...] = ()

    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    presence_grace: float = 5.0
    drain_timeout: float = 10.0
    close_timeout: float = 5.0
    handshake_timeout: float = 10.0  # whole HTTP request head / WebSocket handshake
    max_header_bytes: int = 16384
    # TLS on the public port (docs/operations.md, "TLS"): the certificate
    # chain (PEM) and its key (None: the key is inside certfile). SIGHUP
    # reloads both.
    certfile: Path | None = None
    keyfile: Path | None = None

    # Connection tokens (#14, docs/protocol.md §15): a JWT key turns
    # authentication on (HS256 with a secret, or a PEM/JWKS public key).
    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # The server API (#14, docs/protocol.md §16): /api/ answers only with this key.
    api_key: str | None = None

    redis: str | None = None
    node_timeout: float = 30.0
    # A wait on the rest of the cluster: a join's catch-up and name claim, a
    # flush of what a step published, another node's answer to a relayed SSE
    # POST or a whisper, reaching Redis at start-up.
    backplane_timeout: float = 5.0
    log_level: str = "INFO"
    # Logs and metrics an operator can use (#11 §4, docs/operations.md).
    log_format: str = "text"  # or "json": one object per line
    # With a port, /metrics and the health endpoints are served on their own
    # listener (at metrics_host, else host) and answer 404 on the public port.
    metrics_host: str | None = None
    metrics_port: int | None = None
    # Processes on the one port (docs/operations.md, "Several workers on one
    # machine"): the command line's supervisor (workers.py) starts this many,
    # each its own cluster node, so more than one needs redis. A `Server` is
    # always one process and never reads it.
    workers: int = 1
    # Set in a worker by its supervisor (TRIOCHAT_WORKER_INDEX), from 0: the
    # public port is then bound with SO_REUSEPORT, and the index is in every
    # log line and in /healthz's X-Triochat-Worker header. None: not a worker.
    worker: int | None = None

    inbound_buffer: int = 64  # frames from all clients waiting for the hub

    @property
    def authenticating(self) -> bool:
        """Whether connections must send a token first (docs/protocol.md §15)."""
        return self.jwt_secret is not None or self.jwt_public_key is not None

    def __post_init__(self) -> None:
        positive = {
            "max_frame_bytes": self.max_frame_bytes,
            "max_msg_chars": self.max_msg_chars,
            "burst": self.burst,
            "outbox_frames": self.outbox_frames,
            "outbox_bytes": self.outbox_bytes,
            "max_rooms": self.max_rooms,
            "history_size": self.history_size,
            "room_cache": self.room_cache,
            "room_cache_bytes": self.room_cache_bytes,
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
            "close_timeout": self.close_timeout,
            "handshake_timeout": self.handshake_timeout,
            "max_header_bytes": self.max_header_bytes,
            "node_timeout": self.node_timeout,
            "backplane_timeout": self.backplane_timeout,
            "inbound_buffer": self.inbound_buffer,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        not_negative = {
            "rate": self.rate,
            "max_conns_per_ip": self.max_conns_per_ip,
            "max_pending_per_ip": self.max_pending_per_ip,
            "max_pending": self.max_pending,
            "max_stored_bytes": self.max_stored_bytes,
            "presence_grace": self.presence_grace,
            "drain_timeout": self.drain_timeout,
        }
        for name, value in not_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must not be negative, got {value}")
        if self.workers < 1:
            raise ConfigError(f"workers must be positive, got {self.workers}")
        if self.workers > 1 and self.redis is None:
            raise ConfigError(
                f"--workers {self.workers} needs --redis: the workers form one chat through "
                "Redis (add --redis redis://host:port/db, or use --workers 1)"
            )
        if 0 < self.max_stored_bytes < MIN_STORED_BYTES:
            raise ConfigError(
                f"max_stored_bytes must be 0 (off) or at least {MIN_STORED_BYTES}, "
                f"got {self.max_stored_bytes}"
            )
        if self.redis is not None and not self.redis.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"redis must be a redis://host:port/db URL, got {redact_url(self.redis)!r}"
            )
        for host in self.allow_hosts:
            # A name, never host:port or a URL: ports are not compared (§1).
            if host != "*" and (not host or any(c in host for c in ":/[]@ \t,")):
                raise ConfigError(f"allow_hosts takes host names or *, got {host!r}")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)  # forwarded.parse_networks' reading
            except ValueError:
                raise ConfigError(
                    f"trusted_proxies takes IP networks or addresses, got {entry!r}"
                ) from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port}")
        if self.keyfile is not None and self.certfile is None:
            raise ConfigError("keyfile needs a certfile")
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ConfigError("give jwt_secret or jwt_public_key, not both")
        if self.jwt_secret == "":
            raise ConfigError("jwt_secret must not be empty")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError("api_key must be at least 16 characters")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if self.metrics_port is not None:
            if not 0 <= self.metrics_port <= 65535:
                raise ConfigError(f"metrics_port must be 0-65535, got {self.metrics_port}")
            # With workers, worker i serves metrics_port + i (docs/operations.md).
            last = self.metrics_port + self.workers - 1 if self.metrics_port else 0
            if last > 65535:
                raise ConfigError(f"metrics_port + workers - 1 must be 65535 at most, got {last}")
            if (
                self.metrics_port <= self.port <= last
                and self.port != 0
                and self.metrics_host in (None, self.host)
            ):
                if self.workers == 1:
                    raise ConfigError(f"metrics_port must differ from port ({self.port})")
                raise ConfigError(
                    f"metrics ports {self.metrics_port}-{last} (one per worker) "
                    f"must not include port ({self.port})"
                )
