"""The core of the fault-injection campaign (bench/fault_campaign.py, tests/test_fault_campaign.py):
train the demo with frequent saves, SIGKILL the trainer at random moments (biased toward save
windows), and after every kill check what a user relies on:

* the run is listed `failed` or `stopped` with a reason (never "running"), and events.jsonl ends
  with `run_finished`;
* every checkpoint listed valid passes `verify --quick` (deep verify on a sample); a folder that is
  not valid is never picked as latest; every export file on disk loads;
* no checkpoint is lost: one valid before a kill is valid (unchanged) after it, and the newest
  `save_last_n_*` save points a run announced are all there;
* the next segment resumes from the latest valid checkpoint and its per-step losses equal an
  uninterrupted reference run bit for bit (a chain: fresh run, kill, resume, kill, resume ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from backend import checkpoints as C
from backend import launcher, runs
from backend.config import TrainingConfig
from backend.events import read_events
from backend.presets import resolve
from backend.resume import plan_resume
from tests.conftest import demo_config

SAVE_EVERY = 4  # optimizer steps between step save points (16 steps per epoch on the demo set)
KEEP = {"epoch": 1, "step": 2}  # save_last_n_epochs, save_last_n_steps: rotation deletes on every save
SECTIONS: dict[str, dict] = {
    "training": {"max_train_epochs": 3},
    "sampling": {"prompts": []},
    "logging": {"tensorboard": False},
    "saving": {"save_every_n_epochs": 1, "save_last_n_epochs": KEEP["epoch"],
               "save_every_n_steps": SAVE_EVERY, "save_last_n_steps": KEEP["step"]},
}
UNIFORM_WINDOW_S = 3.0  # uniform kills land within this long after the first step (several save points)
STARTUP_WINDOW_S = 6.0  # startup kills land within this long after the launch
EVENT_TIMEOUT_S = 180.0  # no expected event for this long: reported as a hang


# ------------------------------------------------------------------------------------ launching
def campaign_config(demo: Path, out: Path, **sections: dict) -> TrainingConfig:
    """The demo preset with the campaign's saving schedule (plus overrides), paths absolute."""
    merged = {k: {**SECTIONS.get(k, {}), **v} for k, v in sections.items()}
    return launcher.absolutize(resolve(demo_config(demo, out, **{**SECTIONS, **merged})))


def resume_config(checkpoint: Path) -> TrainingConfig:
    """What `python -m backend resume CHECKPOINT` launches: the checkpoint's config + resume_from."""
    data = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return launcher.absolutize(resolve({**data, "resume_from": str(checkpoint)}))


def start(cfg: TrainingConfig, extra_env: dict[str, str] | None = None) -> launcher.Launched:
    """Launch through the real launcher (new version folder, own session, default CPU thread count)."""
    from tests.trainer_probe import PROBE_ENTRY

    return launcher.launch(cfg, env={**launcher.launch_env(cfg), **(extra_env or {})}, entry=PROBE_ENTRY)


def ensure_dead(launched: launcher.Launched) -> None:
    """Leave nothing behind: SIGKILL the run's whole tree if any of it is alive, reap the child."""
    if launched.proc.poll() is None or not launcher.wait_run_gone(launched.version_dir, 0):
        launcher.kill(launched.version_dir)
    launched.proc.wait(timeout=60)


def wait_end(launched: launcher.Launched, timeout: float) -> bool:
    """Wait for the run's processes to end by themselves; False when it did not (a hang)."""
    try:
        launched.proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: the caller reports the hang
        return False
    return launcher.wait_run_gone(launched.version_dir, 30)


# --------------------------------------------------------------------------------------- reading
class EventTail:
    """New events of a version folder, read by byte offset (a half-written last line waits)."""

    def __init__(self, version_dir: Path):
        self.path, self.offset = version_dir / "events.jsonl", 0

    def poll(self) -> list[dict[str, Any]]:
        evs, self.offset = read_events(self.path, self.offset)
        return evs


def all_events(version_dir: Path, name: str | None = None) -> list[dict[str, Any]]:
    evs, _ = read_events(version_dir / "events.jsonl")
    return [e for e in evs if name is None or e["event"] == name]


def step_losses(version_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in all_events(version_dir, "step")}


def wait_event(tail: EventTail, proc: Any, pred: Callable[[dict[str, Any]], bool],
               timeout: float = EVENT_TIMEOUT_S) -> dict[str, Any] | str:
    """The first new event matching pred; 'ended' when the process exits first, 'hang' on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in tail.poll():
            if pred(e):
                return e
        if proc.poll() is not None:
            return next((e for e in tail.poll() if pred(e)), "ended")
        time.sleep(0.01)
    return "hang"


def manifest_sha(folder: Path) -> str:
    return hashlib.sha256((folder / C.MANIFEST).read_bytes()).hexdigest()


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every valid checkpoint of a run (all versions): path -> sha256 of its manifest."""
    return {c["path"]: manifest_sha(Path(c["path"])) for c in C.list_checkpoints(run_dir) if c["status"] == "valid"}


# ---------------------------------------------------------------------------------------- checks
def verify_quick(folder: Path) -> tuple[bool, list[str]]:
    """The check behind `python -m backend verify --quick` (hashes, sizes, every file loads)."""
    from backend.trainer.verify import verify_checkpoint

    return verify_checkpoint(folder, recompute=False)


def verify_deep(folder: Path) -> tuple[bool, list[str]]:
    """`python -m backend verify`: also shapes against the config and the stored loss recomputed."""
    from backend.trainer.verify import verify_checkpoint

    return verify_checkpoint(folder, recompute=True)


def check_listing(run_dir: Path, deep: bool = False, resumable: bool = True) -> tuple[list[str], dict[str, Any] | None]:
    """(problems, latest) of a run's checkpoint listing: every valid one verifies, nothing else is latest,
    the resume preflight accepts the latest (when `resumable`), every export file on disk loads."""
    problems: list[str] = []
    cks = C.list_checkpoints(run_dir)
    latest = C.latest(cks)
    for c in cks:
        if c["status"] == "valid":
            ok, lines = verify_quick(Path(c["path"]))
            if not ok:
                problems.append(f"listed valid but verify --quick fails: {c['path']}: {lines[-1]}")
        elif c is latest:
            problems.append(f"{c['status']} checkpoint picked as latest: {c['path']}")
        else:
            problems.append(f"a checkpoint-named folder is {c['status']}: {c['path']} {c['problems'][:1]}")
    if latest is not None and resumable:
        if deep and not verify_deep(Path(latest["path"]))[0]:
            problems.append(f"latest fails deep verify: {latest['path']}")
        refused = plan_resume(latest["path"], resume_config(Path(latest["path"]))).refused
        if refused and "already complete" not in refused[0]:
            problems.append(f"resume refuses the latest checkpoint: {refused}")
    for export in sorted(run_dir.glob("version_*/exports/*.safetensors")):
        try:
            with safe_open(str(export), framework="pt") as fh:
                fh.keys()
        except Exception as e:  # noqa: BLE001 - a half-written export is the finding
            problems.append(f"export does not load: {export}: {e}")
    return problems, latest


def check_status(out: Path, version_dir: Path) -> tuple[list[str], str, str | None]:
    """(problems, state, reason) of the killed run as `python -m backend runs` lists it (reconciled)."""
    info = next((i for i in runs.list_runs(out) if Path(i.path) == version_dir), None)
    if info is None:
        return [f"{version_dir} not listed by runs"], "missing", None
    problems = []
    if info.state not in ("failed", "stopped"):
        problems.append(f"after a kill the run is listed {info.state}")
    if not info.reason:
        problems.append("after a kill the run has no reason")
    last = (all_events(version_dir) or [{}])[-1]
    if last.get("event") != "run_finished":
        problems.append(f"events.jsonl does not end with run_finished (last: {last.get('event')})")
    return problems, info.state, info.reason


def lost_checkpoints(before: dict[str, str], version_dir: Path) -> list[str]:
    """Checkpoints that were valid before the kill and are not (unchanged) after it; and, in the killed
    version, the newest save_last_n_* save points it announced (checkpoint_saved, never removed)."""
    lost = [p for p, sha in before.items()
            if C.checkpoint_status(Path(p))[0] != "valid" or manifest_sha(Path(p)) != sha]
    removed = {e["name"] for e in all_events(version_dir, "checkpoint_removed")}
    saved = [e for e in all_events(version_dir, "checkpoint_saved") if e["name"] not in removed]
    must = [e for e in saved if e["kind"] not in KEEP]
    for kind, keep in KEEP.items():
        must += sorted((e for e in saved if e["kind"] == kind), key=lambda e: e["step"])[-keep:]
    folders = {version_dir / "checkpoints" / e["name"] for e in must}
    return lost + [str(f) for f in sorted(folders) if C.checkpoint_status(f)[0] != "valid"]


def segment_check(version_dir: Path, reference: dict[int, float], from_step: int) -> tuple[bool | None, str]:
    """Did this segment's per-step losses continue the reference bit for bit? None: no step logged."""
    losses = step_losses(version_dir)
    if not losses:
        return None, "no step logged before the kill"
    steps = sorted(losses)
    if steps != list(range(from_step + 1, from_step + 1 + len(steps))):
        return False, f"steps {steps[0]}..{steps[-1]} do not continue step {from_step} contiguously"
    diff = [(k, losses[k], reference.get(k)) for k in steps if losses[k] != reference.get(k)]
    if diff:
        return False, f"{len(diff)} of {len(steps)} losses differ from the reference, first {diff[0]}"
    return True, f"steps {steps[0]}..{steps[-1]} bit-identical to the reference"


def final_matches(version_dir: Path, reference_dir: Path) -> bool:
    """The finished segment's final LoRA tensors are byte-identical to the reference's."""
    sha = [((C.read_manifest(v / "checkpoints" / "final") or {}).get("files") or {}).get("lora.safetensors", {}).get("sha256")
           for v in (version_dir, reference_dir)]
    return sha[0] is not None and sha[0] == sha[1]


# ---------------------------------------------------------------------------------------- strike
def strike(launched: launcher.Launched, rng: random.Random, slow_save_s: float) -> dict[str, Any]:
    """Wait for a random moment and SIGKILL the run. Modes: 'save' (just after the step event that
    precedes a save point, or an epoch_end, within the widened save window), 'uniform' (any time in
    the first seconds of training) and 'startup' (while the model loads or the resume restores).
    Half the kills take the whole tree (launcher.kill, like `stop --kill`), half only the launch
    group from outside (os.killpg, like the OOM killer or a lost machine)."""
    v, proc, tail = launched.version_dir, launched.proc, EventTail(launched.version_dir)
    mode = rng.choices(["save", "uniform", "startup"], weights=[60, 30, 10])[0]
    how = rng.choice(["tree", "group"])
    t0 = time.monotonic()
    if mode == "startup":
        end = t0 + rng.uniform(0.3, STARTUP_WINDOW_S)
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.01)
    else:
        def boundary(e: dict[str, Any]) -> bool:
            return e["event"] == "epoch_end" or (e["event"] == "step" and e["step"] % SAVE_EVERY == 0)
        waits = [boundary] * rng.randint(1, 2) if mode == "save" else [lambda e: e["event"] == "step"]
        for pred in waits:
            seen = wait_event(tail, proc, pred)
            if isinstance(seen, str):
                return {"mode": mode, "how": how, "killed": False, "outcome": seen}
        time.sleep(rng.uniform(0.0, 3 * slow_save_s + 0.15 if mode == "save" else UNIFORM_WINDOW_S))
    if proc.poll() is not None:
        return {"mode": mode, "how": how, "killed": False, "outcome": "ended"}
    at = runs.read_status(v).get("step")
    if how == "tree":
        launcher.kill(v)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    launcher.wait_run_gone(v, 30)
    return {"mode": mode, "how": how, "killed": True, "outcome": "killed", "delay_s": round(time.monotonic() - t0, 2),
            "status_step": at}


# ------------------------------------------------------------------------------------ the chain
@dataclass
class KillRecord:
    n: int
    chain: int
    version: str
    resumed_from: str | None
    mode: str
    how: str
    delay_s: float | None
    state: str
    reason: str | None
    tmp_left: list[str]  # unfinished saves the kill left behind (it landed inside a save or removal)
    valid: list[str]
    latest: str | None
    lost: list[str]
    problems: list[str]
    bitexact: bool | None
    bitexact_note: str
    cli: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Campaign:
    demo: Path
    root: Path
    reference: dict[int, float]
    reference_dir: Path
    seed: int = 0
    slow_save_s: float = 0.15
    deep_every: int = 10  # deep verify (loss recomputed) of the latest checkpoint every N kills
    cli_every: int = 25  # cross-check with the real CLI (runs, checkpoints, verify --quick) every N kills
    log: Callable[[str], None] = print
    segments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return max(self.reference)


def reference_run(demo: Path, root: Path) -> tuple[dict[int, float], Path]:
    """The uninterrupted run every segment is compared with (same config, no test hooks)."""
    launched = start(campaign_config(demo, root / "reference"))
    try:
        assert wait_end(launched, 600), "the reference run did not end"
    finally:
        ensure_dead(launched)
    status = runs.read_status(launched.version_dir)
    assert status.get("state") == "finished", status
    return step_losses(launched.version_dir), launched.version_dir


def cli_crosscheck(out: Path, version_dir: Path, latest: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The same facts through the real CLI: `runs --json`, `checkpoints --json`, `verify --quick`."""
    from tests.conftest import run_cli

    listed = {r["path"]: r for r in json.loads(run_cli("runs", str(out), "--json").stdout)}
    cks = json.loads(run_cli("checkpoints", str(version_dir.parent), "--json").stdout)
    mine = listed.get(str(version_dir), {})
    facts: dict[str, Any] = {"runs_state": mine.get("state"), "checkpoints": {c["name"]: c["status"] for c in cks}}
    problems = [] if mine.get("state") in ("failed", "stopped") else [f"`runs` lists the killed run as {mine.get('state')}"]
    if latest is not None:
        proc = run_cli("verify", latest["path"], "--quick")
        facts["verify_latest_rc"] = proc.returncode
        if proc.returncode != 0:
            problems.append(f"`verify --quick` fails on the latest checkpoint: {proc.stdout[-300:]}")
    return facts, problems


def examine(c: Campaign, n: int, chain: int, launched: launcher.Launched, hit: dict[str, Any],
            before: dict[str, str], from_step: int) -> KillRecord:
    """Every check after one kill (see the module docstring)."""
    v = launched.version_dir
    out, run_dir = v.parent.parent, v.parent
    problems, state, reason = check_status(out, v)
    tmp_left = sorted(p.name for d in ("checkpoints", "exports") for p in (v / d).glob("*.tmp"))
    listing_problems, latest = check_listing(run_dir, deep=n % c.deep_every == 0)
    problems += listing_problems
    bit, note = segment_check(v, c.reference, from_step)
    cli: dict[str, Any] = {}
    if n % c.cli_every == 0:
        cli, cli_problems = cli_crosscheck(out, v, latest)
        problems += cli_problems
    valid = [x["name"] for x in C.list_checkpoints(v) if x["status"] == "valid"]
    cfg = json.loads((v / "config.json").read_text(encoding="utf-8"))
    return KillRecord(n, chain, f"{out.name}/{v.name}", cfg.get("resume_from"), hit["mode"], hit["how"],
                      hit.get("delay_s"), state, reason, tmp_left, valid, latest and latest["path"],
                      lost_checkpoints(before, v), problems, bit, note, cli)


def next_segment(c: Campaign, chain: int) -> tuple[TrainingConfig | None, int]:
    """Resume the chain from its latest valid checkpoint (fresh when it has none); None: complete."""
    out = c.root / f"chain-{chain:03d}"
    latest = C.latest(C.list_checkpoints(out / "demo"))
    if latest is None:
        return campaign_config(c.demo, out), 0
    if (latest["step"] or 0) >= c.total_steps:
        return None, 0
    return resume_config(Path(latest["path"])), int(latest["step"])


def run_kills(c: Campaign, kills: int) -> list[KillRecord]:
    """Kill, check, resume from the latest valid checkpoint, kill again ... until `kills` kills landed.
    A chain whose segment reaches the end is checked (finished, final LoRA identical) and a new starts."""
    rng, records, chain, before = random.Random(c.seed), [], 0, {}
    while len(records) < kills:
        cfg, from_step = next_segment(c, chain)
        if cfg is None:
            chain, before = chain + 1, {}
            continue
        launched = start(cfg, {"LATHE_TEST_SLOW_SAVE_S": str(c.slow_save_s)})
        try:
            hit = strike(launched, rng, c.slow_save_s)
        finally:
            ensure_dead(launched)
        v = launched.version_dir
        if hit["killed"]:
            rec = examine(c, len(records) + 1, chain, launched, hit, before, from_step)
            records.append(rec)
            seg = {"version": rec.version, "from_step": from_step, "bitexact": rec.bitexact, "note": rec.bitexact_note}
            c.log(f"kill {rec.n:>3}/{kills} {rec.version:<22} {rec.mode:<7} {rec.how:<5} {rec.state:<7} "
                  f"latest={Path(rec.latest).name if rec.latest else '-':<14} tmp={len(rec.tmp_left)} "
                  f"lost={len(rec.lost)} problems={len(rec.problems)} bitexact={rec.bitexact}")
        else:
            seg = ended_segment(c, v, from_step, hit["outcome"])
            c.log(f"segment {v.parent.parent.name}/{v.name} ended without a kill: {seg}")
            chain += 1 if seg.get("state") == "finished" else 0
        c.segments.append(seg)
        before = snapshot(v.parent)
    return records


def ended_segment(c: Campaign, v: Path, from_step: int, outcome: str) -> dict[str, Any]:
    """A segment that ended before its kill: it must have finished, bit-exact, with the reference's final LoRA."""
    bit, note = segment_check(v, c.reference, from_step)
    state = runs.reconcile(v).get("state")
    final = final_matches(v, c.reference_dir) if state == "finished" else None
    ok = bool(bit) and state == "finished" and bool(final) and outcome == "ended"
    return {"version": f"{v.parent.parent.name}/{v.name}", "from_step": from_step, "state": state,
            "outcome": outcome, "bitexact": ok, "note": f"{note}; final LoRA identical: {final}"}
