"""The URL rules as pure functions: nothing here resolves a real name or opens a socket."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from app.webhooks import urls
from app.webhooks.urls import WebhookUrlError, check_addresses, forbidden_reason, parse_url, validate_url

FORBIDDEN = [
    "10.0.0.5",
    "172.16.3.4",
    "192.168.1.1",
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "169.254.169.254",  # AWS/GCP/Azure metadata
    "fe80::1",
    "fd00::1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "100.100.100.200",  # Alibaba metadata (shared address space)
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "192.0.2.10",  # documentation range
    "::ffff:10.0.0.5",  # IPv4-mapped
    "::ffff:127.0.0.1",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:a00:5::1",  # 6to4 of 10.0.0.5
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.216.34"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_inside_addresses_are_forbidden(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None
    with pytest.raises(WebhookUrlError) as refused:
        check_addresses("hooks.example.com", [ipaddress.ip_address(address)])
    assert refused.value.code == "webhook_url_not_allowed"


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_one_inside_answer_refuses_the_host() -> None:
    mixed = [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.5")]
    with pytest.raises(WebhookUrlError, match=r"10\.0\.0\.5"):
        check_addresses("hooks.example.com", mixed)
    with pytest.raises(WebhookUrlError) as empty:
        check_addresses("hooks.example.com", [])
    assert empty.value.code == "webhook_url_unresolvable"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", "webhook_url_not_allowed"),
        ("file://127.0.0.1/etc/passwd", "webhook_url_not_allowed"),
        ("ftp://hooks.example.com/x", "webhook_url_not_allowed"),
        ("gopher://hooks.example.com:70/", "webhook_url_not_allowed"),
        ("http://hooks.example.com/x", "webhook_url_not_allowed"),
        ("hooks.example.com/x", "webhook_url_not_allowed"),
        ("https://user:pw@hooks.example.com/x", "webhook_url_not_allowed"),
        ("https:///no-host", "invalid_webhook_url"),
        ("https://hooks.example.com:99999/", "invalid_webhook_url"),
        ("https://hooks.example.com/" + "a" * 2100, "invalid_webhook_url"),
    ],
)
def test_bad_forms_and_schemes(url: str, code: str) -> None:
    with pytest.raises(WebhookUrlError) as refused:
        parse_url(url, allowed_hosts=["127.0.0.1"])
    assert refused.value.code == code


def test_allowed_hosts_are_exempt_from_scheme_and_address_rules() -> None:
    target = validate_url("http://127.0.0.1:8080/hooks", allowed_hosts=["127.0.0.1"])
    assert target.url.exempt and target.addresses == (ipaddress.ip_address("127.0.0.1"),)
    assert target.url.port == 8080
    with pytest.raises(WebhookUrlError) as refused:
        validate_url("http://127.0.0.1:8080/hooks", allowed_hosts=[])
    assert refused.value.code == "webhook_url_not_allowed"
    with pytest.raises(WebhookUrlError) as literal:
        validate_url("https://[::1]:8443/hooks", allowed_hosts=["127.0.0.1"])
    assert literal.value.code == "webhook_url_not_allowed"


@pytest.mark.parametrize("answer", ["10.0.0.5", "169.254.169.254", "fd00::1"])
def test_names_resolving_inside_are_refused(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """The system resolver's answer is what is checked (getaddrinfo stubbed: no DNS query leaves)."""
    family = socket.AF_INET6 if ":" in answer else socket.AF_INET

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        assert host == "hooks.example.com"
        return [(family, socket.SOCK_STREAM, 6, "", (answer, port))]

    monkeypatch.setattr(urls.socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(WebhookUrlError) as refused:
        validate_url("https://hooks.example.com/x", allowed_hosts=[])
    assert refused.value.code == "webhook_url_not_allowed" and answer in refused.value.message


def test_unresolvable_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(*_: object, **__: object) -> list[tuple]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(urls.socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(WebhookUrlError) as refused:
        validate_url("https://nowhere.example.com/x", allowed_hosts=[])
    assert refused.value.code == "webhook_url_unresolvable"
