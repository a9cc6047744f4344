"""The search page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Types a text query, uploads an image, clicks a result ("more like this", by mouse and by keyboard), checks the
grid, checks that captions holding ``<script>`` and ``"><img onerror=...>`` show as text and run nothing, and
saves a screenshot. Without Chromium the test is skipped with one line (``.ci/run`` installs it)."""
import os
import shutil

import pytest

pytest.importorskip("fastapi")

from retrieval.serve import background_server, create_app  # noqa: E402

from .serve_util import EVIL_CAPTIONS, build_index  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def chrome(user_data_dir: str):
    """A headless Chromium that reaches nothing but loopback (no sync, updates or background networking)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={user_data_dir}"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


def _skip_reason():
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Chromium not installed (apt-get install chromium chromium-driver; .ci/run does this)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -r requirements.txt)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_page_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.conftest import FIXTURES

    fixture = os.path.join(FIXTURES, "internvl-cg-tiny")
    has_text = os.path.isfile(os.path.join(fixture, "tokenizer.model"))
    spec = f"internvl-g:{fixture}" if has_text else "internvit:internvit-6b-tiny"
    idx = build_index(str(tmp_path), "photos", spec, n=12)
    imgs = os.path.join(str(tmp_path), "photos_imgs")

    driver = chrome(str(tmp_path / "chrome-profile"))
    wait = WebDriverWait(driver, 60)
    try:
        with background_server(create_app([idx])) as url:
            driver.get(url + "/")
            wait.until(lambda d: len(Select(d.find_element(By.ID, "index")).options) == 1)
            Select(driver.find_element(By.ID, "k")).select_by_visible_text("20")

            def results():
                return driver.find_elements(By.CSS_SELECTOR, "#results .hit")

            def status():
                return driver.find_element(By.ID, "status").text

            # 1. type a text query and press Enter
            box = driver.find_element(By.ID, "text")
            box.send_keys("a blue pattern", Keys.ENTER)
            if has_text:
                wait.until(lambda d: "results for" in status())
                assert len(results()) == 12  # k=20 > 12 items: the whole collection, ranked
            else:
                wait.until(lambda d: "image-only" in status())

            # 2. upload an image: its own picture comes first
            driver.find_element(By.ID, "file").send_keys(os.path.join(imgs, "img_004.png"))
            wait.until(lambda d: "image img_004.png" in status())
            hits = results()
            assert len(hits) == 12 and hits[0].get_attribute("data-id") == "4"
            assert hits[0].find_element(By.CSS_SELECTOR, ".meta").text == "id 4"
            assert "img_004.png" in hits[0].text
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
            assert driver.find_element(By.ID, "query-img").is_displayed()

            # 3. click a result: more like this
            target = next(h for h in results() if h.get_attribute("data-id") == "9")
            target.click()
            wait.until(lambda d: "more like id 9" in status())
            assert results()[0].get_attribute("data-id") == "9"

            # 4. keyboard only: Tab from the text box reaches the controls; Enter on a result searches by it
            second = results()[1]
            second_id = second.get_attribute("data-id")
            second.send_keys(Keys.ENTER)
            wait.until(lambda d: f"more like id {second_id}" in status())
            assert results()[0].get_attribute("data-id") == second_id
            box.send_keys(Keys.TAB)
            assert driver.switch_to.active_element.get_attribute("id") == "k"

            # 5. hostile captions are text: shown verbatim, nothing injected, nothing ran
            caps = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#results .cap")]
            for cap in EVIL_CAPTIONS.values():
                assert cap in caps
            assert driver.execute_script("return window.__pwned") is None
            assert len(driver.find_elements(By.CSS_SELECTOR, "script")) == 1  # app.js only
            assert driver.find_elements(By.CSS_SELECTOR, "img[src='x']") == []
            assert driver.find_elements(By.CSS_SELECTOR, "#results .cap *") == []

            shot = str(tmp_path / "search_page.png")
            assert driver.save_screenshot(shot)
            with open(shot, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not [e for e in logs if "/search" not in e.get("message", "")], logs
    finally:
        driver.quit()


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_page_with_ids_above_2_53_an_encoded_name_and_the_server_limits(tmp_path):
    """Trial 9c: ids above 2**53 are shown and searched exactly (JavaScript numbers round them: "more like this"
    on id 2**53 + 1 searched id 2**53); an index name needing percent-encoding gets its thumbnails; the k choices
    and the text length come from the server's limits (/indices), not from the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from retrieval.serve import ServeLimits
    from retrieval.sharded import set_id_offset

    big = 2**53
    idx = build_index(str(tmp_path), "photos", "internvit:internvit-6b-tiny", n=6, evil=False)
    set_id_offset(idx, big)
    imgs = os.path.join(str(tmp_path), "photos_imgs")
    app = create_app({"my photos #1 %": idx}, limits=ServeLimits(max_k=10, max_text_chars=50))
    driver = chrome(str(tmp_path / "chrome-profile"))
    wait = WebDriverWait(driver, 60)
    try:
        with background_server(app) as url:
            driver.get(url + "/")
            wait.until(lambda d: len(Select(d.find_element(By.ID, "index")).options) == 1)
            assert [o.text for o in Select(driver.find_element(By.ID, "k")).options] == ["5", "10"]
            assert driver.find_element(By.ID, "text").get_attribute("maxLength") == "50"

            def results():
                return driver.find_elements(By.CSS_SELECTOR, "#results .hit")

            def status():
                return driver.find_element(By.ID, "status").text

            driver.find_element(By.ID, "file").send_keys(os.path.join(imgs, "img_001.png"))
            wait.until(lambda d: "image img_001.png" in status())
            first = results()[0]
            assert first.get_attribute("data-id") == str(big + 1)
            assert first.find_element(By.CSS_SELECTOR, ".meta").text == f"id {big + 1}"
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))

            target = next(h for h in results() if h.get_attribute("data-id") == str(big + 3))
            target.click()
            wait.until(lambda d: f"more like id {big + 3}" in status())
            assert results()[0].get_attribute("data-id") == str(big + 3)
    finally:
        driver.quit()
