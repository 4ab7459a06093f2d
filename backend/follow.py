"""Launch a run from the CLI and follow it: the log to the console, Ctrl+C for a graceful stop."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from backend import launcher, runs
from backend.config import TrainingConfig
from backend.events import read_text_from

LOG_TAIL_LINES = 5
EXIT_CODES = {"finished": 0, "failed": 1, "stopped": 3}


def log_tail(version_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = (version_dir / "train.log").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-400:]


def finalize(version_dir: Path, exit_code: int | None) -> dict:
    """After the process is gone: a status that is not final means the trainer died without saying so."""
    status = runs.read_status(version_dir)
    if status.get("state") not in runs.FINAL_STATES:
        reason = f"trainer exited with code {exit_code} without a final status; log: {log_tail(version_dir)}"
        status = runs.update_status(version_dir, state="failed", exit_code=exit_code, error=reason)
    elif status.get("exit_code") is None:
        status = runs.update_status(version_dir, exit_code=exit_code)
    return status


def run_and_follow(cfg: TrainingConfig) -> int:
    cfg = launcher.absolutize(cfg)
    version_dir = runs.create_version_dir(cfg.output_dir, cfg.run_name)
    print(version_dir, flush=True)
    argv = launcher.build_argv(cfg, version_dir, cpu_threads=launcher.default_cpu_threads(cfg))
    runs.write_run_files(version_dir, cfg, argv)
    runs.new_status(version_dir)
    proc = launcher.start(version_dir, argv, launcher.launch_env(cfg))
    interrupts = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nstopping gracefully (saving a stop checkpoint); press Ctrl+C again to kill", file=sys.stderr, flush=True)
            launcher.request_stop(version_dir)
        else:
            print("\nkilling the trainer", file=sys.stderr, flush=True)
            launcher.kill_group(proc.pid)

    old = signal.signal(signal.SIGINT, on_sigint)
    offset = 0
    try:
        while True:
            text, offset = read_text_from(version_dir / "train.log", offset)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
            if proc.poll() is not None:
                text, offset = read_text_from(version_dir / "train.log", offset)
                sys.stdout.write(text)
                break
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, old)
    status = finalize(version_dir, proc.returncode)
    print(f"run {status.get('state')}: {version_dir}" + (f" ({status['error']})" if status.get("error") else ""), flush=True)
    return EXIT_CODES.get(status.get("state"), 1)
