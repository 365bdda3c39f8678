"""Driving the dashboard in Debian's Chromium through Selenium: where the browser is, and the few calls the
browser tests repeat (find, wait, read text, sign in, screenshot)."""

from __future__ import annotations

import os
from pathlib import Path

CHROMIUM = os.environ.get("MUST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MUST_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT_SECONDS = 30


def wait_until(browser, condition, timeout: float = WAIT_SECONDS, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda _: condition(), message)


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, selector)


def css_all(browser, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def text_of(browser, selector: str) -> str:
    """An element's text read in one script call (the page re-renders live parts under the driver)."""
    return browser.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                  selector).strip()


def visible_text(browser, selector: str) -> str:
    found = css_all(browser, selector)
    return found[0].text if found and found[0].is_displayed() else ""


def screenshot(browser, name: str) -> None:
    folder = os.environ.get("MUST_DASHBOARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def sign_in(browser, url: str, key: str) -> None:
    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{url}/#/signin")
    field = css(browser, "#api-key")
    wait_until(browser, field.is_displayed)
    field.clear()
    field.send_keys(key)
    css(browser, "#signin-form button[type=submit]").click()
