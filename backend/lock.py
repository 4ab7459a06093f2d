"""One run at a time per output folder and GPU set.

The lock is a record, not a held file descriptor: `<output_dir>/.locks/<gpu set>.json` names the
version folder that claimed it, and the claim counts only while that run still has a live process
(see process_tree). It cannot go stale: when the holder dies, however it dies, the lock is free.
`flock` only guards the few milliseconds of check-then-claim, and the kernel drops it if the
claiming process dies in between.

Torch-free: the GUI imports this.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend import process_tree, runs
from backend.config import LaunchConfig

LOCK_DIR = ".locks"


ENDING_GRACE_S = 20.0  # how long a finished run's processes may take to exit before a new start is refused


class RunBusyError(RuntimeError):
    """A run is already active in this output folder on the same devices."""


def gpu_set(launch: LaunchConfig) -> str:
    """The device set a run uses, as a file-name-safe key: 'cpu', 'gpu-all' or 'gpu-0,1'."""
    if launch.device == "cpu":
        return "cpu"
    return f"gpu-{launch.gpu_ids or 'all'}"


def lock_path(output_dir: str | Path, key: str) -> Path:
    return Path(output_dir) / LOCK_DIR / f"{key}.json"


def _read_record(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def active_holder(record: dict[str, Any]) -> Path | None:
    """The version folder named by a lock record, when its run still has a live process."""
    v = record.get("version_dir")
    if not v:
        return None
    status = runs.read_status(v)
    if status.get("state") in runs.FINAL_STATES:
        # The run has said its last word and its processes are exiting: give them a moment rather
        # than refusing a start that comes right after a finish.
        deadline = time.monotonic() + ENDING_GRACE_S
        while process_tree.find_for_status(status) and time.monotonic() < deadline:
            time.sleep(0.2)
    return Path(v) if process_tree.find_for_status(status) else None


def busy_message(holder: Path, key: str) -> str:
    st = runs.read_status(holder)
    step = f", step {st.get('step', 0)}/{st.get('total_steps') or '?'}" if st.get("state") == "running" else ""
    where = "the CPU" if key == "cpu" else f"GPUs {key.removeprefix('gpu-')}"
    return (f"another run is active in this output folder on {where}: {holder} ({st.get('state', 'unknown')}{step}); "
            f"wait for it to end or stop it first: python -m backend stop {holder}")


class Claim:
    """The claim being made inside `claim(...)`: call hold() once the process is started."""

    def __init__(self, fd: int):
        self._fd = fd

    def hold(self, version_dir: Path) -> None:
        record = {"version_dir": str(version_dir), "claimed_by_pid": os.getpid(), "claimed_at": time.time()}
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        os.fsync(self._fd)


@contextlib.contextmanager
def claim(output_dir: str | Path, key: str) -> Iterator[Claim]:
    """Check that no run holds (output_dir, key) and claim it; raise RunBusyError otherwise.

    Start the process and call `Claim.hold(version_dir)` inside the block, so a concurrent
    claimant waits and then sees the new holder.
    """
    path = lock_path(output_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        holder = active_holder(_read_record(fd))
        if holder is not None:
            raise RunBusyError(busy_message(holder, key))
        yield Claim(fd)
    finally:
        os.close(fd)  # also releases the flock


def holder(output_dir: str | Path, key: str) -> Path | None:
    """The version folder currently holding (output_dir, key), or None when free."""
    path = lock_path(output_dir, key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return active_holder(record) if isinstance(record, dict) else None
