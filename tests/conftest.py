"""Shared fixtures: the demo assets (built once per session into a temp folder) and helpers that run
the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
MAX_WORKERS = 4  # pytest-xdist workers at most (pyproject's `-n auto`); `-n 0` runs in one process


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker per core, at most MAX_WORKERS: most tests start a one-thread trainer or a browser, a
    few two DDP processes; more workers than cores only slows each test's waits."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh demo asset folder (model/, model.safetensors, model-sd2v/, model-sdxl/, images/)."""
    from backend.trainer.demo import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("assets") / "demo")


@pytest.fixture(scope="session")
def demo_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo preset trained to the end once (64 steps, 4 epochs): its version folder. Tests that
    change it work on a copy."""
    proc, vdir = train(tmp_path_factory.mktemp("demo-run"), demo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return vdir


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def demo_config(demo: Path, out: Path, **sections: dict) -> dict:
    """The shipped demo preset pointed at this session's demo assets and a temp output folder."""
    data = json.loads((ROOT / "presets" / "demo.json").read_text())
    data["model"]["pretrained_model"] = str(demo / "model")
    data["dataset"]["train_data_dir"] = str(demo / "images")
    data["output_dir"] = str(out)
    for key, value in sections.items():
        switching = key == "optimizer" and value.get("type", data[key].get("type")) != data[key].get("type")
        if isinstance(value, dict) and not switching:
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return data


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def events(version_dir: Path, name: str | None = None) -> list[dict]:
    lines = (version_dir / "events.jsonl").read_text().splitlines()
    evs = [json.loads(x) for x in lines if x.strip()]
    return [e for e in evs if name is None or e["event"] == name]


def train(tmp: Path, demo: Path, timeout: float = 300, **sections: dict) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `python -m backend train` on the demo config; return the process and its version folder."""
    cfg = write_config(tmp / f"cfg-{time.monotonic_ns()}.json", demo_config(demo, tmp / "runs", **sections))
    proc = run_cli("train", str(cfg), timeout=timeout)
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    return proc, Path(first)


def wait_for(predicate, timeout: float = 60, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def start_run(tmp: Path, demo: Path, extra_env: dict | None = None, **sections: dict):
    """Start the trainer (under tests/trainer_probe.py, which reads the LATHE_TEST_* disturbances of
    extra_env) through the real launcher without following it; returns (Popen, version_dir)."""
    from backend import launcher, runs
    from backend.presets import resolve
    from tests.trainer_probe import PROBE_ENTRY

    cfg = launcher.absolutize(resolve(demo_config(demo, tmp / "runs", **sections)))
    v = runs.create_version_dir(cfg.output_dir, cfg.run_name)
    # Same thread count as the CLI: CPU float reductions depend on it, and runs are compared bit for bit.
    argv = launcher.build_argv(cfg, v, cpu_threads=launcher.default_cpu_threads(cfg), entry=PROBE_ENTRY)
    runs.write_run_files(v, cfg, argv)
    runs.new_status(v)
    env = {**launcher.launch_env(cfg), **(extra_env or {})}
    return launcher.start(v, argv, env), v


def step_losses(version_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(version_dir, "step")}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test (and the hub is offline): for tests of offline loading."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test tried to use the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
