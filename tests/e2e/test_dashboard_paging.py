"""The dashboard's long lists in a real headless Chromium against the real service: more models than a page of
the Models list, more images of one class than a page of the gallery. The rows are written straight to the
database and the object store (the pages read nothing else), so no adaptation has to run."""

from __future__ import annotations

import time

import httpx
from browser_support import css, css_all, sign_in, wait_until

CLASSES = ["banded", "blotchy"]


def test_models_page_on_past_the_first_and_any_model_can_be_tried(browser, live_url, stack, make_team) -> None:
    """A team with more models than one page: "Older..." reaches the oldest, and Try-it selects a model that
    is not on its list's page. The rows are written straight to the database (listing reads nothing else)."""
    from app.db.models import Model as ModelRow

    team = make_team(stack.session_factory)
    page = 50  # MODELS_PAGE in dashboard.js
    with stack.session_factory() as session:
        rows = [ModelRow(team_id=team.id, adaptation_id=f"adp_listing_{team.id[-8:]}_{i:03d}", class_names=CLASSES,
                         base_model=stack.base_model, artifact_prefix=f"teams/{team.id}/models/none-{i}")
                for i in range(page + 1)]
        session.add(rows[0])
        session.flush()  # ids are time-ordered (milliseconds): the first row is the oldest
        time.sleep(0.01)
        session.add_all(rows[1:])
        session.commit()
        oldest = rows[0].id
    listed = httpx.get(f"{live_url}/models", headers=team.headers, params={"limit": page}).json()
    assert listed["has_more"] and oldest not in {m["id"] for m in listed["data"]}

    sign_in(browser, live_url, team.key)
    wait_until(browser, lambda: css(browser, "#view-adaptations").is_displayed())
    browser.get(f"{live_url}/#/models")
    wait_until(browser, lambda: len(css_all(browser, "#model-rows tr[data-id]")) == page)
    assert not css_all(browser, f'#model-rows tr[data-id="{oldest}"]')
    css(browser, "#models-more").click()
    wait_until(browser, lambda: len(css_all(browser, "#model-rows tr[data-id]")) == page + 1)
    assert css_all(browser, f'#model-rows tr[data-id="{oldest}"]') and not css(browser, "#models-more").is_displayed()

    css(browser, f'#model-rows tr[data-id="{oldest}"] a.button').click()  # its "Try" link
    wait_until(browser, lambda: css(browser, "#try-model").get_attribute("value") == oldest)
    assert len(css_all(browser, "#try-model option")) == page + 1  # the newest page and the one asked for


def test_gallery_pages_on_within_a_class_and_filters_page_too(browser, live_url, stack, make_team, tmp_path) -> None:
    """A class with more images than a gallery page: "More..." appends the next page of that class only, and a
    filter pages through its own rows. Rows are written straight to the database and the object store (the
    gallery reads nothing else); the thumbnails are missing on purpose: they are not what this checks."""
    from app.db.models import Adaptation as AdaptationRow
    from app.db.models import Model as ModelRow
    from app.predictions import PredictionsWriter, predictions_prefix
    from app.storage import upload_directory
    from must_engine.bucket import BucketRow

    team, page = make_team(stack.session_factory), 24  # GALLERY_PAGE in results.js
    names = [f"img-{i:03d}.png" for i in range(page + 6)]  # 30 images of the first class, 1 of the second

    def row(name: str, label: str, unknown: bool) -> BucketRow:
        other = CLASSES[1] if label == CLASSES[0] else CLASSES[0]
        return BucketRow(name, [(label, 0.9), (other, 0.1)], [(label, 0.8), (other, 0.2)], 0.9 if unknown else 0.1,
                         unknown)

    rows = [row(name, CLASSES[0], unknown=i % 6 != 0) for i, name in enumerate(names)]
    rows.append(row("z.png", CLASSES[1], False))
    with stack.session_factory() as session:
        adaptation = AdaptationRow(team_id=team.id, status="succeeded", request_sha256="0" * 64, class_names=CLASSES,
                                   base_model=stack.base_model, config_request={}, source_bucket="none",
                                   source_prefix="none/")
        session.add(adaptation)
        session.flush()
        model = ModelRow(team_id=team.id, adaptation_id=adaptation.id, class_names=CLASSES,
                         base_model=stack.base_model, artifact_prefix=f"teams/{team.id}/models/none")
        session.add(model)
        session.flush()
        adaptation.model_id = model.id
        session.commit()
        adaptation_id = adaptation.id
    writer = PredictionsWriter(tmp_path / "predictions", rows_per_part=7)  # pages cross parts
    writer.add(rows)
    writer.close()
    upload_directory(stack.store, tmp_path / "predictions", predictions_prefix(team.id, adaptation_id))

    sign_in(browser, live_url, team.key)
    wait_until(browser, lambda: css(browser, "#view-adaptations").is_displayed())
    browser.get(f"{live_url}/#/adaptations/{adaptation_id}/results")
    first, second = (f'#gallery section.group[data-class="{name}"]' for name in CLASSES)

    def shown(group: str) -> list[str]:
        return [f.get_attribute("data-image") for f in css_all(browser, f"{group} .thumb")]

    wait_until(browser, lambda: len(shown(first)) == page and shown(second) == ["z.png"])
    assert shown(first) == names[:page] and css(browser, f"{first} .more").is_displayed()
    assert not css(browser, f"{second} .more").is_displayed()
    css(browser, f"{first} .more").click()
    wait_until(browser, lambda: len(shown(first)) == len(names), message="More... appends the rest of the class")
    assert shown(first) == names and not css(browser, f"{first} .more").is_displayed()
    assert shown(second) == ["z.png"], "the other class is left as it was"

    css(browser, "#gal-unknown").click()  # 25 of the 30 are flagged: one page and one more
    flagged = [r.image for r in rows if r.unknown]
    wait_until(browser, lambda: shown(first) == flagged[:page] and not shown(second))
    css(browser, f"{first} .more").click()
    wait_until(browser, lambda: shown(first) == flagged, message="More... pages on within the filter")
    assert not css(browser, f"{first} .more").is_displayed()
