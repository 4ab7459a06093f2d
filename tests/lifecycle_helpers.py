"""Helpers for the run-lifecycle tests: demo configs, a fake trainer that misbehaves on purpose,
and process checks by pid."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

from backend import launcher, runs
from backend.config import TrainingConfig
from backend.presets import resolve
from tests.conftest import demo_config, events, wait_for

# A stand-in trainer started through the real launcher. Modes:
#   ignore: traps SIGINT/SIGTERM, spawns a child in a session of its own (as torch's elastic agent
#           does with its workers) that spawns a grandchild; all three ignore signals, never exit.
#   honour: exits cleanly on the STOP file, writing a final status like the real trainer.
#   crash:  prints an error and exits 3 without a final status.
#   hang:   reports running once, then neither beats nor exits.
FAKE_TRAINER = r'''
import os, signal, subprocess, sys, time
from pathlib import Path
from backend import runs

run, mode, role = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(run / "pids", "a") as fh:
    fh.write(f"{role} {os.getpid()}\n")
if mode == "ignore":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if role == "leader":
        subprocess.Popen([sys.executable, __file__, str(run), mode, "child"], start_new_session=True)
    elif role == "child":
        subprocess.Popen([sys.executable, __file__, str(run), mode, "grandchild"])
if role != "leader":
    while True:
        time.sleep(1)
print("fake trainer running", flush=True)
runs.update_status(run, state="running", trainer_pid=os.getpid(), heartbeat_at=time.time())
if mode == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom: the fake trainer broke", flush=True)
    sys.exit(3)
while True:
    if mode == "honour" and (run / "STOP").exists():
        runs.update_status(run, state="stopped", exit_code=0, error="stopped by request (STOP file)")
        sys.exit(0)
    if mode != "hang":
        runs.update_status(run, heartbeat_at=time.time())
    time.sleep(0.1)
'''


def demo_cfg(demo: Path, out: Path, **sections: dict) -> TrainingConfig:
    """The demo preset on this session's assets, as a validated config (no sampling unless asked)."""
    sections.setdefault("sampling", {"prompts": []})
    return resolve(demo_config(demo, out, **sections))


def fake_trainer_file(tmp: Path) -> Path:
    path = tmp / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


def start_fake(tmp: Path, out: Path, mode: str, exclusive: bool = True) -> tuple[Path, object]:
    """Start the fake trainer for a fresh CPU version folder under `out`, through launcher.start."""
    cfg = launcher.absolutize(TrainingConfig.model_validate({"run_name": "fake", "output_dir": str(out),
                                                             "launch": {"device": "cpu"}}))
    v = runs.create_version_dir(cfg.output_dir, cfg.run_name)
    argv = [sys.executable, str(fake_trainer_file(tmp)), str(v), mode, "leader"]
    runs.write_run_files(v, cfg, argv)
    runs.new_status(v)
    proc = launcher.start(v, argv, launcher.launch_env(cfg), exclusive=exclusive)
    wait_for(lambda: runs.read_status(v).get("state") == "running", timeout=30)
    return v, proc


def fake_pids(v: Path) -> dict[str, int]:
    lines = (v / "pids").read_text().split("\n") if (v / "pids").exists() else []
    return {role: int(pid) for role, pid in (ln.split() for ln in lines if ln.strip())}


def alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent's bookkeeping remains)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_steps(v: Path, n: int, timeout: float = 120) -> None:
    wait_for(lambda: (v / "events.jsonl").exists() and len(events(v, "step")) >= n, timeout=timeout)
