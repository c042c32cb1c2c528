"""The dashboard in a real headless browser (Debian's chromium and chromedriver,
driven by selenium) against a Bascule process with two workers and real backends:
the page loads without console errors, shows the backends, follows a backend going
down, drains one through its button (checked on the backends' hit counts), purges a
cached entry through its form, and shows a hostile route name as text."""

from __future__ import annotations

import http.client
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CountingBackend, free_port, poll, run_bascule, wait_port

pytestmark = pytest.mark.slow

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver "
                    "(make test installs them: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def state_of(driver: Any, backend_id: str) -> str | None:
    # one script, so the row read is the row of one render
    return driver.execute_script(  # type: ignore[no-any-return]
        "for (const row of document.querySelectorAll('table.backends tbody tr'))"
        "  if (row.dataset.key === arguments[0]) return row.children[1].textContent;"
        "return null;", backend_id)


def get(conn: http.client.HTTPConnection, path: str) -> str:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read().decode()
    assert response.status == 200, (response.status, body)
    return body


def test_dashboard_in_a_real_browser(tmp_path: Path, procs: list[Any], browser: Any) -> None:
    a, b, c = CountingBackend("a"), CountingBackend("b"), CountingBackend("c")
    port, admin = free_port(), free_port()
    name = HOSTILE.replace('"', '\\"')
    config = tmp_path / "bascule.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 2
access_log = "off"

[admin]
listen = "127.0.0.1:{admin}"

[cache]
store = "memory"

[[routes]]
name = "{name}"
upstream = "app"
cache = true

[upstreams.app]
backends = ["{a.id}", "{b.id}", "{c.id}"]

[upstreams.app.health]
path = "/health"
interval = "0.3s"
timeout = "0.5s"
jitter = "0.05s"
fall = 1
rise = 1
""")
    try:
        proc = run_bascule(config)
        procs.append(proc)
        wait_port(port)
        wait_port(admin)
        browser.get(f"http://127.0.0.1:{admin}/")

        # the page shows every backend, up
        assert poll(lambda: all(state_of(browser, x.id) == "up" for x in (a, b, c)), 10), \
            browser.page_source[:2000]

        # a hostile route name is text, and nothing of it ran
        route_cell = browser.find_element("css selector", "#routes tbody td")
        assert route_cell.text == HOSTILE
        assert browser.find_elements("css selector", "#routes img, #routes script") == []
        assert browser.execute_script("return window.__pwned") is None

        # a backend going down shows within a few seconds
        c.stop()
        assert poll(lambda: state_of(browser, c.id) == "down", 5)

        # drain through the page: no new requests reach that backend
        browser.find_element(
            "css selector", f'button.act[data-backend="{a.id}"][data-action="drain"]').click()
        assert poll(lambda: state_of(browser, a.id) == "drained", 5)
        a.hits.clear()
        b.hits.clear()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(4):  # fresh connections: both workers must have the drain
            fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            for _ in range(10):
                assert get(fresh, "/") == "b"
            fresh.close()
        assert a.hits["/"] == 0 and b.hits["/"] == 40

        # purge through the page empties the entry (the same connection, so the
        # same worker's memory store, before and after)
        assert get(conn, "/cached") == "b" and get(conn, "/cached") == "b"
        assert b.hits["/cached"] == 1  # the second was a cache hit
        browser.find_element("css selector", "#purge-value").send_keys(
            f"http://127.0.0.1:{port}/cached")
        browser.find_element("css selector", "#purge button[type=submit]").click()
        assert poll(lambda: "Purge url" in browser.find_element("id", "banner").text, 5)
        assert "done" in browser.find_element("id", "banner").text

        def refilled() -> bool:
            get(conn, "/cached")
            return b.hits["/cached"] == 2  # a miss again: the entry was gone
        assert poll(refilled, 5)
        conn.close()

        # the page logged no errors in all of that
        severe = [entry for entry in browser.get_log("browser")
                  if entry["level"] == "SEVERE"]
        assert severe == []
    finally:
        for backend in (a, b, c):
            backend.stop()
