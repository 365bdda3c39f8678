"""Which webhook URLs the service may call: https only, and never an address inside the network.

The address rule is a pure function of the resolved addresses (`check_addresses`), applied at
registration and again before every delivery; the sender then connects to exactly the addresses that
passed, so a DNS answer that changes in between (rebinding) cannot steer a delivery inside.
Hosts listed in `MUST_WEBHOOK_ALLOWED_HOSTS` are exempt from both rules (local receivers in tests).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookUrlError(Exception):
    """A URL the service will not call; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_allowed(message: str) -> WebhookUrlError:
    return WebhookUrlError("webhook_url_not_allowed", message)


@dataclass(frozen=True)
class WebhookUrl:
    """A parsed URL: what the sender needs to reach it without resolving the name again."""

    url: str
    scheme: str
    host: str
    port: int
    exempt: bool


@dataclass(frozen=True)
class Target:
    """A URL with the addresses that passed the check; the sender connects only to these."""

    url: WebhookUrl
    addresses: tuple[IPAddress, ...]


def parse_url(url: str, allowed_hosts: Sequence[str]) -> WebhookUrl:
    """Check the URL's form and scheme (no network)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError("invalid_webhook_url", f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError("invalid_webhook_url", f"not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise not_allowed(f"the scheme {scheme or '(none)'!r} is not allowed; use https")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookUrlError("invalid_webhook_url", "the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise not_allowed("credentials in the URL are not allowed; authenticate with the signature")
    exempt = host in allowed_hosts
    if scheme != "https" and not exempt:
        raise not_allowed("only https URLs are allowed")
    return WebhookUrl(url.strip(), scheme, host, port or (443 if scheme == "https" else 80), exempt)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one tunnels to (mapped, 6to4, NAT64): it is checked instead."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def forbidden_reason(address: IPAddress) -> str | None:
    """Why a delivery must not go to `address` (None when it is a public unicast address)."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            reason = forbidden_reason(inner)
            return f"{reason} (inside {address})" if reason else None
    if address.is_loopback:
        return f"{address} is a loopback address"
    if address.is_link_local:
        return f"{address} is link-local (cloud metadata lives there)"
    if address.is_unspecified:
        return f"{address} is unspecified"
    if address.is_multicast:
        return f"{address} is multicast"
    if address.is_private:
        return f"{address} is a private address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def check_addresses(host: str, addresses: Sequence[IPAddress]) -> tuple[IPAddress, ...]:
    """All of a host's addresses must be public: one bad answer refuses the host."""
    if not addresses:
        raise WebhookUrlError("webhook_url_unresolvable", f"{host} has no address")
    for address in addresses:
        reason = forbidden_reason(address)
        if reason is not None:
            raise not_allowed(f"{host} resolves to {reason}")
    return tuple(addresses)


def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses from the system resolver (a literal address is returned as is)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlError("webhook_url_unresolvable", f"cannot resolve {host}: {exc}") from exc
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def validate_url(url: str, allowed_hosts: Sequence[str]) -> Target:
    """Parse, resolve and check a URL; raises WebhookUrlError before any connection is made."""
    parsed = parse_url(url, allowed_hosts)
    addresses = resolve(parsed.host, parsed.port)
    if parsed.exempt:
        if not addresses:
            raise WebhookUrlError("webhook_url_unresolvable", f"{parsed.host} has no address")
        return Target(parsed, tuple(addresses))
    return Target(parsed, check_addresses(parsed.host, addresses))
