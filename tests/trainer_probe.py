"""The real trainer (`backend.trainer`), plus what tests need to look inside it or to disturb it.

Started through the real launcher as a script in place of `-m backend.trainer` (see PROBE_ENTRY).
At the end every rank writes <version>/probe/rank<N>.safetensors (every trainable tensor, as
`Trained.state_dict` names them: UNet and text encoders) and rank<N>-shard.json (epoch 0's plan of
global batches, this rank's micro-batches of each batch of the first epoch it trains, and this rank's own share of the
loss of every step; the step's loss is the mean of the shares over the ranks). Disturbances, each from the environment and optional:

  LATHE_TEST_SLOW_STEP_S=S            sleep S seconds after each optimizer step (stop windows)
  LATHE_TEST_SLOW_SAVE_S=S            sleep S seconds after each state file is written (crash windows)
  LATHE_TEST_ENOSPC_ON=FILE[@STEP]    writing FILE (a state file's name, or "export") fails like a
                                      full disk, at save points from STEP on
  LATHE_TEST_CORRUPT_RANK=R@STEP      after optimizer step STEP, rank R nudges its first trainable
                                      tensor (a rank that silently diverged)

None of this is in the production trainer: it is wrapped around it here.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROBE_ENTRY = (str(Path(__file__).resolve()),)


def start_probed(cfg: Any) -> tuple[Path, Any]:
    """Start the probed trainer for a fresh version folder of `cfg` (absolute paths) through the real
    launcher, one CPU thread per process, without the run lock: (version folder, process)."""
    from backend import launcher, runs

    v = runs.create_version_dir(cfg.output_dir, cfg.run_name)
    argv = launcher.build_argv(cfg, v, cpu_threads=1, entry=PROBE_ENTRY)
    runs.write_run_files(v, cfg, argv)
    runs.new_status(v)
    return v, launcher.start(v, argv, launcher.launch_env(cfg))


def _plan(batches: list[Any]) -> list[list[list[Any]]]:
    return [[[smp.item, smp.flip, smp.index] for smp in b.samples] for b in batches]


def _disk_full(name: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", name)


def install() -> None:
    import backend.dataset as D
    import backend.trainer.loop as L
    import backend.trainer.savepoints as SP
    import backend.trainer.state as ST

    seen: dict[str, Any] = {}
    at_step = {"step": 0}
    slow_step = float(os.environ.get("LATHE_TEST_SLOW_STEP_S") or 0)
    slow_save = float(os.environ.get("LATHE_TEST_SLOW_SAVE_S") or 0)
    target, _, from_step = os.environ.get("LATHE_TEST_ENOSPC_ON", "").partition("@")
    bad_rank, _, bad_step = os.environ.get("LATHE_TEST_CORRUPT_RANK", "").partition("@")
    real = {"plan": D.epoch_plan, "micro": D.micro_batches_of, "run": L.run_training, "step": L.train_step, "write_state": SP.write_state,
            "export": SP.write_export, "tensors": ST.save_tensors, "pickle": ST.save_pickle}

    def failing(name: str) -> None:
        if target == name and at_step["step"] >= int(from_step or 0):
            raise _disk_full(name)

    def epoch_plan(*args: Any) -> list[Any]:
        plan = real["plan"](*args)
        seen.setdefault("full", _plan(plan))  # the first call is epoch 0's (the schedule's length)
        return plan

    def micro_batches_of(step: Any, rank: int, world: int, accum: int) -> list[Any]:
        mine = real["micro"](step, rank, world, accum)
        if len(seen.setdefault("mine", [])) < len(seen["full"]):
            seen["mine"].append([_plan([b])[0] for b in mine if b.share])
            seen.update(rank=rank, world=world)
        return mine

    def run_training(s: Any, *args: Any, **kwargs: Any) -> str:
        from safetensors.torch import save_file

        state = real["run"](s, *args, **kwargs)
        out = Path(s.io.dir) / "probe"
        out.mkdir(exist_ok=True)
        save_file(s.trained.state_dict(), str(out / f"rank{s.acc.process_index}.safetensors"))
        (out / f"rank{s.acc.process_index}-shard.json").write_text(json.dumps(seen))
        return state

    def train_step(s: Any, chunk: Any, step: int, epoch: int) -> Any:
        out = real["step"](s, chunk, step, epoch)
        seen.setdefault("losses", {})[step + 1] = float(out[0])  # this rank's own loss of the step
        if bad_rank and s.acc.process_index == int(bad_rank) and step + 1 == int(bad_step):
            import torch

            with torch.no_grad():
                s.trained.parameters()[0].add_(1e-3)
        if slow_step:
            time.sleep(slow_step)
        return out

    def write_state(folder: Path, s: Any, prog: Any, *args: Any, **kwargs: Any) -> None:
        at_step["step"] = prog.global_step
        real["write_state"](folder, s, prog, *args, **kwargs)

    def write_export(sc: Any, s: Any, prog: Any, *args: Any, **kwargs: Any) -> Path:
        at_step["step"] = prog.global_step
        failing("export")
        return real["export"](sc, s, prog, *args, **kwargs)

    def slow(kind: str) -> Any:
        def write(path: Path, obj: Any) -> None:
            failing(Path(path).name)
            real[kind](path, obj)
            if slow_save:
                time.sleep(slow_save)
        return write

    D.epoch_plan, D.micro_batches_of, L.run_training, L.train_step = epoch_plan, micro_batches_of, run_training, train_step
    SP.write_state, SP.write_export = write_state, write_export
    ST.save_tensors, ST.save_pickle = slow("tensors"), slow("pickle")


def main() -> int:
    install()
    from backend.trainer.__main__ import main as trainer_main

    return trainer_main()


if __name__ == "__main__":
    sys.exit(main())
