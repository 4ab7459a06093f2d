"""GUI under load: one run with a 100k-line log and 200 checkpoints, followed by several browser
sessions at once. No training: tests.gui_helpers.big_live_run writes the folder (tiny valid
checkpoints with manifests) and plays the trainer's part (step events, log lines, status).

    .venv/bin/python bench/gui_load.py [--sessions 4] [--lines 100000] [--checkpoints 200] [--steps 20]

Prints JSON: handler latencies in ms (the Run tab's attach and poll, the Checkpoints tab's refresh and
poll, called directly), what the first draw of the log shows with the tail-first reading and with
reading from byte 0 (the behaviour before), and the browser figures: per step, the time from the
event being written to every session showing it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gui_helpers import BROWSER_ARGS, AppServer, LiveRun, big_live_run  # noqa: E402


def ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples) * 1000, 2), "max_ms": round(max(samples) * 1000, 2),
            "n": len(samples)}


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def first_log_line_shown(out_dir: Path, start_bytes: int | None) -> dict[str, Any]:
    """Attach a fresh GUI to the run; what the log box shows first (the tail, or the log's start)."""
    import gui.live
    from gui.ui import build_ui

    saved = gui.live.LOG_START_BYTES
    if start_bytes is not None:
        gui.live.LOG_START_BYTES = start_bytes
    try:
        _, page = build_ui(out_dir)
        run = page.tabs["run"]
        took, out = timed(run.on_load, {run.c["follow"]: None})
        return {"attach_ms": round(took * 1000, 2), "last_line_shown": out[run.c["log"]].splitlines()[-1]}
    finally:
        gui.live.LOG_START_BYTES = saved


def handler_figures(out_dir: Path, live: LiveRun, polls: int) -> dict[str, Any]:
    from gui.ui import build_ui

    _, page = build_ui(out_dir)
    run, ck = page.tabs["run"], page.tabs["checkpoints"]
    attach, out = timed(run.on_load, {run.c["follow"]: None})
    state, ticks = out[run.c["follow"]], []
    for _ in range(polls):
        live.step(log_lines=5)
        time.sleep(0.45)  # a RunView reads the folder at most every 0.4 s, whoever asks
        took, out = timed(run.on_tick, {run.c["follow"]: state})
        state = out[run.c["follow"]]
        ticks.append(took)
    picks = {ck.c["version"]: None, ck.c["choice"]: None, ck.c["state"]: None}
    refresh, rows = [], 0
    for _ in range(polls):
        took, out = timed(ck.on_refresh, picks)
        refresh.append(took)
        rows = len(out[ck.c["table"]])
    ck_ticks = []
    picks = {ck.c["version"]: str(live.v), ck.c["choice"]: None, ck.c["state"]: None}
    for _ in range(polls):
        took, _ = timed(ck.on_tick, picks)
        ck_ticks.append(took)
    return {"run_attach_ms": round(attach * 1000, 2), "run_poll": ms(ticks), "checkpoints_refresh": ms(refresh),
            "checkpoints_poll_while_running": ms(ck_ticks), "checkpoint_rows": rows}


def browser_figures(work: Path, out_dir: Path, live: LiveRun, sessions: int, steps: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    server = AppServer(work, out_dir, work / "app.log")
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
            pages = []
            t0 = time.perf_counter()
            for _ in range(sessions):
                pg = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                pg.goto(server.url)
                pages.append(pg)
            for pg in pages:
                pg.get_by_role("tab", name="Run", exact=True).click()
                pg.wait_for_selector("#run-progress .lathe-progress[data-step]", timeout=60_000)
            opened = time.perf_counter() - t0
            lags = []
            for _ in range(steps):
                s = live.step(log_lines=5)
                t = time.perf_counter()
                for pg in pages:
                    pg.wait_for_selector(f"#run-progress .lathe-progress[data-step='{s}']", timeout=30_000)
                lags.append(time.perf_counter() - t)
            live.finish()
            shown = [pg.locator("#run-log textarea").first.input_value().splitlines()[-1] for pg in pages]
            browser.close()
    finally:
        server.stop()
    return {"sessions": sessions, "open_and_attach_s": round(opened, 2), "event_to_all_sessions": ms(lags),
            "log_tail_shown": sorted(set(shown))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--checkpoints", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lathe-gui-load-"))
    out_dir = work / "runs"
    t = time.perf_counter()
    live = big_live_run(out_dir, total_steps=1000, log_lines=args.lines, checkpoints=args.checkpoints)
    result: dict[str, Any] = {"setup_s": round(time.perf_counter() - t, 2), "log_lines": args.lines,
                              "log_mb": round((live.v / "train.log").stat().st_size / 1e6, 2),
                              "checkpoints": args.checkpoints}
    try:
        result["first_draw_tail_first"] = first_log_line_shown(out_dir, None)
        result["first_draw_from_byte_0_before"] = first_log_line_shown(out_dir, 1 << 40)
        result["handlers"] = handler_figures(out_dir, live, args.steps)
        if not args.no_browser:
            result["browser"] = browser_figures(work, out_dir, live, args.sessions, args.steps)
    finally:
        live.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
