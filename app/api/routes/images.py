"""`GET /adaptations/{id}/images`: a thumbnail of one image of the adaptation's bucket (the gallery's)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import CurrentTeam, ServicesDep, SessionDep
from app.db.models import Adaptation as AdaptationRow
from app.errors import ApiError, bad_request, not_found
from app.gallery import THUMBNAIL_SIZES, ImageNotFound
from app.storage import SourceUnreadable
from must_engine import ImageError

router = APIRouter(prefix="/adaptations", tags=["predictions"])


@router.get(
    "/{adaptation_id}/images",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}},
)
async def image_thumbnail(
    session: SessionDep,
    team: CurrentTeam,
    services: ServicesDep,
    adaptation_id: str,
    name: Annotated[str, Query(min_length=1, max_length=4096, description="The `image` of a bucket prediction.")],
    size: Annotated[int, Query(description=f"Longest side in pixels: one of {list(THUMBNAIL_SIZES)}.")] = 128,
) -> Response:
    """The named image of the bucket, shrunk to a JPEG of at most `size` pixels a side."""
    row = session.get(AdaptationRow, adaptation_id)
    if row is None or row.team_id != team.id:
        raise not_found("adaptation", "adaptation_id")
    if size not in THUMBNAIL_SIZES:
        raise bad_request("invalid_request", f"size must be one of {list(THUMBNAIL_SIZES)}", "size")
    store = services.store
    if row.source_bucket != store.bucket:
        store = store.for_bucket(row.source_bucket)
    try:
        data = await run_in_threadpool(
            services.gallery.thumbnail, store, row.source_prefix, name, size, adaptation_id
        )
    except ImageNotFound as exc:
        why = f" ({exc.reason})" if exc.reason else ""
        raise ApiError(404, "not_found", f"no image named {name!r} in this adaptation's bucket{why}", "name") from exc
    except SourceUnreadable as exc:
        raise ApiError(409, "source_unavailable", f"the service can no longer read bucket {exc.bucket!r} "
                       f"({exc.code}): grant it read access again to see its images", "adaptation_id") from exc
    except ImageError as exc:
        raise bad_request(exc.code, str(exc), "name") from exc
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
