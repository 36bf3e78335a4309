"""Who a connection is (docs/protocol.md §15), as the chat state sees it.

Plain data, no I/O and no JWT library: `auth.TokenVerifier` makes an
`Identity` from a token in the connection's own task, and the hub hands the
chat state a `TokenCheck` (the verdict on one `auth` frame).
"""

from __future__ import annotations

import hashlib

import msgspec

__all__ = ["Identity", "TokenCheck", "claim_token"]


class Identity(msgspec.Struct, frozen=True):
    """Who a verified token says the connection is."""

    #: The user id: several connections with one ``sub`` are one member.
    sub: str
    #: The display name (the token's ``name``, else ``sub``), already checked.
    name: str
    #: When the token runs out (Unix seconds): the connection closes 4003 then.
    exp: int
    #: Rooms (or prefixes ending in ``*``) the user may use; None: every room.
    rooms: tuple[str, ...] | None = None

    def may_use(self, room: str) -> bool:
        """Whether ``rooms`` lets the user join, say, read or type in ``room``."""
        rooms = self.rooms
        if rooms is None:
            return True
        return any(
            room == allowed or (allowed.endswith("*") and room.startswith(allowed[:-1]))
            for allowed in rooms
        )


class TokenCheck(msgspec.Struct, frozen=True):
    """The verdict on one `auth` frame: an identity, or why there is none."""

    identity: Identity | None
    #: Why the token was refused (said to the client); "" when it was not.
    error: str = ""
    ref: str | None = None


def claim_token(sub: str) -> str:
    """The token an authenticated user's name is claimed with in a cluster.

    Every node derives the same one from ``sub``, so a second node's claim
    shares the name instead of taking it over (docs/protocol.md §15). It
    authenticates nothing: with tokens on, a join needs a verified identity.
    """
    return "sub-" + hashlib.sha256(sub.encode()).hexdigest()[:32]
