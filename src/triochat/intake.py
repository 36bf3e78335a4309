"""`Intake`: a connection's messages on their way to the hub, in its own task.

Rules:

1. Everything here runs in the connection's task (`Hub.receive` is
   `Intake.receive`): the frame is decoded there, its token checked and the
   embedding hooks run there (`hooks`), so a signature check (RSA, EdDSA) or
   a slow hook holds up only the client that sent the frame, never the chat.
2. The result goes to the dispatcher through the hub's bounded inbound
   channel, in order, waiting while it is full: a flooding client slows only
   its own reader. What could not be decoded goes too, as its
   `ClientProtocolError`, so its answer keeps its place among the client's
   frames.
3. A binary message closes the connection with 1003 (docs/protocol.md §2);
   nothing reaches the hub.
"""

from __future__ import annotations

import logging
import time
from typing import Final, cast

import msgspec

from .auth import TokenError, TokenVerifier
from .budgets import AddressBudgets
from .chat import Client
from .clientlog import chat_fields
from .config import Config
from .errors import ClientProtocolError
from .hooks import Authenticator, Refusal, SayHook, SayInfo
from .identity import Identity, TokenCheck
from .inbound import ClientItem, InboundSend
from .protocol import (
    Auth,
    ClassicFrame,
    CloseCode,
    ErrorCode,
    Say,
    decode_client_frame,
    msg_problem,
    normalize_name,
)
from .state.model import CLASSIC_ROOM

__all__ = ["Intake"]

# The hub's logger: operators know these lines by it (docs/operations.md).
LOGGER: Final = logging.getLogger("triochat.hub")


class Intake:
    """Decodes a connection's messages, checks tokens, runs hooks, posts the frames."""

    __slots__ = ("_addresses", "_authenticate", "_config", "_inbound", "_on_say", "_verifier")

    def __init__(
        self,
        config: Config,
        inbound: InboundSend,
        addresses: AddressBudgets,
        *,
        authenticate: Authenticator | None,
        on_say: SayHook | None,
    ) -> None:
        self._config = config
        self._inbound = inbound
        #: Where the authenticator learns a connection's address.
        self._addresses = addresses
        #: The host program's authenticator (`hooks`): it decides instead of a key.
        self._authenticate = authenticate
        #: The host program's say hook (`hooks`); None: says go in as sent.
        self._on_say = on_say
        #: Checks connection tokens (docs/protocol.md §15); None: tokens are off
        #: or an authenticator decides.
        self._verifier = (
            TokenVerifier(
                secret=config.jwt_secret,
                public_key=config.jwt_public_key,
                audience=config.jwt_audience,
                issuer=config.jwt_issuer,
            )
            if config.authenticating and authenticate is None
            else None
        )

    async def receive(self, client: object, message: str | bytes) -> None:
        """One message of a connection (``client``: what `Hub.connect` gave it).

        Runs in the connection's task: the frame is decoded there, then queued
        for the hub, waiting while the queue is full (a flooding client slows
        only its own reader). A binary message closes the connection with 1003
        (docs/protocol.md section 2).
        """
        chat_client = cast("Client", client)
        if isinstance(message, bytes):
            chat_client.peer.close_soon(
                CloseCode.UNSUPPORTED_DATA, "binary frames are not accepted"
            )
            return
        item: ClientItem
        try:
            item = decode_client_frame(message, max_msg_chars=self._config.max_msg_chars)
        except ClientProtocolError as exc:
            item = exc
        # Tokens and hooks run here, in the connection's task: a signature
        # check (RSA, EdDSA) or a slow hook holds up only this client.
        if isinstance(item, Auth):
            if self._authenticate is not None:
                item = await self._run_authenticator(item, chat_client)
            elif self._verifier is not None:
                item = self._check_token(item)
        elif isinstance(item, Say | ClassicFrame) and self._on_say is not None:
            item = await self._run_say_hook(item, chat_client, self._on_say)
        inbound = self._inbound
        if not isinstance(item, Say | ClassicFrame) and inbound.statistics().tasks_waiting_receive:
            # A frame that is not a message, to a dispatcher that waits: handed
            # over without the yield of a `send` (a task switch per join and
            # leave, #16: churn; the connection's next read is its checkpoint).
            # Messages go with the yield: a flood of them reaches the
            # dispatcher one per turn, which keeps its members' outboxes
            # within their bounds (rule 2, tests/test_backlog.py).
            inbound.send_nowait((chat_client, item))
        else:
            await inbound.send((chat_client, item))

    async def _run_authenticator(self, frame: Auth, client: Client) -> TokenCheck:
        assert self._authenticate is not None
        try:
            identity = await self._authenticate(frame.token, self._addresses.address_of(client))
        except Refusal as exc:
            return TokenCheck(None, exc.message, frame.ref)
        except Exception:
            LOGGER.exception(
                "the authenticator failed; the connection is refused", extra=chat_fields(client)
            )
            return TokenCheck(None, "the token could not be checked", frame.ref)
        name = normalize_name(identity.name) if isinstance(identity, Identity) else None
        if name is None:
            LOGGER.error(
                "the authenticator returned %r: not an Identity with a valid name",
                identity,
                extra=chat_fields(client),
            )
            return TokenCheck(None, "the token could not be checked", frame.ref)
        return TokenCheck(msgspec.structs.replace(identity, name=name), "", frame.ref)

    async def _run_say_hook(
        self, frame: Say | ClassicFrame, client: Client, on_say: SayHook
    ) -> ClientItem:
        if isinstance(frame, Say):
            if client.user is None or frame.room not in client.rooms:
                return frame  # not joined: the hub answers it (not_joined)
            name, room = client.user.name, frame.room
        else:
            name, room = frame.name, CLASSIC_ROOM
        user = client.identity.sub if client.identity is not None else None
        try:
            text = await on_say(SayInfo(room=room, msg=frame.msg, name=name, user=user))
        except Refusal as exc:
            return ClientProtocolError(
                exc.code, exc.message, frame.ref, classic=isinstance(frame, ClassicFrame)
            )
        except Exception:
            LOGGER.exception(
                "the say hook failed; the message is not stored", extra=chat_fields(client, room)
            )
            return ClientProtocolError(
                ErrorCode.INTERNAL, "the message could not be checked", frame.ref
            )
        if not isinstance(text, str) or msg_problem(text, self._config.max_msg_chars):
            LOGGER.error(
                "the say hook returned %r: not a text within the limits",
                text,
                extra=chat_fields(client, room),
            )
            return ClientProtocolError(
                ErrorCode.INTERNAL, "the message could not be checked", frame.ref
            )
        return msgspec.structs.replace(frame, msg=text)

    def _check_token(self, frame: Auth) -> TokenCheck:
        assert self._verifier is not None
        try:
            identity = self._verifier.verify(frame.token, now=time.time())
        except TokenError as exc:
            return TokenCheck(None, str(exc), frame.ref)
        return TokenCheck(identity, "", frame.ref)
