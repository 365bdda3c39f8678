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
