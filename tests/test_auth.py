"""Connection tokens (#14 §1, docs/protocol.md §15): `TokenVerifier` with every key
kind, and the hostile tokens of #14's bars: forged, expired, wrong audience or
issuer, ``alg: none``, the wrong key, key confusion, oversized."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from triochat.auth import MAX_TOKEN_BYTES, Identity, TokenError, TokenVerifier
from triochat.errors import ConfigError

SECRET = "s3cret-for-tests-only-0123456789abcdef"
NOW = time.time()


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "u1", "exp": int(NOW) + 600, **extra}


def hs(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs_by_hand(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made without PyJWT's guard against asymmetric keys as secrets."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET)


def test_hs256_token_gives_the_identity(verifier: TokenVerifier) -> None:
    identity = verifier.verify(hs(claims(name=" Alice ", rooms=["lobby", "team-*"])), now=NOW)
    assert identity == Identity(
        sub="u1", name="Alice", exp=int(NOW) + 600, rooms=("lobby", "team-*")
    )
    assert [identity.may_use(room) for room in ("lobby", "team-a", "other", "team")] == [
        True,
        True,
        False,
        False,
    ]


def test_name_defaults_to_sub_and_rooms_to_every_room(verifier: TokenVerifier) -> None:
    identity = verifier.verify(hs(claims()), now=NOW)
    assert (identity.name, identity.rooms, identity.may_use("anything")) == ("u1", None, True)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (hs(claims(), secret="another-secret-another-secret-xx"), "Signature"),  # forged
        (hs(claims(exp=int(NOW) - 1)), "expired"),
        (hs({"sub": "u1"}), "MissingRequiredClaim"),  # no exp
        (hs({"exp": int(NOW) + 600}), "MissingRequiredClaim"),  # no sub
        (hs(claims(sub="x" * 65)), "sub"),
        (hs(claims(sub=7)), "Invalid"),  # PyJWT wants a string sub
        (hs(claims(name="\u200balice")), "name"),  # an invisible character (§2.1)
        (hs(claims(name="server")), "name"),  # a reserved name
        (hs(claims(rooms="lobby")), "rooms"),
        (hs(claims(rooms=["Bad Room"])), "rooms"),
        (hs(claims(nbf=int(NOW) + 300)), "ImmatureSignature"),
        ("not.a.jwt", "JWT"),
        ("", "JWT"),
    ],
)
def test_bad_tokens_are_refused(verifier: TokenVerifier, token: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        verifier.verify(token, now=NOW)


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    header = json.dumps({"alg": "none", "typ": "JWT"}).encode()
    unsigned = f"{b64(header)}.{b64(json.dumps(claims()).encode())}."
    with pytest.raises(TokenError):
        verifier.verify(unsigned, now=NOW)


def test_oversized_token_is_refused_unread(verifier: TokenVerifier) -> None:
    token = hs(claims(padding="x" * MAX_TOKEN_BYTES))
    with pytest.raises(TokenError, match="too long"):
        verifier.verify(token, now=NOW)


def test_expiry_is_judged_by_the_callers_clock(verifier: TokenVerifier) -> None:
    token = hs(claims(exp=int(NOW) + 10))
    assert verifier.verify(token, now=NOW).exp == int(NOW) + 10
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token, now=NOW + 10)


def test_audience_and_issuer_when_configured() -> None:
    strict = TokenVerifier(secret=SECRET, audience="chat", issuer="https://id.example")
    good = hs(claims(aud="chat", iss="https://id.example"))
    assert strict.verify(good, now=NOW).sub == "u1"
    for bad in (
        hs(claims(aud="other", iss="https://id.example")),
        hs(claims(iss="https://id.example")),  # no aud at all
        hs(claims(aud="chat", iss="https://evil.example")),
        hs(claims(aud="chat")),
    ):
        with pytest.raises(TokenError):
            strict.verify(bad, now=NOW)


@pytest.mark.parametrize(
    ("make_key", "algorithm"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    ],
)
def test_public_key_pem_each_kind(tmp_path: Path, make_key: Any, algorithm: str) -> None:
    private = make_key()
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem(private))
    verifier = TokenVerifier(public_key=pem)
    assert verifier.verify(jwt.encode(claims(), private, algorithm=algorithm), now=NOW).sub == "u1"
    # The wrong key: a token signed by another key of the same kind.
    other = make_key()
    with pytest.raises(TokenError):
        verifier.verify(jwt.encode(claims(), other, algorithm=algorithm), now=NOW)
    # Key confusion: HS256 "signed" with the public key's PEM as the secret.
    forged = hs_by_hand(claims(), pem.read_bytes())  # (PyJWT itself refuses to make one)
    with pytest.raises(TokenError):
        verifier.verify(forged, now=NOW)


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    one = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    two = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, private in (("one", one), ("two", two)):
        jwk = json.loads(
            jwt.algorithms.get_default_algorithms()["RS256" if kid == "one" else "ES256"].to_jwk(
                private.public_key()
            )
        )
        keys.append({**jwk, "kid": kid})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    verifier = TokenVerifier(public_key=path)
    assert verifier.verify(
        jwt.encode(claims(), one, algorithm="RS256", headers={"kid": "one"}), now=NOW
    )
    assert verifier.verify(
        jwt.encode(claims(), two, algorithm="ES256", headers={"kid": "two"}), now=NOW
    )
    for token in (
        jwt.encode(claims(), one, algorithm="RS256", headers={"kid": "two"}),  # the wrong kid
        jwt.encode(claims(), one, algorithm="RS256", headers={"kid": "three"}),  # no such kid
        jwt.encode(claims(), one, algorithm="RS256"),  # no kid, several keys
    ):
        with pytest.raises(TokenError):
            verifier.verify(token, now=NOW)


@pytest.mark.parametrize("content", [b"", b"not a key", b'{"keys": [{"kty": "nope"}]}'])
def test_unusable_key_files_are_config_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        TokenVerifier(public_key=path)


def test_exactly_one_key() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier()
    with pytest.raises(ConfigError):
        TokenVerifier(secret=SECRET, public_key=Path("/nonexistent"))
    with pytest.raises(ConfigError):
        TokenVerifier(public_key=Path("/nonexistent"))
