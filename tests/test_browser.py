"""The operations page in headless Chromium, through the round-robin proxy.

`examples/launch.py` runs three replicas of an example app behind its proxy, on
the test's NATS and PostgreSQL. The page polls ``GET /api/operations`` once a
second, so its polls land on each replica in turn, as behind a load balancer.

Chromium and chromedriver come from the system (Debian: ``apt-get install
chromium chromium-driver``). Without them the test is skipped, unless
``REPLISTATE_REQUIRE_BROWSER=1`` makes that a failure. Selenium gets both paths,
so Selenium Manager never runs, and Chromium's flags keep it on 127.0.0.1: every
host name fails to resolve and any other HTTP request goes to a closed port.
The test checks Chromium's network log for connections elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.selenium_manager import SeleniumManager
    from selenium.webdriver.remote.webdriver import WebDriver
except ImportError:  # pragma: no cover - the test extra installs selenium
    webdriver = None

REQUIRE_ENV = "REPLISTATE_REQUIRE_BROWSER"
ARTIFACTS_ENV = "REPLISTATE_ARTIFACTS_DIR"
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
LAUNCHER = EXAMPLES_DIR / "launch.py"
# Debian's /usr/bin/chromium is a shell wrapper that sources /etc/chromium.d,
# which adds flags such as --enable-remote-extensions. The binary behind it
# runs with only the flags given below.
DEBIAN_CHROMIUM_BINARY = Path("/usr/lib/chromium/chromium")
APPS = ("aiohttp", "flask", "fastapi")
REPLICAS = 3
INSTALL_SECONDS = 6.0
LAUNCH_TIMEOUT = 90.0
WAIT_TIMEOUT = 45.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-client-side-phishing-detection",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-extensions",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-features=AutofillServerCommunication,MediaRouter,"
    "NetworkTimeServiceQuerying,OptimizationHints,Translate",
    "--metrics-recording-only",
    "--no-default-browser-check",
    "--no-first-run",
    "--no-pings",
    # Every host name but 127.0.0.1 fails to resolve, with no DNS query sent.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1000,900",
)

T = TypeVar("T")


def find_browser() -> tuple[Path | None, Path | None, str | None]:
    """Return Chromium, chromedriver and, when one is missing, why the test
    cannot run."""
    wrapper = shutil.which("chromium") or shutil.which("chromium-browser")
    chromium = None
    if wrapper is not None:
        chromium = (
            DEBIAN_CHROMIUM_BINARY
            if DEBIAN_CHROMIUM_BINARY.is_file()
            else Path(wrapper)
        )
    found = shutil.which("chromedriver")
    chromedriver = Path(found) if found is not None else None
    reasons = []
    missing = [
        name
        for name, path in (("chromium", chromium), ("chromedriver", chromedriver))
        if path is None
    ]
    if missing:
        reasons.append(
            f"{' and '.join(missing)} not found: install them with "
            "`apt-get install chromium chromium-driver` (Debian)"
        )
    if webdriver is None:
        reasons.append("selenium is not installed: run pip install -e '.[test]'")
    if not reasons:
        return chromium, chromedriver, None
    return chromium, chromedriver, "; ".join(reasons) + " to run the browser test"


CHROMIUM, CHROMEDRIVER, MISSING_BROWSER = find_browser()

if MISSING_BROWSER is not None and os.environ.get(REQUIRE_ENV) != "1":
    pytestmark = pytest.mark.skip(reason=MISSING_BROWSER)


def wait_until(
    check: Callable[[], T | None], message: str, timeout: float = WAIT_TIMEOUT
) -> T:
    """Return the first true result of `check`, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s: {message}")
        time.sleep(0.1)


def get_json(url: str, method: str = "GET") -> Any:
    """Send a request without any proxy from the environment; return the JSON."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method)
    try:
        with opener.open(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


@dataclass
class Launched:
    """A running launcher: its proxy and replicas."""

    url: str
    table: str
    replicas: list[dict[str, Any]]

    def log(self, since: int = 0) -> list[dict[str, Any]]:
        """Return the proxy's records of forwarded requests after `since`."""
        records: list[dict[str, Any]] = get_json(f"{self.url}_proxy/log?since={since}")[
            "requests"
        ]
        return records

    def last_seq(self) -> int:
        """Return the sequence number of the latest forwarded request."""
        records = self.log()
        return int(records[-1]["seq"]) if records else 0

    def next_upstream(self) -> str:
        """Return the name of the replica the next forwarded request goes to."""
        return str(get_json(f"{self.url}_proxy/next")["upstream"]["name"])

    def direct(self, path: str) -> Any:
        """Request `path` from the first replica, around the proxy."""
        return get_json(self.replicas[0]["url"] + path)


@contextlib.contextmanager
def launch(
    app: str, nats_url: str, postgres_url: str, tmp_path: Path
) -> Iterator[Launched]:
    """Run the launcher until the block ends, then check that it cleaned up."""
    log_path = tmp_path / "launcher.log"
    command = [sys.executable, str(LAUNCHER), "--app", app, "--json"]
    command += ["--replicas", str(REPLICAS), "--port", "0"]
    command += ["--nats-url", nats_url, "--postgres-url", postgres_url]
    command += ["--install-seconds", str(INSTALL_SECONDS)]
    command += ["--log-dir", str(tmp_path / "replica-logs")]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
        )
    lines: queue.Queue[bytes] = queue.Queue()

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        try:
            line = lines.get(timeout=LAUNCH_TIMEOUT)
        except queue.Empty:
            pytest.fail(
                f"the launcher printed nothing within {LAUNCH_TIMEOUT:g} s:\n"
                + log_path.read_text(errors="replace")
            )
        ready = json.loads(line)
        assert ready["event"] == "ready", line
        assert len(ready["replicas"]) == REPLICAS
        assert Path(ready["work_dir"]).is_dir()
        yield Launched(ready["url"], ready["table"], ready["replicas"])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            reader.join(timeout=10)
            assert process.stdout is not None
            process.stdout.close()
    launcher_log = log_path.read_text(errors="replace")
    assert code == 0, launcher_log
    assert not Path(ready["work_dir"]).exists()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (ready["table"],)).fetchone()
    assert row == (None,), f"table {ready['table']} left behind"


def closed_port() -> int:
    """Return a loopback port with no listener at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def open_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WebDriver]:
    """Start headless Chromium through chromedriver, both from the system."""
    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None

    # Selenium Manager downloads drivers and sends usage statistics. With the
    # driver's path given it is never called; this makes any call fail the test.
    def no_selenium_manager(*args: object) -> None:
        raise AssertionError("Selenium Manager must not run in this test")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_selenium_manager)
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    # Selenium reaches chromedriver on localhost, never through a proxy.
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # HTTP requests to hosts other than loopback go to a port with no listener.
    # Chromium never sends requests for loopback addresses through a proxy.
    options.add_argument(f"--proxy-server=http://127.0.0.1:{closed_port()}")
    options.add_argument(f"--log-net-log={tmp_path / 'netlog.json'}")
    service = Service(
        executable_path=str(CHROMEDRIVER),
        log_output=str(tmp_path / "chromedriver.log"),
    )
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def non_loopback_traffic(netlog_path: Path) -> list[str]:
    """Return every TCP connection and UDP datagram in a Chromium network log
    whose address is not a loopback address.

    Chromium connects UDP sockets to a public address to learn whether IPv6 is
    routed. A connected UDP socket sends nothing, so only the bytes are checked.
    """
    netlog = json.loads(netlog_path.read_text())
    names = {
        number: name for name, number in netlog["constants"]["logEventTypes"].items()
    }
    udp_peers: dict[int, str] = {}
    found = []
    for event in netlog["events"]:
        name = names[event["type"]]
        params = event.get("params") or {}
        source = event["source"]["id"]
        if name == "TCP_CONNECT_ATTEMPT" and "address" in params:
            addresses = [params["address"]]
        elif name == "TCP_CONNECT" and "address_list" in params:
            addresses = params["address_list"]
        elif name == "UDP_CONNECT" and "address" in params:
            udp_peers[source] = params["address"]
            continue
        elif name in ("UDP_BYTES_SENT", "UDP_BYTES_RECEIVED"):
            addresses = [params.get("address") or udp_peers.get(source, "unknown")]
        else:
            continue
        for address in addresses:
            host = address.rpartition(":")[0].strip("[]")
            try:
                loopback = ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                found.append(f"{name} {address}")
    return found


RECORD_REFRESHES = """
window.observedRefreshes = [];
document.addEventListener("replistate:refreshed", (event) => {
  const cards = {};
  for (const card of document.querySelectorAll("#operations .card")) {
    cards[card.dataset.jobId] = Number(card.dataset.progress);
  }
  window.observedRefreshes.push({...event.detail, cards});
});
"""


def observed_refreshes(driver: WebDriver) -> list[dict[str, Any]]:
    """Return what the page showed after each refresh since recording began."""
    refreshes: list[dict[str, Any]] = driver.execute_script(
        "return window.observedRefreshes"
    )
    return refreshes


def install_through_form(driver: WebDriver, model: str) -> tuple[str, str]:
    """Install `model` with the page's form; return its job id and owner."""
    field = driver.find_element(By.ID, "model-id")
    field.clear()
    field.send_keys(model)
    driver.find_element(By.CSS_SELECTOR, "#install-form button").click()
    result = driver.find_element(By.ID, "install-result")

    def started() -> tuple[str, str] | None:
        if result.get_attribute("data-model") != model:
            return None
        state = result.get_attribute("data-state")
        assert state != "error", result.text
        if state != "started":
            return None
        return (
            str(result.get_attribute("data-job-id")),
            str(result.get_attribute("data-replica")),
        )

    return wait_until(started, f"the page did not start installing {model}")


def find_card(driver: WebDriver, job_id: str) -> Any:
    """Return the card of `job_id`, or None when the page shows none."""
    try:
        return driver.find_element(By.CSS_SELECTOR, f'.card[data-job-id="{job_id}"]')
    except NoSuchElementException:
        return None


SHOW_CARD = """
const card = document.querySelector(`.card[data-job-id="${arguments[0]}"]`);
return {
  progress: Number(card.dataset.progress),
  name: card.querySelector(".card-name").textContent,
  message: card.querySelector(".card-message").textContent,
  nodes: [...card.querySelectorAll(".nodes li")].map((node) => node.dataset.nodeId),
  cancelShown: !card.querySelector("[data-action=cancel]").hidden,
};
"""


def show_card(driver: WebDriver, job_id: str) -> dict[str, Any]:
    """Return what the card of `job_id` shows, read in one step of the page."""
    card_view: dict[str, Any] = driver.execute_script(SHOW_CARD, job_id)
    return card_view


def save_screenshot(driver: WebDriver, path: Path) -> None:
    """Save a screenshot to `path` and, when set, to the artifacts folder."""
    assert driver.save_screenshot(str(path))
    artifacts = os.environ.get(ARTIFACTS_ENV)
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(artifacts) / path.name)


def check_install_refreshes(refreshes: list[dict[str, Any]], job_id: str) -> list[int]:
    """Check the card on each refresh; return the progress it showed.

    From the first refresh that shows the card until the install finishes, every
    refresh shows it, with a progress no lower than before. Once a refresh no
    longer shows the card, no later refresh shows it again.
    """
    assert all(refresh["ok"] for refresh in refreshes), refreshes
    card_shown = [job_id in refresh["cards"] for refresh in refreshes]
    assert True in card_shown, f"no refresh showed job {job_id}: {refreshes}"
    first = card_shown.index(True)
    last = len(card_shown) - 1 - card_shown[::-1].index(True)
    gaps = [
        refresh["servedBy"]
        for refresh in refreshes[first : last + 1]
        if job_id not in refresh["cards"]
    ]
    assert gaps == [], f"the card went missing on refreshes served by {gaps}"
    progress = [refresh["cards"][job_id] for refresh in refreshes[first : last + 1]]
    assert progress == sorted(progress), f"progress went down: {progress}"

    return progress


@pytest.mark.timeout(300)
@pytest.mark.parametrize("app", APPS)
def test_operations_page_through_proxy(
    app: str,
    nats_url: str,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An install shows steady progress on every poll, and a cancel clicked on a
    replica that does not own the install stops it."""
    if MISSING_BROWSER is not None:
        pytest.fail(f"{MISSING_BROWSER} ({REQUIRE_ENV}=1 makes this a failure)")
    replica_names = {f"replica-{index}" for index in range(1, REPLICAS + 1)}
    suffix = uuid.uuid4().hex[:6]
    model_a, model_b = f"browser-a-{suffix}", f"browser-b-{suffix}"
    screenshot = tmp_path / f"operations-{app}.png"

    with (
        launch(app, nats_url, postgres_url, tmp_path) as launched,
        open_browser(tmp_path, monkeypatch) as driver,
    ):
        driver.get(launched.url)
        wait_until(
            lambda: driver.find_element(By.TAG_NAME, "body").get_attribute(
                "data-refreshes"
            ),
            "the page never refreshed",
        )
        driver.execute_script(RECORD_REFRESHES)

        # An install, watched on every refresh until it finishes.
        job_a, owner_a = install_through_form(driver, model_a)
        assert owner_a in replica_names

        def finished() -> bool:
            return bool(launched.direct(f"/api/models/job/{job_a}").get("processed"))

        wait_until(finished, f"install of {model_a} did not finish")
        seen_before_end = len(observed_refreshes(driver))
        wait_until(
            lambda: len(observed_refreshes(driver)) >= seen_before_end + REPLICAS,
            "the page stopped refreshing",
        )
        refreshes = observed_refreshes(driver)
        progress = check_install_refreshes(refreshes, job_a)
        assert len(progress) >= 3, progress
        assert progress[-1] > progress[0], progress
        assert {refresh["servedBy"] for refresh in refreshes} == replica_names
        for refresh in refreshes[-REPLICAS:]:
            assert job_a not in refresh["cards"], refresh
        assert find_card(driver, job_a) is None
        status = launched.direct(f"/api/models/job/{job_a}")
        assert status["progress"] == 100
        assert "error" not in status
        for replica in launched.replicas:
            models = get_json(replica["url"] + "/api/models")["models"]
            assert model_a in models, replica["name"]

        # A second install, cancelled through a replica that does not own it.
        job_b, owner_b = install_through_form(driver, model_b)
        installs = [
            record
            for record in launched.log()
            if record["path"] == f"/api/models/install/{model_b}"
        ]
        assert [record["upstream"] for record in installs] == [owner_b]
        card = wait_until(lambda: find_card(driver, job_b), f"no card for {model_b}")
        # A peer lists the install as queued until its first progress arrives.
        wait_until(
            lambda: show_card(driver, job_b)["progress"] >= 10,
            f"the card of {model_b} shows no progress",
        )
        card_view = show_card(driver, job_b)
        assert card_view["name"] == model_b
        assert card_view["message"] == f"downloading {model_b}.gguf"
        assert card_view["nodes"] == ["node-1", "node-2"]
        assert card_view["cancelShown"] is True
        save_screenshot(driver, screenshot)
        cancel_button = card.find_element(By.CSS_SELECTOR, "[data-action=cancel]")

        driver.execute_async_script(
            "window.replistatePage.pause().then(arguments[arguments.length - 1]);"
        )
        # With the page paused, only this test sends requests through the proxy.
        while launched.next_upstream() == owner_b:
            get_json(f"{launched.url}api/models")
        target = launched.next_upstream()
        mark = launched.last_seq()
        cancel_button.click()

        def cancel_record() -> dict[str, Any] | None:
            records = launched.log(since=mark)
            if records and records[0]["status"] is not None:
                return records[0]
            return None

        record = wait_until(cancel_record, "the cancel never reached the proxy")
        assert record["method"] == "POST"
        assert record["path"] == f"/api/operations/{job_b}/cancel"
        assert record["upstream"] == target
        assert record["upstream"] != owner_b
        assert record["status"] == 202
        wait_until(
            lambda: card.get_attribute("data-cancel") == "accepted",
            "the page did not show the cancel as accepted",
        )

        driver.execute_script("window.replistatePage.resume();")
        wait_until(
            lambda: find_card(driver, job_b) is None, "the cancelled card stayed"
        )
        seen = len(observed_refreshes(driver))
        wait_until(
            lambda: len(observed_refreshes(driver)) >= seen + REPLICAS,
            "the page stopped refreshing",
        )
        for refresh in observed_refreshes(driver)[-REPLICAS:]:
            assert job_b not in refresh["cards"], refresh
        status = launched.direct(f"/api/models/job/{job_b}")
        assert status["cancelled"] is True
        for replica in launched.replicas:
            models = get_json(replica["url"] + "/api/models")["models"]
            assert model_b not in models, replica["name"]

    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
    assert non_loopback_traffic(tmp_path / "netlog.json") == []
