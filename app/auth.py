"""Teams and their API keys.

A key reads `mk_<key id>_<secret>`. The id finds the row; only the SHA-256 of the secret is stored and
it is compared in constant time. Keys are revoked by id, and a team can hold several at once (rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Team, utcnow

_KEY_FORMAT = re.compile(r"^mk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_TEAM_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


class TeamError(ValueError):
    pass


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_api_key(session: Session, team: Team) -> str:
    """Create a key for the team and return it; this is the only time the secret exists in clear."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    session.add(ApiKey(id=f"key_{key_id}", team_id=team.id, secret_sha256=_digest(secret)))
    return f"mk_{key_id}_{secret}"


def create_team(session: Session, name: str) -> tuple[Team, str]:
    name = name.strip()
    if not _TEAM_NAME.match(name):
        raise TeamError("a team name is 1 to 200 printable characters")
    if session.scalar(select(Team.id).where(Team.name == name)) is not None:
        raise TeamError(f"team {name!r} already exists")
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team, issue_api_key(session, team)


def find_team(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name.strip()))
    if team is None:
        raise TeamError(f"no team named {name!r}")
    return team


def revoke_api_key(session: Session, key_id: str) -> bool:
    """Revoke a key by its id (`key_...`, or the 16 hex characters after `mk_`)."""
    key_id = key_id if key_id.startswith("key_") else f"key_{key_id}"
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return bool(getattr(result, "rowcount", 0))


def authenticate(session: Session, presented: str) -> Team | None:
    """The team of a valid, unrevoked key, or None."""
    match = _KEY_FORMAT.match(presented)
    if match is None:
        return None
    key_id, secret = match.groups()
    key = session.get(ApiKey, f"key_{key_id}")
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_sha256, _digest(secret)):
        return None
    return session.get(Team, key.team_id)
