"""TensorBoard from the GUI (backend/tensorboard_server.py): a real TensorBoard on loopback over a
run's event files, answering with that run; the same folder asked again is the same server; it ends
on stop and when the process that started it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from backend.tensorboard_server import HOST, TensorBoardError, TensorBoardServer
from tests.conftest import ROOT


def event_files(folder: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as w:
        for step in range(3):
            w.add_scalar("loss", 1.0 / (step + 1), step)
    return folder


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode("utf-8", "replace")


def gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


def test_tensorboard_serves_the_runs_scalars_on_loopback_and_stops(tmp_path: Path):
    logdir = event_files(tmp_path / "demo" / "version_0" / "tensorboard")
    server = TensorBoardServer(log_file=tmp_path / "tb.log")
    served = server.serve(logdir)
    try:
        assert served.url.startswith(f"http://{HOST}:")
        status, _ = get(served.url)
        assert status == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # TensorBoard reads the folder a moment after it answers
            tags = json.loads(get(served.url + "data/plugin/scalars/tags")[1])
            if tags:
                break
            time.sleep(0.5)
        assert "loss" in next(iter(tags.values())), tags
        assert server.serve(logdir).pid == served.pid  # the same folder: the same TensorBoard
        children = [p.pid for p in psutil.Process(served.pid).children(recursive=True)]
    finally:
        server.stop()
    assert gone(served.pid) and all(gone(pid) for pid in children)
    assert server.served is None
    with pytest.raises(TensorBoardError, match="does not exist"):
        server.serve(tmp_path / "nowhere")


def test_tensorboard_ends_when_the_app_that_started_it_is_killed(tmp_path: Path):
    logdir = event_files(tmp_path / "tensorboard")
    code = ("import sys, time; from backend.tensorboard_server import TensorBoardServer; "
            f"s = TensorBoardServer().serve({str(logdir)!r}); print(s.pid, s.url, flush=True); time.sleep(600)")
    app = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid, url = app.stdout.readline().split()
        watcher = psutil.Process(int(pid))
        tensorboard = [p.pid for p in watcher.children(recursive=True)]
        assert tensorboard and get(url)[0] == 200
        os.kill(app.pid, signal.SIGKILL)  # no atexit, no stop(): the watcher must notice by itself
        app.wait(timeout=10)
        assert gone(int(pid)) and all(gone(p) for p in tensorboard)
    finally:
        if app.poll() is None:
            app.kill()
