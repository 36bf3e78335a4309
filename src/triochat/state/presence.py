"""Presence: who holds which name, with which token, and for how long.

A user holds its name while connected and for the grace period after
(docs/protocol.md §6), and keeps its rooms meanwhile: a takeover with the
token (a reload, a reconnect) carries on with no presence change. Names are
held by key, and no two users hold look-alike names (§2.1). Held rooms wait
on a heap of deadlines; `expire` ends them. An explicit leave settles the
same way, for a shorter time (`LEAVE_SETTLE`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
from typing import Final

from ..events import Claim, Entry, Kick
from ..identity import TokenCheck
from ..protocol import (
    ClassicFrame,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Join,
    confusable_key,
    is_valid_room,
    name_key,
    normalize_name,
)
from .model import Client, Refused, User
from .output import OutputBuffer
from .rooms import Rooms

__all__ = ["LEAVE_SETTLE", "Presence"]

#: Seconds a `leave` waits before the others are told (docs/protocol.md §6):
#: a join of the same room within it shows them nothing, so leave/join churn
#: cannot flood a room with presence frames.
LEAVE_SETTLE: Final = 2.0

#: Seconds: a hold ends on the next multiple of this (as late as the wait
#: of a presence frame, docs/protocol.md §6), so the holds that end close
#: together end in one step of the hub, not one step each (#16: churn).
DEADLINE_GRID: Final = 0.05


class Presence:
    """Every user this node holds, and when their held rooms are let go."""

    __slots__ = ("_deadlines", "_grace", "_output", "_rooms", "_skeletons", "_tiebreak", "users")

    def __init__(self, rooms: Rooms, output: OutputBuffer, *, presence_grace: float) -> None:
        self._rooms = rooms
        self._output = output
        self._grace = presence_grace
        #: Every user this node holds, by `name_key` (docs/protocol.md §2.1).
        self.users: dict[str, User] = {}
        #: The same users by `confusable_key`: a look-alike is `name_taken` too.
        self._skeletons: dict[str, User] = {}
        self._deadlines: list[tuple[float, int, User]] = []
        self._tiebreak = itertools.count()

    # --- names ---------------------------------------------------------------------

    def needs_claim(self, client: Client, frame: ClientFrame | TokenCheck) -> str | None:
        """The name ``frame`` would take that only the cluster can grant, if any
        (see `ChatState.needs_claim`)."""
        if client.gone or client.user is not None:
            return None
        identity = client.identity
        if isinstance(frame, Join):
            if not is_valid_room(frame.room):
                return None
            requested = frame.name if identity is None else identity.name
            if requested is None:
                return None
        elif isinstance(frame, ClassicFrame) and identity is None:
            requested = frame.name
        else:
            return None
        name = normalize_name(requested)
        if name is None:
            return None
        user = self.users.get(name_key(name))
        if user is not None:
            if identity is not None:
                return None  # the same user's connection, or name_taken: decided here
            # A takeover of a user here that rotates its token: the cluster
            # records the new one (§6). Without `rotate` this node decides.
            if not (isinstance(frame, Join) and frame.rotate and frame.token is not None):
                return None
            if not secrets.compare_digest(frame.token, user.token):
                return None  # taken: refused without asking
            return name
        if confusable_key(name) in self._skeletons:
            return None  # a look-alike of a user here: refused without asking
        return name

    def bind(
        self,
        client: Client,
        name: str,
        token: str | None,
        now: float,
        claim: Claim | None,
        *,
        rotate: bool = False,
    ) -> User:
        """The user ``client`` speaks as, taking the name over with its token.

        An authenticated connection (``client.identity``) joins the user of
        its ``sub`` as one more connection (docs/protocol.md §15); it never
        takes over and is never refused by that user.

        Raises:
            Refused: the name (or a look-alike) is taken, and no token matched.
        """
        if client.user is not None:
            return client.user
        sub = client.identity.sub if client.identity is not None else None
        # Names are held by key (docs/protocol.md §2.1): "ALICE" and "\u0430lice"
        # (Cyrillic a) are "alice"; a look-alike of another user's name is taken too.
        user = self.users.get(name_key(name))
        if user is None:
            if claim is not None and claim.status == "taken":
                raise Refused(ErrorCode.NAME_TAKEN, f"{name} is taken")
            if claim is not None and claim.status in ("takeover", "shared") and claim.name:
                name = claim.name  # held on another node: the name as first bound
            if confusable_key(name) in self._skeletons:
                raise Refused(ErrorCode.NAME_TAKEN, f"{name} is taken (too like another name)")
            user = User(name, client, claim.token if claim else None, sub)
            self.users[user.key] = user
            self._skeletons[user.skeleton] = user
            output = self._output
            output.changed(add=("", name))
            if (
                claim is not None
                and claim.status == "takeover"
                and claim.previous
                and claim.previous != output.node
            ):
                # The name was held on another node: it closes that connection
                # and hands the user's rooms over (`apply` of Kick/Handover).
                output.publish(Kick(claim.previous, name, output.node))
        elif sub is not None or user.sub is not None:
            if sub != user.sub:
                raise Refused(ErrorCode.NAME_TAKEN, f"{name} is taken")
            self._add_connection(user, client)
        elif (
            token is None
            or not secrets.compare_digest(token, user.token)
            or (claim is not None and claim.status == "taken")
        ):
            raise Refused(ErrorCode.NAME_TAKEN, f"{name} is taken")
        else:
            self._take_over(user, client, now)  # keeps the name as first bound
            if rotate:
                # A new token (docs/protocol.md §6): the one used stops working, so
                # a leaked copy of it takes the name over no more.
                user.token = claim.token if claim is not None else secrets.token_urlsafe(24)
        client.name = user.name
        client.user = user
        return user

    def _add_connection(self, user: User, client: Client) -> None:
        """One more connection of an authenticated user: the same member."""
        was_connected = bool(user.clients)
        user.clients[client] = None
        if not was_connected:
            self._output.changed(add=("", user.name))

    def forget(self, user: User) -> None:
        """``user`` no longer holds its name here (never awaits)."""
        del self.users[user.key]
        if self._skeletons.get(user.skeleton) is user:
            del self._skeletons[user.skeleton]

    def _take_over(self, user: User, client: Client, now: float) -> None:
        old = list(user.clients)
        user.clients = {client: None}
        if not old:
            self._output.changed(add=("", user.name))
            return
        # The old connection's memberships are held for the grace period, as on
        # a disconnect; the new connection takes them back by joining again.
        for previous in old:
            self.replaced(previous)
        if user.rooms:
            self.hold(user, now)

    def replaced(self, old: Client) -> None:
        """Close ``old``: its user is another connection's now (here or elsewhere)."""
        old.peer.close_soon(CloseCode.REPLACED, "replaced by a newer connection")
        self._rooms.drop(old)
        old.user = None

    def connection_lost(self, client: Client, now: float) -> None:
        """``client`` (already dropped from its rooms) is gone: hold its user's rooms."""
        user = client.user
        if user is None or client not in user.clients:
            return
        del user.clients[client]
        if not user.clients:
            self._output.changed(remove=("", user.name))
        # Rooms only this connection had end after the grace period too.
        self.hold(user, now)

    def disconnect(self, user: str) -> None:
        """Close every connection of ``user`` here with 4009 (docs/protocol.md
        §16): an authenticated user by its ``sub``, an anonymous one by name.
        Its rooms are then held for the grace period, as after any close."""
        typed = normalize_name(user)
        key = name_key(typed) if typed is not None else None
        for held in list(self.users.values()):
            if held.sub == user or (held.sub is None and held.key == key):
                for client in list(held.clients):
                    client.peer.close_soon(CloseCode.DISCONNECTED, "disconnected by an operator")

    # --- held rooms -------------------------------------------------------------------

    def hold(self, user: User, now: float, delay: float | None = None) -> None:
        """Keep the memberships ``user``'s connection no longer has until ``delay``
        (default: the presence grace) has passed, to the next `DEADLINE_GRID`
        (no delay: now); `expire` then ends them."""
        wait = self._grace if delay is None else delay
        # (No wait, with ``--presence-grace 0``: it ends in this very step.)
        deadline = math.ceil((now + wait) / DEADLINE_GRID) * DEADLINE_GRID if wait else now
        if delay is not None:
            # A shorter wait (a leave) never cuts short a grace already running.
            deadline = max(deadline, user.deadline or 0.0)
            if deadline == user.deadline:
                return
        user.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), user))

    def settle_leave(self, user: User, now: float) -> None:
        """A left room stays a membership for the others until the leave settles
        (a join again within it shows them nothing); `expire` ends it then."""
        self.hold(user, now, min(LEAVE_SETTLE, self._grace))

    def next_deadline(self) -> float:
        """When `expire` must next run (``inf`` when nothing is held).

        Deadlines a later hold superseded (a leave's settle, then the close's
        grace) are dropped first: the hub would wake for them for nothing,
        once per connection of a churn (#16)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].deadline != deadlines[0][0]:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else float("inf")

    def expire(self, now: float) -> None:
        """Release every membership whose grace period (or leave) has ended; a user
        with no connection then lets its name go."""
        deadlines = self._deadlines
        rooms = self._rooms
        while deadlines and deadlines[0][0] <= now:
            deadline, _, user = heapq.heappop(deadlines)
            if user.deadline != deadline:
                continue  # superseded by a later disconnect
            user.deadline = None
            for room_name in sorted(user.rooms - user.live_rooms()):
                rooms.remove_member(user, rooms.rooms[room_name])
            if not user.clients and self.users.get(user.key) is user:
                self.forget(user)
                self._output.release(user.name)

    # --- for the backplane --------------------------------------------------------------

    def own_entries(self) -> list[Entry]:
        """This node's entries, for the backplane to rewrite after an outage."""
        entries: list[Entry] = []
        for user in self.users.values():
            if user.clients:
                entries.append(("", user.name))
            entries.extend((room, user.name) for room in sorted(user.rooms))
        return entries

    def own_users(self) -> list[tuple[str, str]]:
        """(name, token) of every user this node holds."""
        return [(user.name, user.token) for user in self.users.values()]
