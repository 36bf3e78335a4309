"""TLS on the public port (docs/operations.md, "TLS"): the certificate, its
reload on SIGHUP, and the server side of each connection's handshake.

The port serves https and wss when a certificate is given: the HTTP front
and the WebSocket run over a `trio.SSLStream` exactly as over a socket.
A plain-HTTP request on that port is answered with a short 400 in clear
text (as nginx does), and a handshake that does not finish within
``--handshake-timeout`` is dropped.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Final

import trio

from .errors import ConfigError

__all__ = ["Certificate", "server_context", "start_tls"]

LOGGER = logging.getLogger("triochat.tls")

#: The first byte of every TLS record that opens a handshake (RFC 8446 5.1).
TLS_HANDSHAKE_RECORD: Final = 0x16
#: What a plain-HTTP request on the TLS port gets before the close.
PLAIN_HTTP_ANSWER: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 48\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"This port speaks HTTPS: use an https:// address\n"
)


def server_context(certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    """A server context for ``certfile`` (the chain, PEM) and ``keyfile`` (or the
    key inside ``certfile``): TLS 1.2 or later, the stdlib's secure defaults.

    Raises:
        ConfigError: a file is missing or unreadable, or the key does not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        key = f" and {keyfile}" if keyfile is not None else ""
        raise ConfigError(f"cannot use the certificate {certfile}{key}: {exc}") from None
    return context


class Certificate:
    """The server's current TLS context; `reload` swaps it for new connections."""

    __slots__ = ("certfile", "context", "keyfile")

    def __init__(self, certfile: Path, keyfile: Path | None) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        #: What new connections use; open ones keep the context they were made with.
        self.context = server_context(certfile, keyfile)

    def reload(self) -> bool:
        """Read the pair again (SIGHUP). A bad pair is logged and the old one stays."""
        try:
            context = server_context(self.certfile, self.keyfile)
        except ConfigError as exc:
            LOGGER.error("%s; keeping the certificate in use", exc)
            return False
        self.context = context
        LOGGER.info("reloaded the TLS certificate %s", self.certfile)
        return True


async def start_tls(
    stream: trio.SocketStream, context: ssl.SSLContext, handshake_timeout: float
) -> trio.SSLStream[trio.SocketStream] | None:
    """The TLS side of a fresh connection, once its handshake is done; None if
    there is none to be had (plain HTTP, a failed or stalled handshake), after
    answering and closing what needs it. Never raises but Cancelled."""
    with trio.move_on_after(handshake_timeout):
        try:
            first = await stream.socket.recv(1, socket.MSG_PEEK)
        except OSError:
            return None
        if not first:
            return None  # closed without a word
        if first[0] != TLS_HANDSHAKE_RECORD:
            LOGGER.debug("plain HTTP on the TLS port: answered 400")
            try:
                await stream.send_all(PLAIN_HTTP_ANSWER)
                # Read what it sent before closing: closing with unread data
                # would reset the connection and lose the answer.
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return None
        # https_compatible: HTTP ends by its own framing, and browsers often
        # close without a TLS close_notify.
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            LOGGER.debug("TLS handshake failed: %s", exc.__cause__ or exc)
            return None
        return tls
    LOGGER.debug("TLS handshake not done within %s s: dropped", handshake_timeout)
    return None
