"""The gallery's thumbnail route (`GET /adaptations/{id}/images`) on the real stack: it serves only images of
the adaptation's own upload, at the sizes it allows, to the team that owns it; for zip uploads and for loose
image files alike."""

from __future__ import annotations

import io
import json

CLASSES = ["banded", "blotchy"]
TINY = {"batch_size": 8, "num_workers": 0, "checkpoint_every": 1, "log_every": 1}


def test_thumbnail_route_refuses_unknown_names_and_sizes(stack, make_team, dtd_images) -> None:
    team = make_team(stack.session_factory)
    created = stack.submit(team, dtd_images.zip(dtd_images.paths(8)))
    url = f"/adaptations/{created['id']}/images"
    inside = dtd_images.paths(8)[0]
    name = f"{inside.parent.name}/{inside.name}"
    ok = stack.client.get(url, headers=team.headers, params={"name": name, "size": 64})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(ok.content)).size) == 64
    for params, status, param in (
        ({"name": "nope/missing.jpg"}, 404, "name"),
        ({"name": "../../etc/passwd"}, 404, "name"),
        ({"name": name, "size": 65}, 400, "size"),
    ):
        response = stack.client.get(url, headers=team.headers, params=params)
        assert response.status_code == status and response.json()["error"]["param"] == param, response.text
    other = make_team(stack.session_factory)
    assert stack.client.get(url, headers=other.headers, params={"name": name}).status_code == 404
    stack.client.post(f"/adaptations/{created['id']}/cancel", headers=team.headers)

    # Loose image files: each is an object of its own, named by its key under the upload prefix.
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in dtd_images.paths(8)]
    loose = stack.client.post("/adaptations", headers=team.headers, files=files,
                              data={"class_names": json.dumps(CLASSES), "config": json.dumps(TINY)})
    assert loose.status_code == 202, loose.text
    prefix = f"teams/{team.id}/adaptations/{loose.json()['id']}/upload/"
    keys = [info.key[len(prefix):] for info in stack.store.list(prefix)]
    assert len(keys) == 8
    thumb = stack.client.get(f"/adaptations/{loose.json()['id']}/images", headers=team.headers,
                             params={"name": keys[0], "size": 256})
    assert thumb.status_code == 200, thumb.text
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256
    stack.client.post(f"/adaptations/{loose.json()['id']}/cancel", headers=team.headers)


def test_a_source_bucket_deleted_since_is_a_404_of_the_image_not_a_500(stack, make_team) -> None:
    """An adaptation of a team's own bucket keeps pointing at it; once the team deletes the bucket, its
    thumbnails are gone (404 `not_found` saying so), and the service has not failed."""
    from app.db.models import Adaptation as AdaptationRow

    team = make_team(stack.session_factory)
    with stack.session_factory() as session:
        row = AdaptationRow(team_id=team.id, status="succeeded", request_sha256="0" * 64, class_names=CLASSES,
                            base_model=stack.base_model, config_request={},
                            source_bucket=f"deleted-{team.id[-12:].lower()}", source_prefix="photos/")
        session.add(row)
        session.commit()
        adaptation_id = row.id
    response = stack.client.get(f"/adaptations/{adaptation_id}/images", headers=team.headers,
                                params={"name": "cat.jpg"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("not_found", "name") and "deleted since" in error["message"]
