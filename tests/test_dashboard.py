"""The dashboard in a real headless browser (Debian's chromium and chromedriver, which ``./dev test`` installs):
live numbers change as messages are published, a click redrives dead letters, and the queue page links a
message to its timeline, which follows it through the dead-letter queue and back."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import replika
from tests.conftest import WAIT, ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (./dev test installs them: apt-get install chromium chromium-driver)",
)

if CHROMIUM is not None and CHROMEDRIVER is not None:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


def cell(driver: WebDriver, queue: str, field: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, f'tr[data-queue="{queue}"] [data-field="{field}"]')
    return str(found[0].text) if found else ""


def wait_for(driver: WebDriver, what: str, check: object) -> None:
    # A live page re-renders while it is checked: an element found a moment ago may be gone, so look again.
    wait = WebDriverWait(driver, WAIT, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: check(d), message=what)  # type: ignore[operator]


def test_the_dashboard_shows_queues_filling_and_draining_live(
    browser: WebDriver, broker: ServerProcess, tmp_path: Path
) -> None:
    browser.get(f"http://127.0.0.1:{broker.admin_port}/")
    wait_for(browser, "the live feed connects", lambda d: "on" in d.find_element(By.ID, "live").get_attribute("class"))
    # What scripts/dashboard_screenshot.py waits for before a screenshot.
    wait_for(browser, "a first sample", lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-sampled"))
    with replika.Client(broker.url) as client:
        client.declare("jobs", max_attempts=1)
        client.publish_many("jobs", [b"job %d" % i for i in range(5)])
        wait_for(browser, "jobs shows 5 ready", lambda d: cell(d, "jobs", "ready") == "5")
        client.publish_many("jobs", [b"more"] * 10)
        wait_for(browser, "jobs shows 15 ready", lambda d: cell(d, "jobs", "ready") == "15")
        msgs = client.fetch("jobs", max=3)
        wait_for(browser, "3 in flight", lambda d: cell(d, "jobs", "in_flight") == "3")
        client.reject(msgs)
        wait_for(browser, "3 dead-lettered", lambda d: cell(d, "jobs", "dead") == "3")
        browser.save_screenshot(str(tmp_path / "overview.png"))

        browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="jobs"]').click()
        wait_for(browser, "the queue page", lambda d: d.find_element(By.ID, "q-name").text == "jobs")
        redrive = browser.find_element(By.ID, "btn-redrive")
        wait_for(browser, "the redrive button offers 3", lambda d: redrive.text == "Redrive 3 dead letters")
        wait_for(
            browser, "peeked messages listed", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peek-rows tr")) == 12
        )
        redrive.click()
        status = browser.find_element(By.ID, "action-status")
        wait_for(browser, "the redrive reports", lambda d: status.text == "moved 3 messages back")
        wait_for(
            browser, "no dead letters left", lambda d: d.find_element(By.CSS_SELECTOR, '[data-q="dead"]').text == "0"
        )
        wait_for(browser, "15 ready again", lambda d: d.find_element(By.CSS_SELECTOR, '[data-q="ready"]').text == "15")
        assert client.stats("jobs")["ready"] == 15
        browser.save_screenshot(str(tmp_path / "queue.png"))


#: A life through a dead-letter queue and back, as the timeline page shows it: (event, message) per row.
LIFE = [
    ("published", "life #1"),
    ("delivered", "life #1"),
    ("nacked", "life #1"),
    ("delivered", "life #1"),
    ("lease_expired", "life #1"),
    ("dead_lettered", "life #1"),
    ("published", "life.dlq #1"),
    ("redriven", "life.dlq #1"),
    ("published", "life #2"),
    ("delivered", "life #2"),
    ("acked", "life #2"),
]


def timeline(driver: WebDriver) -> list[tuple[str, str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#timeline-rows tr")
    return [(str(r.get_attribute("data-kind")), str(r.find_elements(By.TAG_NAME, "td")[4].text)) for r in rows]


def listing(driver: WebDriver) -> list[tuple[str, str]]:
    """The queue page's recent messages with a history: (id, state) per row, read in one go in the page (it
    re-renders the rows when they change)."""
    script = """return [...document.querySelectorAll('#history-rows tr[data-id]')]
        .map((tr) => [tr.dataset.id, tr.children[1].textContent]);"""
    return [(str(i), str(state)) for i, state in driver.execute_script(script)]


def test_the_queue_page_links_a_message_to_its_whole_life_in_order(
    browser: WebDriver, broker: ServerProcess, tmp_path: Path
) -> None:
    browser.get(f"http://127.0.0.1:{broker.admin_port}/")
    wait_for(browser, "the live feed connects", lambda d: "on" in d.find_element(By.ID, "live").get_attribute("class"))
    with replika.Client(broker.url) as client:
        client.declare("life", max_attempts=2, history={"payloads": True})
        client.declare("life.dlq", history=True)
        mid = client.publish("life", b"the job", headers={"trace": "t-1"})
        [first] = client.fetch("life", max=1, wait=WAIT)
        client.nack([first], delay=0)
        [second] = client.fetch("life", max=1, wait=WAIT, lease=0.2)
        assert (first.id, second.id, second.attempts) == (mid, mid, 2)
        # Its second lease runs out unsettled, at its last attempt: the broker dead-letters it.
        wait_for(browser, "life shows 1 dead letter", lambda d: cell(d, "life", "dead") == "1")
        browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="life"]').click()
        redrive = browser.find_element(By.ID, "btn-redrive")
        wait_for(browser, "the redrive button offers 1", lambda d: redrive.text == "Redrive 1 dead letters")
        redrive.click()
        status = browser.find_element(By.ID, "action-status")
        wait_for(browser, "the redrive reports", lambda d: status.text == "moved 1 messages back")
        [third] = client.fetch("life", max=1, wait=WAIT)
        client.ack([third])
        client.flush()
        assert third.id == mid + 1 and third.payload == b"the job"

    # The listing refreshes every few seconds: newest first, the redriven copy once its ack is in, then the first.
    wait_for(browser, "the redriven copy listed as acked", lambda d: listing(d)[:1] == [(str(third.id), "acked")])
    assert listing(browser) == [(str(third.id), "acked"), (str(mid), "dead_lettered")]
    row = browser.find_element(By.CSS_SELECTOR, f'#history-rows tr[data-id="{mid}"]')
    browser.execute_script("arguments[0].scrollIntoView()", row)
    browser.save_screenshot(str(tmp_path / "queue-history.png"))
    row.find_element(By.TAG_NAME, "a").click()
    wait_for(browser, "the whole life, in order", lambda d: timeline(d) == LIFE)
    assert browser.current_url.endswith(f"#/queues/life/messages/{mid}")
    assert browser.find_element(By.ID, "m-state").text == "acked"
    assert browser.find_element(By.ID, "m-deliveries").text == "3"
    cells = [r.find_elements(By.TAG_NAME, "td") for r in browser.find_elements(By.CSS_SELECTOR, "#timeline-rows tr")]
    assert [c[2].text for c in cells[:6]] == ["", "1", "1", "2", "2", ""]  # the attempt an event concerns
    assert cells[0][3].text != "" and cells[5][3].text == ""  # by a connection, or by the broker itself
    assert "reason=max_attempts" in cells[5][5].text and "to life.dlq #1" in cells[5][5].text
    assert "from life.dlq #1" in cells[8][5].text
    times = [c[0].text for c in cells]
    assert times == sorted(times)  # ISO 8601 UTC: text order is time order
    assert browser.find_element(By.ID, "m-headers").text == "trace t-1"
    assert browser.find_element(By.ID, "m-payload").text == "the job"
    browser.save_screenshot(str(tmp_path / "timeline.png"))
