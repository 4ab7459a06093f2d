"""TensorBoard for the GUI: one `python -m tensorboard.main` child on loopback, over one run's
`tensorboard/` folder or the whole output folder, started on request and stopped with the app.

The child is a small watcher (`python -m backend.tensorboard_server PARENT_PID ARGS...`) in its own
process group, which runs TensorBoard and ends it as soon as its parent is gone, so a killed app.py
leaves no TensorBoard behind; `stop()` (also run at exit) ends the group otherwise. It binds
127.0.0.1 only: TensorBoard has no login, so it is never exposed beyond this machine.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
WATCH_S = 1.0


class TensorBoardError(Exception):
    """TensorBoard could not start; the message says why."""


@dataclass(frozen=True)
class Served:
    logdir: Path
    url: str
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class TensorBoardServer:
    """At most one TensorBoard at a time; asking for another folder restarts it over that folder."""

    def __init__(self, log_file: Path | None = None):
        self._proc: subprocess.Popen | None = None
        self._served: Served | None = None
        self._lock = threading.Lock()
        self._log_file = log_file
        atexit.register(self.stop)

    @property
    def served(self) -> Served | None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._proc, self._served = None, None
            return self._served

    def serve(self, logdir: str | Path, timeout_s: float = START_TIMEOUT_S) -> Served:
        """TensorBoard over `logdir` (started, or the running one when it already shows that folder)."""
        folder = Path(logdir).expanduser().resolve()
        if not folder.is_dir():
            raise TensorBoardError(f"{folder} does not exist (a run writes TensorBoard logs with logging.tensorboard on)")
        current = self.served
        if current is not None and current.logdir == folder:
            return current
        self.stop()
        port = free_port()
        argv = [sys.executable, "-m", "backend.tensorboard_server", str(os.getpid()), "--logdir", str(folder),
                "--host", HOST, "--port", str(port), "--reload_interval", "5"]
        log = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
                                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        except OSError as e:
            raise TensorBoardError(f"could not start TensorBoard: {e}") from None
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        url = f"http://{HOST}:{port}/"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TensorBoardError(f"TensorBoard exited at start (exit code {proc.returncode})"
                                       + (f"; see {self._log_file}" if self._log_file else ""))
            if _answers(url):
                with self._lock:
                    self._proc, self._served = proc, Served(folder, url, proc.pid)
                return self._served
            time.sleep(0.2)
        _end(proc)
        raise TensorBoardError(f"TensorBoard did not answer on {url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        with self._lock:
            proc, self._proc, self._served = self._proc, None, None
        if proc is not None:
            _end(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - our own loopback URL
            return r.status == 200
    except OSError:
        return False


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def watch(parent: int, args: list[str]) -> int:
    """The child: TensorBoard with `args`, ended when `parent` is gone (or when it ends by itself)."""
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", *args], stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: (tb.terminate(), sys.exit(0)))
    while tb.poll() is None:
        if os.getppid() != parent:
            tb.terminate()
            try:
                tb.wait(timeout=10)
            except subprocess.TimeoutExpired:
                tb.kill()
            return 0
        time.sleep(WATCH_S)
    return tb.returncode


if __name__ == "__main__":
    raise SystemExit(watch(int(sys.argv[1]), sys.argv[2:]))
