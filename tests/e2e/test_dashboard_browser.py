"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium)
against the real service: the API served by uvicorn on a loopback port, a Celery worker, PostgreSQL,
Redis and the S3 server. A team signs in, adapts on real DTD photos, watches the job, browses the gallery,
audits, classifies, downloads the artifact, deletes the model; a bad key and a bad upload show the API's own
error message (long lists: test_dashboard_paging.py). Set MUST_DASHBOARD_SCREENSHOTS=docs/img to refresh the
README's screenshots.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import httpx
from browser_support import css, css_all, screenshot, sign_in, text_of, visible_text, wait_until

TRAIN_SECONDS = 300
CLASSES = ["banded", "blotchy"]
TINY = {"batch_size": 8, "num_workers": 0, "checkpoint_every": 1, "log_every": 1}


def _api_error(response: httpx.Response) -> dict:
    assert response.status_code >= 400, response.text
    return response.json()["error"]


def test_bad_key_and_bad_upload_show_the_api_message(browser, live_url, stack, make_team, dtd_images, tmp_path) -> None:
    bad_key = "mk_0123456789abcdef_" + "A" * 43
    expected = _api_error(httpx.get(f"{live_url}/adaptations", headers={"Authorization": f"Bearer {bad_key}"}))
    sign_in(browser, live_url, bad_key)
    wait_until(browser, lambda: visible_text(browser, '[data-error-for="key"]'))
    assert visible_text(browser, '[data-error-for="key"]') == f"{expected['message']} ({expected['code']})"
    assert css(browser, "#view-signin").is_displayed() and not css(browser, "#nav").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('must.apiKey')") is None
    screenshot(browser, "signin-error")

    team = make_team(stack.session_factory)
    sign_in(browser, live_url, team.key)
    wait_until(browser, lambda: css(browser, "#view-adaptations").is_displayed())
    assert team.key not in browser.current_url

    too_few = tmp_path / "too-few.zip"
    too_few.write_bytes(dtd_images.zip(dtd_images.paths(2)))
    expected = _api_error(httpx.post(
        f"{live_url}/adaptations", headers=team.headers,
        data={"class_names": json.dumps(CLASSES), "config": json.dumps({"preset": "auto"})},
        files={"images": ("too-few.zip", too_few.read_bytes(), "application/zip")},
    ))
    assert expected["param"] == "images"
    css(browser, "#create-form textarea[name=class_names]").send_keys("banded\nblotchy")
    css(browser, "#create-form input[name=images]").send_keys(str(too_few))
    css(browser, "#create-form button[type=submit]").click()
    wait_until(browser, lambda: visible_text(browser, '[data-error-for="images"]'))
    assert visible_text(browser, '[data-error-for="images"]') == f"{expected['message']} ({expected['code']})"
    assert "field-error" in css(browser, "#create-form input[name=images]").get_attribute("class")
    listed = httpx.get(f"{live_url}/adaptations", headers=team.headers).json()["data"]
    assert listed == [], "a refused upload leaves nothing"
    screenshot(browser, "create-error")


def test_watch_a_run_live_and_cancel_it(browser, live_url, stack, make_team, dtd_images, tmp_path) -> None:
    team = make_team(stack.session_factory)
    images = tmp_path / "bucket.zip"
    images.write_bytes(dtd_images.zip(dtd_images.paths(16)))
    adaptation_id = stack.submit(team, images.read_bytes(), config={**TINY, "epochs": 200})["id"]
    try:
        sign_in(browser, live_url, team.key)
        wait_until(browser, lambda: css_all(browser, f'#adaptation-rows tr[data-id="{adaptation_id}"]'))
        browser.get(f"{live_url}/#/adaptations/{adaptation_id}")
        # Live: the step moves and the charts grow while the page is open (three progress windows at least).
        wait_until(browser, lambda: text_of(browser, "#ad-status") == "running", TRAIN_SECONDS)
        progress_events = ("return [...document.querySelectorAll('#ad-events li')]"
                           ".filter(li => / progress/.test(li.textContent)).length")
        wait_until(browser, lambda: browser.execute_script(progress_events) >= 3, TRAIN_SECONDS)
        first = text_of(browser, "#ad-step")
        wait_until(browser, lambda: text_of(browser, "#ad-step") != first, message="the step does not move")
        assert text_of(browser, "#ad-eta").startswith("about "), text_of(browser, "#ad-eta")
        assert css(browser, "#ad-cancel").is_displayed() and not css(browser, "#ad-results").is_displayed()
        screenshot(browser, "adaptation-running")
        css(browser, "#ad-cancel").click()
        wait_until(browser, lambda: text_of(browser, "#ad-status") == "cancelled", TRAIN_SECONDS)
        assert not css(browser, "#ad-cancel").is_displayed()
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
    sign_in(browser, live_url, team.key)
    wait_until(browser, lambda: css(browser, "#view-adaptations").is_displayed())

    # Create: 16 real photos, the embedded default base model, three short epochs.
    images = tmp_path / "bucket.zip"
    images.write_bytes(dtd_images.zip(dtd_images.paths(16)))
    form = "#create-form "
    css(browser, form + "textarea[name=class_names]").send_keys("banded\nblotchy")
    css(browser, form + "input[name=images]").send_keys(str(images))
    assert css(browser, form + "input[name=base_model]").get_attribute("value") == stack.base_model
    css(browser, form + "input[name=epochs]").send_keys("3")
    css(browser, form + "details summary").click()
    css(browser, form + "textarea[name=config]").send_keys(json.dumps(TINY))
    css(browser, form + "button[type=submit]").click()

    # Watch it: the page of the new adaptation, live until it succeeds.
    wait_until(browser, lambda: "#/adaptations/ada_" in browser.current_url)
    adaptation_id = browser.current_url.rsplit("/", 1)[-1]
    wait_until(browser, lambda: text_of(browser, "#ad-status") in ("succeeded", "failed", "cancelled"), TRAIN_SECONDS,
          "the adaptation did not finish")
    adaptation = httpx.get(f"{live_url}/adaptations/{adaptation_id}", headers=team.headers).json()
    assert adaptation["status"] == "succeeded", adaptation
    assert adaptation["config"]["epochs"] == 3 and adaptation["class_names"] == CLASSES
    model_id = adaptation["model_id"]
    wait_until(browser, lambda: css(browser, "#ad-results").is_displayed())
    total = adaptation["progress"]["total_steps"]
    assert text_of(browser, "#ad-step").startswith(f"step {total} of {total}")
    assert css_all(browser, "#chart-loss svg path"), "the loss chart has a line"
    assert css_all(browser, "#chart-agreement svg path, #chart-agreement svg circle")
    assert not css(browser, "#ad-cancel").is_displayed(), "a finished adaptation cannot be cancelled"
    events = httpx.get(f"{live_url}/adaptations/{adaptation_id}/events", headers=team.headers,
                       params={"limit": 1000}).json()["data"]
    windows = [e for e in events if e["type"] == "progress" and (e["data"] or {}).get("pseudo_labels")]
    assert windows, "the worker records the pseudo-label histogram"
    shares = [bar.find_elements("css selector", "span")[-1].text for bar in css_all(browser, "#chart-pseudo .bar-row")]
    assert shares == [f"{100 * share:.1f}%" for share in windows[-1]["data"]["pseudo_labels"]]

    # Results: the report and the gallery, grouped by the adapted model's top-1.
    css(browser, "#ad-results").click()
    wait_until(browser, lambda: css(browser, "#view-results").is_displayed())
    rows = httpx.get(f"{live_url}/adaptations/{adaptation_id}/predictions", headers=team.headers,
                     params={"limit": 100}).json()["data"]
    assert len(rows) == 16
    wait_until(browser, lambda: len(css_all(browser, "#gallery .thumb")) == 16)
    wait_until(browser, lambda: browser.execute_script(
        "return [...document.querySelectorAll('#gallery .thumb img')].every(i => i.complete && i.naturalWidth > 0)"
    ), message="every thumbnail decodes")
    shown = {
        figure.get_attribute("data-image"): group.get_attribute("data-class")
        for group in css_all(browser, "#gallery section.group")
        for figure in group.find_elements("css selector", ".thumb")
    }
    assert shown == {row["image"]: row["predictions"][0]["label"] for row in rows}
    assert not any(more.is_displayed() for more in css_all(browser, "#gallery .more")), "every image is shown"
    changed = {row["image"] for row in rows if row["changed"]}
    assert {f.get_attribute("data-image") for f in css_all(browser, "#gallery .thumb.changed")} == changed
    model = httpx.get(f"{live_url}/models/{model_id}", headers=team.headers).json()
    assert css(browser, "#rep-changed").text == f"{100 * model['report']['changed_from_zero_shot']:.1f}%"
    beyond = model["report"]["beyond_balancing"]
    balancing, differs = browser.execute_script(  # formatted as the page formats them
        "return Array.from(arguments).map((v) => (100 * v).toFixed(1))",
        beyond["class_balancing"], beyond["adapted_differs"])
    assert css(browser, "#rep-beyond").text == (f"balancing zero-shot's classes over the bucket alone changes "
                                                 f"{balancing}%; the adapted model differs from that on {differs}%")
    assert css(browser, "#rep-est-adapted").text == f"{100 * model['report']['estimated_top1']['adapted']:.1f}%"
    skewed = model["report"]["estimated_top1_if_skewed"]
    adapted, zero = browser.execute_script(
        "return Array.from(arguments).map((v) => (100 * v).toFixed(1))", skewed["adapted"], skewed["zero_shot"])
    shown = css(browser, "#rep-est-skewed").text
    assert shown.startswith(f"adapted {adapted}%, zero-shot {zero}% (zero-shot's shares: ")
    assert skewed["measured_error"]["summary"] in text_of(browser, "#rep-skewed-trust")
    assert bool(css_all(browser, "#rep-disagree")) is not skewed["same_order"]
    # what the bucket threshold flagged, and the histogram of the scores it was fitted on
    unknown, flagged = model["report"]["unknown"], {row["image"] for row in rows if row["unknown"]}
    assert flagged, "a fitted threshold flags at least the top 1% of its bucket"
    share, threshold = browser.execute_script(  # formatted as the page formats them (JS rounds 6.25 up)
        "return [(100 * arguments[0]).toFixed(1), arguments[1].toFixed(3)]", unknown["share"], unknown["threshold"])
    images = f"{len(flagged)} image{'' if len(flagged) == 1 else 's'}"
    assert text_of(browser, "#rep-unknown") == f"{share}% ({images}): ood score above {threshold}"
    assert sum(unknown["histogram"]) == 16 and unknown["histogram"] == [
        int(b.get_attribute("data-count")) for b in css_all(browser, "#res-unknown-chart rect.bin")]
    assert css_all(browser, "#res-unknown-chart line.threshold")
    assert unknown["how"] and unknown["how"] in text_of(browser, "#res-unknown-how")  # the report's own words
    screenshot(browser, "results")

    def gallery() -> set[str]:
        return {f.get_attribute("data-image") for f in css_all(browser, "#gallery .thumb")}

    css(browser, "#gal-changed").click()
    wait_until(browser, lambda: gallery() == changed, message="the filter shows only the images whose label changed")
    css(browser, "#gal-changed").click()
    css(browser, "#gal-unknown").click()
    wait_until(browser, lambda: gallery() == flagged, message="the filter shows only the images of no known class")
    assert all("unknown" in f.get_attribute("class") for f in css_all(browser, "#gallery .thumb"))
    css(browser, "#res-csv").click()
    table = downloads / f"{adaptation_id}-predictions.csv"
    wait_until(browser, lambda: table.is_file() and not list(downloads.glob("*.crdownload")), message="no CSV")
    assert len(table.read_text().splitlines()) == 1 + len(rows)

    # Audit: a labelled zip of the same two classes; adapted vs zero-shot and the confusion matrices.
    labelled = tmp_path / "labelled.zip"
    labelled.write_bytes(dtd_images.zip(dtd_images.paths(8)))
    css(browser, "#audit-form input[name=images]").send_keys(str(labelled))
    css(browser, "#audit-form button[type=submit]").click()
    wait_until(browser, lambda: css_all(browser, "#audits .audit-top1"), TRAIN_SECONDS, "the audit did not finish")
    audit = httpx.get(f"{live_url}/models/{model_id}/evaluations", headers=team.headers).json()["data"][0]
    assert audit["status"] == "succeeded" and audit["n"] == 8
    assert css(browser, "#audits .audit-top1").text == (
        f"{100 * audit['adapted']['top1']:.1f}% adapted vs {100 * audit['zero_shot']['top1']:.1f}% zero-shot"
    )
    confusion = css_all(browser, "#audits table.confusion")[0]
    cells = [int(cell.text) for cell in confusion.find_elements("css selector", "td")]
    assert cells == [count for row in audit["adapted"]["confusion"] for count in row]
    browser.execute_script("document.querySelector('#audits').scrollIntoView()")
    screenshot(browser, "audit")

    # Try it: drop an image; the adapted model's top-k beside zero-shot's, as the API answers them.
    photo = dtd_images.paths(3, classes=3)[2]
    browser.get(f"{live_url}/#/try/{model_id}")
    wait_until(browser, lambda: css(browser, "#try-model").get_attribute("value") == model_id)
    browser.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));
        const drop = new DragEvent('drop', {dataTransfer: transfer, bubbles: true});
        document.querySelector('#drop').dispatchEvent(drop);""",
        base64.b64encode(photo.read_bytes()).decode(), photo.name,
    )
    wait_until(browser, lambda: css_all(browser, "#try-zero .bar-row"))
    files = {"images": (photo.name, photo.read_bytes(), "image/jpeg")}
    mine = httpx.post(f"{live_url}/models/{model_id}/classify", headers=team.headers, files=files).json()
    base = httpx.post(f"{live_url}/classify", headers=team.headers, files=files,
                      data={"class_names": json.dumps(CLASSES), "base_model": stack.base_model}).json()
    for selector, answer in (("#try-adapted", mine), ("#try-zero", base)):
        bars = css_all(browser, f"{selector} .bar-row")
        shown_labels = [row.find_element("css selector", ".label").get_attribute("title") for row in bars]
        shown_scores = [row.find_elements("css selector", "span")[-1].text for row in bars]
        predictions = answer["results"][0]["predictions"]
        assert shown_labels == [p["label"] for p in predictions]
        assert shown_scores == [f"{100 * p['score']:.1f}%" for p in predictions]
    screenshot(browser, "try")

    browser.get(f"{live_url}/#/adaptations")
    wait_until(browser, lambda: css_all(browser, f'#adaptation-rows tr[data-id="{adaptation_id}"] .status.succeeded'))
    screenshot(browser, "adaptations")

    # Models: download the artifact (a loadable zip), then delete the model after confirming.
    browser.get(f"{live_url}/#/models")
    wait_until(browser, lambda: css_all(browser, f'#model-rows tr[data-id="{model_id}"]'))
    screenshot(browser, "models")
    css(browser, f'#model-rows tr[data-id="{model_id}"] button.download').click()
    archive = downloads / f"{model_id}.zip"
    wait_until(browser, archive.is_file, message="the artifact was not downloaded")
    wait_until(browser, lambda: not list(downloads.glob("*.crdownload")))
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as opened:
        assert sorted(opened.namelist()) == [f"{model_id}/metadata.json", f"{model_id}/model.safetensors"]
        assert json.loads(opened.read(f"{model_id}/metadata.json"))["class_names"] == CLASSES

    css(browser, f'#model-rows tr[data-id="{model_id}"] button.delete').click()
    browser.switch_to.alert.dismiss()
    assert httpx.get(f"{live_url}/models/{model_id}", headers=team.headers).status_code == 200, "dismissed: kept"
    css(browser, f'#model-rows tr[data-id="{model_id}"] button.delete').click()
    browser.switch_to.alert.accept()
    wait_until(browser, lambda: not css_all(browser, f'#model-rows tr[data-id="{model_id}"]'))
    assert httpx.get(f"{live_url}/models/{model_id}", headers=team.headers).status_code == 404

    # Nothing came from outside the service, and the key never reached a URL.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith((live_url, "blob:", "data:")) for name in loaded), loaded
    assert team.key not in browser.current_url

    css(browser, "#sign-out").click()
    wait_until(browser, lambda: css(browser, "#view-signin").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('must.apiKey')") is None
