"""`JoinResolver`: client frames onto the chat state, and the joins that wait for the cluster.

A join first catches up with the cluster (so its member list and its
`since` recovery include everything published before it), and a frame that
binds a name first claims it (`Backplane.claim`): see `needs_cluster`. The
dispatcher applies every other frame at once (`apply_frame`).

Rules:

1. The hub never awaits the cluster: a frame that needs it is parked and
   resolved beside the hub (`park`, one `_resolve` task each); only that
   client's later frames wait behind it, in order, at most `PARKED_FRAMES`
   (more are refused ``unavailable``: the client's reader is not held up
   meanwhile). The answer comes back through the hub's inbound channel
   (`Resolved`), for the dispatcher to apply. (An in-process backplane,
   whose waits never wait, is asked inline by the dispatcher:
   `Backplane.immediate`, `ask_cluster`.)
2. The answer to a resolved join (``joined``) is written once the cluster
   has seen the join: the client's peer is held until what was published so
   far is flushed (`release_held`), so a client told "joined" can be reached
   from every node.
3. A name claimed for a frame that did not end up binding it goes back
   (`Backplane.release`); a claim the cluster could not answer refuses the
   frame ``unavailable``.
4. A bug that one client's frame triggers is logged (with the connection's
   fields) and answered ``internal``, and that connection is closed 1011:
   it must not take the hub, and every other connection, down.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Final

import trio

from .backplane import Backplane
from .chat import ChatState, Client
from .clientlog import chat_fields
from .config import Config
from .errors import ClientProtocolError, StorageError
from .events import Claim
from .identity import claim_token
from .inbound import ChatFrame, ClientItem, InboundSend, Resolved
from .logformat import log_context
from .protocol import ClassicFrame, CloseCode, ErrorCode, Join, Message
from .state.model import CLASSIC_ROOM

__all__ = ["PARKED_FRAMES", "WAITING", "JoinResolver", "needs_cluster"]

# The hub's logger: operators know these lines by it (docs/operations.md).
LOGGER: Final = logging.getLogger("triochat.hub")

WAITING: Final = "too many frames while your join waits for the cluster: try again"
UNREADABLE: Final = "the room's history cannot be read now: try again"
#: Frames a client may send while its join waits for the cluster; more are
#: refused with `unavailable` (the client's reader is not held up meanwhile).
PARKED_FRAMES: Final = 64


def needs_cluster(chat: ChatState, client: Client, frame: ChatFrame) -> bool:
    """A join catches up with the cluster first (so its member list and its
    `since` recovery include everything published before it), a first
    join asks for its name (`Backplane.claim`), and a join or `history` of a
    room whose history is not in memory reads it first (`ChatState.to_load`)."""
    return (
        isinstance(frame, Join)
        or chat.needs_claim(client, frame) is not None
        or chat.to_load(client, frame) is not None
    )


class JoinResolver:
    """Applies client frames; parks those that need the cluster and resolves them beside the hub.

    Called by the dispatcher only; nothing but `ask_cluster` awaits.
    """

    def __init__(
        self,
        config: Config,
        backplane: Backplane,
        inbound: InboundSend,
        log_fields: Mapping[Client, Mapping[str, object]],
    ) -> None:
        self._config = config
        self._backplane = backplane
        self._inbound = inbound
        #: Each connection's log fields (`Hub.connect`): the lines about a bug
        #: are logged in the dispatcher's task, with the connection's fields.
        self._log_fields = log_fields
        #: Clients whose join waits for the cluster (`park`), and their frames
        #: that came after it, in order.
        self.parked: dict[Client, list[ClientItem]] = {}
        #: Clients of this step whose frames wait for the publish (`release_held`).
        self.held: list[Client] = []
        #: Where `_resolve` tasks run (`start`).
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Run the `_resolve` and release tasks in ``nursery`` (the hub's)."""
        self._nursery = nursery

    def wait_behind(
        self, chat: ChatState, client: Client, parked: list[ClientItem], frame: ClientItem
    ) -> None:
        """``client`` has a parked join: ``frame`` waits behind it, if there is room."""
        if len(parked) < PARKED_FRAMES:
            parked.append(frame)
        elif not isinstance(frame, ClientProtocolError):
            chat.refuse(client, ErrorCode.UNAVAILABLE, WAITING, frame.ref)

    def park(self, chat: ChatState, client: Client, frame: ChatFrame) -> None:
        """Ask the cluster (and the store, for a room's history) beside the hub;
        ``client``'s later frames wait behind ``frame``."""
        self.parked[client] = []
        room = chat.to_load(client, frame)
        if room is not None:
            chat.begin_load(room)
        assert self._nursery is not None
        self._nursery.start_soon(self._resolve, chat, client, frame, room)

    def resolved(self, chat: ChatState, item: Resolved, now: float, wall_ms: int) -> None:
        """Apply a parked frame with the cluster's answer, then what waited behind it."""
        # Its answer (`joined`) is written once the cluster has seen the join:
        # a client told "joined" can be reached from every node.
        client = item.client
        client.peer.hold()
        if item.loaded is not None and not self._loaded(chat, item):
            ref = getattr(item.frame, "ref", None)
            chat.refuse(client, ErrorCode.UNAVAILABLE, UNREADABLE, ref)
        else:
            self.apply_frame(chat, client, item.frame, now, wall_ms, item.claimed)
        self._unpark(chat, client, now, wall_ms)
        self.held.append(client)

    def _loaded(self, chat: ChatState, item: Resolved) -> bool:
        """Hand the room history read for ``item`` to the chat; whether it was read."""
        assert item.loaded is not None
        room, stored = item.loaded
        chat.end_load(room, stored)
        if stored is None and item.claimed is not None:
            self._release_unused(item.client, item.claimed[0])
        return stored is not None

    def _unpark(self, chat: ChatState, client: Client, now: float, wall_ms: int) -> None:
        """Apply the frames that waited behind a resolved one, until one needs the cluster."""
        waiting = self.parked.pop(client, [])
        for index, frame in enumerate(waiting):
            if not isinstance(frame, ClientProtocolError) and needs_cluster(chat, client, frame):
                self.park(chat, client, frame)
                self.parked[client].extend(waiting[index + 1 :])
                return
            self.apply_frame(chat, client, frame, now, wall_ms, None)

    def release_held(self) -> None:
        """End of a step: write the held clients' frames once what it published is out."""
        if self.held:
            held, self.held = self.held, []
            assert self._nursery is not None
            self._nursery.start_soon(self._release_when_published, held)

    async def _release_when_published(self, held: list[Client]) -> None:
        """Write the held clients' frames once what was published so far is out."""
        try:
            with trio.move_on_after(self._config.backplane_timeout):
                await self._backplane.flush()
        finally:
            for client in held:
                client.peer.release()

    async def _resolve(
        self, chat: ChatState, client: Client, frame: ChatFrame, room: str | None
    ) -> None:
        """A parked frame's cluster requests (and the read of ``room``'s history),
        beside the hub; the answer goes back inbound."""
        claimed = await self.ask_cluster(chat, client, frame)
        loaded: tuple[str, list[Message] | None] | None = None
        if room is not None:
            try:
                loaded = room, await self._backplane.recent(room)
            except StorageError as exc:
                LOGGER.info("cannot read the history of %s: %s", room, exc)
                loaded = room, None
        with contextlib.suppress(trio.ClosedResourceError):  # the hub is stopping
            await self._inbound.send(Resolved(client, frame, claimed, loaded))

    async def ask_cluster(
        self, chat: ChatState, client: Client, frame: ChatFrame
    ) -> tuple[str, Claim] | None:
        """Catch up (for a join), then claim the name ``frame`` binds, if any."""
        backplane = self._backplane
        if isinstance(frame, Join):
            if backplane.immediate:
                await backplane.catch_up()  # never waits: no cancel scope per join
            else:
                with trio.move_on_after(self._config.backplane_timeout):
                    await backplane.catch_up()
        name = chat.needs_claim(client, frame)
        if name is None:
            return None
        token = frame.token if isinstance(frame, Join) else None
        rotate = isinstance(frame, Join) and frame.rotate
        share = client.identity is not None
        if client.identity is not None:
            # Every node claims an authenticated user's name with the same
            # token: one more connection shares it (docs/protocol.md §15).
            token, rotate = claim_token(client.identity.sub), False
        try:
            return name, await backplane.claim(name, token, rotate=rotate, share=share)
        except StorageError:
            return name, Claim("unavailable")

    def apply_frame(
        self,
        chat: ChatState,
        client: Client,
        frame: ClientItem,
        now: float,
        wall_ms: int,
        claimed: tuple[str, Claim] | None,
    ) -> None:
        """Apply one frame of ``client`` (``claimed``: the answer of its name's claim)."""
        claim = claimed[1] if claimed is not None else None
        try:
            if isinstance(frame, ClientProtocolError):
                chat.refuse(
                    client, frame.code, frame.message, frame.ref, classic=frame.classic, now=now
                )
            elif claim is not None and claim.status == "unavailable":
                chat.refuse(
                    client, ErrorCode.UNAVAILABLE, "the chat is unavailable: try again", frame.ref
                )
            else:
                chat.handle(client, frame, now, wall_ms, claim)
                if claimed is not None and claimed[1].status != "taken":
                    self._release_unused(client, claimed[0])
        except Exception:
            # A bug triggered by one client's frame must not take the hub (and
            # every other connection) down: answer `internal`, close with 1011.
            # In the dispatcher's task: the connection's fields are restored.
            room = (
                CLASSIC_ROOM if isinstance(frame, ClassicFrame) else getattr(frame, "room", None)
            )
            with log_context(**self._log_fields.get(client, {})):
                LOGGER.exception(
                    "bug while handling a frame; closing its connection with 1011",
                    extra=chat_fields(client, room),
                )
            chat.refuse(client, ErrorCode.INTERNAL, "internal error", getattr(frame, "ref", None))
            client.peer.close_soon(CloseCode.INTERNAL_ERROR, "internal error")

    def _release_unused(self, client: Client, name: str) -> None:
        """A claimed name the frame did not end up binding goes back."""
        if not client.holds(name):  # (by key: a takeover may bind another form of it)
            self._backplane.release(name)
