"""HTTP messages as data, sans-I/O: the request head as the front reads it,
the checks on it, and the heads of the front's answers.

- `Request`: one request head, its path (no query) and its headers
  joined by name.
- `check_head`: the limits h11 leaves to us: a head's total size (431,
  counted by `head_size`) and
  request smuggling (both ``Transfer-Encoding`` and ``Content-Length``: 400);
  `screen_head`: the bytes h11 refuses, found before h11's slow way does.
- `response_headers` and `raw_head`: every answer's headers, the security
  ones included (``nosniff``, no referrer; the page's CSP and
  ``X-Frame-Options: DENY`` on every HTML answer, docs/protocol.md §1).

Rule: no trio here (the I/O is in `wire`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Final

import h11

# Sent with every HTML response (docs/protocol.md §1). connect-src 'self' covers
# ws:/wss: to the page's own host and port (CSP Level 3; Chromium checked by
# tests/test_browser.py), so the page can reach its own server and no other.
PAGE_CSP: Final = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HTML_HEADERS: Final = (("content-security-policy", PAGE_CSP), ("x-frame-options", "DENY"))
TEXT_TYPE: Final = "text/plain; charset=utf-8"
JSON_ERROR_TYPE: Final = "application/json"
REASONS: Final = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class Request:
    """One request head, as the front reads it: what h11 parsed (`from_h11`),
    or a WebSocket upgrade read without h11 (`quickhead.quick_upgrade`)."""

    __slots__ = ("early", "fields", "headers", "http_version", "method", "path", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        fields: Sequence[tuple[bytes, bytes]],
        early: bytes | None = None,
    ) -> None:
        self.method = method.decode("ascii", "replace")
        self.target = target
        self.path = target.split(b"?", 1)[0].decode("ascii", "replace")
        self.http_version = http_version
        #: Every header line, in order: its name in lower case, its value.
        self.fields = fields
        #: What the client sent after the head, when it was read without h11
        #: (the h11 connection then never saw this request); None otherwise.
        self.early = early
        self.headers: dict[str, str] = {}
        for name, value in fields:
            key = name.decode("ascii", "replace")
            text = value.decode("latin-1")
            # Repeated headers are joined, as RFC 9110 §5.3 allows.
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    @classmethod
    def from_h11(cls, event: h11.Request) -> Request:
        return cls(event.method, event.target, event.http_version, event.headers)


def screen_head(buffered: bytes) -> None:
    """Refuse a request head holding a byte h11 refuses anywhere in a head,
    before h11 reads it; ``buffered``: what h11 holds, the head first.

    Those bytes: NUL, vertical tab, form feed, and a CR that does not end a
    line. Why: h11 checks each header line with a pattern whose time grows
    with the square of a run of blanks when the line then fails (16,000
    blanks and a NUL: 0.8 s of the event loop, per request), and only such a
    byte makes a line fail after a run of blanks. Found here by byte searches
    (memchr speed: this runs on every read of a head). The answer is h11's
    own: 400.

    Raises:
        h11.RemoteProtocolError: a 400.
    """
    # Where h11 ends a head: the first empty line (LF LF or LF CR LF). Until
    # then h11 reads no line of it, so there is nothing to screen yet.
    ends = [at for at in (buffered.find(b"\n\n"), buffered.find(b"\n\r\n")) if at >= 0]
    if not ends:
        return
    head = buffered[: min(ends) + 1]  # (with the last line's LF)
    crs = head.count(b"\r")
    if b"\x00" in head or b"\x0b" in head or b"\x0c" in head or crs != head.count(b"\r\n"):
        raise h11.RemoteProtocolError("illegal byte in the request head", error_status_hint=400)


def head_size(target: bytes, fields: Iterable[tuple[bytes, bytes]]) -> int:
    """A request head's size as ``max_header_bytes`` counts it: its target, and
    each header's name and value plus 4 (``": "`` and CRLF)."""
    return len(target) + sum(len(name) + len(value) + 4 for name, value in fields)


def check_head(event: h11.Request, head_limit: int | None) -> None:
    """Refuse a request head longer than ``head_limit``, or one that frames its body twice.

    (h11's own limit only applies while the head is incomplete, so a head
    that arrives complete in one large read could pass it.) A request with
    both ``Transfer-Encoding`` and ``Content-Length`` is refused with 400:
    h11 would frame it by the first, a proxy in front of us might by the
    second, and the difference is a smuggled request (RFC 9112 6.1 allows
    either answer; closing after it is required).

    Raises:
        h11.RemoteProtocolError: with the status to answer (431 or 400).
    """
    size = head_size(event.target, event.headers)
    framing = 0  # bit 1: Content-Length seen, bit 2: Transfer-Encoding
    for name, _value in event.headers:  # names come lower case from h11
        if name == b"content-length":
            framing |= 1
        elif name == b"transfer-encoding":
            framing |= 2
    if head_limit is not None and size > head_limit:
        raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
    if framing == 3:
        raise h11.RemoteProtocolError(
            "both Transfer-Encoding and Content-Length", error_status_hint=400
        )


def response_headers(
    body_size: int,
    content_type: str,
    *,
    allow: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """The headers of an answer h11 writes (the connection may stay open)."""
    headers = [
        ("content-type", content_type),
        ("content-length", str(body_size)),
        ("cache-control", "no-cache"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ]
    if allow is not None:
        headers.append(("allow", allow))
    if content_type.startswith("text/html"):
        headers.extend(HTML_HEADERS)  # every HTML response, whatever its route (§1)
    headers.extend(extra or [])
    return headers


def raw_head(status: int, body_size: int, content_type: str, extra: str = "") -> bytes:
    """The head of an answer written without h11, after which the connection
    closes (a refusal, or a request h11 could not parse). ``extra``: more
    header lines, each ending in CRLF."""
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, b'').decode()}\r\n"
        f"content-type: {content_type}\r\ncontent-length: {body_size}\r\n"
        "cache-control: no-cache\r\nx-content-type-options: nosniff\r\n"
        f"connection: close\r\n{extra}\r\n"
    ).encode()


def json_error(code: str, message: str) -> bytes:
    """The body of a JSON refusal (SSE endpoints): ``{"code", "message"}``."""
    return json.dumps({"code": code, "message": message}).encode()
