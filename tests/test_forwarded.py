"""`triochat.forwarded`: who the client is behind a trusted proxy (#11 §3), sans-I/O.

The rules are the module's (and docs/protocol.md §1, "Behind a proxy"); the
end-to-end tests on a real server are in test_http.py.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triochat.forwarded import (
    client_address,
    parse_forwarded,
    parse_networks,
    parse_x_forwarded_for,
    trusted_networks,
)

LOCAL = trusted_networks(("127.0.0.1/32",))
LOCAL_AND_TEN = trusted_networks(("127.0.0.1/32", "10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "trusted", "forwarded", "xff", "expected"),
    [
        # Not trusted: the headers are ignored, whatever they say.
        ("127.0.0.1", (), None, "203.0.113.7", "127.0.0.1"),
        ("127.0.0.2", LOCAL, 'for="203.0.113.7"', "203.0.113.7", "127.0.0.2"),
        ("192.0.2.1", LOCAL_AND_TEN, None, "203.0.113.7", "192.0.2.1"),
        ("?", LOCAL, None, "203.0.113.7", "?"),  # a stream with no address
        # Trusted, no header: the peer.
        ("127.0.0.1", LOCAL, None, None, "127.0.0.1"),
        # X-Forwarded-For.
        ("127.0.0.1", LOCAL, None, "203.0.113.7", "203.0.113.7"),
        ("127.0.0.1", LOCAL, None, " 203.0.113.7 ", "203.0.113.7"),
        ("127.0.0.1", LOCAL, None, "203.0.113.7:4711", "203.0.113.7"),
        ("127.0.0.1", LOCAL, None, "2001:DB8::1", "2001:db8::1"),
        ("127.0.0.1", LOCAL, None, "[2001:db8::1]:4711", "2001:db8::1"),
        ("127.0.0.1", LOCAL, None, "::ffff:203.0.113.7", "203.0.113.7"),
        # The right-most hop that is not trusted; the client's own entries are not read.
        ("127.0.0.1", LOCAL_AND_TEN, None, "198.51.100.9, 10.0.0.5", "198.51.100.9"),
        ("127.0.0.1", LOCAL_AND_TEN, None, "1.1.1.1, 198.51.100.9, 10.0.0.5", "198.51.100.9"),
        ("127.0.0.1", LOCAL, None, "junk, 198.51.100.9", "198.51.100.9"),
        ("127.0.0.1", LOCAL, None, "198.51.100.9,, 203.0.113.7", "203.0.113.7"),
        ("10.1.2.3", LOCAL_AND_TEN, None, "203.0.113.7, 127.0.0.1", "203.0.113.7"),
        # Every hop trusted: the left-most.
        ("127.0.0.1", LOCAL_AND_TEN, None, "10.0.0.9, 10.0.0.5", "10.0.0.9"),
        ("127.0.0.1", LOCAL, None, "127.0.0.1", "127.0.0.1"),
        # Forwarded (RFC 7239).
        ("127.0.0.1", LOCAL, 'for="[2001:db8::1]:4711"', None, "2001:db8::1"),
        ("127.0.0.1", LOCAL, "for=203.0.113.7", None, "203.0.113.7"),
        ("127.0.0.1", LOCAL, 'For="203.0.113.7:80";proto=https;by=_node', None, "203.0.113.7"),
        ("127.0.0.1", LOCAL, 'for="\\203.0.113.7"', None, "203.0.113.7"),  # quoted-pair
        ("127.0.0.1", LOCAL, "for=192.0.2.60;proto=http, for=203.0.113.7", None, "203.0.113.7"),
        ("127.0.0.1", LOCAL_AND_TEN, "for=198.51.100.9, for=10.0.0.5", None, "198.51.100.9"),
        ("127.0.0.1", LOCAL, 'for="_x,y", for=203.0.113.7', None, "203.0.113.7"),
        ("127.0.0.1", LOCAL, "for=203.0.113.7 , , for=198.51.100.9 ", None, "198.51.100.9"),
        # Both headers: Forwarded wins.
        ("127.0.0.1", LOCAL, "for=198.51.100.1", "198.51.100.2", "198.51.100.1"),
        # Not an address where the walk stops: the peer.
        ("127.0.0.1", LOCAL, "for=unknown", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, "for=UNKNOWN", "203.0.113.7", "127.0.0.1"),
        ("127.0.0.1", LOCAL, "for=_hidden", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, "for=203.0.113.7, for=unknown", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, "for=203.0.113.7, proto=https", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, 'for="example.com"', None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "unknown", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "203.0.113.7, junk", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "203.0.113.7:99999x", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "203.0.113.7:123456", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "[203.0.113.7]", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "[2001:db8::1", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "[2001:db8::1]x", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "203.0.113.\xff", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, "", "127.0.0.1"),
        ("127.0.0.1", LOCAL, None, " , ", "127.0.0.1"),
        ("127.0.0.1", LOCAL_AND_TEN, None, "junk, 10.0.0.5", "127.0.0.1"),
        # A Forwarded header that does not parse as a whole: the peer, never XFF.
        ("127.0.0.1", LOCAL, 'for="[2001:db8::1]', "203.0.113.7", "127.0.0.1"),
        ("127.0.0.1", LOCAL, "for=[2001:db8::1]", None, "127.0.0.1"),  # must be quoted
        ("127.0.0.1", LOCAL, "for=203.0.113.7:80", None, "127.0.0.1"),  # must be quoted
        ("127.0.0.1", LOCAL, "for=203.0.113.7;for=198.51.100.9", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, "for=", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, "203.0.113.7", None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, 'for="203.0.113.7"x', None, "127.0.0.1"),
        ("127.0.0.1", LOCAL, "", None, "127.0.0.1"),
    ],
)
def test_forwarded_client_address(peer, trusted, forwarded, xff, expected):
    """The client is the right-most untrusted hop, from a trusted peer only; anything
    else that cannot be believed is the peer (#11 §3)."""
    assert client_address(peer, trusted, forwarded=forwarded, x_forwarded_for=xff) == expected


def test_forwarded_parse_each_header():
    """Each header gives one entry per hop, None where a hop names no address."""
    v4, v6 = ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8::1")
    assert parse_forwarded(
        'for=203.0.113.7;proto=http, by=x, for=unknown,for="[2001:db8::1]"'
    ) == [
        v4,
        None,
        None,
        v6,
    ]
    assert parse_forwarded("") == []
    assert parse_forwarded('for="x') is None
    assert parse_x_forwarded_for("203.0.113.7, nope, [2001:db8::1]:1") == [v4, None, v6]


def test_forwarded_networks_from_options():
    """--trusted-proxy entries: networks or bare addresses, host bits allowed; else ValueError."""
    assert parse_networks(["10.1.2.3/8", "::1", "192.0.2.7"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    for bad in ("localhost", "10.0.0.0/33", "", "10.0.0.0/8,::1"):
        with pytest.raises(ValueError):  # noqa: PT011 (ipaddress raises plain ValueError)
            parse_networks([bad])


_PUBLIC = st.ip_addresses(v=4).filter(lambda a: not a.is_loopback).map(str)


@given(prefix=st.text(), client=_PUBLIC)
def test_forwarded_a_client_cannot_spoof_past_the_proxy_entry(prefix, client):
    """Whatever a client puts in X-Forwarded-For, the entry the trusted proxy appends
    ($proxy_add_x_forwarded_for) is the answer."""
    xff = f"{prefix}, {client}"
    assert client_address("127.0.0.1", LOCAL, x_forwarded_for=xff) == client


@given(peer=st.ip_addresses().map(str), forwarded=st.text(), xff=st.text())
def test_forwarded_never_raises_and_answers_an_address(peer, forwarded, xff):
    """Any header text gives the peer or a normalised address, never an exception; an
    untrusted peer always gets itself."""
    trusted = trusted_networks(("0.0.0.0/1", "2000::/3"))
    answer = client_address(peer, trusted, forwarded=forwarded, x_forwarded_for=xff)
    assert answer == peer or str(ipaddress.ip_address(answer)) == answer
    assert client_address(peer, (), forwarded=forwarded, x_forwarded_for=xff) == peer
