"""``python -m triochat`` / ``triochat``: options and environment -> Config -> run.

Every option can also come from the environment as ``TRIOCHAT_`` + the
option's name in upper snake case (``--max-frame-bytes`` ->
``TRIOCHAT_MAX_FRAME_BYTES``); the command line wins.

``triochat backup --data-dir DIR OUT`` is the one subcommand (backup.py).
With ``--workers N`` (more than 1) this process supervises N workers, each
a ``python -m triochat`` of its own (workers.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .backup import backup_main
from .config import Config
from .errors import ConfigError, StorageError
from .logformat import setup_logging
from .server import serve_until_signalled
from .worker import serve_worker, worker_setup
from .workers import supervise

__all__ = ["build_parser", "config_from_args", "main"]


def on_off(text: str) -> bool:
    """``on`` or ``off`` (also 1/0, true/false, yes/no), for switches that take a value."""
    value = text.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"expected on or off, got {text!r}")


# (option, Config field, type, help). Defaults come from Config itself.
_OPTIONS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on (0: any free port)"),
    ("--data-dir", "data_dir", Path, "directory of the SQLite history"),
    ("--max-frame-bytes", "max_frame_bytes", int, "largest client frame; over it: close 1009"),
    (
        "--compression",
        "compression",
        on_off,
        "on: accept a client's permessage-deflate offer (RFC 7692); off: decline it",
    ),
    ("--max-msg-chars", "max_msg_chars", int, "longest `msg`; over it: error too_long"),
    ("--rate", "rate", float, "say/typing/whisper per second per connection (0 = off)"),
    ("--burst", "burst", int, "token bucket size of the rate limit"),
    (
        "--outbox-frames",
        "outbox_frames",
        int,
        "backlog bound per connection in frames; staying over it: close 1013",
    ),
    (
        "--outbox-bytes",
        "outbox_bytes",
        int,
        "backlog bound per connection in bytes; staying over it: close 1013",
    ),
    ("--max-rooms", "max_rooms", int, "rooms per connection; over it: error bad_room"),
    (
        "--max-conns-per-ip",
        "max_conns_per_ip",
        int,
        "chat connections per IP (0 = off); over it: 429",
    ),
    ("--history-size", "history_size", int, "messages kept per room"),
    (
        "--room-cache",
        "room_cache",
        int,
        "idle rooms whose history stays in memory; past it the least recently used goes",
    ),
    (
        "--room-cache-bytes",
        "room_cache_bytes",
        int,
        "bytes of history in memory before idle rooms are evicted",
    ),
    (
        "--max-stored-bytes",
        "max_stored_bytes",
        int,
        "bytes of history the store keeps in all (0 = off); past it the oldest messages go",
    ),
    (
        "--max-pending-per-ip",
        "max_pending_per_ip",
        int,
        "sockets per IP not yet a chat (0 = off); over it a new one is closed at once",
    ),
    (
        "--max-pending",
        "max_pending",
        int,
        "sockets in all not yet a chat (0 = off); over it a new one is closed at once",
    ),
    ("--ping-interval", "ping_interval", float, "seconds between pings"),
    ("--ping-timeout", "ping_timeout", float, "seconds to wait for a pong before closing"),
    ("--presence-grace", "presence_grace", float, "seconds a lost user keeps its name and rooms"),
    ("--drain-timeout", "drain_timeout", float, "seconds to flush and close on SIGTERM"),
    ("--close-timeout", "close_timeout", float, "seconds to wait for a close handshake"),
    ("--handshake-timeout", "handshake_timeout", float, "seconds for a request head / handshake"),
    ("--max-header-bytes", "max_header_bytes", int, "largest HTTP request head; over it: 431"),
    (
        "--certfile",
        "certfile",
        Path,
        "TLS certificate chain (PEM): the port then serves https and wss; SIGHUP reloads it",
    ),
    ("--keyfile", "keyfile", Path, "the certificate's private key (PEM; default: in --certfile)"),
    (
        "--jwt-secret",
        "jwt_secret",
        str,
        "HS256 secret of connection tokens: turns authentication on (docs/protocol.md §15)",
    ),
    (
        "--jwt-public-key",
        "jwt_public_key",
        Path,
        "public key of connection tokens (PEM, or a JWKS file): turns authentication on",
    ),
    ("--jwt-audience", "jwt_audience", str, "the `aud` every token must carry"),
    ("--jwt-issuer", "jwt_issuer", str, "the `iss` every token must carry"),
    (
        "--api-key",
        "api_key",
        str,
        "turn the server API (/api/) on, for requests with `Authorization: Bearer KEY`",
    ),
    ("--redis", "redis", str, "redis://host:port/db: form one chat with the other nodes on it"),
    ("--node-timeout", "node_timeout", float, "seconds before a silent cluster node is gone"),
    (
        "--backplane-timeout",
        "backplane_timeout",
        float,
        "seconds a wait on the cluster (claim, catch-up, another node's answer) may take",
    ),
    (
        "--workers",
        "workers",
        int,
        "processes sharing the port (SO_REUSEPORT), one chat through --redis; "
        "a parent starts and restarts them",
    ),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR"),
    ("--log-format", "log_format", str, "text, or json: one JSON object per line"),
    (
        "--metrics-port",
        "metrics_port",
        int,
        "serve /metrics, /healthz and /readyz on this port only, not on --port",
    ),
    ("--metrics-host", "metrics_host", str, "address of --metrics-port (default: --host)"),
]


def _env_name(option: str) -> str:
    return "TRIOCHAT_" + option.lstrip("-").replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; `--help` documents every option and its env var."""
    parser = argparse.ArgumentParser(
        prog="triochat",
        description="A real-time chat server for the browser: the page and the "
        "WebSocket on one port. Every option can also be set with the environment "
        "variable shown; the command line wins.",
        epilog="`triochat backup --data-dir DIR OUT` copies the history of a running "
        "server to OUT (see `triochat backup --help`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    for option, field, kind, help_text in _OPTIONS:
        parser.add_argument(
            option,
            dest=field,
            type=kind,
            default=getattr(defaults, field),
            help=f"{help_text} [env {_env_name(option)}]",
        )
    parser.add_argument(
        "--memory",
        action="store_true",
        default=False,
        help="keep history in memory only (lost on restart) [env TRIOCHAT_MEMORY=1]",
    )
    parser.add_argument(
        "--allow-origin",
        dest="allow_origins",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="an extra Origin allowed to open chats (repeatable; `*` any, `null`) "
        "[env TRIOCHAT_ALLOW_ORIGIN, comma-separated]",
    )
    parser.add_argument(
        "--allow-host",
        dest="allow_hosts",
        action="append",
        default=None,
        metavar="NAME",
        help="a host name requests may name besides localhost and IP addresses "
        "(repeatable; `*` any; others get 421) [env TRIOCHAT_ALLOW_HOST, comma-separated]",
    )
    parser.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        default=None,
        metavar="CIDR",
        help="a proxy network whose X-Forwarded-For / Forwarded name the client for "
        "the per-address limits and the log (repeatable; default none: the headers "
        "are ignored) [env TRIOCHAT_TRUSTED_PROXY, comma-separated]",
    )
    parser.add_argument("--version", action="version", version=f"triochat {__version__}")
    return parser


def config_from_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parse ``argv`` over ``environ``.

    Raises:
        ConfigError: a value is invalid.
        SystemExit: bad usage (argparse's own message) or ``--help``.
    """
    parser = build_parser()
    env_defaults: dict[str, Any] = {}
    for option, field, kind, _ in _OPTIONS:
        raw = environ.get(_env_name(option))
        if raw is not None and raw != "":
            try:
                env_defaults[field] = kind(raw)
            except ValueError:
                raise ConfigError(f"{_env_name(option)}={raw!r} is not a valid value") from None
    memory_env = environ.get("TRIOCHAT_MEMORY", "").strip().lower()
    if memory_env in ("1", "true", "yes", "on"):
        env_defaults["memory"] = True
    parser.set_defaults(**env_defaults)
    args = parser.parse_args(argv)
    origins = args.allow_origins
    if origins is None:
        raw_origins = environ.get("TRIOCHAT_ALLOW_ORIGIN", "")
        origins = [entry.strip() for entry in raw_origins.split(",") if entry.strip()]
    values = vars(args)
    values["allow_origins"] = tuple(origins)
    values["allow_hosts"] = tuple(_listed(args.allow_hosts, environ, "TRIOCHAT_ALLOW_HOST"))
    values["trusted_proxies"] = tuple(
        _listed(args.trusted_proxies, environ, "TRIOCHAT_TRUSTED_PROXY")
    )
    values["log_level"] = str(values["log_level"]).upper()
    if values["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"unknown log level {values['log_level']}")
    values["log_format"] = str(values["log_format"]).lower()
    return Config(**values)


def _listed(given: list[str] | None, environ: Mapping[str, str], env: str) -> list[str]:
    """A repeatable option's values, or else its comma-separated variable's."""
    if given is not None:
        return given
    return [entry.strip() for entry in environ.get(env, "").split(",") if entry.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``triochat`` and ``python -m triochat``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["backup"]:
        # Dispatched by hand, not an argparse subparser: `triochat` with
        # options only must parse exactly as it always has.
        raise SystemExit(backup_main(args[1:], os.environ))
    try:
        config = config_from_args(args, os.environ)
        worker = worker_setup(os.environ)  # started by a supervisor (workers.py)?
        if worker is not None:
            config = dataclasses.replace(config, workers=1, worker=worker.index)
    except (ConfigError, ValueError) as exc:
        print(f"triochat: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(config.log_level, config.log_format, sys.stderr, worker=config.worker)
    status = 0
    try:
        if config.workers > 1:
            status = trio.run(supervise, config, args, os.environ)
        elif worker is not None:
            trio.run(serve_worker, config, worker.control_fd)
        else:
            trio.run(serve_until_signalled, config)
    except ConfigError as exc:  # found at start-up: the certificate files, say
        logging.getLogger("triochat").error("%s", exc)
        raise SystemExit(2) from None
    except StorageError as exc:
        logging.getLogger("triochat").error("%s", exc)
        raise SystemExit(1) from None
    except OSError as exc:
        logging.getLogger("triochat").error(
            "cannot listen on %s:%s: %s", config.host, config.port, exc
        )
        raise SystemExit(1) from None
    if status:
        raise SystemExit(status)
