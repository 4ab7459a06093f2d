"""Follow a run: new events, new log text and its status, from any byte offsets.

Whoever follows (the CLI that started the run, a GUI restarted an hour later, another terminal)
keeps two offsets and asks for what came after them, so following survives restarts and never
re-reads what it has. A run counts as done when its status is final and none of its processes is
alive, so the last lines of the log are read too.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from backend import launcher, lock, process_tree, runs
from backend.config import TrainingConfig
from backend.events import read_events, read_text_from

EXIT_CODES = {"finished": 0, "failed": 1, "stopped": 3}
RECONCILE_EVERY_S = 2.0
MAX_LOG_BYTES = 1 << 20


@dataclass
class Update:
    """What is new since the last poll; pass the offsets back to continue from here."""

    events: list[dict[str, Any]]
    log: str
    status: dict[str, Any]
    events_offset: int
    log_offset: int
    done: bool = False


@dataclass
class Follower:
    """Follows one version folder. `proc` is the launched process when this process started it."""

    version_dir: Path
    events_offset: int = 0
    log_offset: int = 0
    proc: subprocess.Popen | None = None
    _last_reconcile: float = field(default=0.0, repr=False)

    def poll(self, max_log_bytes: int = MAX_LOG_BYTES) -> Update:
        v = Path(self.version_dir)
        # Status first: whatever the trainer wrote before a final status is then read below.
        status, gone = self._status()
        events, self.events_offset = read_events(v / "events.jsonl", self.events_offset)
        log, self.log_offset = read_text_from(v / "train.log", self.log_offset, max_log_bytes)
        done = status.get("state") in runs.FINAL_STATES and gone and len(log.encode("utf-8", "replace")) < max_log_bytes
        return Update(events, log, status, self.events_offset, self.log_offset, done)

    def _status(self) -> tuple[dict[str, Any], bool]:
        v = Path(self.version_dir)
        status = runs.read_status(v)
        if self.proc is not None and self.proc.poll() is not None and not process_tree.find_for_status(status):
            return runs.finalize(v, self.proc.returncode), True
        if status.get("state") in runs.FINAL_STATES:
            return status, not process_tree.find_for_status(status)
        now = time.monotonic()
        if self.proc is None and now - self._last_reconcile >= RECONCILE_EVERY_S:
            self._last_reconcile = now
            status = runs.reconcile(v)
            if status.get("state") in runs.FINAL_STATES:
                return status, not process_tree.find_for_status(status)
        return status, False


def follow_to_end(version_dir: Path, events_offset: int = 0, log_offset: int = 0, proc: subprocess.Popen | None = None,
                  out: TextIO | None = None, on_update: Callable[[Update], None] | None = None,
                  poll_s: float = 0.2) -> dict[str, Any]:
    """Copy the run's log to `out` (stdout by default) until it is done; return its final status."""
    out = sys.stdout if out is None else out
    f = Follower(Path(version_dir), events_offset, log_offset, proc)
    while True:
        u = f.poll()
        if u.log:
            out.write(u.log)
            out.flush()
        if on_update is not None:
            on_update(u)
        if u.done:
            return u.status
        time.sleep(poll_s)


def summary_line(version_dir: Path, status: dict[str, Any]) -> str:
    reason = status.get("error")
    return f"run {status.get('state')}: {version_dir}" + (f" ({reason})" if reason else "")


class Interrupts:
    """Ctrl+C while following: the first asks for a graceful stop, the second kills the run.

    Installed before the launch, so a Ctrl+C that comes while the trainer is being started is not
    lost (nor turned into a traceback). The handler only counts; `act()`, called from the follow
    loop, does the work, because stop and kill take the status.json lock, which the interrupted
    code may be holding.
    """

    def __init__(self) -> None:
        self.count = 0
        self.acted = 0
        self.version_dir: Path | None = None
        self._old: Any = None

    def __enter__(self) -> Interrupts:
        self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)

    def attach(self, version_dir: Path) -> None:
        self.version_dir = version_dir
        self.act()

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.count += 1

    def act(self) -> None:
        if self.version_dir is None:
            return
        while self.acted < self.count:
            self.acted += 1
            if self.acted == 1:
                print("\nstopping gracefully (saving a stop checkpoint); press Ctrl+C again to kill", file=sys.stderr, flush=True)
                launcher.request_stop(self.version_dir)
            elif self.acted == 2:
                print("\nkilling the trainer", file=sys.stderr, flush=True)
                launcher.kill(self.version_dir, "killed by a second Ctrl+C (nothing saved since the last checkpoint)")


def follow_with_interrupts(version_dir: Path, proc: subprocess.Popen | None = None, log_offset: int = 0,
                           interrupts: Interrupts | None = None) -> int:
    """Follow a run in a terminal: Ctrl+C asks for a graceful stop, a second Ctrl+C kills it.
    Returns the CLI exit code of its final state (finished 0, failed 1, stopped 3)."""
    if interrupts is None:
        with Interrupts() as ints:
            return follow_with_interrupts(version_dir, proc, log_offset, ints)
    interrupts.attach(version_dir)
    status = follow_to_end(version_dir, log_offset=log_offset, proc=proc, on_update=lambda u: interrupts.act())
    print(summary_line(version_dir, status), flush=True)
    return EXIT_CODES.get(status.get("state"), 1)


def run_and_follow(cfg: TrainingConfig) -> int:
    """`train` / `resume`: launch, print the version folder first, follow to the end."""
    with Interrupts() as ints:
        try:
            launched = launcher.launch(cfg)
        except lock.RunBusyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(launched.version_dir, flush=True)
        return follow_with_interrupts(launched.version_dir, launched.proc, interrupts=ints)
