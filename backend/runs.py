"""Run folders: <output_dir>/<run_name>/version_<N>/, their status.json, and listing them.

The run folder is the only interface between the GUI/CLI and the trainer (see docs/architecture.md).
Listing reconciles: a run whose processes are gone without a final state, or whose heartbeat went
stale, is marked failed with the tail of its train.log as the reason, so nothing stays "running"
after a crash, a reboot or a GUI restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from backend import process_tree
from backend.config import TrainingConfig
from backend.events import EventWriter, last_step

VERSION_RE = re.compile(r"^version_(\d+)$")
STATES = ("starting", "running", "stopping", "finished", "stopped", "failed")
FINAL_STATES = ("finished", "stopped", "failed")
STALE_HEARTBEAT_S = 60.0  # the trainer beats every 2 s from a thread of its own
STARTING_GRACE_S = 60.0  # a launcher may be between writing status.json and spawning the process
LOG_TAIL_LINES = 3


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def version_dirs(run_dir: str | Path) -> list[Path]:
    """The version_N folders of one run, by N."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := VERSION_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def create_version_dir(output_dir: str | Path, run_name: str) -> Path:
    """Make the next version_N folder. mkdir is atomic, so two launches never share a folder."""
    run_dir = Path(output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = version_dirs(run_dir)
    n = int(VERSION_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
    while True:
        path = run_dir / f"version_{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def write_run_files(version_dir: Path, cfg: TrainingConfig, command: list[str]) -> None:
    """config.json (frozen), hparams.yaml (complete, human-readable) and command.txt."""
    data = cfg.model_dump(mode="json")
    atomic_write_text(version_dir / "config.json", json.dumps(data, indent=2) + "\n")
    header = f"# Lathe run {cfg.run_name} / {version_dir.name}: every setting, defaults included.\n"
    atomic_write_text(version_dir / "hparams.yaml", header + yaml.safe_dump(data, sort_keys=False))
    atomic_write_text(version_dir / "command.txt", command_text(command) + "\n")


def command_text(argv: list[str]) -> str:
    """A copy-pasteable POSIX rendering of an argv (for display only; nothing runs it via a shell)."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def read_status(version_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(version_dir) / "status.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def update_status(version_dir: str | Path, when: Callable[[dict[str, Any]], bool] | None = None, **fields: Any) -> dict[str, Any]:
    """Merge fields into status.json atomically (only if `when(current)` holds) and return the status.

    The trainer (heartbeat) and the launcher (stop, reconcile) both update it: the read-merge-write
    holds an flock on .status.lock, so neither overwrites a change it has not seen (say, a final
    state written between another writer's read and its write).
    """
    fd = os.open(Path(version_dir) / ".status.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        status = read_status(version_dir)
        if when is not None and not when(status):
            return status
        status.update(fields)
        atomic_write_text(Path(version_dir) / "status.json", json.dumps(status, indent=1) + "\n")
    finally:
        os.close(fd)
    return status


def this_host() -> str:
    return socket.gethostname()


def new_status(version_dir: Path, total_steps: int | None = None) -> dict[str, Any]:
    now = time.time()
    return update_status(
        version_dir,
        state="starting",
        host=this_host(),  # where the processes run: only that machine can look for them
        pid=None,
        pgid=None,
        started_at=now,
        heartbeat_at=now,
        step=0,
        total_steps=total_steps,
        exit_code=None,
        error=None,
    )


# ------------------------------------------------------------------------------- ends and reasons
# accelerate's own last words when its trainer process ended badly
LAUNCHER_VERDICT = re.compile(r"CalledProcessError: Command .*(?:died with <Signals\.(\w+): \d+>|returned non-zero exit status (-?\d+))")


def log_lines(version_dir: str | Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last meaningful lines of train.log: progress-bar redraws collapsed, traceback frames
    (`File "..."` and the source line under it) and accelerate's re-raise left out."""
    try:
        with open(Path(version_dir) / "train.log", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    kept: list[str] = []
    frame = False
    for raw in text.splitlines():
        line = raw.split("\r")[-1]
        s = line.strip()
        if frame and line.startswith("    ") or not s or set(s) <= set("^~ "):
            frame = False
            continue
        frame = s.startswith('File "')
        if frame or s.startswith("Traceback (most recent call last)") or LAUNCHER_VERDICT.search(s):
            continue
        kept.append(s if len(s) <= 200 else s[:90] + " ... " + s[-100:])
    return kept[-lines:]


def log_tail(version_dir: str | Path, lines: int = LOG_TAIL_LINES, max_chars: int = 400) -> str:
    """log_lines joined into one line."""
    return " | ".join(log_lines(version_dir, lines))[-max_chars:]


def how_it_ended(version_dir: str | Path, exit_code: int | None) -> str:
    """' (killed by SIGKILL ...)' / ' (exit code N)' from the exit code or accelerate's verdict in the log."""
    try:
        with open(Path(version_dir) / "train.log", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16 * 1024))
            verdicts = LAUNCHER_VERDICT.findall(fh.read().decode("utf-8", errors="replace"))
    except FileNotFoundError:
        verdicts = []
    sig = verdicts[-1][0] if verdicts and verdicts[-1][0] else None
    if sig is None and exit_code is not None and exit_code < 0:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(-exit_code).name
    if sig == "SIGKILL":
        return " (killed by SIGKILL from outside; on a training machine often the out-of-memory killer)"
    if sig:
        return f" (killed by {sig})"
    code = int(verdicts[-1][1]) if verdicts and verdicts[-1][1] else exit_code
    return f" (exit code {code})" if code is not None else ""


def death_reason(version_dir: str | Path, exit_code: int | None, what: str) -> str:
    """One line: what happened, how the process ended, and the last lines of the log."""
    tail = log_tail(version_dir)
    how = how_it_ended(version_dir, exit_code)
    return f"{what}{how}; log: {tail}" if tail else f"{what}{how}; train.log is empty"


def _not_final(status: dict[str, Any]) -> bool:
    return status.get("state") not in FINAL_STATES


not_final = _not_final  # public name for other modules' conditional updates


def close_run(version_dir: str | Path, state: str, exit_code: int | None, reason: str | None) -> dict[str, Any]:
    """Write a final state the trainer could not write (it is dead), and the run_finished event it
    would have written, so status.json and events.jsonl both end with the truth (the step too: the
    last step event, newer than the last heartbeat). Keeps a final state the trainer did write."""
    v = Path(version_dir)
    wrote: list[bool] = []

    def when(current: dict[str, Any]) -> bool:
        wrote.append(_not_final(current))
        return wrote[-1]

    reported = last_step(v / "events.jsonl")  # the heartbeat's step in status.json lags the step events
    steps = {"step": reported} if reported is not None and reported > int(read_status(v).get("step") or 0) else {}
    status = update_status(v, when=when, state=state, exit_code=exit_code, error=reason, finished_at=time.time(), **steps)
    if wrote and wrote[-1]:
        with contextlib.suppress(OSError):
            writer = EventWriter(v / "events.jsonl")
            writer.emit("run_finished", state=state, step=int(status.get("step") or 0), error=reason, by="launcher")
            writer.close()
    elif status.get("exit_code") is None and exit_code is not None:
        status = update_status(v, exit_code=exit_code)
    return status


def finalize(version_dir: str | Path, exit_code: int | None, what: str = "the trainer exited without a final status") -> dict[str, Any]:
    """After the run's processes are gone: keep the trainer's own verdict, or record a failure
    (or the stop, when they are gone because someone killed them)."""
    status = read_status(version_dir)
    if not _not_final(status):
        return update_status(version_dir, when=lambda st: st.get("exit_code") is None and exit_code is not None,
                             exit_code=exit_code)
    if status.get("kill_requested_at"):
        return close_run(version_dir, "stopped", exit_code if exit_code is not None else -9, status.get("kill_reason"))
    return close_run(version_dir, "failed", exit_code, death_reason(version_dir, exit_code, what))


def reconcile(version_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """Bring status.json in line with reality and return it.

    A run that is not in a final state fails when none of its processes is alive, or when its
    heartbeat is older than STALE_HEARTBEAT_S (the trainer hung, or its machine went away). A run
    started on another host (shared storage: another machine's version folder) is judged by its
    heartbeat alone: its processes cannot be seen from here.
    """
    now = time.time() if now is None else now
    status = read_status(version_dir)
    state = status.get("state")
    if not status or state in FINAL_STATES:
        return status
    if status.get("pid") is None and now - float(status.get("started_at") or 0) < STARTING_GRACE_S:
        return status  # being launched right now
    elsewhere = status.get("host") not in (None, this_host())
    if not elsewhere and not process_tree.find_for_status(status):
        return finalize(version_dir, status.get("exit_code"), "the trainer's processes are gone without a final status")
    age = now - float(status.get("heartbeat_at") or status.get("started_at") or now)
    if state in ("running", "stopping") and age > STALE_HEARTBEAT_S:
        what = (f"no heartbeat for {age:.0f} s from host {status['host']} (its trainer died or hung, or the "
                "machine went away)" if elsewhere else
                f"no heartbeat for {age:.0f} s although its processes are alive (hung?); "
                f"end it with: python -m backend stop --kill {version_dir}")
        return update_status(version_dir, when=_not_final, state="failed", error=death_reason(version_dir, None, what),
                             finished_at=now)
    return status


# ---------------------------------------------------------------------------------------- listing
@dataclass
class RunInfo:
    """One version folder as the GUI and `runs --json` show it."""

    run_name: str
    version: int
    path: str
    state: str
    step: int
    total_steps: int | None
    reason: str | None
    exit_code: int | None = None
    pid: int | None = None
    started_at: float | None = None
    heartbeat_at: float | None = None
    step_at: float | None = None  # when the step counter last moved
    # A run across several machines (docs/cli.md "Several machines"); None on one machine.
    role: str | None = None  # "main" (machine 0: checkpoints, exports, events) or "worker"
    machine_rank: int | None = None
    main_host: str | None = None  # a worker's: the main machine's host name ...
    main_version_dir: str | None = None  # ... and its version folder (there)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def worker_of(self) -> str | None:
        """'machine 1, worker of host:/runs/demo/version_0' for a worker's version; None otherwise."""
        if self.role != "worker":
            return None
        return f"machine {self.machine_rank}, worker of {self.main_host}:{self.main_version_dir}"


def describe(version_dir: Path, status: dict[str, Any]) -> RunInfo:
    state = status.get("state") or "unknown"
    reason = status.get("error")
    if reason is None and state == "finished":
        reason = f"finished at step {status.get('step', 0)}"
    return RunInfo(
        run_name=version_dir.parent.name,
        version=int(VERSION_RE.match(version_dir.name).group(1)),
        path=str(version_dir),
        state=state,
        step=int(status.get("step") or 0),
        total_steps=status.get("total_steps"),
        reason=reason,
        exit_code=status.get("exit_code"),
        pid=status.get("pid"),
        started_at=status.get("started_at"),
        heartbeat_at=status.get("heartbeat_at"),
        step_at=status.get("step_at"),
        role=status.get("role"),
        machine_rank=status.get("machine_rank"),
        main_host=status.get("main_host"),
        main_version_dir=status.get("main_version_dir"),
    )


def list_runs(output_dir: str | Path, reconcile_dead: bool = True) -> list[RunInfo]:
    """Every version folder under output_dir (by run name, then N), reconciled unless told not to."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for v in version_dirs(run_dir):
            if not (v / "status.json").exists() and not (v / "config.json").exists():
                continue
            status = reconcile(v) if reconcile_dead else read_status(v)
            out.append(describe(v, status))
    return out
