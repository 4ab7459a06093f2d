"""Deep verification of a state checkpoint: hashes, every tensor loadable on CPU, shapes against the
config, and the stored evaluation loss reproduced by running the model again."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from backend import checkpoints as C
from backend.config import validate_config
from backend.trainer import data as D
from backend.trainer import evaluation, lora
from backend.trainer.caching import TextEncoder
from backend.trainer.models import load_components

EXACT_TOL = 1e-5
MIXED_TOL = 2e-2  # saved under fp16/bf16 on a GPU, recomputed in fp32 on the CPU


def verify_checkpoint(folder: Path, recompute: bool = True) -> tuple[bool, list[str]]:
    """(ok, report lines). Never raises for a bad checkpoint: problems are lines in the report."""
    lines: list[str] = []
    status, problems = C.checkpoint_status(folder)
    if status != "valid":
        return False, [f"{folder.name}: {status}", *problems]
    manifest = C.read_manifest(folder)
    lines.append(f"files: {len(manifest['files'])} files, sha256 and sizes match the manifest")
    try:
        tensors = load_file(str(folder / "lora.safetensors"), device="cpu")
        torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False)
        torch.load(folder / "rng.pt", map_location="cpu", weights_only=False)
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
    ok, shape_lines = _check_shapes(comps, cfg, tensors)
    lines += shape_lines
    if not ok:
        return False, lines
    return _recompute(comps, cfg, manifest, lines)


def _check_shapes(comps, cfg, tensors: dict[str, torch.Tensor]) -> tuple[bool, list[str]]:
    models = {}
    if cfg.network.train_unet:
        lora.inject(comps.unet, cfg.network, cfg.network.target_modules, "unet")
        models["unet."] = comps.unet
    if cfg.network.train_text_encoder:
        for i, te in enumerate(comps.text_encoders):
            lora.inject(te, cfg.network, cfg.network.text_encoder_target_modules, "text encoder")
            models[f"text_encoder_{i}."] = te
    try:
        for prefix, m in models.items():
            lora.load_trainable_state(m, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except ValueError as e:
        return False, [f"shapes: {e}"]
    return True, [f"shapes: every tensor matches the network built from the config (rank {cfg.network.rank})"]


def _recompute(comps, cfg, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
    items, val_items, _ = D.load_dataset(cfg.dataset, cfg.training.seed)
    kind, eval_list = evaluation.eval_items(items, val_items)
    samples = evaluation.prepare(comps, eval_list, D.buckets_for(cfg.dataset), cfg.dataset.resolution)
    text = TextEncoder(comps, cfg.training.clip_skip, cache=False)
    with torch.no_grad():
        loss = evaluation.eval_loss(comps, comps.unet, text, samples, cfg.training.seed, torch.device("cpu"),
                                    torch.float32, cfg.training, contextlib.nullcontext)
    stored = manifest.get("val_loss") if kind == "val" else manifest.get("ref_loss")
    if stored is None:
        return True, [*lines, f"loss: recomputed {kind} loss {loss:.6f}; the manifest stores none to compare"]
    diff = abs(loss - stored)
    tol = (MIXED_TOL if cfg.training.mixed_precision != "no" else EXACT_TOL) * max(1.0, abs(stored))
    word = "val_loss" if kind == "val" else "reference loss"
    verdict = f"loss: stored {word} {stored:.6f}, recomputed {loss:.6f}, difference {diff:.2e} (tolerance {tol:.0e})"
    return diff <= tol, [*lines, verdict]
