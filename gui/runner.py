"""Start, resume, stop and kill runs for the GUI, exactly as the CLI does (no Gradio here).

A start writes a version folder (config.json, hparams.yaml, command.txt) and launches the trainer
through backend.launcher, never through a shell. The GUI keeps the Popen only to reap the process
and to learn its exit code; everything else it knows comes from the run folder, so a restarted GUI
finds the same runs by scanning the output folder.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from backend import launcher, lock, runs
from backend.config import ConfigError, TrainingConfig, load_config_file
from backend.preflight import preflight, start_problems  # start_problems: re-exported for gui.tabs.setup
from backend.presets import read_json_object, resolve
from backend.resume import ResumePlan, plan_resume
from gui.preview import resume_command

ACTIVE_STATES = ("starting", "running", "stopping")
EXIT_WAIT_S = 20.0  # a finished trainer's processes may take a moment to exit (and free the run lock)


class StartRefused(Exception):
    """Nothing was started; `lines` say why, in plain words."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class Started:
    version_dir: Path


def resume_config(checkpoint: Path, base: TrainingConfig | None = None) -> TrainingConfig:
    """The config of a resume from `checkpoint`: the checkpoint's own settings (base None), or
    `base` (the Setup tab's settings); in both cases with resume_from set and paths absolute."""
    if base is None:
        data = read_json_object(checkpoint / "config.json")
    else:
        data = base.model_dump(mode="json")
    return launcher.absolutize(resolve({**data, "resume_from": str(checkpoint)}))


def plan_for(checkpoint: Path, base: TrainingConfig | None = None) -> tuple[TrainingConfig | None, ResumePlan | None,
                                                                             list[str]]:
    """(config, plan, problems) of a resume; problems are plain reasons why it cannot start."""
    if not (checkpoint / "config.json").is_file():
        return None, None, [f"{checkpoint} is not a checkpoint folder (no config.json)"]
    try:
        cfg = resume_config(checkpoint, base)
    except ConfigError as e:
        return None, None, e.lines
    plan = plan_resume(checkpoint, cfg)
    return cfg, plan, plan.refused + preflight(cfg)


def reproduce_command(version_dir: Path) -> str:
    """The CLI command that reproduces a version: `train CONFIG`, or `resume CKPT --set ...` for a resume."""
    try:
        cfg = load_config_file(version_dir / "config.json")
    except ConfigError:
        return f"# {version_dir}/config.json is missing or invalid"
    if cfg.resume_from and (Path(cfg.resume_from) / "config.json").is_file():
        plan = plan_resume(cfg.resume_from, cfg, check_dataset=False)
        return resume_command(cfg.resume_from, plan.changed)
    return f"python -m backend train {shlex.quote(str(version_dir / 'config.json'))}"


def launched_command(version_dir: Path) -> str:
    try:
        return (version_dir / "command.txt").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


class Runner:
    """The runs this GUI process started (for reaping), and the actions on any run."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        # Held while a kill is under way, and by everything here that may finalize a run whose
        # processes are gone: else a poll between the SIGKILL and the kill's own "stopped" status
        # would record the run as failed.
        self.ending = threading.RLock()

    def start(self, cfg: TrainingConfig) -> Started:
        """Preflight, then launch; StartRefused (nothing created) when it cannot start."""
        problems = start_problems(cfg)
        if problems:
            raise StartRefused(problems)
        try:
            launched = self._launch(cfg)
        except lock.RunBusyError as e:
            raise StartRefused([str(e)]) from None
        except OSError as e:
            raise StartRefused([f"could not start the trainer: {e}"]) from None
        with self._lock:
            self._procs[str(launched.version_dir)] = launched.proc
        return Started(launched.version_dir)

    def _launch(self, cfg: TrainingConfig) -> launcher.Launched:
        """launcher.launch; when the run holding the lock has already ended (its final status is
        written) and only its processes are still exiting, wait for them once instead of refusing."""
        try:
            return launcher.launch(cfg)
        except lock.RunBusyError:
            holder = lock.holder(launcher.absolutize(cfg).output_dir, lock.gpu_set(cfg.launch))
            if holder is not None:
                if runs.read_status(holder).get("state") not in runs.FINAL_STATES:
                    raise
                launcher.wait_run_gone(holder, EXIT_WAIT_S)
            return launcher.launch(cfg)

    def resume(self, checkpoint: Path, base: TrainingConfig | None = None) -> Started:
        cfg, _, problems = plan_for(checkpoint, base)
        if problems or cfg is None:
            raise StartRefused(problems)
        return self.start(cfg)

    def proc(self, version_dir: Path) -> subprocess.Popen | None:
        with self._lock:
            return self._procs.get(str(version_dir))

    def reap(self) -> None:
        """Collect the exit status of finished trainers (no zombies left behind)."""
        with self._lock:
            for key, proc in list(self._procs.items()):
                if proc.poll() is not None and runs.read_status(key).get("state") not in ACTIVE_STATES:
                    del self._procs[key]

    def stop(self, version_dir: Path) -> dict:
        """Graceful stop: STOP file now; a background thread escalates (SIGTERM, then SIGKILL) if the
        trainer does not end within the launcher's grace periods."""
        status = launcher.request_stop(version_dir)
        threading.Thread(target=launcher.stop, args=(version_dir,), name=f"stop {version_dir.name}",
                         daemon=True).start()
        return status

    def kill(self, version_dir: Path) -> dict:
        with self.ending:
            return launcher.kill(version_dir)

    def list_runs(self) -> list[runs.RunInfo]:
        with self.ending:
            return runs.list_runs(self.output_dir)

    def current(self) -> runs.RunInfo | None:
        """The run to show: the newest active one, else the newest started."""
        infos = self.list_runs()
        active = [i for i in infos if i.state in ACTIVE_STATES]
        pool = active or infos
        return max(pool, key=lambda i: i.started_at or 0.0) if pool else None


def run_label(info: runs.RunInfo) -> str:
    worker = f", worker (machine {info.machine_rank})" if info.role == "worker" else ""
    return f"{info.run_name} / version_{info.version} ({info.state}{worker})"


def version_config(version_dir: Path) -> dict:
    try:
        return json.loads((Path(version_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
