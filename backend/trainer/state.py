"""Full training state in a checkpoint folder, and restoring it.

Folder contents (manifest.json written last, see backend.checkpoints.AtomicDir):
  lora.safetensors        every trainable tensor (Trained.state_dict), fp32; never the frozen base model
  optimizer.safetensors   the optimizer state_dict's tensors (Adam moments, Prodigy's per-parameter
                          state), by their path in the state_dict; a big state is split over
                          optimizer-01.safetensors ... too (OPTIMIZER_SHARD_BYTES each), so that its
                          files are written, hashed and verified on several threads at once
  optimizer.json          the rest of the state_dict (hyperparameters, Prodigy's d, counters) with
                          references to those tensors; older checkpoints hold one optimizer.pt instead
  scheduler.pt            LR scheduler state_dict
  rng.pt                  python/numpy/torch/cuda RNG states of every rank (restored when the process
                          count is the same; every random draw of training is derived from the
                          position anyway, so a resume on another process count needs none of them)
  scaler.json             the fp16 loss scaler (scale, growth tracker), only when training in fp16
  training_state.json     global step, epoch, global batches done in the epoch, best val loss, the
                          layout (processes, batch, accumulation) and the global batch, ...
  config.json             the run's frozen config

Every .pt file holds plain data only and is read with `weights_only=True`: opening a checkpoint
never runs code from it (the same policy as for users' .ckpt models).
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend import checkpoints as C
from backend.resume import Layout, layout_refusal
from backend.trainer import tensorfile
from backend.trainer.context import Progress, Setup

SCALER_FILE = "scaler.json"
OPTIMIZER_TENSORS, OPTIMIZER_SKELETON, OPTIMIZER_PICKLE = "optimizer.safetensors", "optimizer.json", "optimizer.pt"
OPTIMIZER_SHARD = re.compile(r"^optimizer(?:-\d{2})?\.safetensors$")  # optimizer.safetensors, optimizer-01.safetensors ...
OPTIMIZER_SHARD_BYTES = 16 << 20  # a shard's size: sha256 of one file runs on one core (~0.5 s per GB)
OPTIMIZER_MAX_SHARDS = 16
PLAN_FORMAT = 2  # 2: the plan is in global batches (1: per-rank batches of train_batch_size)


class StateError(Exception):
    pass


# Each file is written by one of these three, so a test probe can wrap them (slow or failing disks).
# Each serializes in memory and writes once with C.write_file: fsynced, hashed while written. A save
# writes its files on several threads at once (C.run_parallel), so these must not share state.
def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    C.write_file(path, tensorfile.buffers(tensors))


def save_pickle(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    C.write_file(path, buf.getbuffer())


def save_json(path: Path, obj: Any, compact: bool = False) -> None:
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    C.write_file(path, text.encode("utf-8"))


def load_pickle(path: Path | bytes | bytearray | memoryview | Any) -> Any:
    """A .pt state file (a path, or its bytes), tensors and plain containers only. Older checkpoints
    stored numpy's RNG state as an ndarray: those two numpy types are allowed, nothing else."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]
    source = path if isinstance(path, (str, Path)) else io.BytesIO(path)  # bytes, or a mapped file
    with torch.serialization.safe_globals(allowed):
        return torch.load(source, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ optimizer state as tensors + JSON
# A pickled optimizer state_dict of a few hundred tensors takes ~5x a safetensors file of the same
# bytes to load; this split keeps every tensor in safetensors and the few plain values in JSON.
def split_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, tensors by key) of a nested state_dict: dicts (any keys), lists, tuples,
    tensors and plain scalars. A tensor object that appears twice (bitsandbytes shares its quantile
    maps) is stored once; distinct tensors sharing memory are copied apart (safetensors refuses them)."""
    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}
    storages: set[int] = set()

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in by_id:
                return {"tensor": by_id[id(x)]}
            t = x.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in storages:
                t = t.clone()
            elif ptr is not None:
                storages.add(ptr)
            if path in tensors:  # keys with dots could spell another path
                path = f"{path}#{len(tensors)}"
            by_id[id(x)] = path
            tensors[path] = t
            return {"tensor": path}
        if isinstance(x, dict):
            return {"dict": [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"tuple" if isinstance(x, tuple) else "list": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"optimizer state holds a {type(x).__name__} at {path}; only tensors and plain values are saved")

    return walk(obj, "state"), tensors


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo split_state."""
    if isinstance(skeleton, dict):
        if "tensor" in skeleton:
            return tensors[skeleton["tensor"]]
        if "dict" in skeleton:
            return {k: join_state(v, tensors) for k, v in skeleton["dict"]}
        if "tuple" in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton["tuple"])
        return [join_state(v, tensors) for v in skeleton["list"]]
    return skeleton


def shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The tensors cut, in their order, into consecutive groups of about equal size: as many as it
    takes to keep each under OPTIMIZER_SHARD_BYTES (one, for a small state), at most OPTIMIZER_MAX_SHARDS."""
    shard_bytes, most = OPTIMIZER_SHARD_BYTES, OPTIMIZER_MAX_SHARDS
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    total = sum(sizes)
    n = max(1, min(most, -(-total // shard_bytes)))
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    done = 0
    for (key, t), size in zip(tensors.items(), sizes, strict=True):
        groups[min(n - 1, done * n // max(1, total))][key] = t
        done += size
    return [g for g in groups if g] or [{}]


def optimizer_writes(folder: Path, state: dict[str, Any]) -> list[Callable[[], None]]:
    """The writes of the optimizer state: its tensor files (optimizer.safetensors, optimizer-01 ...)
    and optimizer.json, biggest first, for C.run_parallel."""
    skeleton, tensors = split_state(state)
    names = [OPTIMIZER_TENSORS if i == 0 else f"optimizer-{i:02d}.safetensors" for i in range(OPTIMIZER_MAX_SHARDS)]
    writes = [lambda p=folder / names[i], g=group: save_tensors(p, g) for i, group in enumerate(shards(tensors))]
    return [*writes, lambda: save_json(folder / OPTIMIZER_SKELETON, skeleton, compact=True)]


def save_optimizer(folder: Path, state: dict[str, Any]) -> None:
    C.run_parallel(optimizer_writes(folder, state))


def load_optimizer(read: Any, files: dict[str, Any], read_each: Any = None) -> Any:
    """The optimizer state_dict through `read(name) -> bytes`; old checkpoints' optimizer.pt too.
    Its tensors are in every optimizer*.safetensors file the manifest lists (one, before shards),
    read through `read_each(names) -> (name, bytes)...` when given (VerifiedReader.read_each: each
    shard deserialized as soon as it is verified, in any order)."""
    if OPTIMIZER_PICKLE in files:
        return load_pickle(read(OPTIMIZER_PICKLE))
    names = sorted(n for n in files if OPTIMIZER_SHARD.match(n))
    tensors: dict[str, torch.Tensor] = {}
    for _, data in read_each(names) if read_each else ((n, read(n)) for n in names):
        tensors.update(tensorfile.load(data))
    try:
        return join_state(json.loads(read(OPTIMIZER_SKELETON)), tensors)
    except KeyError as e:
        raise C.CorruptFile(f"{OPTIMIZER_SKELETON}: tensor {e} is in no optimizer file") from None


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.array(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def batches_done(ts: dict[str, Any], accum: int) -> int:
    """Global batches done in the checkpoint's epoch. Checkpoints before PLAN_FORMAT 2 counted one
    rank's micro-batches: a step was `gradient_accumulation_steps` of them (the last one of an epoch
    possibly fewer). Their plan was another one too, so the data order after such a resume differs
    from what the older version would have drawn; the step count and the schedule are kept."""
    if ts.get("plan_format", 1) >= PLAN_FORMAT:
        return int(ts["batch_in_epoch"])
    return -(-int(ts["batch_in_epoch"]) // max(1, int(ts.get("gradient_accumulation_steps") or accum)))


def saved_layout(ts: dict[str, Any]) -> Layout | None:
    """(processes, batch per device, accumulation) a checkpoint was trained with (None: not recorded)."""
    try:
        return int(ts["world_size"]), int(ts["train_batch_size"]), int(ts["gradient_accumulation_steps"])
    except (KeyError, TypeError, ValueError):
        return None


def write_state(folder: Path, s: Setup, prog: Progress, all_rng: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """Fill a (temporary) checkpoint folder, its files written on several threads at once (each
    fsynced; the manifest comes after all of them, in AtomicDir.commit). Called on rank 0 only."""
    ts = {"global_step": prog.global_step, "epoch": prog.epoch, "batch_in_epoch": prog.batch_in_epoch,
          "epoch_loss_sum": prog.epoch_loss_sum, "epoch_loss_count": prog.epoch_loss_count,
          "best_val_loss": prog.best_val_loss, "skipped_steps": prog.skipped_steps,
          "world_size": s.acc.num_processes, "train_batch_size": s.cfg.training.train_batch_size,
          "gradient_accumulation_steps": s.cfg.training.gradient_accumulation_steps,
          "global_batch": s.plan.global_batch, "plan_format": PLAN_FORMAT, **extra}
    lora, sched, scaler = s.trained.state_dict(), s.lr_scheduler.state_dict(), s.scaler
    optimizer = optimizer_writes(folder, s.optimizer.state_dict())
    writes = [lambda: save_tensors(folder / "lora.safetensors", lora), *optimizer[:-1],
              lambda: save_pickle(folder / "scheduler.pt", sched), lambda: save_pickle(folder / "rng.pt", all_rng),
              lambda: save_json(folder / "training_state.json", ts),
              lambda: save_json(folder / "config.json", s.cfg.model_dump(mode="json")), optimizer[-1]]
    if scaler is not None:
        writes.append(lambda: save_json(folder / SCALER_FILE, scaler.state_dict()))
    C.run_parallel(writes)


def load_state(folder: Path, s: Setup, prog: Progress) -> dict[str, Any]:
    """Restore everything from a checkpoint folder into a set-up trainer (every rank). Each file is
    read once: verified against the manifest (size, sha256) from the bytes that are deserialized."""
    status, problems = C.checkpoint_status(folder, hashes=False)
    if status != "valid":
        raise StateError(f"resume_from: checkpoint {folder} is {status}: {'; '.join(problems[:3])}")
    reader = C.VerifiedReader(folder, C.read_manifest(folder))
    reader.prefetch()  # the big files are read and hashed on several threads meanwhile
    try:
        ts = json.loads(reader.read("training_state.json"))
        problem = layout_refusal(saved_layout(ts), (s.acc.num_processes, s.cfg.training.train_batch_size,
                                                    s.cfg.training.gradient_accumulation_steps))
        if problem:
            raise StateError(problem)
        try:
            s.trained.load_state_dict(tensorfile.load(reader.read("lora.safetensors")))
        except ValueError as e:
            raise StateError(f"resume_from: {e}") from None
        s.optimizer.load_state_dict(load_optimizer(reader.read, reader.manifest["files"], reader.read_each))
        s.lr_scheduler.load_state_dict(load_pickle(reader.read("scheduler.pt")))
        rngs = load_pickle(reader.read("rng.pt"))
        if len(rngs) == s.acc.num_processes:
            _set_rng(rngs[s.acc.process_index])
        if s.scaler is not None and SCALER_FILE in reader.manifest["files"]:
            s.scaler.load_state_dict(json.loads(reader.read(SCALER_FILE)))
        reader.finish()
    except C.CorruptFile as e:
        raise StateError(f"resume_from: checkpoint {folder} is corrupt: {e}") from None
    prog.global_step, prog.epoch = ts["global_step"], ts["epoch"]
    prog.batch_in_epoch = batches_done(ts, s.cfg.training.gradient_accumulation_steps)
    prog.epoch_loss_sum, prog.epoch_loss_count = ts.get("epoch_loss_sum", 0.0), ts.get("epoch_loss_count", 0)
    prog.best_val_loss = ts.get("best_val_loss")
    prog.skipped_steps = ts.get("skipped_steps", 0)
    return ts
