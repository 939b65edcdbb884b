"""The web page in a real headless Chromium: type a query, see the result images load, search by
clicking a result and by uploading an image, all under the service's Content-Security-Policy
(no violation in the console); against a service with an API key, the page asks for it once
and shows images fetched with it. A screenshot is saved to test-artifacts/.

Skipped, with the reason, where Chromium, chromedriver or selenium is missing (.ci/run installs
Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipforge.index.searcher import Searcher
from clipforge.index.server import ServerConfig, create_app, running_server

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (the dev extra)"),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no chromium/chromedriver on PATH (Debian: apt-get install chromium "
        "chromium-driver)",
    ),
]

# Every image of the grid has arrived and decoded (naturalWidth is 0 for a broken image).
IMAGES_LOADED = """
const imgs = [...document.querySelectorAll('#results .hit img')];
return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
"""


KEY = "browser-test-key-42"


@pytest.fixture(scope="module")
def searcher(demo_index: Path) -> Searcher:
    return Searcher.open(demo_index)


@pytest.fixture(scope="module")
def base_url(demo_index: Path, searcher: Searcher) -> Iterator[str]:
    with running_server(create_app(ServerConfig(str(demo_index)), searcher=searcher)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(demo_index: Path, searcher: Searcher) -> Iterator[str]:
    app = create_app(ServerConfig(str(demo_index), api_key=KEY), searcher=searcher)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    # The flags that keep Chromium from reaching for the network at start (a closed network
    # makes those attempts fail slowly), and a fresh profile.
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=1280,1000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console, CSP reports
    # An explicit chromedriver: selenium must not try to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, what: str, timeout: float = 60) -> Any:
    try:
        # a grid re-rendered while the condition reads it: read it again
        return WebDriverWait(
            driver, timeout, ignored_exceptions=(StaleElementReferenceException,)
        ).until(condition)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for {what}; status line: {status!r}") from None


def _csp_violations(driver: Any) -> list[str]:
    """Console messages of the page since the last call that report a blocked resource."""
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"]]  # fmt: skip


def _hit_ids(driver: Any) -> list[int]:
    return [int(e.get_attribute("data-id")) for e in driver.find_elements(By.CSS_SELECTOR, ".hit")]


def _exact_matches(driver: Any) -> list[int]:
    """Ids of the results scored as the same image as the query (pixel-identical twins tie)."""
    ids = _hit_ids(driver)
    scores = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, ".hit .score")]
    return [i for i, s in zip(ids, scores, strict=True) if s >= 0.999]


def test_search_page_in_chromium(browser: Any, base_url: str, tmp_path: Path) -> None:
    d = browser
    d.get(base_url + "/")
    _wait(d, lambda d: "1,911 items" in d.find_element(By.ID, "info").text, "the index info")

    # type a query and press Enter: a grid of result images that load
    box = d.find_element(By.ID, "query")
    box.send_keys("a red heart", Keys.ENTER)
    _wait(d, lambda d: d.execute_script(IMAGES_LOADED), "the result images")
    cards = d.find_elements(By.CSS_SELECTOR, ".hit")
    assert len(cards) == 24  # the page's default k
    widths = d.execute_script(
        "return [...document.querySelectorAll('#results .hit img')].map(i => i.naturalWidth)"
    )
    assert all(w > 0 for w in widths), widths
    # the grid shows the API's answer to the same query, in order
    api = httpx.post(f"{base_url}/search", json={"text": "a red heart", "k": 24}, timeout=60)
    assert _hit_ids(d) == [h["id"] for h in api.json()["hits"]]
    captions = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".hit .caption")]
    assert captions == [h["caption"] for h in api.json()["hits"]]
    scores = [float(e.text) for e in d.find_elements(By.CSS_SELECTOR, ".hit .score")]
    assert scores == sorted(scores, reverse=True)
    assert "a red heart" in d.find_element(By.ID, "status").text
    assert "q=a+red+heart" in d.current_url  # the query is in the address, for sharing
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-page.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # click the third result: image -> image search, the clicked item comes out on top
    third = _hit_ids(d)[2]
    cards[2].click()
    _wait(d, lambda d: "similar to" in d.find_element(By.ID, "status").text
          and third in _exact_matches(d), "the 'more like this' results")  # fmt: skip
    _wait(d, lambda d: d.execute_script(IMAGES_LOADED), "the result images")
    assert "item=" in d.current_url

    # upload an image file (the bytes of the sixth result): that item comes out on top
    target = _hit_ids(d)[5]
    data = d.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer())
            .then(b => done(Array.from(new Uint8Array(b))));""",
        f"{base_url}/items/{target}/image",
    )
    upload = tmp_path / "query.webp"
    upload.write_bytes(bytes(data))
    d.find_element(By.ID, "image-input").send_keys(str(upload))
    _wait(d, lambda d: "query.webp" in d.find_element(By.ID, "status").text
          and target in _exact_matches(d), "the upload results")  # fmt: skip

    # switching to captions repeats the query against the caption index
    assert d.find_element(By.ID, "results").get_attribute("data-target") == "image"
    d.find_element(By.CSS_SELECTOR, 'input[name="target"][value="text"] + span').click()
    _wait(d, lambda d: d.find_element(By.ID, "results").get_attribute("data-target") == "text"
          and d.execute_script(IMAGES_LOADED), "the caption results")  # fmt: skip
    assert "query.webp" in d.find_element(By.ID, "status").text

    # a bad request shows the service's message instead of results
    box = d.find_element(By.ID, "query")
    box.send_keys("x" * 1001, Keys.ENTER)
    _wait(d, lambda d: "limit" in d.find_element(By.ID, "status").text, "the error message")
    assert d.find_elements(By.CSS_SELECTOR, ".hit") == []
    # everything above ran under the page's Content-Security-Policy without a violation
    assert _csp_violations(d) == []


def test_api_key_prompt_in_chromium(browser: Any, keyed_url: str) -> None:
    d = browser
    d.get(keyed_url + "/?q=pizza")  # the page (public) searches at once: 401, so it asks
    form = d.find_element(By.ID, "key-form")
    _wait(d, lambda d: form.is_displayed(), "the API key form")
    assert "needs an API key" in d.find_element(By.ID, "status").text
    assert d.find_elements(By.CSS_SELECTOR, ".hit") == []

    key_box = d.find_element(By.ID, "api-key")
    key_box.send_keys("not-the-key", Keys.ENTER)
    _wait(d, lambda d: "refused" in d.find_element(By.ID, "key-note").text, "the refusal")
    assert form.is_displayed()

    key_box.send_keys(KEY, Keys.ENTER)
    _wait(d, lambda d: d.execute_script(IMAGES_LOADED), "the result images")
    assert not form.is_displayed()
    api = httpx.post(f"{keyed_url}/search", json={"text": "pizza", "k": 24},
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
    assert _hit_ids(d) == [h["id"] for h in api.json()["hits"]]
    # <img src> cannot send the key: the images were fetched with it and shown as blob: URLs
    sources = d.execute_script(
        "return [...document.querySelectorAll('#results .hit img')].map(i => i.src)"
    )
    assert sources and all(s.startswith("blob:") for s in sources), sources[:3]
    assert d.execute_script("return sessionStorage.getItem('clipforge-api-key')") == KEY

    # asked once: a reload and a click search with the kept key, no form
    d.refresh()
    _wait(d, lambda d: d.execute_script(IMAGES_LOADED), "the result images after a reload")
    assert not d.find_element(By.ID, "key-form").is_displayed()
    first = _hit_ids(d)[0]
    d.find_elements(By.CSS_SELECTOR, ".hit")[0].click()
    _wait(d, lambda d: "similar to" in d.find_element(By.ID, "status").text
          and first in _exact_matches(d), "the 'more like this' results")  # fmt: skip
    _wait(d, lambda d: d.execute_script(IMAGES_LOADED), "the result images")
    chip = d.find_element(By.CSS_SELECTOR, "#status .chip img")
    _wait(d, lambda d: chip.get_attribute("src").startswith("blob:"), "the query chip image")
    assert not d.find_element(By.ID, "key-form").is_displayed()
    assert _csp_violations(d) == []
