"""The fields of a log line about one chat client (`chat_fields`).

The hub's lines about a client (a hook that failed, a bug its frame hit)
carry the name it chats under and the room at hand, as ``extra=`` fields
(docs/operations.md, "Logs"); the connection's own fields (id, peer,
transport) come from `logformat.log_context`.
"""

from __future__ import annotations

from .chat import Client
from .protocol import is_valid_room

__all__ = ["chat_fields"]


def chat_fields(client: Client, room: str | None = None) -> dict[str, object]:
    """``extra=`` of a log line about ``client``: the name it chats under and
    the room at hand, where known (a room only if valid: a frame's text never
    reaches a log field raw)."""
    fields: dict[str, object] = {}
    if client.name is not None:
        fields["user"] = client.name
    if room is not None and is_valid_room(room):
        fields["room"] = room
    return fields
