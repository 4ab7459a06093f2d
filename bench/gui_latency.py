"""Benchmark the GUI side: app.py start-up time to the first served page, and the delay from a
trainer event being written to it being visible in a real browser.

    .venv/bin/python bench/gui_latency.py [--reps 3] [--seconds 20] [--json out.json]

Start-up: wall time from starting `python app.py` to the first HTTP 200 on "/", and to the page
being rendered in headless Chromium (demo preset loaded). Event-to-browser: a real trainer runs on
the demo (slowed to ~3 steps/s); a MutationObserver in the page records when each "step N/..."
first appears in the progress bar; the delay is that moment minus the `time` of step N's event in
events.jsonl (same machine clock).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(out: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--output-dir", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)
        if proc.poll() is not None or time.perf_counter() - t0 > 120:
            raise RuntimeError("app.py did not start")


def stop_app(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


def startup(reps: int, browser, tmp: Path) -> dict:
    http, rendered = [], []
    for r in range(reps):
        t0 = time.perf_counter()
        proc, url, to_http = start_app(tmp / f"s{r}")
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => (document.querySelector('#preset-status') || {}).innerText?.includes('Loaded the demo preset')",
                               timeout=60_000)
        rendered.append(time.perf_counter() - t0)
        http.append(to_http)
        page.close()
        stop_app(proc)
    return {"to_first_http_200_s": stats(http), "to_rendered_page_s": stats(rendered)}


OBSERVER = """
() => { window.__seen = [];
  const el = document.querySelector('#run-progress');
  const note = () => window.__seen.push([Date.now() / 1000, el.innerText]);
  new MutationObserver(note).observe(el, {subtree: true, childList: true, characterData: true}); note(); }
"""


def event_delay(seconds: float, browser, tmp: Path) -> dict:
    from backend import launcher
    from backend.presets import load_config_or_preset
    from tests.trainer_probe import PROBE_ENTRY  # the trainer, slowed down per step

    out = tmp / "live"
    proc, url, _ = start_app(out)
    cfg = load_config_or_preset(ROOT / "presets/demo.json", [f"output_dir={json.dumps(str(out))}", "training.max_train_epochs=100",
                                                              "sampling.prompts=[]"])
    run = launcher.launch(cfg, env={**launcher.launch_env(cfg), "LATHE_TEST_SLOW_STEP_S": "0.3"}, entry=PROBE_ENTRY)
    try:
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("tab", name="Run", exact=True).click()
        page.wait_for_selector("#run-progress")
        page.wait_for_function("() => /step \\d+\\//.test(document.querySelector('#run-progress').innerText)", timeout=120_000)
        page.evaluate(OBSERVER)
        time.sleep(seconds)
        seen = page.evaluate("() => window.__seen")
    finally:
        launcher.kill(run.version_dir)
        stop_app(proc)
    shown = [(t, int(m.group(1))) for t, text in seen if (m := re.search(r"step (\d+)/", text))]
    written = {e["step"]: e["time"] for e in map(json.loads, (run.version_dir / "events.jsonl").read_text().splitlines())
               if e["event"] == "step"}
    # For every step written while the page was watched: how long until the page showed it (or a later step).
    t_begin, shown_at_begin = shown[0]
    delays = []
    for n, t_written in sorted(written.items()):
        if n <= shown_at_begin or t_written < t_begin:
            continue
        later = [t for t, k in shown if k >= n]
        if later:
            delays.append(later[0] - t_written)
    return {"samples": len(delays), "delay_s": stats(delays)}


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        result = {"startup": startup(args.reps, browser, Path(t)), "event_to_browser": event_delay(args.seconds, browser, Path(t))}
        browser.close()
    s, e = result["startup"], result["event_to_browser"]
    print(f"app.py start-up: first HTTP 200 {s['to_first_http_200_s']['median']:.2f} s median "
          f"(min {s['to_first_http_200_s']['min']:.2f}, max {s['to_first_http_200_s']['max']:.2f}); page rendered "
          f"{s['to_rendered_page_s']['median']:.2f} s median")
    d = e["delay_s"]
    print(f"event -> browser: {d['median']:.3f} s median (min {d['min']:.3f}, max {d['max']:.3f}) over {e['samples']} steps")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
