"""Fault-injection campaign: SIGKILL the trainer at random moments (biased toward save windows),
kill the GUI mid-run, fill the disk during a save, corrupt checkpoints, unplug the dataset, and
check after each that no checkpoint was lost, no listing lies, and resume is bit-exact.

    .venv/bin/python bench/fault_campaign.py [--kills 100] [--seed 0] [--json out.json] [--keep]

Not part of the default test run: tests/test_fault_campaign.py runs the same code with a few kills
and each scenario once. The kill loop and the checks live in tests/fault_helpers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import checkpoints as C  # noqa: E402
from backend import process_tree, runs  # noqa: E402
from backend.resume import plan_resume  # noqa: E402
from tests import fault_helpers as F  # noqa: E402


class Outcome:
    """One scenario's result: what was checked, what failed, and the facts seen."""

    def __init__(self, name: str):
        self.name, self.checks, self.failures, self.facts = name, 0, [], {}
        self.t0 = time.monotonic()

    def expect(self, ok: Any, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(what)
        return bool(ok)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": not self.failures, "checks": self.checks, "failures": self.failures,
                "facts": self.facts, "seconds": round(time.monotonic() - self.t0, 1)}


def run_to_end(cfg: Any, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[Any, bool]:
    """Launch and wait for the run to end by itself; (launched, ended) where not ended means a hang."""
    launched = F.start(cfg, env)
    try:
        ended = F.wait_end(launched, timeout)
    finally:
        F.ensure_dead(launched)
    return launched, ended


def expect_intact(o: Outcome, version_dir: Path, resumable: bool = True) -> None:
    """Every checkpoint folder valid and verifying, no unfinished save left, every export loads."""
    problems, _ = F.check_listing(version_dir.parent, resumable=resumable)
    o.expect(not problems, f"listing: {problems}")
    left = [p.name for d in ("checkpoints", "exports") for p in (version_dir / d).glob("*.tmp")]
    o.expect(not left, f"unfinished files left behind: {left}")


def expect_resume(o: Outcome, checkpoint: Path, reference: dict[int, float], reference_dir: Path) -> None:
    """Resume from `checkpoint` to the end: finished, losses and final LoRA identical to the reference."""
    launched, ended = run_to_end(F.resume_config(checkpoint))
    v = launched.version_dir
    bit, note = F.segment_check(v, reference, int(C.read_manifest(checkpoint)["step"]))
    o.facts["resume"] = note
    o.expect(ended and runs.reconcile(v).get("state") == "finished", f"the resume did not finish: {runs.read_status(v)}")
    o.expect(bit and F.final_matches(v, reference_dir), f"the resume is not bit-exact: {note}")


# ---------------------------------------------------------------------------------------- scenarios
def disk_full(demo: Path, root: Path, reference: dict[int, float], reference_dir: Path,
              target: str = "optimizer.safetensors", at: int = 12, resume: bool = True) -> dict[str, Any]:
    """ENOSPC while writing `target` from step `at`: the run fails with "disk full", earlier saves stay."""
    o = Outcome(f"disk full while writing {target} at step {at}")
    launched, ended = run_to_end(F.campaign_config(demo, root / f"diskfull-{target}"), {"LATHE_TEST_ENOSPC_ON": f"{target}@{at}"})
    v = launched.version_dir
    status = runs.reconcile(v)
    o.facts.update(state=status.get("state"), reason=status.get("error"),
                   checkpoints={c["name"]: c["status"] for c in C.list_checkpoints(v)})
    o.expect(ended, "the run hung after the failed save")
    o.expect(status.get("state") == "failed" and str(status.get("error")).startswith(f"disk full while writing {target}"),
             f"not failed with 'disk full': {status.get('state')}: {status.get('error')}")
    expect_intact(o, v)
    removed = {e["name"] for e in F.all_events(v, "checkpoint_removed")}
    earlier = [e["name"] for e in F.all_events(v, "checkpoint_saved") if e["step"] < at and e["name"] not in removed]
    o.expect(earlier and all(C.checkpoint_status(v / "checkpoints" / n)[0] == "valid" for n in earlier),
             f"earlier checkpoints not intact: {earlier}")
    latest = C.latest(C.list_checkpoints(v))
    o.expect(latest and latest["step"] <= at, f"latest is {latest and latest['name']}")
    if resume and latest:
        expect_resume(o, Path(latest["path"]), reference, reference_dir)
    return o.to_json()


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def corrupted(root: Path, reference_dir: Path) -> dict[str, Any]:
    """A flipped byte in the newest checkpoint and a deleted file in the next: both corrupt, never latest."""
    from tests.conftest import run_cli

    o = Outcome("corrupt checkpoints (flipped byte, deleted file)")
    v = root / "corrupt" / "demo" / "version_0"
    shutil.copytree(reference_dir, v)
    first = C.latest(C.list_checkpoints(v))
    flip_byte(Path(first["path"]) / "lora.safetensors")
    second = C.latest(C.list_checkpoints(v))
    (Path(second["path"]) / "optimizer.safetensors").unlink()
    bad = {first["name"]: "lora.safetensors: xxh3_128 hash differs", second["name"]: "optimizer.safetensors: missing"}
    listing = {c["name"]: c["status"] for c in json.loads(run_cli("checkpoints", str(v), "--json").stdout)}
    latest = C.latest(C.list_checkpoints(v))
    o.facts.update(corrupted=bad, listing=listing, latest=latest and latest["name"])
    for name, why in bad.items():
        o.expect(listing.get(name) == "corrupt", f"`checkpoints` lists {name} as {listing.get(name)}")
        out = run_cli("verify", str(v / "checkpoints" / name))
        o.expect(out.returncode == 1 and why in out.stdout, f"`verify {name}` rc {out.returncode}: {out.stdout[-200:]}")
        refused = plan_resume(v / "checkpoints" / name, F.resume_config(v / "checkpoints" / name)).refused
        o.expect(refused and "is corrupt" in refused[0], f"resume from {name} not refused: {refused}")
        out = run_cli("resume", str(v / "checkpoints" / name))
        o.expect(out.returncode == 2 and "corrupt" in out.stderr, f"`resume {name}` rc {out.returncode}")
    o.expect(latest and latest["name"] not in bad and latest["status"] == "valid", f"latest is {latest}")
    o.expect(all(s == "valid" for n, s in listing.items() if n not in bad), f"others damaged: {listing}")
    return o.to_json()


def unplugged(demo: Path, root: Path, cache: bool, resume_after: bool = False) -> dict[str, Any]:
    """Rename the dataset folder away mid-run: with cached latents the run continues, without it ends
    with a clear reason; never a hang, never a damaged checkpoint; resume refused until it is back."""
    o = Outcome(f"dataset unplugged mid-run (cache_latents={cache})")
    out = root / f"unplug-{'cache' if cache else 'nocache'}"
    data = out / "images"
    shutil.copytree(demo / "images", data)
    cfg = F.campaign_config(demo, out, dataset={"train_data_dir": str(data), "cache_latents": cache})
    launched = F.start(cfg, {"LATHE_TEST_SLOW_STEP_S": "0.05"})
    try:
        seen = F.wait_event(F.EventTail(launched.version_dir), launched.proc,
                            lambda e: e["event"] == "step" and e["step"] >= SAVE_AFTER_UNPLUG)
        data.rename(data.with_name("images-unplugged"))
        o.facts["unplugged_at_step"] = seen.get("step") if isinstance(seen, dict) else seen
        ended = F.wait_end(launched, 300)
    finally:
        F.ensure_dead(launched)
    v = launched.version_dir
    status = runs.reconcile(v)
    o.facts.update(state=status.get("state"), step=status.get("step"), reason=status.get("error"))
    o.expect(ended, "the run hung after the dataset disappeared")
    if cache:
        o.expect(status.get("state") == "finished", f"with cached latents the run did not finish: {status.get('error')}")
    else:
        o.expect(status.get("state") == "failed" and "No such file" in str(status.get("error")) and str(data) in
                 str(status.get("error")), f"no clear reason: {status.get('state')}: {status.get('error')}")
    expect_intact(o, v, resumable=False)  # not while unplugged: checked below
    latest = C.latest(C.list_checkpoints(v))
    o.expect(latest is not None, "no checkpoint survived")
    if latest and not cache:
        ckpt = Path(latest["path"])
        refused = plan_resume(ckpt, F.resume_config(ckpt)).refused
        o.expect(refused and "changed" in refused[0], f"resume while unplugged not refused: {refused}")
        data.with_name("images-unplugged").rename(data)
        o.expect(plan_resume(ckpt, F.resume_config(ckpt)).ok, "resume refused after plugging the folder back")
        if resume_after:
            resumed, done = run_to_end(F.resume_config(ckpt))
            o.facts["resume_after_replug"] = runs.reconcile(resumed.version_dir).get("state")
            o.expect(done and o.facts["resume_after_replug"] == "finished", "the resume after plugging back failed")
    return o.to_json()


SAVE_AFTER_UNPLUG = 6  # unplug after the first step save (step 4) is on disk


# ------------------------------------------------------------------------------------------ the GUI
def gui_state(page: Any) -> tuple[str | None, int]:
    """(state, step) as the Run tab's banner and progress bar show them."""
    banner, bar = page.locator("#run-banner .lathe-banner"), page.locator("#run-progress .lathe-progress")
    return (banner.get_attribute("data-state") if banner.count() else None,
            int(bar.get_attribute("data-step") or 0) if bar.count() else 0)


def open_run_tab(browser: Any, app: Any, epochs: int | None = None) -> Any:
    """A new page on `app`; with `epochs`, set max_train_epochs on the Setup tab first; ends on Run."""
    from tests.gui_helpers import field, fill, tab

    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(60_000)
    page.goto(app.url)
    field(page, "run_name").locator("input").wait_for()
    if epochs is not None:
        fill(page, "training.max_train_epochs", epochs)
    tab(page, "Run")
    return page


def gui_killed(demo: Path, root: Path, epochs: int = 6) -> dict[str, Any]:
    """Start a run from the GUI (a real app.py and a headless browser), SIGKILL app.py mid-run: the
    run goes on; a new app.py finds it by itself and shows it to the end."""
    o = Outcome("GUI process (app.py) killed mid-run")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not o.expect(chromium, "Chromium is not installed: the GUI scenario needs a browser"):
        return o.to_json()
    from playwright.sync_api import sync_playwright

    from tests.gui_helpers import BROWSER_ARGS, AppServer, wait_until

    work, out = root / "gui", root / "gui" / "runs"
    work.mkdir(parents=True)
    (work / "demo").symlink_to(demo)  # the demo preset's relative paths resolve here, as in a checkout
    apps = [AppServer(work, out, work / "app-1.log")]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
            try:
                apps[0].wait_ready()
                page = open_run_tab(browser, apps[0], epochs)
                page.click("#btn-start")
                wait_until(lambda: gui_state(page)[0] == "running" and gui_state(page)[1] >= 2, 180, what="a running run")
                v = next(iter(out.glob("*/version_*")))
                kill_gui_and_watch(o, apps[0], v)
                apps.append(AppServer(work, out, work / "app-2.log"))
                apps[1].wait_ready()
                o.facts["running_when_new_gui_up"] = runs.reconcile(v).get("state")
                page = open_run_tab(browser, apps[1])
                wait_until(lambda: v.name in page.locator("#run-banner").inner_text(), 60, what="the run in the new GUI")
                wait_until(lambda: gui_state(page)[0] in ("finished", "failed", "stopped"), 400, 0.3, "the run's end")
                final = runs.reconcile(v)
                o.facts.update(new_gui_shows=list(gui_state(page)), final_state=final.get("state"), step=final.get("step"))
                o.expect(gui_state(page)[0] == "finished" and final.get("state") == "finished",
                         f"the new GUI shows {gui_state(page)}; status {final.get('state')}: {final.get('error')}")
                o.expect(C.checkpoint_status(v / "checkpoints" / "final")[0] == "valid", "no valid final checkpoint")
            finally:
                browser.close()
    finally:
        for app in reversed(apps):
            app.stop()  # also kills any run of its output folder still alive
    return o.to_json()


def kill_gui_and_watch(o: Outcome, app: Any, version_dir: Path) -> None:
    """SIGKILL app.py's whole process group; the trainer (a session of its own) must keep training."""
    before = runs.read_status(version_dir).get("step") or 0
    os.killpg(app.proc.pid, signal.SIGKILL)
    app.proc.wait(timeout=30)
    end = time.monotonic() + 60
    while time.monotonic() < end and (runs.read_status(version_dir).get("step") or 0) <= before + 2:
        time.sleep(0.2)
    status = runs.reconcile(version_dir)
    after = status.get("step") or 0
    o.facts.update(gui_killed_at_step=before, step_after_gui_kill=after,
                   state_after_gui_kill=status.get("state"))
    o.expect(after > before and status.get("state") in ("running", "finished"),
             f"the run did not go on after the GUI died: {status.get('state')} at step {after} (was {before})")
    o.expect(process_tree.find_for_status(status) or status.get("state") == "finished", "the trainer died with the GUI")


# ------------------------------------------------------------------------------------------- report
def scenarios(demo: Path, root: Path, reference: dict[int, float], reference_dir: Path, full: bool,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    jobs: list[Callable[[], dict[str, Any]]] = [
        lambda: gui_killed(demo, root),
        lambda: disk_full(demo, root, reference, reference_dir, "optimizer.safetensors", 12, resume=True),
        lambda: corrupted(root, reference_dir),
        lambda: unplugged(demo, root, cache=False, resume_after=full),
        lambda: unplugged(demo, root, cache=True),
    ]
    if full:
        jobs += [lambda: disk_full(demo, root, reference, reference_dir, "lora.safetensors", 20, resume=False),
                 lambda: disk_full(demo, root, reference, reference_dir, "export", 28, resume=False)]
    results = []
    for job in jobs:
        results.append(job())
        log(f"scenario: {results[-1]['name']}: {'ok' if results[-1]['ok'] else 'FAILED'} "
            f"({results[-1]['checks']} checks, {results[-1]['seconds']} s) {results[-1]['failures']}")
    return results


def summarize(records: list[F.KillRecord], segments: list[dict[str, Any]], scen: list[dict[str, Any]]) -> dict[str, Any]:
    resumed = [s for s in segments if s["from_step"] > 0 and s["bitexact"] is not None]
    fresh = [s for s in segments if s["from_step"] == 0 and s["bitexact"] is not None]
    return {
        "kills": len(records),
        "kills_survived": sum(1 for r in records if not r.problems and not r.lost),
        "kills_by_mode": {m: sum(1 for r in records if r.mode == m) for m in ("save", "uniform", "startup")},
        "kills_by_how": {h: sum(1 for r in records if r.how == h) for h in ("tree", "group")},
        "kills_inside_a_save": sum(1 for r in records if r.tmp_left),
        "kills_with_a_valid_checkpoint": sum(1 for r in records if r.latest),
        "checkpoints_lost": sum(len(r.lost) for r in records),
        "listing_problems": sum(len(r.problems) for r in records),
        "resumes_bitexact": sum(1 for s in resumed if s["bitexact"]),
        "resumes_checked": len(resumed),
        "fresh_segments_bitexact": f"{sum(1 for s in fresh if s['bitexact'])}/{len(fresh)}",
        "chains_finished": sum(1 for s in segments if s.get("state") == "finished"),
        "hangs": sum(1 for s in segments if s.get("outcome") == "hang"),
        "scenarios": {s["name"]: "ok" if s["ok"] else f"FAILED: {s['failures']}" for s in scen},
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\nkills survived: {summary['kills_survived']}/{summary['kills']} "
          f"(save-window {summary['kills_by_mode']['save']}, uniform {summary['kills_by_mode']['uniform']}, "
          f"startup {summary['kills_by_mode']['startup']}; {summary['kills_inside_a_save']} landed inside a save)")
    print(f"checkpoints lost: {summary['checkpoints_lost']}; listing problems: {summary['listing_problems']}; "
          f"hangs: {summary['hangs']}")
    print(f"resumes bit-exact: {summary['resumes_bitexact']}/{summary['resumes_checked']} "
          f"(fresh segments {summary['fresh_segments_bitexact']}; chains run to the end: {summary['chains_finished']})")
    for name, verdict in summary["scenarios"].items():
        print(f"  {name}: {verdict}")


def campaign(root: Path, kills: int, seed: int, full: bool, slow_save_s: float = 0.15) -> dict[str, Any]:
    """Everything: demo assets, the reference run, the kill loop, the scenarios; the JSON report."""
    from backend.trainer.demo import build_demo_assets

    t0 = time.monotonic()
    demo = build_demo_assets(root / "assets" / "demo")
    reference, reference_dir = F.reference_run(demo, root)
    c = F.Campaign(demo, root / "kills", reference, reference_dir, seed=seed, slow_save_s=slow_save_s)
    records = F.run_kills(c, kills)
    scen = scenarios(demo, root / "scenarios", reference, reference_dir, full)
    summary = summarize(records, c.segments, scen)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    return {"summary": summary, "seconds": round(time.monotonic() - t0, 1), "machine": machine,
            "config": {"sections": F.SECTIONS, "slow_save_s": slow_save_s, "seed": seed},
            "kills": [r.to_json() for r in records], "segments": c.segments, "scenarios": scen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="SIGKILLs to land (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "lathe-fault-campaign.json",
                    help="where to write the JSON report (default: %(default)s)")
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temp folder, removed)")
    ap.add_argument("--quick", action="store_true", help="each scenario once, without the extra disk-full targets")
    args = ap.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lathe-faults-"))
    try:
        report = campaign(root, args.kills, args.seed, full=not args.quick)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_summary(report["summary"])
    print(f"report: {args.json} ({report['seconds']} s)")
    s = report["summary"]
    ok = s["kills_survived"] == s["kills"] and not s["checkpoints_lost"] and s["resumes_bitexact"] == s["resumes_checked"]
    return 0 if ok and all(v == "ok" for v in s["scenarios"].values()) and not s["hangs"] else 1


if __name__ == "__main__":
    sys.exit(main())
