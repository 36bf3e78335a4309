"""Who a request comes from behind a proxy (issue #11 §3), sans-I/O: strings in,
an address out.

The per-address limits and the log lines need the client's address, which a
proxy replaces with its own. A proxy says who its client was in
``X-Forwarded-For`` or ``Forwarded`` (RFC 7239), but any client can send
those headers too. Rules (docs/protocol.md §1, "Behind a proxy"):

1. The headers are believed only when the TCP peer is inside one of the
   ``--trusted-proxy`` networks; from any other peer they are ignored.
2. Each proxy appends the address it saw, so the list is walked from the
   right, past every hop that is itself a trusted proxy; the first one that
   is not is the client (nginx's realip module with ``real_ip_recursive
   on``). Entries further left were written by that client: never read.
   When every hop is trusted, the left-most is the client.
3. A hop that is not an address (``for=unknown``, an obfuscated
   ``for=_id``, a ``Forwarded`` element without ``for=``, garbage) names
   nobody, and what is left of it was written by a party nobody vouches
   for: the client is then the TCP peer. A ``Forwarded`` header that does
   not parse as a whole (its quoting decides where elements end) is the
   TCP peer too.
4. ``Forwarded`` wins over ``X-Forwarded-For`` when both are present, even
   when it is malformed: falling back to the other header would let a
   client pick which one is believed by breaking one.

Nothing here raises on input from the wire; a bad value is rule 3.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "Address",
    "Network",
    "client_address",
    "parse_forwarded",
    "parse_networks",
    "parse_x_forwarded_for",
    "trusted_networks",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 5.6.2 tchar
_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'  # RFC 9110 5.6.4; h11 already refused control bytes
# One step of RFC 7239 §4: an optional ``name=value`` pair, then ``;`` (next
# pair), ``,`` (next element) or the end. Empty pairs and elements are allowed
# (the ``#`` list rule), whitespace around separators tolerated.
_STEP: Final = re.compile(rf"[ \t]*(?:({_TOKEN})=({_TOKEN}|{_QUOTED}))?[ \t]*([;,]|\Z)")
_UNESCAPE: Final = re.compile(r"\\(.)")
_OBFUSCATED: Final = re.compile(r"_[A-Za-z0-9._-]+")  # RFC 7239 §6.3 obfnode / obfport


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``--trusted-proxy`` entries as networks (an address alone is a /32 or /128).

    Raises:
        ValueError: an entry is not an IP network or address.
    """
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


@functools.lru_cache(maxsize=8)
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """`parse_networks`, cached: the tuple is the config's, the same on every request.

    Raises:
        ValueError: as `parse_networks` (Config has refused such entries already).
    """
    return parse_networks(entries)


def client_address(
    peer: str,
    trusted: Sequence[Network],
    *,
    forwarded: str | None = None,
    x_forwarded_for: str | None = None,
) -> str:
    """The client's address by the module's rules: ``peer`` unless it is trusted.

    Args:
        peer: the TCP peer's address as the socket gives it.
        trusted: the ``--trusted-proxy`` networks (`trusted_networks`).
        forwarded: the request's ``Forwarded`` header (repeats joined by ``,``).
        x_forwarded_for: its ``X-Forwarded-For`` header (likewise).

    Returns:
        A normalised address (``str`` of an `ipaddress` address; an IPv4
        address mapped into IPv6 as IPv4), or ``peer`` itself.
    """
    if not trusted or (forwarded is None and x_forwarded_for is None):
        return peer
    peer_address = _address(peer)
    if peer_address is None or not _is_trusted(peer_address, trusted):
        return peer
    if forwarded is not None:
        chain = parse_forwarded(forwarded)
        if chain is None:
            return peer
    else:
        assert x_forwarded_for is not None
        chain = parse_x_forwarded_for(x_forwarded_for)
    client: Address | None = None
    for hop in reversed(chain):
        if hop is None:
            return peer
        client = hop
        if not _is_trusted(hop, trusted):
            break
    return peer if client is None else str(client)


def parse_forwarded(value: str) -> list[Address | None] | None:
    """The ``for=`` node of each element of a ``Forwarded`` header, left to right.

    An element whose node is not an address (``unknown``, obfuscated, no
    ``for=`` at all, a bad address) is None; empty elements are skipped.
    Returns None when the header does not parse (bad quoting, a pair that
    is not ``token=value``, a parameter twice in one element).
    """
    chain: list[Address | None] = []
    seen: set[str] = set()
    node: Address | None = None
    position = 0
    while True:
        step = _STEP.match(value, position)
        if step is None:
            return None
        name, raw, separator = step.groups()
        if name is not None:
            name = name.lower()
            if name in seen:
                return None  # RFC 7239 §4: each parameter at most once per element
            seen.add(name)
            if name == "for":
                if raw.startswith('"'):
                    raw = _UNESCAPE.sub(r"\1", raw[1:-1])
                node = _node(raw)
        if separator != ";":  # "," or the end: the element is complete
            if seen:
                chain.append(node)
            seen.clear()
            node = None
            if not separator:
                return chain
        position = step.end()


def parse_x_forwarded_for(value: str) -> list[Address | None]:
    """Each entry of an ``X-Forwarded-For`` header, left to right; None where an
    entry is not an address. Empty entries are skipped, as nginx does."""
    return [_node(entry.strip()) for entry in value.split(",") if entry.strip()]


def _node(text: str) -> Address | None:
    """A node's address: IPv4 or ``[IPv6]``, each with an optional ``:port``, or
    a bare IPv6 address (X-Forwarded-For). None for anything else."""
    if text.startswith("["):
        literal, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _is_port(port[1:]))):
            return None
        try:
            return _unmapped(ipaddress.IPv6Address(literal))
        except ValueError:
            return None
    if text.count(":") == 1:  # IPv4 with a port (an IPv6 address has at least two)
        text, _, port = text.partition(":")
        if not _is_port(port):
            return None
    return _address(text)


def _is_port(text: str) -> bool:
    # RFC 7239 §6: node-port = 1*5DIGIT / obfport; isdigit alone takes "²".
    if text.isascii() and text.isdigit():
        return len(text) <= 5
    return _OBFUSCATED.fullmatch(text) is not None


def _address(text: str) -> Address | None:
    """``text`` as an address, an IPv4-mapped IPv6 one as IPv4 (a dual-stack
    socket's peer ``::ffff:127.0.0.1`` is 127.0.0.1); None if it is none."""
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    # `in` is False across IP versions, never an error.
    return any(address in network for network in trusted)
