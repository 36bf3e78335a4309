"""Connection tokens (docs/protocol.md §15): JWTs verified with PyJWT.

Off unless the server has a key: ``--jwt-secret`` (HS256) or
``--jwt-public-key PATH`` (a PEM public key, RS256 / ES256 / EdDSA by its
type, or a JWKS file whose keys are picked by the token's ``kid``). A token
must be signed with the one algorithm its key allows (never ``none``, never
HS256 with a public key as the secret), carry ``exp`` and ``sub``, and,
when configured, the expected ``aud`` and ``iss``. Its ``name`` follows the
rules of names (§2.1) and its ``rooms`` are room names or prefixes ending
in ``*``.

Sans-I/O apart from reading the key file once at start-up: `verify` is a
pure function of the token and the time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import ConfigError, TriochatError
from .identity import Identity
from .protocol import MAX_ROOM_CHARS, is_valid_room, normalize_name

__all__ = ["MAX_TOKEN_BYTES", "Identity", "TokenError", "TokenVerifier"]

#: A longer token is refused unread: a JWT with a few claims is a few hundred bytes.
MAX_TOKEN_BYTES: Final = 8192
MAX_SUB_CHARS: Final = 64
#: The one algorithm each kind of public key allows (RFC 7518, RFC 8037).
_CURVE_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class TokenError(TriochatError):
    """A token that does not authenticate: answered `unauthorized`, then 4003."""


class TokenVerifier:
    """Verifies connection tokens against the server's key (see the module docstring)."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: Path | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        """Raises ConfigError for no key, two keys, or a key file that cannot be used."""
        if (secret is None) == (public_key is None):
            raise ConfigError("give exactly one of jwt_secret and jwt_public_key")
        self._audience = audience
        self._issuer = issuer
        #: kid -> (key, algorithm); the key under "" serves tokens without a kid.
        self._keys: dict[str, tuple[Any, str]] = {}
        if secret is not None:
            if not secret:
                raise ConfigError("jwt_secret must not be empty")
            self._keys[""] = (secret, "HS256")
        else:
            assert public_key is not None
            self._keys = _load_public_keys(public_key)

    def verify(self, token: str, *, now: float) -> Identity:
        """The identity ``token`` proves at ``now`` (Unix seconds).

        Raises:
            TokenError: why it does not (said to the client in general terms).
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenError("not a JWT") from None
        kid = header.get("kid")
        # A key set picks by kid; one key (a secret, a PEM) serves every token.
        entry = self._keys.get(kid) if isinstance(kid, str) else None
        if entry is None:
            entry = self._keys.get("")
        if entry is None:
            raise TokenError("no key for this token")
        key, algorithm = entry
        # `exp` is judged against ``now`` (`_identity`), not PyJWT's own clock.
        options: Any = {
            "require": ["exp", "sub"],
            "verify_aud": self._audience is not None,
            "verify_exp": False,
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options=options,
                leeway=0,
            )
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token: {_reason(exc)}") from None
        return _identity(claims, now)


def _identity(claims: dict[str, Any], now: float) -> Identity:
    exp, sub = claims.get("exp"), claims.get("sub")
    if not isinstance(exp, int) or isinstance(exp, bool) or exp <= now:
        raise TokenError("the token has expired")
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_CHARS:
        raise TokenError(f"`sub` must be a string of 1-{MAX_SUB_CHARS} characters")
    raw_name = claims.get("name", sub)
    name = normalize_name(raw_name) if isinstance(raw_name, str) else None
    if name is None:
        raise TokenError("`name` is not a valid name")
    rooms = claims.get("rooms")
    allowed: tuple[str, ...] | None = None
    if rooms is not None:
        if not isinstance(rooms, list) or not all(_valid_grant(room) for room in rooms):
            raise TokenError("`rooms` must be a list of room names or prefixes ending in *")
        allowed = tuple(rooms)
    return Identity(sub=sub, name=name, exp=exp, rooms=allowed)


def _valid_grant(room: object) -> bool:
    if not isinstance(room, str):
        return False
    if room.endswith("*"):
        prefix = room[:-1]
        return prefix == "" or (len(prefix) < MAX_ROOM_CHARS and is_valid_room(prefix))
    return is_valid_room(room)


def _reason(exc: jwt.InvalidTokenError) -> str:
    """A short reason for the log: PyJWT's class name, not the token's contents."""
    return type(exc).__name__.removesuffix("Error") or "invalid"


def _algorithm_of(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _CURVE_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise ConfigError(f"unsupported elliptic curve {key.curve.name}")
        return algorithm
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    raise ConfigError(f"unsupported public key type {type(key).__name__}")


def _load_public_keys(path: Path) -> dict[str, tuple[Any, str]]:
    """A PEM public key (under "") or a JWKS file (each key under its kid)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the JWT public key {path}: {exc.strerror}") from None
    if raw.lstrip().startswith(b"{"):
        try:
            keys = jwt.PyJWKSet.from_json(raw.decode()).keys
        except (
            jwt.PyJWKSetError,
            jwt.PyJWKError,
            json.JSONDecodeError,
            UnicodeDecodeError,
        ) as exc:
            raise ConfigError(f"{path} is not a usable JWKS file: {exc}") from None
        found: dict[str, tuple[Any, str]] = {}
        for jwk in keys:
            if jwk.key_id is None:
                if len(keys) > 1:
                    raise ConfigError(f"{path}: with several keys, each needs a kid")
                found[""] = (jwk.key, _algorithm_of(jwk.key))
            else:
                found[jwk.key_id] = (jwk.key, _algorithm_of(jwk.key))
        return found
    try:
        key = load_pem_public_key(raw)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    return {"": (key, _algorithm_of(key))}
