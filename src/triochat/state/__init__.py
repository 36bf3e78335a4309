"""The parts of the chat state, sans-I/O; `triochat.chat.ChatState` puts them together.

One concern per module, each importing only those above it in this list:

- `model`: the nouns (`Peer`, `Client`, `User`, `Room`, `PendingSay`) and `Refused`;
- `output`: what the state hands the hub (`ChatOutput`, gathered in `OutputBuffer`);
- `rooms`: rooms, subscriptions (typed, classic, lobby listeners), members
  and the fan-out of room frames;
- `log`: each room's kept messages, ids, `since` recovery and history pages;
- `checks`: the checks of docs/protocol.md §5, in its order;
- `access`: authentication with tokens (§15): who each connection is, until when;
- `presence`: users, names, tokens, takeover, the grace heap, leave settle;
- `says`: the say pipeline (refs, stores, acks), and the stored messages
  coming back in the one order (a reload too);
- `cluster`: what this node knows of the others (entries, kick, handover, resync);
- `whispers`: whispers, here and to other nodes;
- `connections`: the connection registry, each connection's mode, admission;
- `operator`: the server API's operations (§16), here and for the other nodes;
- `handlers`: what each client frame does: its checks, then the parts above.

Rule: no trio here either (tests/test_protocol.py checks every module).
"""
