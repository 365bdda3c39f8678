"""FastAPI dependencies: the process's services, a database session, the caller's team, and the query
string check every route runs first."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import authenticate
from app.db.models import Team
from app.errors import ApiError
from app.services import Services
from app.settings import Settings
from app.storage import ObjectStore


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_store(services: ServicesDep) -> ObjectStore:
    return services.store


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.session_factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[ObjectStore, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `must admin create-team`.")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_current_team(session: SessionDep, credentials: BearerDep) -> Team:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing `Authorization: Bearer <api key>` header", headers=challenge)
    team = authenticate(session, credentials.credentials)
    if team is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=challenge)
    return team


CurrentTeam = Annotated[Team, Depends(get_current_team)]


async def get_team_briefly(services: ServicesDep, credentials: BearerDep) -> Team:
    """The caller's team, from a session closed before the route runs.

    For routes that then wait (classify waits for a shared forward pass): a request must not hold a pooled
    database connection, nor a worker thread, while it waits, or a burst of them starves the pool and every
    request behind it times out. The lookup is one worker-thread hop.
    """

    def lookup() -> Team:
        with services.session_factory() as session:
            return get_current_team(session, credentials)

    return await run_in_threadpool(lookup)


TeamBriefly = Annotated[Team, Depends(get_team_briefly)]


def _declared_query(dependant: Dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared_query(sub)
    return names


async def check_query_parameters(request: Request) -> None:
    """Refuse query parameters the route does not declare, and repeats: FastAPI would drop both unseen.

    Installed on the whole app, so it runs before authentication and before anything is read or written.
    Every declared query parameter is a single value, so a second occurrence is refused too. Pure work on
    the request: async, so it costs no worker-thread hop (dependencies declared with `def` each take one).
    """
    route = request.scope.get("route")
    declared = _declared_query(route.dependant) if isinstance(route, APIRoute) else set()
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in declared:
            accepted = ", ".join(sorted(declared)) or "none"
            raise ApiError(
                400, "unknown_parameter", f"unknown query parameter {name!r} (this route takes: {accepted})", name
            )
        if name in seen:
            raise ApiError(400, "duplicate_parameter", f"query parameter {name!r} was sent more than once", name)
        seen.add(name)
