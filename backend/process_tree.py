"""The processes of one run, found by a token in their environment, and how to end them all.

`accelerate launch` runs in its own session, but its children do not all stay in that process
group: torch's elastic agent (used for several processes) starts every worker in a new session of
its own. A process group is therefore not enough to find "the run". The launcher puts a random
token into the trainer's environment (LATHE_RUN_TOKEN); every descendant inherits it, even one
that changed session or was re-parented when its parent died, so scanning /proc for the token
finds the whole tree. The group id is kept as a second key (for a child that cleared its
environment), limited to processes created after the run started so a reused id cannot match.

Torch-free: the GUI imports this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping
from typing import Any

import psutil

TOKEN_ENV = "LATHE_RUN_TOKEN"
CLOCK_SLACK_S = 2.0  # create_time has coarse resolution; started_at is taken just before the spawn


def _matches(p: psutil.Process, token: str | None, pgid: int | None, since: float | None) -> bool:
    if token:
        with contextlib.suppress(psutil.Error, OSError):
            if p.environ().get(TOKEN_ENV) == token:
                return True
    if pgid:
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and (since is None or p.create_time() >= since - CLOCK_SLACK_S):
                return True
    return False


def find(token: str | None, pgid: int | None = None, since: float | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes of a run: those carrying `token`, or in group `pgid` and created
    after `since`, plus all their descendants."""
    if not token and not pgid:
        return []
    me, uid = os.getpid(), os.getuid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["uids", "status"]):
        info = p.info
        if p.pid == me or info.get("uids") is None or info["uids"].real != uid:
            continue
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if _matches(p, token, pgid, since):
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
    return [p for p in found.values() if is_running(p)]


def find_for_status(status: Mapping[str, Any]) -> list[psutil.Process]:
    """The live processes of the run described by a status.json mapping."""
    return find(status.get("run_token"), status.get("pgid"), status.get("launched_at"))


def is_running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent's bookkeeping remains)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    try:
        return is_running(psutil.Process(pid))
    except psutil.Error:
        return False


def send(procs: Iterable[psutil.Process], sig: int, pgid: int | None = None) -> None:
    """Signal every listed process, and the group `pgid` when one of them is still in it (a group
    with none of ours left may be a stranger's that reused the id)."""
    procs = list(procs)
    if pgid and any(_pgid(p) == pgid for p in procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for p in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            p.send_signal(sig)


def signal_group(status: Mapping[str, Any], sig: int) -> bool:
    """Signal the run's launch process group, when a process of the run is still in it."""
    pgid = status.get("pgid")
    if not pgid or not any(_pgid(p) == pgid for p in find_for_status(status)):
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None


def wait_gone(procs: Iterable[psutil.Process], timeout: float, poll_s: float = 0.1) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); return the survivors."""
    left = list(procs)
    end = time.monotonic() + timeout
    while True:
        left = [p for p in left if is_running(p)]
        if not left or time.monotonic() >= end:
            return left
        time.sleep(poll_s)


def kill_all(status: Mapping[str, Any], rounds: int = 5, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process of the run until none is left; return pids that survived (normally none).

    Repeated because a process may spawn a child between the scan and the signal.
    """
    survivors: list[psutil.Process] = []
    for _ in range(rounds):
        procs = find_for_status(status)
        if not procs:
            return []
        send(procs, signal.SIGKILL, status.get("pgid"))
        survivors = wait_gone(procs, timeout / rounds)
    return [p.pid for p in survivors if is_running(p)]
