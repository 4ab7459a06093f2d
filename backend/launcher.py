"""Start training as a separate process through `accelerate launch`, and follow it.

No shell is ever involved: the command is an argv list, so a value with spaces, quotes or `;` arrives
as one literal argument. The process runs in its own session (process group), so it survives the
GUI or CLI that started it, and the whole tree can be signalled at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from backend import runs
from backend.config import TrainingConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PATH_FIELDS = (
    ("model", "pretrained_model"),
    ("dataset", "train_data_dir"),
    ("dataset", "validation_data_dir"),
    ("launch", "accelerate_config_file"),
)


def absolutize(cfg: TrainingConfig, base: Path | None = None) -> TrainingConfig:
    """Make every path in the config absolute, so the run folder is valid from any working directory."""
    base = base or Path.cwd()
    data = cfg.model_dump(mode="json")

    def fix(v: str | None) -> str | None:
        if v is None:
            return None
        p = Path(v).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    for sec, key in PATH_FIELDS:
        data[sec][key] = fix(data[sec][key])
    data["output_dir"] = fix(data["output_dir"])
    data["resume_from"] = fix(data["resume_from"])
    return TrainingConfig.model_validate(data)


def build_argv(cfg: TrainingConfig, version_dir: Path, python: str | None = None, cpu_threads: int | None = None) -> list[str]:
    """The exact `accelerate launch` command for this config (pure: no I/O, no environment reads).

    cpu_threads: torch threads per process for CPU training (accelerate's default is a guess).
    """
    lc = cfg.launch
    argv = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if lc.accelerate_config_file:
        argv += ["--config_file", lc.accelerate_config_file]
    cpu = lc.device == "cpu"
    distributed = lc.num_processes > 1 or lc.num_machines > 1
    if distributed:
        argv += ["--multi_gpu"]
    elif cpu:
        argv += ["--cpu"]
    argv += ["--num_processes", str(lc.num_processes), "--num_machines", str(lc.num_machines)]
    if lc.num_machines > 1:
        argv += ["--machine_rank", str(lc.machine_rank), "--main_process_ip", str(lc.main_process_ip)]
    if lc.main_process_port is not None:
        argv += ["--main_process_port", str(lc.main_process_port)]
    if lc.gpu_ids and not cpu:
        argv += ["--gpu_ids", lc.gpu_ids]
    if cpu and cpu_threads:
        argv += ["--num_cpu_threads_per_process", str(cpu_threads)]
    argv += ["--mixed_precision", "no" if cpu else cfg.training.mixed_precision, "--dynamo_backend", "no"]
    argv += ["-m", "backend.trainer", "--run-dir", str(version_dir)]
    return argv


def default_cpu_threads(cfg: TrainingConfig) -> int:
    return max(1, (os.cpu_count() or 1) // cfg.launch.num_processes)


def launch_env(cfg: TrainingConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the trainer: unbuffered output, offline hubs, the project importable."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["DIFFUSERS_OFFLINE"] = "1"
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    if cfg.launch.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # with --multi_gpu, this makes CPU DDP (gloo) processes
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def start(version_dir: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the trainer in its own session; stdout+stderr go to train.log."""
    with open(version_dir / "train.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(PROJECT_ROOT),
            env=env,
            start_new_session=True,
        )
    runs.update_status(version_dir, pid=proc.pid, pgid=os.getpgid(proc.pid))
    return proc


def request_stop(version_dir: Path) -> None:
    """Ask for a graceful stop: the trainer finishes its step, saves (save_on_stop) and exits."""
    (version_dir / "STOP").write_text("stop requested\n", encoding="utf-8")
    status = runs.read_status(version_dir)
    if status.get("state") in ("starting", "running"):
        runs.update_status(version_dir, state="stopping")


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
