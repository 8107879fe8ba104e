"""Screenshots of the dashboard for README.md: ``.venv/bin/python scripts/dashboard_screenshot.py [OUT_DIR]``.

Starts a broker, runs traffic through three queues (after 40 seconds the sparklines and charts have a history),
with some messages dead-lettered, and meanwhile saves ``dashboard.png`` (the queues) and
``dashboard-queue.png`` (one queue's page) from headless chromium. Needs chromium and chromedriver (Debian:
``apt-get install chromium chromium-driver``, which ``./dev test`` installs).

Each page is shot once its live feed is connected and has shown samples, never while it still says
"connecting". Chromium runs with ``--no-sandbox``: as root (a container, CI) it refuses to start without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import replika

TRAFFIC_SECONDS = 40
#: Seconds to wait for a page, its live feed or a sample before giving up.
PAGE_WAIT = 30
#: Samples (one a second) a page shows before its screenshot: the rates and sparklines have settled.
SETTLE_SAMPLES = 2


def start(tmp: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    cmd = [sys.executable, "-m", "replika_server", "serve", "--port", "0", "--admin-port", "0"]
    cmd += ["--data-dir", str(tmp / "data"), "--port-file", str(tmp / "port"), "--admin-port-file", str(tmp / "aport")]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"])
    deadline = time.monotonic() + 60
    while not (tmp / "port").exists() or not (tmp / "port").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the broker did not start")
        time.sleep(0.05)
    return proc, f"replika://127.0.0.1:{(tmp / 'port').read_text()}", int((tmp / "aport").read_text())


async def traffic(url: str, seconds: float) -> None:
    async with replika.AsyncClient(url) as client:
        await client.declare("orders", max_attempts=2)
        await client.declare("emails")
        await client.declare("thumbnails")
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline:
            step += 1
            wave = 1 + abs((step % 40) - 20) / 4  # publish in waves, so that depths rise and fall
            await client.publish_many("orders", [b'{"order": %d}' % i for i in range(int(40 * wave))])
            await client.publish_many("emails", [b"welcome mail"] * int(25 * random.uniform(0.5, 1.5)))
            await client.publish_many("thumbnails", [b"\x89PNG..."] * 12)
            for queue, share in (("orders", 0.8), ("emails", 1.0), ("thumbnails", 0.6)):
                msgs = await client.fetch(queue, max=int(60 * share * wave))
                bad = [m for m in msgs if queue == "orders" and random.random() < 0.03]
                good = [m for m in msgs if m not in bad]
                if good:
                    await client.ack(good)
                if bad:
                    await client.nack(bad)
            await asyncio.sleep(0.25)


def browser() -> WebDriver:
    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        raise SystemExit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,860"):
        options.add_argument(arg)
    options.binary_location = chromium
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))


def sampled(driver: WebDriver) -> str:
    """When the page last got a sample from the live feed ('' before the first)."""
    return str(driver.find_element(By.TAG_NAME, "body").get_attribute("data-sampled") or "")


def shoot(driver: WebDriver, url: str, ready_selector: str, path: Path) -> None:
    """Open ``url``, wait until the live feed is on and ``ready_selector`` is shown, let SETTLE_SAMPLES samples
    arrive, and save the screenshot to ``path``."""
    wait = WebDriverWait(driver, PAGE_WAIT, poll_frequency=0.1)
    driver.get(url)
    wait.until(lambda d: "on" in (d.find_element(By.ID, "live").get_attribute("class") or ""), "the live feed")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ready_selector), ready_selector)
    for _ in range(SETTLE_SAMPLES):
        seen = sampled(driver)
        wait.until(lambda d: sampled(d) not in ("", seen), "a sample")  # noqa: B023 (called before seen changes)
    driver.save_screenshot(str(path))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, admin_port = start(Path(tmp))
        try:
            # Traffic goes on while the screenshots are taken, so that the rates are live.
            feeder = threading.Thread(target=lambda: asyncio.run(traffic(url, TRAFFIC_SECONDS + 30)), daemon=True)
            feeder.start()
            time.sleep(TRAFFIC_SECONDS)  # history for the sparklines and charts
            driver = browser()
            try:
                base = f"http://127.0.0.1:{admin_port}/"
                shoot(driver, base, 'tr[data-queue="orders"]', out / "dashboard.png")
                shoot(driver, base + "#/queues/orders", "#peek-rows tr", out / "dashboard-queue.png")
            finally:
                driver.quit()
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
    print(f"wrote {out / 'dashboard.png'} and {out / 'dashboard-queue.png'}")


if __name__ == "__main__":
    main()
