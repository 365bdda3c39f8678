"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium)
against the real service: the API served by uvicorn on a loopback port, a Celery worker, PostgreSQL,
Redis and the S3 server. A team signs in, adapts on real DTD photos, watches the job, browses the gallery,
audits, classifies, downloads the artifact, deletes the model, pages through more models than one page; a bad
key and a bad upload show the API's own error message. Set MUST_DASHBOARD_SCREENSHOTS=docs/img to refresh the
README's screenshots.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = os.environ.get("MUST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MUST_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT_SECONDS = 30
TRAIN_SECONDS = 300
CLASSES = ["banded", "blotchy"]
TINY = {"batch_size": 8, "num_workers": 0, "checkpoint_every": 1, "log_every": 1}


@pytest.fixture(scope="module")
def live_url(stack, unused_port_module: int) -> Iterator[str]:
    """The app on the stack's services, served over real HTTP by uvicorn in a thread."""
    import uvicorn

    from app.main import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(stack.settings), host="127.0.0.1", port=unused_port_module,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{unused_port_module}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def unused_port_module() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    """Headless Chromium. Missing, it fails the run (scripts/setup.sh installs it): never a silent skip."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(f"the browser test needs {missing}: run scripts/setup.sh (it installs chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
        "safebrowsing.enabled": False,
    })
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(browser, condition, timeout: float = WAIT_SECONDS, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda _: condition(), message)


def _css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, selector)


def _all(browser, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def _text(browser, selector: str) -> str:
    """An element's text read in one script call (the page re-renders live parts under the driver)."""
    return browser.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                  selector).strip()


def _visible_text(browser, selector: str) -> str:
    found = _all(browser, selector)
    return found[0].text if found and found[0].is_displayed() else ""


def _screenshot(browser, name: str) -> None:
    folder = os.environ.get("MUST_DASHBOARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def _sign_in(browser, url: str, key: str) -> None:
    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{url}/#/signin")
    field = _css(browser, "#api-key")
    _wait(browser, field.is_displayed)
    field.clear()
    field.send_keys(key)
    _css(browser, "#signin-form button[type=submit]").click()


def _api_error(response: httpx.Response) -> dict:
    assert response.status_code >= 400, response.text
    return response.json()["error"]


def test_bad_key_and_bad_upload_show_the_api_message(browser, live_url, stack, make_team, dtd_images, tmp_path) -> None:
    bad_key = "mk_0123456789abcdef_" + "A" * 43
    expected = _api_error(httpx.get(f"{live_url}/adaptations", headers={"Authorization": f"Bearer {bad_key}"}))
    _sign_in(browser, live_url, bad_key)
    _wait(browser, lambda: _visible_text(browser, '[data-error-for="key"]'))
    assert _visible_text(browser, '[data-error-for="key"]') == f"{expected['message']} ({expected['code']})"
    assert _css(browser, "#view-signin").is_displayed() and not _css(browser, "#nav").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('must.apiKey')") is None
    _screenshot(browser, "signin-error")

    team = make_team(stack.session_factory)
    _sign_in(browser, live_url, team.key)
    _wait(browser, lambda: _css(browser, "#view-adaptations").is_displayed())
    assert team.key not in browser.current_url

    too_few = tmp_path / "too-few.zip"
    too_few.write_bytes(dtd_images.zip(dtd_images.paths(2)))
    expected = _api_error(httpx.post(
        f"{live_url}/adaptations", headers=team.headers,
        data={"class_names": json.dumps(CLASSES), "config": json.dumps({"preset": "auto"})},
        files={"images": ("too-few.zip", too_few.read_bytes(), "application/zip")},
    ))
    assert expected["param"] == "images"
    _css(browser, "#create-form textarea[name=class_names]").send_keys("banded\nblotchy")
    _css(browser, "#create-form input[name=images]").send_keys(str(too_few))
    _css(browser, "#create-form button[type=submit]").click()
    _wait(browser, lambda: _visible_text(browser, '[data-error-for="images"]'))
    assert _visible_text(browser, '[data-error-for="images"]') == f"{expected['message']} ({expected['code']})"
    assert "field-error" in _css(browser, "#create-form input[name=images]").get_attribute("class")
    listed = httpx.get(f"{live_url}/adaptations", headers=team.headers).json()["data"]
    assert listed == [], "a refused upload leaves nothing"
    _screenshot(browser, "create-error")


def test_watch_a_run_live_and_cancel_it(browser, live_url, stack, make_team, dtd_images, tmp_path) -> None:
    team = make_team(stack.session_factory)
    images = tmp_path / "bucket.zip"
    images.write_bytes(dtd_images.zip(dtd_images.paths(16)))
    adaptation_id = stack.submit(team, images.read_bytes(), config={**TINY, "epochs": 200})["id"]
    try:
        _sign_in(browser, live_url, team.key)
        _wait(browser, lambda: _all(browser, f'#adaptation-rows tr[data-id="{adaptation_id}"]'))
        browser.get(f"{live_url}/#/adaptations/{adaptation_id}")
        # Live: the step moves and the charts grow while the page is open (three progress windows at least).
        _wait(browser, lambda: _text(browser, "#ad-status") == "running", TRAIN_SECONDS)
        progress_events = ("return [...document.querySelectorAll('#ad-events li')]"
                           ".filter(li => / progress/.test(li.textContent)).length")
        _wait(browser, lambda: browser.execute_script(progress_events) >= 3, TRAIN_SECONDS)
        first = _text(browser, "#ad-step")
        _wait(browser, lambda: _text(browser, "#ad-step") != first, message="the step does not move")
        assert _text(browser, "#ad-eta").startswith("about "), _text(browser, "#ad-eta")
        assert _css(browser, "#ad-cancel").is_displayed() and not _css(browser, "#ad-results").is_displayed()
        _screenshot(browser, "adaptation-running")
        _css(browser, "#ad-cancel").click()
        _wait(browser, lambda: _text(browser, "#ad-status") == "cancelled", TRAIN_SECONDS)
        assert not _css(browser, "#ad-cancel").is_displayed()
        final = httpx.get(f"{live_url}/adaptations/{adaptation_id}", headers=team.headers).json()
        assert final["status"] == "cancelled", final
    finally:  # a failure above must not leave a long job holding the module's only worker
        httpx.post(f"{live_url}/adaptations/{adaptation_id}/cancel", headers=team.headers)


def test_the_whole_flow_in_the_browser(
    browser, live_url, stack, make_team, dtd_images, tmp_path, downloads: Path
) -> None:
    page = httpx.get(f"{live_url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    team = make_team(stack.session_factory)
    _sign_in(browser, live_url, team.key)
    _wait(browser, lambda: _css(browser, "#view-adaptations").is_displayed())

    # Create: 16 real photos, the embedded default base model, three short epochs.
    images = tmp_path / "bucket.zip"
    images.write_bytes(dtd_images.zip(dtd_images.paths(16)))
    form = "#create-form "
    _css(browser, form + "textarea[name=class_names]").send_keys("banded\nblotchy")
    _css(browser, form + "input[name=images]").send_keys(str(images))
    assert _css(browser, form + "input[name=base_model]").get_attribute("value") == stack.base_model
    _css(browser, form + "input[name=epochs]").send_keys("3")
    _css(browser, form + "details summary").click()
    _css(browser, form + "textarea[name=config]").send_keys(json.dumps(TINY))
    _css(browser, form + "button[type=submit]").click()

    # Watch it: the page of the new adaptation, live until it succeeds.
    _wait(browser, lambda: "#/adaptations/ada_" in browser.current_url)
    adaptation_id = browser.current_url.rsplit("/", 1)[-1]
    _wait(browser, lambda: _text(browser, "#ad-status") in ("succeeded", "failed", "cancelled"), TRAIN_SECONDS,
          "the adaptation did not finish")
    adaptation = httpx.get(f"{live_url}/adaptations/{adaptation_id}", headers=team.headers).json()
    assert adaptation["status"] == "succeeded", adaptation
    assert adaptation["config"]["epochs"] == 3 and adaptation["class_names"] == CLASSES
    model_id = adaptation["model_id"]
    _wait(browser, lambda: _css(browser, "#ad-results").is_displayed())
    total = adaptation["progress"]["total_steps"]
    assert _text(browser, "#ad-step").startswith(f"step {total} of {total}")
    assert _all(browser, "#chart-loss svg path"), "the loss chart has a line"
    assert _all(browser, "#chart-agreement svg path, #chart-agreement svg circle")
    assert not _css(browser, "#ad-cancel").is_displayed(), "a finished adaptation cannot be cancelled"
    events = httpx.get(f"{live_url}/adaptations/{adaptation_id}/events", headers=team.headers,
                       params={"limit": 1000}).json()["data"]
    windows = [e for e in events if e["type"] == "progress" and (e["data"] or {}).get("pseudo_labels")]
    assert windows, "the worker records the pseudo-label histogram"
    shares = [bar.find_elements("css selector", "span")[-1].text for bar in _all(browser, "#chart-pseudo .bar-row")]
    assert shares == [f"{100 * share:.1f}%" for share in windows[-1]["data"]["pseudo_labels"]]

    # Results: the report and the gallery, grouped by the adapted model's top-1.
    _css(browser, "#ad-results").click()
    _wait(browser, lambda: _css(browser, "#view-results").is_displayed())
    rows = httpx.get(f"{live_url}/adaptations/{adaptation_id}/predictions", headers=team.headers,
                     params={"limit": 100}).json()["data"]
    assert len(rows) == 16
    _wait(browser, lambda: len(_all(browser, "#gallery .thumb")) == 16)
    _wait(browser, lambda: browser.execute_script(
        "return [...document.querySelectorAll('#gallery .thumb img')].every(i => i.complete && i.naturalWidth > 0)"
    ), message="every thumbnail decodes")
    shown = {
        figure.get_attribute("data-image"): group.get_attribute("data-class")
        for group in _all(browser, "#gallery section.group")
        for figure in group.find_elements("css selector", ".thumb")
    }
    assert shown == {row["image"]: row["predictions"][0]["label"] for row in rows}
    assert not any(more.is_displayed() for more in _all(browser, "#gallery .more")), "every image is shown"
    changed = {row["image"] for row in rows if row["changed"]}
    assert {f.get_attribute("data-image") for f in _all(browser, "#gallery .thumb.changed")} == changed
    model = httpx.get(f"{live_url}/models/{model_id}", headers=team.headers).json()
    assert _css(browser, "#rep-changed").text == f"{100 * model['report']['changed_from_zero_shot']:.1f}%"
    assert _css(browser, "#rep-est-adapted").text == f"{100 * model['report']['estimated_top1']['adapted']:.1f}%"
    # what the bucket threshold flagged, and the histogram of the scores it was fitted on
    unknown, flagged = model["report"]["unknown"], {row["image"] for row in rows if row["unknown"]}
    assert flagged, "a fitted threshold flags at least the top 1% of its bucket"
    share, threshold = browser.execute_script(  # formatted as the page formats them (JS rounds 6.25 up)
        "return [(100 * arguments[0]).toFixed(1), arguments[1].toFixed(3)]", unknown["share"], unknown["threshold"])
    images = f"{len(flagged)} image{'' if len(flagged) == 1 else 's'}"
    assert _text(browser, "#rep-unknown") == f"{share}% ({images}): ood score above {threshold}"
    assert sum(unknown["histogram"]) == 16 and unknown["histogram"] == [
        int(b.get_attribute("data-count")) for b in _all(browser, "#res-unknown-chart rect.bin")]
    assert _all(browser, "#res-unknown-chart line.threshold")
    assert ("top 1%" in _text(browser, "#res-unknown-how")) == (unknown["method"] == "clean_quantile")
    _screenshot(browser, "results")

    def gallery() -> set[str]:
        return {f.get_attribute("data-image") for f in _all(browser, "#gallery .thumb")}

    _css(browser, "#gal-changed").click()
    _wait(browser, lambda: gallery() == changed, message="the filter shows only the images whose label changed")
    _css(browser, "#gal-changed").click()
    _css(browser, "#gal-unknown").click()
    _wait(browser, lambda: gallery() == flagged, message="the filter shows only the images of no known class")
    assert all("unknown" in f.get_attribute("class") for f in _all(browser, "#gallery .thumb"))
    _css(browser, "#res-csv").click()
    table = downloads / f"{adaptation_id}-predictions.csv"
    _wait(browser, lambda: table.is_file() and not list(downloads.glob("*.crdownload")), message="no CSV")
    assert len(table.read_text().splitlines()) == 1 + len(rows)

    # Audit: a labelled zip of the same two classes; adapted vs zero-shot and the confusion matrices.
    labelled = tmp_path / "labelled.zip"
    labelled.write_bytes(dtd_images.zip(dtd_images.paths(8)))
    _css(browser, "#audit-form input[name=images]").send_keys(str(labelled))
    _css(browser, "#audit-form button[type=submit]").click()
    _wait(browser, lambda: _all(browser, "#audits .audit-top1"), TRAIN_SECONDS, "the audit did not finish")
    audit = httpx.get(f"{live_url}/models/{model_id}/evaluations", headers=team.headers).json()["data"][0]
    assert audit["status"] == "succeeded" and audit["n"] == 8
    assert _css(browser, "#audits .audit-top1").text == (
        f"{100 * audit['adapted']['top1']:.1f}% adapted vs {100 * audit['zero_shot']['top1']:.1f}% zero-shot"
    )
    cells = [int(cell.text) for cell in _all(browser, "#audits table.confusion")[0].find_elements("css selector", "td")]
    assert cells == [count for row in audit["adapted"]["confusion"] for count in row]
    browser.execute_script("document.querySelector('#audits').scrollIntoView()")
    _screenshot(browser, "audit")

    # Try it: drop an image; the adapted model's top-k beside zero-shot's, as the API answers them.
    photo = dtd_images.paths(3, classes=3)[2]
    browser.get(f"{live_url}/#/try/{model_id}")
    _wait(browser, lambda: _css(browser, "#try-model").get_attribute("value") == model_id)
    browser.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));
        const drop = new DragEvent('drop', {dataTransfer: transfer, bubbles: true});
        document.querySelector('#drop').dispatchEvent(drop);""",
        base64.b64encode(photo.read_bytes()).decode(), photo.name,
    )
    _wait(browser, lambda: _all(browser, "#try-zero .bar-row"))
    files = {"images": (photo.name, photo.read_bytes(), "image/jpeg")}
    mine = httpx.post(f"{live_url}/models/{model_id}/classify", headers=team.headers, files=files).json()
    base = httpx.post(f"{live_url}/classify", headers=team.headers, files=files,
                      data={"class_names": json.dumps(CLASSES), "base_model": stack.base_model}).json()
    for selector, answer in (("#try-adapted", mine), ("#try-zero", base)):
        bars = _all(browser, f"{selector} .bar-row")
        shown_labels = [row.find_element("css selector", ".label").get_attribute("title") for row in bars]
        shown_scores = [row.find_elements("css selector", "span")[-1].text for row in bars]
        predictions = answer["results"][0]["predictions"]
        assert shown_labels == [p["label"] for p in predictions]
        assert shown_scores == [f"{100 * p['score']:.1f}%" for p in predictions]
    _screenshot(browser, "try")

    browser.get(f"{live_url}/#/adaptations")
    _wait(browser, lambda: _all(browser, f'#adaptation-rows tr[data-id="{adaptation_id}"] .status.succeeded'))
    _screenshot(browser, "adaptations")

    # Models: download the artifact (a loadable zip), then delete the model after confirming.
    browser.get(f"{live_url}/#/models")
    _wait(browser, lambda: _all(browser, f'#model-rows tr[data-id="{model_id}"]'))
    _screenshot(browser, "models")
    _css(browser, f'#model-rows tr[data-id="{model_id}"] button.download').click()
    archive = downloads / f"{model_id}.zip"
    _wait(browser, archive.is_file, message="the artifact was not downloaded")
    _wait(browser, lambda: not list(downloads.glob("*.crdownload")))
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as opened:
        assert sorted(opened.namelist()) == [f"{model_id}/metadata.json", f"{model_id}/model.safetensors"]
        assert json.loads(opened.read(f"{model_id}/metadata.json"))["class_names"] == CLASSES

    _css(browser, f'#model-rows tr[data-id="{model_id}"] button.delete').click()
    browser.switch_to.alert.dismiss()
    assert httpx.get(f"{live_url}/models/{model_id}", headers=team.headers).status_code == 200, "dismissed: kept"
    _css(browser, f'#model-rows tr[data-id="{model_id}"] button.delete').click()
    browser.switch_to.alert.accept()
    _wait(browser, lambda: not _all(browser, f'#model-rows tr[data-id="{model_id}"]'))
    assert httpx.get(f"{live_url}/models/{model_id}", headers=team.headers).status_code == 404

    # Nothing came from outside the service, and the key never reached a URL.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith((live_url, "blob:", "data:")) for name in loaded), loaded
    assert team.key not in browser.current_url

    _css(browser, "#sign-out").click()
    _wait(browser, lambda: _css(browser, "#view-signin").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('must.apiKey')") is None


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

    _sign_in(browser, live_url, team.key)
    _wait(browser, lambda: _css(browser, "#view-adaptations").is_displayed())
    browser.get(f"{live_url}/#/models")
    _wait(browser, lambda: len(_all(browser, "#model-rows tr[data-id]")) == page)
    assert not _all(browser, f'#model-rows tr[data-id="{oldest}"]')
    _css(browser, "#models-more").click()
    _wait(browser, lambda: len(_all(browser, "#model-rows tr[data-id]")) == page + 1)
    assert _all(browser, f'#model-rows tr[data-id="{oldest}"]') and not _css(browser, "#models-more").is_displayed()

    _css(browser, f'#model-rows tr[data-id="{oldest}"] a.button').click()  # its "Try" link
    _wait(browser, lambda: _css(browser, "#try-model").get_attribute("value") == oldest)
    assert len(_all(browser, "#try-model option")) == page + 1  # the newest page and the one asked for


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

    _sign_in(browser, live_url, team.key)
    _wait(browser, lambda: _css(browser, "#view-adaptations").is_displayed())
    browser.get(f"{live_url}/#/adaptations/{adaptation_id}/results")
    first, second = (f'#gallery section.group[data-class="{name}"]' for name in CLASSES)

    def shown(group: str) -> list[str]:
        return [f.get_attribute("data-image") for f in _all(browser, f"{group} .thumb")]

    _wait(browser, lambda: len(shown(first)) == page and shown(second) == ["z.png"])
    assert shown(first) == names[:page] and _css(browser, f"{first} .more").is_displayed()
    assert not _css(browser, f"{second} .more").is_displayed()
    _css(browser, f"{first} .more").click()
    _wait(browser, lambda: len(shown(first)) == len(names), message="More... appends the rest of the class")
    assert shown(first) == names and not _css(browser, f"{first} .more").is_displayed()
    assert shown(second) == ["z.png"], "the other class is left as it was"

    _css(browser, "#gal-unknown").click()  # 25 of the 30 are flagged: one page and one more
    flagged = [r.image for r in rows if r.unknown]
    _wait(browser, lambda: shown(first) == flagged[:page] and not shown(second))
    _css(browser, f"{first} .more").click()
    _wait(browser, lambda: shown(first) == flagged, message="More... pages on within the filter")
    assert not _css(browser, f"{first} .more").is_displayed()
