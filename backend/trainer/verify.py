"""Deep verification of a state checkpoint: hashes, every tensor loadable on CPU, shapes against the
config, and the stored evaluation loss reproduced by running the model again."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from backend import checkpoints as C
from backend import dataset as D
from backend.config import validate_config
from backend.launcher import default_cpu_threads
from backend.trainer import evaluation, fp8
from backend.trainer.caching import TextEncoder
from backend.trainer.models import load_components
from backend.trainer.state import load_optimizer, load_pickle
from backend.trainer.trained import Trained

EXACT_TOL = 1e-5
MIXED_TOL = 2e-2  # saved under fp16/bf16 on a GPU, recomputed in fp32 on the CPU


def verify_checkpoint(folder: Path, recompute: bool = True) -> tuple[bool, list[str]]:
    """(ok, report lines). Never raises for a bad checkpoint: problems are lines in the report."""
    lines: list[str] = []
    status, problems = C.checkpoint_status(folder)
    if status != "valid":
        return False, [f"{folder.name}: {status}", *problems]
    manifest = C.read_manifest(folder)
    lines.append(f"files: {len(manifest['files'])} files, sizes and hashes match the manifest")
    try:
        tensors = load_file(str(folder / "lora.safetensors"), device="cpu")
        load_optimizer(lambda name: (folder / name).read_bytes(), manifest["files"])
        for name in ("scheduler.pt", "rng.pt"):
            load_pickle(folder / name)
        cfg = validate_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except Exception as e:  # noqa: BLE001 - any load failure is a finding
        return False, [*lines, f"load: {type(e).__name__}: {e}"]
    lines.append(f"load: {len(tensors)} LoRA tensors, optimizer, scheduler and RNG states load on the CPU")
    if not recompute:
        return True, lines
    try:
        comps = load_components(cfg)
    except Exception as e:  # noqa: BLE001
        return False, [*lines, f"model: cannot load the base model to check shapes: {e}"]
    trained = Trained.for_components(cfg, comps)  # as the trainer built it
    if cfg.model.fp8_base:  # the base weights the trainer computed with (backend/trainer/fp8.py)
        fp8.store_base_in_fp8(comps.unet, torch.device("cpu"), torch.float32)
    try:
        trained.load_state_dict(tensors)
    except ValueError as e:
        return False, [*lines, f"shapes: {e}"]
    lines.append(f"shapes: every tensor matches the network built from the config ({cfg.network.type} rank {cfg.network.rank}; "
                 f"trained: {', '.join(e.key for e in trained.entries)})")
    return _recompute(comps, trained, cfg, manifest, lines)


@contextlib.contextmanager
def _threads_of_the_run(cfg):
    """A CPU run's loss is recomputed on the torch thread count it trained with (the launcher's
    choice): another count splits the kernels' sums differently and the last bits of the loss move."""
    before = torch.get_num_threads()
    if cfg.launch.device == "cpu":
        torch.set_num_threads(default_cpu_threads(cfg))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _recompute(comps, trained: Trained, cfg, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
    items, val_items, _ = D.load_dataset(cfg.dataset, cfg.training.seed)
    kind, eval_list = evaluation.eval_items(items, val_items)
    samples = evaluation.prepare(comps, eval_list, D.buckets_for(cfg.dataset))
    text = TextEncoder.for_training(comps, cfg.training, cache=False)
    with torch.no_grad(), _threads_of_the_run(cfg):
        loss = evaluation.eval_loss(comps, trained, text, samples, cfg.training.seed, torch.device("cpu"),
                                    torch.float32, cfg.training, contextlib.nullcontext)
    stored = manifest.get("val_loss") if kind == "val" else manifest.get("ref_loss")
    if stored is None:
        return True, [*lines, f"loss: recomputed {kind} loss {loss:.6f}; the manifest stores none to compare"]
    diff = abs(loss - stored)
    tol = (MIXED_TOL if cfg.training.mixed_precision != "no" else EXACT_TOL) * max(1.0, abs(stored))
    word = "val_loss" if kind == "val" else "reference loss"
    verdict = f"loss: stored {word} {stored:.6f}, recomputed {loss:.6f}, difference {diff:.2e} (tolerance {tol:.0e})"
    return diff <= tol, [*lines, verdict]
