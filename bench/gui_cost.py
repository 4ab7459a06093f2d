"""What an open Run tab costs the trainer, and how soon the page shows each event.

    .venv/bin/python bench/gui_cost.py [--rounds 3] [--steps 600] [--json out.json]

One app.py serves an output folder the whole time. Each round trains the demo (CPU, no samples,
no checkpoints, `--steps` optimizer steps) twice, in alternating order: once with no browser
attached, once with a headless Chromium showing the Run tab (opened before the launch; the tab
picks up the new run on its own, as it does for a run started from a terminal). From the trainer's
own `step` events: the steady time per step (steps after the first 30, end to end, so stalls
count). In the browser runs a MutationObserver records every change of the progress bar; for each
step event written while the page watched, the delay until the page showed that step or a later one.

Prints a table and the ratio browser / no browser of the steady s/step (the issue's target: within
10%) and the event-to-browser median (target: <= 0.25 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gui_latency import ARGS, OBSERVER, start_app, stop_app  # noqa: E402

WARMUP_STEPS = 30


def step_events(version_dir: Path) -> list[dict[str, Any]]:
    lines = (version_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "step"]


def steady_s_per_step(steps: list[dict[str, Any]]) -> float:
    times = [e["time"] for e in steps if e["step"] > WARMUP_STEPS]
    return (times[-1] - times[0]) / (len(times) - 1)


def train_once(out: Path, steps: int) -> Path:
    from backend import follow, launcher
    from backend.presets import load_config_or_preset

    cfg = load_config_or_preset(ROOT / "presets/demo.json", [
        f"output_dir={json.dumps(str(out))}", "training.max_train_epochs=null", f"training.max_train_steps={steps}",
        "sampling.prompts=[]", "saving.save_every_n_epochs=null", "saving.save_last_n_epochs=null"])
    run = launcher.launch(cfg)
    with open(os.devnull, "w") as devnull:
        status = follow.follow_to_end(run.version_dir, proc=run.proc, out=devnull)
    if status.get("state") != "finished":
        raise RuntimeError(f"the run did not finish: {status}")
    return run.version_dir


def delays(seen: list[list[Any]], steps: list[dict[str, Any]]) -> list[float]:
    shown = [(t, int(m.group(1))) for t, text in seen if (m := re.search(r"step (\d+)/", text))]
    starts = [i for i in range(1, len(shown)) if shown[i][1] < shown[i - 1][1]]  # the page switched to this run
    shown = shown[starts[-1]:] if starts else shown
    if not shown:
        return []
    t_begin, first = shown[0]
    out = []
    for e in steps:
        if e["step"] <= first or e["time"] < t_begin:
            continue
        later = [t for t, k in shown if k >= e["step"]]
        if later:
            out.append(later[0] - e["time"])
    return out


def browser_round(url: str, browser: Any, out: Path, steps: int) -> tuple[Path, list[float]]:
    page = browser.new_page()
    try:
        page.goto(url)
        page.get_by_role("tab", name="Run", exact=True).click()
        page.wait_for_selector("#run-progress")
        page.evaluate(OBSERVER)
        version_dir = train_once(out, steps)
        time.sleep(1.5)  # the last steps reach the page
        seen = page.evaluate("() => window.__seen")
    finally:
        page.close()
    d = delays(seen, step_events(version_dir))
    if not d:
        print(f"  (the page recorded {len(seen)} changes of the progress bar: {seen[:3]} ... {seen[-3:]})", flush=True)
    return version_dir, d


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {"no_browser": [], "browser": [], "delays": []}
    with tempfile.TemporaryDirectory() as t, sync_playwright() as pw:
        out = Path(t) / "out"
        proc, url, _ = start_app(out)
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        try:
            for r in range(args.rounds):
                for kind in (("no_browser", "browser") if r % 2 == 0 else ("browser", "no_browser")):
                    if kind == "browser":
                        v, d = browser_round(url, browser, out, args.steps)
                        result["delays"] += d
                    else:
                        v = train_once(out, args.steps)
                    s = steady_s_per_step(step_events(v))
                    result[kind].append(s)
                    print(f"round {r + 1} {kind:10s}: {s * 1000:.1f} ms/step", flush=True)
        finally:
            browser.close()
            stop_app(proc)
    nb, b = statistics.median(result["no_browser"]), statistics.median(result["browser"])
    d = stats(result["delays"])
    result["ratio_browser_over_none"] = b / nb
    result["delay_s"] = d
    print(f"steady s/step: no browser {nb * 1000:.1f} ms, Run tab open {b * 1000:.1f} ms: ratio {b / nb:.3f}")
    if d:
        print(f"event -> browser: {d['median']:.3f} s median (min {d['min']:.3f}, max {d['max']:.3f}) over {d['n']} steps")
    if args.json:
        result.pop("delays")
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
