"""The training recipe, top to bottom: set up -> recover the run folder -> load the state (resume)
-> train -> final save. Every failure becomes a `run_finished` event and a final status.json with
a one-line reason; the full traceback goes to stderr (train.log).

`python -m backend.trainer --run-dir VERSION_DIR` (backend/trainer/__main__.py) calls `run`.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from backend.config import TrainingConfig

# A graceful stop is a clean exit (0): accelerate turns any other code into a traceback of its own.
# The CLI's exit code comes from the final state: finished 0, failed 1, stopped 3 (backend.follow).
EXIT_FINISHED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 0


def run(cfg: TrainingConfig, version_dir: Path) -> int:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from backend.trainer.build import build_setup
    from backend.trainer.context import Progress
    from backend.trainer.distributed import collective_timeout_s
    from backend.trainer.loop import run_training
    from backend.trainer.run_io import open_run_io
    from backend.trainer.savepoints import SaveContext, samples, save
    from backend.trainer.state import load_state
    from backend.trainer.stopping import StopWatch
    from backend.trainer.trained import ddp_kwargs

    cpu = cfg.launch.device == "cpu"
    acc = Accelerator(mixed_precision=cfg.training.mixed_precision if not cpu else "no", cpu=cpu,
                      kwargs_handlers=[DistributedDataParallelKwargs(**ddp_kwargs(cfg)),
                                       InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s(cfg)))])
    io = open_run_io(acc, version_dir, cfg)  # several machines: a status writer per machine (run_io)
    io.status(state="running", trainer_pid=os.getpid(), **io.identity)
    io.start_heartbeat()
    stop = StopWatch(version_dir, acc)
    sc = SaveContext(version_dir, resumed_from=cfg.resume_from)
    prog = Progress()
    state, error, code, aborted = "failed", None, EXIT_FAILED, False
    try:
        s = build_setup(cfg, acc, io)
        if acc.is_main_process:
            for note in recover_run_folder(version_dir):
                io.warn(note)
        if cfg.resume_from:
            load_state(Path(cfg.resume_from), s, prog)
            if acc.is_main_process:
                print(f"resumed from {cfg.resume_from} at step {prog.global_step} (epoch {prog.epoch + 1}, "
                      f"batch {prog.batch_in_epoch})", flush=True)
        n_reg = sum(1 for it in s.items if it.is_reg)
        io.emit("run_started", version=int(version_dir.name.split("_")[-1]), world_size=acc.num_processes,
                total_steps=s.total_steps, total_epochs=s.total_epochs, resumed_from=cfg.resume_from,
                family=s.comps.family, v_prediction=s.comps.v_prediction, images=len(s.items) - n_reg,
                reg_images=n_reg, subsets=len(s.subsets),
                trained=[e.key for e in s.trained.entries], optimizer=optimizer_args(s.optimizer))
        for report in s.cache_reports:
            io.emit("cache_filled", **report)
        io.status(total_steps=s.total_steps)
        if acc.is_main_process:
            print(f"training {cfg.run_name}: {s.total_steps} steps, {s.total_epochs} epochs, {len(s.items) - n_reg} images"
                  f"{f' + {n_reg} regularization images' if n_reg else ''} in {len(s.subsets)} subset(s), "
                  f"{acc.num_processes} process(es) on {acc.device}; {network_summary(s)}", flush=True)
        state = run_training(s, prog, stop, sc)
        if state == "stopped":
            error = stop.reason
            if cfg.saving.save_on_stop:
                save(sc, s, prog, "stop", prog.global_step)
            code = EXIT_STOPPED
        else:
            save(sc, s, prog, "final")
            samples(sc, s, prog, "final")
            code = EXIT_FINISHED
        acc.wait_for_everyone()
    except KeyboardInterrupt:
        state, error, code, aborted = "stopped", "aborted after a stop request (nothing saved)", EXIT_STOPPED, True
    except Exception as exc:  # noqa: BLE001 - every failure gets a reason
        traceback.print_exc()
        state, error, code = "failed", failure_reason(exc), EXIT_FAILED
        print(f"error: {error}", file=sys.stderr, flush=True)
    io.emit("run_finished", state=state, step=prog.global_step, error=error, skipped_steps=prog.skipped_steps,
            **peak_memory())
    io.status(state=state, step=prog.global_step, error=error, exit_code=code, finished_at=time.time())
    io.close()
    if aborted:
        # A save interrupted by the abort may have writes still under way in its threads (a disk that
        # hangs is what makes a stop outlast its grace); the end is recorded, so exit without waiting
        # for them (the interpreter would join those threads). The unfinished .tmp folder is removed
        # at the run folder's next start.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def network_summary(s: Any) -> str:
    """What trains, in one phrase: `lokr rank 8 (conv 4) on unet, text_encoder_0, 1234 tensors`."""
    net = s.cfg.network
    conv = f" (conv {net.conv_rank})" if getattr(net, "conv_rank", 0) else ""
    return (f"{net.type} rank {net.rank}{conv} on {', '.join(e.key for e in s.trained.entries)}, "
            f"{len(s.trained.parameters())} tensors")


def failure_reason(exc: BaseException) -> str:
    """One plain line saying why the run failed."""
    from backend.dataset import DatasetError
    from backend.trainer.export import NetworkFileError
    from backend.trainer.loss import LossSettingError
    from backend.trainer.models import ModelLoadError
    from backend.trainer.network import NoTargetsError
    from backend.trainer.optim import OptimizerUnavailable
    from backend.trainer.state import StateError
    from backend.trainer.steplog import NonFiniteLoss
    from backend.trainer.trained import RanksDiverged

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (DatasetError, ModelLoadError, NetworkFileError, NoTargetsError, OptimizerUnavailable, NonFiniteLoss, StateError,
                        RanksDiverged, LossSettingError)):
        return msg
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing {getattr(exc, 'filename', None) or 'a file'}: free space in the output folder and resume from the last checkpoint"
    text = f"{type(exc).__name__}: {msg}"
    if "out of memory" in text.lower():
        return (f"CUDA out of memory ({msg[:120]}): lower train_batch_size or resolution, enable "
                "gradient_checkpointing and cache_latents, or use mixed precision")
    return text[:300]


def recover_run_folder(version_dir: Path) -> list[str]:
    """Clean up after earlier crashes in this run's other (not running) versions: unfinished `.tmp`
    saves are removed, an interrupted replacement of final/best is undone, half-written exports go."""
    from backend import checkpoints as C
    from backend import runs

    notes = []
    for vdir in runs.version_dirs(version_dir.parent):
        st = runs.read_status(vdir)
        live = st.get("state") in ("starting", "running", "stopping") and time.time() - (st.get("heartbeat_at") or 0) < 30
        if vdir != version_dir and live:
            continue  # another version of this run is alive: its .tmp folders are saves in progress
        notes += [f"{vdir.name}: {n}" for n in C.recover(vdir / "checkpoints")]
        for tmp in (vdir / "exports").glob("*.tmp") if (vdir / "exports").is_dir() else []:
            tmp.unlink(missing_ok=True)
            notes.append(f"{vdir.name}: removed unfinished export {tmp.name}")
    return notes


def peak_memory() -> dict:
    """Peak host RAM of this process and peak CUDA memory, in MB (for the GUI and benchmarks)."""
    import resource

    import torch

    out = {"peak_ram_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def optimizer_args(optimizer: object) -> dict:
    """The hyperparameters as the optimizer itself holds them (proof that the config reached it)."""
    group = optimizer.param_groups[0]
    plain = (int, float, bool, str, tuple, list, type(None))
    return {"class": type(getattr(optimizer, "optimizer", optimizer)).__name__,
            **{k: v for k, v in group.items() if k != "params" and isinstance(v, plain)}}
