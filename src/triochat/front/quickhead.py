"""A WebSocket upgrade's request head read without h11, when it is plainly
well formed (#16: h11 took a tenth of a connection's setup).

`quick_upgrade` takes the bytes a new connection has sent so far. It
returns the `Request` only for the plain case: one whole head, its request
line ``GET <target> HTTP/1.1``, every line ending in CRLF, header values of
visible ASCII (spaces and tabs between words), exactly one ``Host``, no
``Content-Length``, ``Transfer-Encoding`` or ``Expect``, an ``Upgrade``
header naming websocket, and within the front's head limit. Anything else
(another method or version, a folded line, a bare LF, control or non-ASCII
bytes, a body, a head not all here yet) returns None and goes to h11 as
before, which answers what is broken. What is accepted is a subset of what
h11 accepts, read the same way (names in lower case, values without the
whitespace around them): tests/test_quickhead.py compares the two.

Rule: no trio here, and no answers: whatever is in doubt is h11's.
"""

from __future__ import annotations

import re
from typing import Final

from .messages import Request, head_size

__all__ = ["quick_upgrade"]

# The whole head in one match: h11's request line narrowed to GET and
# HTTP/1.1, then h11's header lines (RFC 9110 field-name ":" OWS field-value
# OWS) with values narrowed to visible ASCII, each ending in CRLF, then the
# empty line. Linear: CRLF cannot occur inside a line, and a run of blanks has
# one place only (before the value, between two words, or after the last
# word), so a failed match never tries the ways of splitting it. (h11's own
# line pattern, "OWS value? OWS", has two places for an empty value's blanks:
# quadratic on a long run of them.)
_HEAD: Final = re.compile(
    rb"GET ([\x21-\x7e]+) HTTP/1\.1\r\n"
    rb"((?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[ \t]*(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*[ \t]*)?\r\n)*)"
    rb"\r\n"
)
#: Headers h11 reads with rules of its own (a body's framing, 100-continue).
_LEFT_TO_H11: Final = frozenset({b"content-length", b"transfer-encoding", b"expect"})


def quick_upgrade(data: bytes, head_limit: int | None) -> Request | None:
    """The WebSocket upgrade request at the start of ``data``, with what follows
    it as `Request.early`; None when h11 must read ``data`` (module docstring).

    ``head_limit``: the front's ``max_header_bytes``, counted by
    `messages.head_size` as `messages.check_head` counts it (a longer head is
    h11's, and a 431).
    """
    head = _HEAD.match(data)
    if head is None:
        return None
    target = head[1]
    fields: list[tuple[bytes, bytes]] = []
    hosts = 0
    upgrade = False
    for line in head[2].split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name in _LEFT_TO_H11:
            return None
        if name == b"host":
            hosts += 1
        elif name == b"upgrade" and b"websocket" in value.lower():
            upgrade = True
        fields.append((name, value))
    if hosts != 1 or not upgrade:
        return None
    if head_limit is not None and head_size(target, fields) > head_limit:
        return None
    return Request(b"GET", target, b"1.1", fields, early=data[head.end() :])
