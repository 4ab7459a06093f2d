"""Full training state in a checkpoint folder, and restoring it.

Folder contents (manifest.json written last, see backend.checkpoints.AtomicDir):
  lora.safetensors        trainable LoRA tensors only, fp32 (never the frozen base model)
  optimizer.pt            optimizer state_dict (Prodigy's d, its per-parameter state, Adam moments)
  scheduler.pt            LR scheduler state_dict
  rng.pt                  python/numpy/torch/cuda RNG states of every rank
  training_state.json     global step, epoch, position in the epoch, best val loss, ...
  config.json             the run's frozen config
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from backend import checkpoints as C
from backend.trainer import lora

if TYPE_CHECKING:
    from backend.trainer.loop import Progress, Setup

STATE_FILES = ("lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "training_state.json", "config.json")


class StateError(Exception):
    pass


def _slow_hook() -> None:
    """Test hook: LATHE_TEST_SLOW_SAVE_S widens the save window so crash tests can hit it."""
    delay = float(os.environ.get("LATHE_TEST_SLOW_SAVE_S", "0") or 0)
    if delay:
        time.sleep(delay)


def fail_hook(name: str, step: int) -> None:
    """Test hook: LATHE_TEST_ENOSPC_ON=<file>[@<step>] makes writing that file fail like a full disk
    (from that step on), to prove a failed save damages nothing that was saved before."""
    spec = os.environ.get("LATHE_TEST_ENOSPC_ON", "")
    target, _, at = spec.partition("@")
    if target == name and step >= int(at or 0):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", name)


def trainable_tensors(s: Setup) -> dict[str, torch.Tensor]:
    out = {}
    if s.cfg.network.train_unet:
        out.update({f"unet.{k}": v for k, v in lora.trainable_state(s.bare(s.unet)).items()})
    if s.cfg.network.train_text_encoder:
        for i, te in enumerate(s.text_encoders):
            out.update({f"text_encoder_{i}.{k}": v for k, v in lora.trainable_state(s.bare(te)).items()})
    return out


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def write_state(folder: Path, s: Setup, prog: Progress, all_rng: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """Fill a (temporary) checkpoint folder. Called on rank 0 only."""
    fail_hook("lora.safetensors", prog.global_step)
    save_file(trainable_tensors(s), str(folder / "lora.safetensors"))
    _slow_hook()
    fail_hook("optimizer.pt", prog.global_step)
    torch.save(s.optimizer.state_dict(), folder / "optimizer.pt")
    _slow_hook()
    torch.save(s.lr_scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(all_rng, folder / "rng.pt")
    ts = {"global_step": prog.global_step, "epoch": prog.epoch, "batch_in_epoch": prog.batch_in_epoch,
          "epoch_loss_sum": prog.epoch_loss_sum, "epoch_loss_count": prog.epoch_loss_count,
          "best_val_loss": prog.best_val_loss, "world_size": s.acc.num_processes, **extra}
    (folder / "training_state.json").write_text(json.dumps(ts, indent=1), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(s.cfg.model_dump(mode="json"), indent=1), encoding="utf-8")
    _slow_hook()


def load_state(folder: Path, s: Setup, prog: Progress) -> dict[str, Any]:
    """Restore everything from a verified checkpoint folder into a set-up trainer (every rank)."""
    status, problems = C.checkpoint_status(folder)
    if status != "valid":
        raise StateError(f"resume_from: checkpoint {folder} is {status}: {'; '.join(problems[:3])}")
    tensors = load_file(str(folder / "lora.safetensors"), device="cpu")
    if s.cfg.network.train_unet:
        lora.load_trainable_state(s.bare(s.unet), _strip(tensors, "unet."))
    if s.cfg.network.train_text_encoder:
        for i, te in enumerate(s.text_encoders):
            lora.load_trainable_state(s.bare(te), _strip(tensors, f"text_encoder_{i}."))
    s.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    s.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False))
    ts = json.loads((folder / "training_state.json").read_text(encoding="utf-8"))
    if ts.get("world_size", 1) != s.acc.num_processes:
        raise StateError(f"launch.num_processes: checkpoint was trained with {ts.get('world_size')} processes, "
                         f"this run has {s.acc.num_processes}")
    rngs = torch.load(folder / "rng.pt", map_location="cpu", weights_only=False)
    mine = rngs[s.acc.process_index]
    random.setstate(mine["python"])
    np.random.set_state(mine["numpy"])
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    prog.global_step, prog.epoch, prog.batch_in_epoch = ts["global_step"], ts["epoch"], ts["batch_in_epoch"]
    prog.epoch_loss_sum, prog.epoch_loss_count = ts.get("epoch_loss_sum", 0.0), ts.get("epoch_loss_count", 0)
    prog.best_val_loss = ts.get("best_val_loss")
    return ts


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
