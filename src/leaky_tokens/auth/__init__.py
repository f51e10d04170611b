"""Auth service: users, roles, organisations, passwords, RS256 JWTs, JWKS and API keys."""
