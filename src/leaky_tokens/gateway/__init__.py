"""API gateway: routing, edge authentication, per-principal rate limits, circuit breakers."""
