"""Who the front answers, sans-I/O: the ``Host`` and ``Origin`` rules of
docs/protocol.md §1, and the client address behind a trusted proxy.

- `host_allowed`: a name this server answers for; anything else is a
  DNS-rebinding page (421), checked before anything else of a request.
- `origin_allowed`: a page allowed to open a chat (403 otherwise).
- `client_ip`: the address a chat counts under (``--max-conns-per-ip``) and
  its log lines name: the TCP peer's, unless that is a ``--trusted-proxy``
  (#11 §3; the parsing is `triochat.forwarded`).

Rule: no trio here.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Final

from ..config import Config
from ..forwarded import client_address, trusted_networks


@functools.lru_cache(maxsize=8)
def _allowed_names(allowed: tuple[str, ...]) -> frozenset[str]:
    """``--allow-host`` entries as compared: lower case, no trailing dot (cached:
    the tuple is the config's, the same object on every request)."""
    names = (entry.strip().lower().removesuffix(".") for entry in allowed)
    return frozenset(name for name in names if name)


#: Longer than any Host a browser sends (a DNS name is at most 253
#: characters): such a value is checked each time, never cached.
_CACHED_HOST_CHARS: Final = 300


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's ``Host`` is one this server answers for (§1, DNS rebinding).

    Allowed: ``localhost`` and any IP literal (IPv4, or IPv6 in brackets),
    the names in ``allowed`` (``*``: any), each with any port or none,
    ignoring case and one trailing dot. No ``Host`` at all only reaches
    here on HTTP/1.0 (h11 answers 400 on HTTP/1.1): allowed, since a
    browser, which a rebinding attack needs, always sends one.
    (Cached by value: every request asks, and hosts repeat.)
    """
    if host is not None and len(host) > _CACHED_HOST_CHARS:
        return _check_host(host, allowed)
    return _cached_check_host(host, allowed)


def _check_host(host: str | None, allowed: tuple[str, ...]) -> bool:
    """`host_allowed`, uncached."""
    if host is None:
        return True
    names = _allowed_names(allowed)
    if "*" in names:
        return True
    host = host.strip().lower()
    if host.startswith("["):
        literal, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _is_port(port[1:]))):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return True
    name, colon, port = host.partition(":")
    if colon and not _is_port(port):
        return False  # a second colon, an empty or a non-numeric port
    name = name.removesuffix(".")
    if name == "localhost" or name in names:
        return True
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


_cached_check_host: Final = functools.lru_cache(maxsize=1024)(_check_host)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone takes "²" (latin-1)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """docs/protocol.md §1: no Origin, the request's own host, or an allowed origin."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    allowed_lower = {entry.lower() for entry in allowed}
    if origin == "null":
        return "null" in allowed_lower
    if "*" in allowed_lower or origin in allowed_lower:
        return True
    if host is None:
        return False
    host = host.strip().lower()
    return origin in (f"http://{host}", f"https://{host}")


def client_ip(peer: str, headers: Mapping[str, str], config: Config) -> str:
    """The address a chat from ``peer`` counts under: ``peer`` itself unless it
    is a ``--trusted-proxy``. Without that option (the default) nothing is
    parsed, not even ``peer``."""
    trusted = config.trusted_proxies
    if not trusted:
        return peer
    return client_address(
        peer,
        trusted_networks(trusted),
        forwarded=headers.get("forwarded"),
        x_forwarded_for=headers.get("x-forwarded-for"),
    )
