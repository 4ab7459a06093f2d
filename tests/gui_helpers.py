"""Helpers for the real-browser GUI tests: the browser (or a clear skip), app.py as a server, and
the few gestures a user makes on Gradio components."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ENV, ROOT

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
REQUIRE_ENV = "LATHE_REQUIRE_BROWSER"
SCREENSHOT_ENV = "LATHE_SCREENSHOT_DIR"


def chromium_or_skip() -> str:
    """The Chromium executable. Missing: a skip with the reason, or a failure where the browser is
    required (CI sets LATHE_REQUIRE_BROWSER=1 after installing it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = "Chromium is not installed (apt-get install -y chromium); the real-browser GUI tests need it"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 says it must be there")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` on 127.0.0.1 in its own process group; the working folder holds demo/."""

    def __init__(self, workdir: Path, output_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.output_dir = output_dir
        env = {**ENV, "LATHE_PRESETS_DIR": str(output_dir.parent / "user-presets")}
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--output-dir", str(output_dir)],
            cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"app.py exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"app.py did not answer within {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        from backend import launcher, process_tree, runs

        for info in runs.list_runs(self.output_dir):  # leave no trainer behind
            if process_tree.find_for_status(runs.read_status(info.path)):
                launcher.kill(Path(info.path))
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()


# ------------------------------------------------------------------------------------ gestures
def field(page, key: str):
    """The component of a Setup field, by its key (e.g. optimizer.Prodigy.d_coef)."""
    return page.locator("#f-" + key.replace(".", "-"))


def fill(page, key: str, value: object) -> None:
    """Type into a text or number field and leave it (as a user does), so Gradio sees the change."""
    box = field(page, key).locator("input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown by its label."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).first.click()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def shot(page, tmp: Path, name: str, selector: str | None = None, full: bool = True) -> Path:
    """A screenshot into $LATHE_SCREENSHOT_DIR (docs/screenshots when making the docs), else tmp."""
    folder = Path(os.environ.get(SCREENSHOT_ENV) or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if selector:
        page.locator(selector).screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=full)
    return path


def wait_until(predicate, timeout: float = 60, interval: float = 0.25, what: str = "condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
