"""Start training as a separate process through `accelerate launch`, stop it, kill it.

No shell is ever involved: the command is an argv list, so a value with spaces, quotes, `;` or
`$(...)` arrives as one literal argument. The process runs in its own session, so it survives the
GUI or CLI that started it (closing the terminal or the browser changes nothing). Every process of
the run carries a token in its environment (see process_tree), so stop and kill reach the whole
tree, including accelerate's workers that live in sessions of their own.

Stopping escalates: STOP file (the trainer finishes its step and saves a stop checkpoint) ->
SIGTERM to the launch group after `grace_s` -> SIGKILL of every process of the run after `term_s`.
status.json always ends in finished, stopped or failed, with exit_code and a one-line reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend import lock, process_tree, runs
from backend.config import TrainingConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PATH_FIELDS = (
    ("model", "pretrained_model"),
    ("dataset", "train_data_dir"),
    ("dataset", "reg_data_dir"),
    ("dataset", "validation_data_dir"),
    ("launch", "accelerate_config_file"),
)
STOP_GRACE_S = 120.0  # a stop checkpoint of a large SDXL run with optimizer state takes a while
TERM_GRACE_S = 30.0  # torch's elastic agent gives its workers 30 s after SIGTERM before SIGKILL
KILLED = -signal.SIGKILL


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
    for sub in data["dataset"]["subsets"]:
        sub["image_dir"] = fix(sub["image_dir"])
    data["output_dir"] = fix(data["output_dir"])
    data["resume_from"] = fix(data["resume_from"])
    return TrainingConfig.model_validate(data)


# ------------------------------------------------------------------------------------------ argv
TRAINER_ENTRY = ("-m", "backend.trainer")
SUPERVISOR = "backend.supervise"  # the few-MB parent of a one-process run (backend/supervise.py)


def direct(cfg: TrainingConfig) -> bool:
    """Whether the trainer starts as a plain process, without `accelerate launch`: one process on
    one machine and no accelerate config file. accelerate's `Accelerator` works in a plain process;
    the launcher would only add its own start-up (it imports torch before starting the trainer:
    2-3 s and a ~260 MB process that waits for the whole run)."""
    lc = cfg.launch
    return lc.num_processes == 1 and lc.num_machines == 1 and not lc.accelerate_config_file


def build_argv(cfg: TrainingConfig, version_dir: Path, python: str | None = None, cpu_threads: int | None = None,
               entry: Sequence[str] = TRAINER_ENTRY) -> list[str]:
    """The exact command for this config (pure: no I/O, no environment reads).

    - One process on one machine (`direct`): the trainer itself, `python -m backend.trainer
      --run-dir V [--cpu-threads N]`, under `python -m backend.supervise V --` (which records how it
      ended); what accelerate launch would set in its environment is in `env_overrides` (mixed
      precision, the GPU ids, ACCELERATE_USE_CPU).
    Otherwise `accelerate launch`:
    - CPU, several processes: `--multi_gpu` plus ACCELERATE_USE_CPU=true in the
      environment (gloo DDP; `--cpu --num_processes 2` would silently run one process).
    - GPUs: `--multi_gpu` when num_processes or num_machines > 1, `--gpu_ids` when set.
    - Several machines: `--num_machines --machine_rank --main_process_ip [--main_process_port]`;
      num_processes counts the processes of all machines together (accelerate's meaning).
    - An accelerate config file (DeepSpeed, FSDP) replaces all of the above: flags on the command
      line would override it (`--multi_gpu` would even switch DeepSpeed off).
    cpu_threads: torch threads per process for CPU training (accelerate's default is a guess).
    entry: what accelerate starts (the trainer module; a script path runs that script instead).
    """
    lc = cfg.launch
    trainer = [*entry, "--run-dir", str(version_dir)]
    if direct(cfg):
        py = python or sys.executable
        threads = ["--cpu-threads", str(cpu_threads)] if lc.device == "cpu" and cpu_threads else []
        return [py, "-m", SUPERVISOR, str(version_dir), "--", py, *trainer, *threads]
    argv = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if lc.accelerate_config_file:
        return [*argv, "--config_file", lc.accelerate_config_file, *trainer]
    cpu = lc.device == "cpu"
    if lc.num_processes > 1 or lc.num_machines > 1:
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
    return argv + trainer


DENOISER_FOLDERS = ("unet", "transformer")
# Denoiser weight bytes x latent positions per step below which one CPU thread steps faster than
# several: torch's per-operator parallel overhead outweighs the split. Measured on 2 cores
# (docs/performance.md): the demo UNet (3.2 MB) at 64 px, batch 4 (8e8) is 8% faster on 1 thread than
# on 2; at 128 px (3.3e9) 2 threads are 5% faster, at 256 px 1.6x. A real SD1.5 UNet at 512 px is 1e13.
SMALL_STEP_WORK = 2e9


def denoiser_bytes(model: str) -> int | None:
    """Size of the model's denoiser weights (a single file: the whole file), without loading anything;
    None when it cannot be told from the files."""
    p = Path(model).expanduser()
    try:
        if p.is_file():
            return p.stat().st_size
        for sub in DENOISER_FOLDERS:
            if (p / sub).is_dir():
                return sum(f.stat().st_size for f in (p / sub).iterdir() if f.suffix in (".safetensors", ".bin"))
    except OSError:
        return None
    return None


def default_cpu_threads(cfg: TrainingConfig) -> int:
    """torch CPU threads per training process: `launch.num_cpu_threads_per_process` when set;
    otherwise 1 for a tiny step (SMALL_STEP_WORK), else this machine's cores shared among its own
    processes (num_processes counts every machine's)."""
    lc = cfg.launch
    if lc.num_cpu_threads_per_process:
        return lc.num_cpu_threads_per_process
    size = denoiser_bytes(cfg.model.pretrained_model)
    positions = (cfg.dataset.resolution // 8) ** 2 * cfg.training.train_batch_size
    if size is not None and size * positions < SMALL_STEP_WORK:
        return 1
    local = max(1, lc.num_processes // lc.num_machines)
    return max(1, (os.cpu_count() or 1) // local)


def env_overrides(cfg: TrainingConfig) -> dict[str, str]:
    """What the trainer's environment sets on top of the caller's (pure)."""
    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    cpu = cfg.launch.device == "cpu"
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # with --multi_gpu, this makes CPU DDP (gloo) processes
        env["CUDA_VISIBLE_DEVICES"] = ""
    if direct(cfg):  # what `accelerate launch` would have set for its one process
        env["ACCELERATE_MIXED_PRECISION"] = "no" if cpu else cfg.training.mixed_precision
        env["ACCELERATE_DYNAMO_BACKEND"] = "NO"
        if cfg.launch.gpu_ids and cfg.launch.gpu_ids != "all" and not cpu:
            env["CUDA_VISIBLE_DEVICES"] = cfg.launch.gpu_ids
    return env


def launch_env(cfg: TrainingConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the trainer: unbuffered output, offline hubs, the project importable."""
    env = dict(os.environ if base is None else base)
    old_path = env.get("PYTHONPATH")
    env.update(env_overrides(cfg))
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    if old_path:
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), old_path])
    return env


def command_argv(cfg: TrainingConfig, argv: list[str]) -> list[str]:
    """argv with its environment as `env K=V ...`: what command.txt records, runnable as is."""
    return ["env", *(f"{k}={v}" for k, v in env_overrides(cfg).items()), *argv]


def preview(cfg: TrainingConfig) -> str:
    """The command a launch of cfg would run, for display ("preview command"); the version folder
    is shown as <version_dir> because it is only chosen at launch."""
    cfg = absolutize(cfg)
    argv = build_argv(cfg, Path("<version_dir>"), cpu_threads=default_cpu_threads(cfg))
    return runs.command_text(command_argv(cfg, argv))


def other_machine_ranks(cfg: TrainingConfig) -> list[int]:
    """The machine ranks other than this config's own, for a run across several machines set by the
    launch settings (an accelerate config file sets the machines itself: then none)."""
    lc = cfg.launch
    if lc.num_machines <= 1 or lc.accelerate_config_file:
        return []
    return [r for r in range(lc.num_machines) if r != lc.machine_rank]


def worker_commands(cfg: TrainingConfig, config_file: str | None = None) -> list[str]:
    """What to run on each other machine of a several-machine run (pure): the same config file,
    with that machine's rank, one command per rank of `other_machine_ranks` (for machine 0: ranks
    1 .. num_machines-1). `config_file` is the config's path there (default `<run_name>.json`).
    Every machine makes a version folder of its own; see docs/cli.md, "Several machines"."""
    name = config_file or f"{cfg.run_name}.json"
    return [runs.command_text(["python", "-m", "backend", "train", name, "--set", f"launch.machine_rank={r}"])
            for r in other_machine_ranks(cfg)]


# ----------------------------------------------------------------------------------------- start
@dataclass
class Launched:
    version_dir: Path
    proc: subprocess.Popen
    argv: list[str]


def _spawn(version_dir: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start argv in a new session with stdout+stderr appended to train.log; record pid, pgid, token."""
    if not runs.read_status(version_dir):
        runs.new_status(version_dir)
    token = uuid.uuid4().hex
    runs.update_status(version_dir, run_token=token, launched_at=time.time())
    with open(version_dir / "train.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(PROJECT_ROOT),
            env={**env, process_tree.TOKEN_ENV: token},
            start_new_session=True,  # its own session and process group: pgid == pid
        )
    runs.update_status(version_dir, pid=proc.pid, pgid=proc.pid)
    return proc


def _lock_key(version_dir: Path) -> tuple[str, str]:
    from backend.config import load_config_file

    cfg = load_config_file(version_dir / "config.json")
    return cfg.output_dir, lock.gpu_set(cfg.launch)


def start(version_dir: Path, argv: list[str], env: dict[str, str], exclusive: bool = True) -> subprocess.Popen:
    """Start argv for an existing version folder (config.json written). With `exclusive`, refuse
    (lock.RunBusyError) while another run is active in the same output folder on the same devices."""
    if not exclusive:
        return _spawn(version_dir, argv, env)
    output_dir, key = _lock_key(version_dir)
    with lock.claim(output_dir, key) as held:
        proc = _spawn(version_dir, argv, env)
        held.hold(version_dir)
    return proc


def launch(cfg: TrainingConfig, env: dict[str, str] | None = None, exclusive: bool = True,
           cpu_threads: int | None = None, entry: Sequence[str] = TRAINER_ENTRY) -> Launched:
    """Create the next version folder for cfg, write its files, and start the trainer.

    Raises lock.RunBusyError (before creating anything) when a run is active in the same output
    folder on the same devices and `exclusive` is set.
    """
    cfg = absolutize(cfg)
    env = launch_env(cfg) if env is None else env

    def go() -> Launched:
        version_dir = runs.create_version_dir(cfg.output_dir, cfg.run_name)
        argv = build_argv(cfg, version_dir, cpu_threads=cpu_threads or default_cpu_threads(cfg), entry=entry)
        runs.write_run_files(version_dir, cfg, command_argv(cfg, argv))
        runs.new_status(version_dir)
        try:
            return Launched(version_dir, _spawn(version_dir, argv, env), argv)
        except OSError as e:  # e.g. the python executable is gone: say so in the run folder too
            runs.close_run(version_dir, "failed", None, f"could not start the trainer: {e}")
            raise

    if not exclusive:
        return go()
    with lock.claim(cfg.output_dir, lock.gpu_set(cfg.launch)) as held:
        launched = go()
        held.hold(launched.version_dir)
    return launched


# ------------------------------------------------------------------------------------ stop, kill
def request_stop(version_dir: Path) -> dict[str, Any]:
    """Ask for a graceful stop: the trainer finishes its step, saves (save_on_stop) and exits."""
    (Path(version_dir) / "STOP").write_text("stop requested\n", encoding="utf-8")
    return runs.update_status(version_dir, when=lambda st: st.get("state") in ("starting", "running"),
                              state="stopping", stop_requested_at=time.time())


def wait_run_gone(version_dir: Path, timeout: float, poll_s: float = 0.2) -> bool:
    """Wait until no process of the run is alive; True when that happened within timeout."""
    end = time.monotonic() + timeout
    while True:
        if not process_tree.find_for_status(runs.read_status(version_dir)):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(poll_s)


def stop(version_dir: Path, grace_s: float = STOP_GRACE_S, term_s: float = TERM_GRACE_S, poll_s: float = 0.2) -> dict[str, Any]:
    """Stop a run and wait for it: STOP file, then SIGTERM to its group after grace_s, then SIGKILL
    of its whole tree after term_s more. Returns the final status."""
    v = Path(version_dir)
    if not process_tree.find_for_status(runs.read_status(v)):
        return runs.reconcile(v)
    request_stop(v)
    if wait_run_gone(v, grace_s, poll_s):
        return runs.finalize(v, None)
    # To the launch group only: accelerate's elastic agent forwards it to its workers (which live in
    # sessions of their own). A signal after a stop request makes the trainer abort what it is doing
    # (a hung save, say) and still write its own final state; SIGKILL below is the last resort.
    process_tree.signal_group(runs.update_status(v, stop_escalation="SIGTERM"), signal.SIGTERM)
    if wait_run_gone(v, term_s, poll_s):
        return runs.finalize(v, None)
    return kill(v, f"did not stop within {grace_s + term_s:.0f} s of the stop request; killed (nothing saved since the last checkpoint)")


def kill(version_dir: Path, reason: str = "killed by request (nothing saved since the last checkpoint)") -> dict[str, Any]:
    """SIGKILL every process of the run at once; the state becomes stopped unless the trainer had
    already written its own final state. Returns the final status."""
    v = Path(version_dir)
    status = runs.read_status(v)
    if not process_tree.find_for_status(status):
        return runs.reconcile(v)  # it ended by itself: record that, not a kill
    # Say it is a kill before killing: a follower or reconcile that sees the processes vanish in
    # between then records "stopped" with this reason, not a mysterious failure.
    runs.update_status(v, when=runs.not_final, kill_requested_at=time.time(), kill_reason=reason)
    survivors = process_tree.kill_all(status)
    if survivors:
        reason = f"{reason}; processes {survivors} could not be killed"
    return runs.close_run(v, "stopped", KILLED, reason)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a process group directly (low level; prefer kill(version_dir), which reaches the whole tree)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
