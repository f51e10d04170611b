"""RS256 signing keys (persisted, rotated by kid) and the JWTs the auth service issues."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from leaky_tokens.shared.errors import InvalidToken
from leaky_tokens.shared.jwt_verify import ALGORITHM, decode_token, unverified_kid


def _b64(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class KeyMaterial:
    kid: str
    private_pem: str
    public_jwk: dict[str, str]
    created_at: datetime


ENCRYPTED_PEM = "-----BEGIN ENCRYPTED PRIVATE KEY-----"


class SigningKeyLocked(RuntimeError):
    """The stored signing keys are encrypted and no (or the wrong) passphrase is configured."""


def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    if passphrase:
        return serialization.BestAvailableEncryption(passphrase)
    return serialization.NoEncryption()


def is_encrypted(private_pem: str) -> bool:
    return private_pem.lstrip().startswith(ENCRYPTED_PEM)


def load_private_key(private_pem: str, passphrase: bytes | None) -> RSAPrivateKey:
    """Parse a stored key, encrypted under `passphrase` or plain."""
    password = passphrase if is_encrypted(private_pem) else None
    if is_encrypted(private_pem) and not passphrase:
        raise SigningKeyLocked(
            "the signing keys are stored encrypted: set LEAKY_AUTH__SIGNING_KEY_PASSPHRASE "
            "or LEAKY_AUTH__SIGNING_KEY_PASSPHRASE_FILE"
        )
    try:
        loaded = serialization.load_pem_private_key(private_pem.encode(), password=password)
    except ValueError as exc:
        if password is not None:
            raise SigningKeyLocked(
                "the signing key passphrase does not open the stored keys"
            ) from exc
        raise
    assert isinstance(loaded, RSAPrivateKey)
    return loaded


def reencrypted_pem(private_pem: str, passphrase: bytes | None) -> str:
    """The same key stored under `passphrase` (or plain without one)."""
    key = load_private_key(private_pem, passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase)
    ).decode()


def generate_key_material(now: datetime, passphrase: bytes | None = None) -> KeyMaterial:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = private.public_key().public_numbers()
    e, n = _b64(numbers.e), _b64(numbers.n)
    # RFC 7638 thumbprint: the kid is derived from the key, so it is stable and unique.
    thumbprint = hashlib.sha256(
        json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":")).encode()
    ).digest()
    kid = base64.urlsafe_b64encode(thumbprint).rstrip(b"=").decode()[:32]
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase)
    ).decode()
    jwk = {"kty": "RSA", "use": "sig", "alg": ALGORITHM, "kid": kid, "n": n, "e": e}
    return KeyMaterial(kid=kid, private_pem=pem, public_jwk=jwk, created_at=now)


class KeyRing:
    """The newest key signs; the newest two verify and are published in the JWKS."""

    def __init__(self, issuer: str, ttl_seconds: int, passphrase: bytes | None = None) -> None:
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self._passphrase = passphrase
        self._signing: tuple[str, RSAPrivateKey] | None = None
        self._verifying: dict[str, RSAPublicKey] = {}
        self._published: list[dict[str, str]] = []

    def load(self, newest_first: list[KeyMaterial]) -> None:
        if not newest_first:
            raise RuntimeError("no signing key")
        current = newest_first[0]
        if self._signing is not None and self._signing[0] == current.kid:
            # Reloads run every few seconds; parsing a PEM re-validates the RSA key, which costs
            # ~70 ms of CPU on the event loop, so an unchanged signing key is kept as it is.
            private = self._signing[1]
        else:
            private = load_private_key(current.private_pem, self._passphrase)
        active = newest_first[:2]
        self._signing = (current.kid, private)
        self._verifying = {m.kid: _public_from_jwk(m.public_jwk) for m in active}
        self._published = [dict(m.public_jwk) for m in active]

    @property
    def current_kid(self) -> str:
        assert self._signing is not None
        return self._signing[0]

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._published)}

    def issue(
        self,
        *,
        user_id: uuid.UUID,
        username: str,
        roles: list[str],
        org_ids: list[uuid.UUID],
        now: datetime,
        feed_seq: int = 0,
    ) -> str:
        assert self._signing is not None, "key ring not loaded"
        kid, key = self._signing
        claims = {
            "sub": str(user_id),
            "username": username,
            "roles": roles,
            "orgs": [str(o) for o in org_ids],
            "iss": self.issuer,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=self.ttl_seconds)).timestamp()),
            "jti": uuid.uuid4().hex,
            # The principal-change feed's cursor when the claims above were read: a later
            # change about this user or these orgs makes the token stale everywhere.
            "fseq": feed_seq,
        }
        return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})

    def verify(self, token: str) -> dict[str, Any]:
        key = self._verifying.get(unverified_kid(token))
        if key is None:
            raise InvalidToken("bearer token signed by an unknown key")
        return decode_token(token, key, self.issuer)


def _public_from_jwk(jwk: dict[str, str]) -> RSAPublicKey:
    key = jwt.PyJWK.from_dict(dict(jwk), algorithm=ALGORITHM).key
    assert isinstance(key, RSAPublicKey)
    return key
