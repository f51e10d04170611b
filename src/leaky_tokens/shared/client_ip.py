"""The caller's address: the peer, or the client a trusted proxy says it forwarded for.

One setting (`trusted_proxies`, CIDRs) says whose X-Forwarded-For is believed, for the gateway
and the auth service's login throttle alike. Of the X-Forwarded-For hops, the nearest one that is
not itself a trusted proxy is the client: hops further left are whatever the client wrote.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from starlette.requests import Request

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def trusts(self, address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self._networks)

    def client_of(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The client's address, given the peer and the X-Forwarded-For header values."""
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        client = peer
        for hop in reversed(hops):
            address = address_of(hop)
            if address is None:
                break
            client = address
            if not self.trusts(address):
                break
        return client

    def client_ip(self, request: Request) -> str:
        peer = request.client.host if request.client else "unknown"
        return self.client_of(peer, request.headers.getlist("x-forwarded-for"))


def address_of(hop: str) -> str | None:
    """An IP from an X-Forwarded-For hop ("1.2.3.4", "1.2.3.4:5678", "[::1]:80", "::1")."""
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None
