"""FastAPI dependencies: the process's services, a database session, and the caller's team."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import authenticate
from app.db.models import Team
from app.errors import ApiError
from app.services import Services
from app.settings import Settings
from app.storage import ObjectStore


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_store(services: ServicesDep) -> ObjectStore:
    return services.store


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.session_factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[ObjectStore, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `must admin create-team`.")


def get_current_team(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Team:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing `Authorization: Bearer <api key>` header", headers=challenge)
    team = authenticate(session, credentials.credentials)
    if team is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=challenge)
    return team


CurrentTeam = Annotated[Team, Depends(get_current_team)]
