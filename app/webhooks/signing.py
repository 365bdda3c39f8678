"""Signing secrets: generated here, encrypted at rest, decrypted only to sign a delivery.

A secret cannot be stored as a hash (unlike API keys): every delivery must be signed with it. It is
encrypted with a server key (Fernet: AES-128-CBC + HMAC-SHA256), so a database dump alone does not
reveal it; whoever holds both the database and the key can sign as the service. The key comes from
`MUST_WEBHOOK_SECRET_KEY` (several, comma-separated, to rotate it: the first encrypts, all decrypt) or,
when unset, from a key file generated under the data directory (embedded mode).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.settings import Settings

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
KEY_FILE = "webhook-secret.key"


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """One `v1,<signature>` entry of the `webhook-signature` header."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _key_file(data_dir: Path) -> bytes:
    """The embedded mode's server key: created once (0600), shared by every process on this data dir."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    log.info("generated the webhook secret key %s; set MUST_WEBHOOK_SECRET_KEY when several hosts run the API", path)
    return key


class SecretBox:
    """Encrypts signing secrets for the database and decrypts them for signing."""

    def __init__(self, keys: list[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        configured = [key.strip().encode() for key in settings.webhook_secret_key.get_secret_value().split(",")]
        keys = [key for key in configured if key]
        return cls(keys or [_key_file(settings.data_dir)])

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, token: str) -> str:
        """Raises SecretUnreadable when the server key changed without keeping the old one."""
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise SecretUnreadable("the webhook secret cannot be decrypted with the configured key") from exc


class SecretUnreadable(Exception):
    """The stored secret was encrypted under a key this process does not have."""
