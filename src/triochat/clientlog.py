"""The fields of a log line about one chat client (`chat_fields`, `ConnectionFields`).

The hub's lines about a client (a hook that failed, a bug its frame hit)
carry the name it chats under and the room at hand, as ``extra=`` fields
(docs/operations.md, "Logs"); the connection's own fields (id, peer,
transport) come from `logformat.log_context`, in the connection's task,
and from `ConnectionFields` in the hub's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .chat import Client
from .protocol import is_valid_room

__all__ = ["ConnectionFields", "chat_fields"]


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


class ConnectionFields(Mapping[Client, Mapping[str, object]]):
    """Each client's connection log fields (id, peer, transport), by client: for
    the lines the hub logs about a client outside its connection's task.

    Read from the client's peer (``Outbound.log_fields``, which its
    connection sets from its `log_context`) rather than copied into a dict
    of the hub's, one entry per connection (memory per connection, #16).
    Lookups only: it cannot list the clients (it iterates as empty); a
    client whose peer has no fields is not in it.
    """

    __slots__ = ()

    def __getitem__(self, client: Client) -> Mapping[str, object]:
        fields = getattr(client.peer, "log_fields", None)
        if fields is None:
            raise KeyError(client)
        return fields  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Client]:
        return iter(())

    def __len__(self) -> int:
        return 0
