"""Helpers for the real-browser GUI tests: the browser (or a clear skip), app.py as a server, and
the few gestures a user makes on Gradio components."""

from __future__ import annotations

import http.client
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
from urllib.parse import urlencode

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


def shot(page, tmp: Path, name: str, selector: str | None = None, full: bool = True) -> Path | None:
    """A screenshot into $LATHE_SCREENSHOT_DIR (docs/screenshots when making the docs). Without it no
    picture is taken (nobody looks at one in a temp folder, and each costs a second or more of a slow
    CPU); the element a picture would show must still be there and visible, as the screenshot needs."""
    if not os.environ.get(SCREENSHOT_ENV):
        if selector:
            page.locator(selector).wait_for(state="visible")
        return None
    folder = Path(os.environ[SCREENSHOT_ENV])
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


# ------------------------------------------------------------------------------------ a big run folder
def write_big_run(output_dir: Path, log_lines: int = 100_000, checkpoints: int = 200, steps: int = 2000,
                  run_name: str = "loadtest") -> Path:
    """A finished-looking version folder made without training: `log_lines` lines of train.log,
    `steps` step events, and `checkpoints` tiny valid checkpoint folders (a small file and a
    manifest with this run's config hash). Returns the version folder."""
    import json

    from backend.checkpoints import write_manifest
    from backend.config import TrainingConfig

    v = output_dir / run_name / "version_0"
    (v / "checkpoints").mkdir(parents=True)
    cfg = TrainingConfig.model_validate({"run_name": run_name, "output_dir": str(output_dir)})
    (v / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    now = time.time()
    with open(v / "train.log", "w") as fh:
        fh.writelines(f"step {i:06d} loss {1.0 / (i + 1):.6f} some padding text to look like a real log line\n"
                      for i in range(log_lines))
    evs = [{"event": "run_started", "time": now - steps, "version": 0, "world_size": 1, "total_steps": steps,
            "total_epochs": 1, "resumed_from": None}]
    evs += [{"event": "step", "time": now - steps + s, "step": s, "epoch": 1, "loss": 1.0 / s, "lr": 1e-4,
             "samples_per_s": 4.0, "eta_s": steps - s} for s in range(1, steps + 1)]
    every = max(1, steps // checkpoints)
    for i in range(checkpoints):
        step = (i + 1) * every
        ck = v / "checkpoints" / f"step-{step:08d}"
        ck.mkdir()
        (ck / "lora.bin").write_bytes(step.to_bytes(8, "little") * 4)
        write_manifest(ck, {"run_name": run_name, "kind": "step", "step": step, "epoch": 1, "loss": 1.0 / step,
                            "config_hash": cfg.config_hash()})
        evs.append({"event": "checkpoint_saved", "time": now, "kind": "step", "name": ck.name, "path": str(ck),
                    "step": step, "epoch": 1, "bytes": 32, "seconds": 0.01})
    evs.append({"event": "run_finished", "time": now, "state": "finished", "step": steps, "error": None})
    (v / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    (v / "status.json").write_text(json.dumps({"state": "finished", "pid": None, "pgid": None, "started_at": now - steps,
                                               "heartbeat_at": now, "step": steps, "total_steps": steps,
                                               "exit_code": 0, "error": None}))
    return v


class LiveRun:
    """A version folder that looks like a running trainer without training: a sleeping child process
    carries the run's token (so the run is alive for reconcile), and step() appends step events and
    log lines as the trainer would. finish() writes the final status and ends the child."""

    def __init__(self, version_dir: Path, total_steps: int):
        import json
        import uuid

        self.v, self.total, self.step_no = version_dir, total_steps, 0
        token = uuid.uuid4().hex
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                      env={**os.environ, "LATHE_RUN_TOKEN": token}, start_new_session=True)
        now = time.time()
        (version_dir / "status.json").write_text(json.dumps({
            "state": "running", "pid": self.child.pid, "pgid": self.child.pid, "run_token": token, "started_at": now,
            "launched_at": now - 5, "heartbeat_at": now, "step": 0, "total_steps": total_steps, "exit_code": None,
            "error": None}))
        self._event({"event": "run_started", "version": 0, "world_size": 1, "total_steps": total_steps,
                     "total_epochs": 1, "resumed_from": None})

    def _event(self, ev: dict) -> None:
        import json

        with open(self.v / "events.jsonl", "a") as fh:
            fh.write(json.dumps({**ev, "time": time.time()}) + "\n")

    def step(self, log_lines: int = 1) -> int:
        from backend import runs

        self.step_no += 1
        s = self.step_no
        with open(self.v / "train.log", "a") as fh:
            fh.writelines(f"live step {s} line {i}\n" for i in range(log_lines))
        self._event({"event": "step", "step": s, "epoch": 1, "loss": 1.0 / s, "lr": 1e-4, "samples_per_s": 4.0,
                     "eta_s": self.total - s})
        runs.update_status(self.v, step=s, heartbeat_at=time.time(), step_at=time.time())
        return s

    def finish(self) -> None:
        from backend import runs

        self._event({"event": "run_finished", "state": "finished", "step": self.step_no, "error": None})
        runs.update_status(self.v, state="finished", exit_code=0, finished_at=time.time())
        self.stop()

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait(timeout=10)


def big_live_run(output_dir: Path, total_steps: int = 50, log_lines: int = 100_000, checkpoints: int = 200) -> LiveRun:
    """write_big_run's folder (long log, many checkpoints) turned into a running run at step 0 of `total_steps`."""
    v = write_big_run(output_dir, log_lines=log_lines, checkpoints=checkpoints, steps=0)
    (v / "events.jsonl").write_text("")
    return LiveRun(v, total_steps)


# ------------------------------------------------------------------------------------ raw HTTP
def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            source: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, first 64 KiB of the body) for a raw path (sent exactly as given), from the
    client address `source` when given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        try:
            data = b"" if "event-stream" in hdrs.get("content-type", "") else r.read(65536)
        except TimeoutError:
            data = b""
        return r.status, hdrs, data
    finally:
        conn.close()


def login(port: int, user: str, password: str, source: str | None = None) -> tuple[int, dict, bytes]:
    form = urlencode({"username": user, "password": password}).encode()
    return request(port, "POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"}, source)


def cookie_of(headers: dict) -> str:
    return "; ".join(c.split(";")[0] for c in [headers.get("set-cookie", "")] if c)


def start_app(args: list[str], out: Path, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--output-dir", str(out), *args], cwd=ROOT,
                            env={**ENV, **(extra_env or {})}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def app_routes(blocks) -> list[tuple[str, list[str]]]:
    """(path, methods) of every route the running app has, included routers flattened."""
    found = []
    for r in blocks.server_app.routes:
        contexts = r.effective_route_contexts() if hasattr(r, "effective_route_contexts") else [r]
        for ctx in contexts:
            route = getattr(ctx, "original_route", ctx)
            found.append((ctx.path, sorted(getattr(route, "methods", None) or ["GET"])))
    return found
