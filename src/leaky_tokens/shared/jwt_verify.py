"""Verifying our RS256 JWTs against public keys (JWKS), shared by every service."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import jwt

from leaky_tokens.shared.errors import ExpiredToken, InvalidToken
from leaky_tokens.shared.principal import Principal

ALGORITHM = "RS256"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "jti", "iss"]


def unverified_kid(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidToken("malformed bearer token") from exc
    kid = header.get("kid")
    if header.get("alg") != ALGORITHM or not isinstance(kid, str) or not kid:
        raise InvalidToken("bearer token must be RS256 with a kid")
    return kid


def decode_token(token: str, public_key: Any, issuer: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=[ALGORITHM],
            issuer=issuer,
            options={"require": REQUIRED_CLAIMS},
            leeway=5,
        )
    except jwt.ExpiredSignatureError as exc:
        raise ExpiredToken() from exc
    except jwt.PyJWTError as exc:
        raise InvalidToken() from exc
    return claims


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    try:
        user_id = uuid.UUID(str(claims["sub"]))
        roles = frozenset(str(r) for r in claims.get("roles", []))
        orgs = frozenset(uuid.UUID(str(o)) for o in claims.get("orgs", []))
    except (ValueError, TypeError) as exc:
        raise InvalidToken("bearer token has malformed claims") from exc
    username = claims.get("username")
    issued_seq = claims.get("fseq")
    return Principal(
        user_id=user_id,
        roles=roles,
        org_ids=orgs,
        method="jwt",
        username=str(username) if username is not None else None,
        issued_seq=issued_seq if isinstance(issued_seq, int) else None,
    )


def public_key_from_jwk(jwk: Mapping[str, Any]) -> Any:
    return jwt.PyJWK.from_dict(dict(jwk), algorithm=ALGORITHM).key
