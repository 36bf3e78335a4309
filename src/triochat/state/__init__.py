"""The parts of the chat state, sans-I/O; `triochat.chat.ChatState` puts them together.

One concern per module, each importing only those above it in this list:

- `model`: the nouns (`Peer`, `Client`, `User`, `Room`, `PendingSay`) and `Refused`;
- `output`: what the state hands the hub (`ChatOutput`, gathered in `OutputBuffer`);
- `rooms`: rooms, subscriptions, members and the fan-out of room frames;
- `log`: each room's kept messages, ids, `since` recovery and history pages;
- `checks`: the checks of docs/protocol.md §2, in its order;
- `presence`: users, names, tokens, takeover, the grace heap, leave settle;
- `says`: the say pipeline (refs, stores, acks);
- `cluster`: what this node knows of the others (entries, kick, handover, resync);
- `whispers`: whispers, here and to other nodes;
- `connections`: the connection registry, and each connection's mode.

Rule: no trio here either (tests/test_protocol.py checks every module).
"""
