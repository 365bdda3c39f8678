"""The sender connects to the address that was checked, never resolving the name again: the name only
travels in the Host header and, over TLS, in the server name (SNI) the certificate is checked against."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.webhooks.sender import post
from app.webhooks.urls import Target, WebhookUrl

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def test_plain_http_goes_to_the_checked_address_with_the_name_in_host(make_receiver) -> None:
    receiver = make_receiver()
    name = "hooks.invalid"  # a name no resolver knows: reaching the receiver proves nothing resolved it
    url = WebhookUrl(f"http://{name}:{receiver.port}/hooks", "http", name, receiver.port, exempt=True)
    outcome = post(Target(url, (LOOPBACK,)), {"webhook-id": "msg_1"}, '{"a":1}', timeout_seconds=2.0)
    assert outcome.delivered and outcome.status_code == 200 and outcome.response_excerpt == "ok"
    (got,) = receiver.received
    assert got.headers["host"] == f"{name}:{receiver.port}" and got.headers["webhook-id"] == "msg_1"
    assert got.body == b'{"a":1}'


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_https_sends_the_name_as_sni_and_verifies_the_certificate(tmp_path: Path) -> None:
    """A TLS server on 127.0.0.1 with a certificate no CA signed: the handshake carries the URL's name
    (not the address) and the sender refuses the untrusted certificate."""
    name = "hooks.example.com"
    cert, key = _self_signed(tmp_path, name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, server_name, _ctx: server_names.append(server_name)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with context.wrap_socket(connection, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client aborts the handshake: expected

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = WebhookUrl(f"https://{name}:{port}/hooks", "https", name, port, exempt=False)
    outcome = post(Target(url, (LOOPBACK,)), {}, "{}", timeout_seconds=3.0)
    thread.join(5)
    listener.close()
    assert server_names == [name]
    assert not outcome.delivered and outcome.error_code == "connection_failed"
    assert "certificate" in (outcome.error_message or "").lower()
