"""Resume preflight (torch-free): what differs between a checkpoint's config and the new one, what
may change and what may not, and whether there is anything left to train."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend import checkpoints as C
from backend.config import DatasetConfig, TrainingConfig, validate_config

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

# Settings that define what is being trained: changing them makes the saved state meaningless.
FROZEN = {
    "model.pretrained_model": "the base model the LoRA was trained on",
    "model.family": "the base model the LoRA was trained on",
    "model.v_parameterization": "the prediction target the LoRA learned",
    "training.zero_terminal_snr": "the noise schedule the LoRA learned",
    "network": "the network's type, shape and placement (rank, alpha, targets)",
    "optimizer.type": "the optimizer state belongs to one optimizer",
    "dataset.train_data_dir": "the data order and position depend on the dataset",
    "dataset.caption_extension": "the captions are part of the dataset",
    "dataset.resolution": "the buckets and the data order depend on it",
    "dataset.enable_bucket": "the buckets and the data order depend on it",
    "dataset.min_bucket_reso": "the buckets and the data order depend on it",
    "dataset.max_bucket_reso": "the buckets and the data order depend on it",
    "dataset.bucket_reso_steps": "the buckets and the data order depend on it",
    "dataset.random_flip": "the data order and augmentation depend on it",
    "dataset.shuffle_caption": "the captions seen at each step depend on it",
    "dataset.keep_tokens": "the captions seen at each step depend on it",
    "dataset.caption_dropout_rate": "the captions seen at each step depend on it",
    "dataset.validation_split": "the split between training and validation images",
    "dataset.validation_data_dir": "best/validation losses would not be comparable",
    "training.seed": "the data order and noise are derived from the seed",
}


# The layout of a global batch: (processes, batch per device, gradient accumulation). Any layout of
# the same global batch trains the same steps on the same samples (the plan is in global batches and
# every random draw is keyed by the sample's position), so it may change on resume; the global batch
# may not: the data position, the step counter and the LR schedule are counted in it.
Layout = tuple[int, int, int]


def describe_layout(layout: Layout) -> str:
    procs, batch, accum = layout
    text = f"{procs} process{'es' if procs != 1 else ''} x batch {batch}"
    return text + (f" x accumulation {accum}" if accum > 1 else "")


def layout_refusal(old: Layout | None, new: Layout) -> str | None:
    """Why a checkpoint of layout `old` cannot resume with layout `new`; None when it can."""
    if old is None or old == new:
        return None
    g_old, g_new = math.prod(old), math.prod(new)
    if g_old == g_new:
        return None
    return (f"training.train_batch_size: the global batch would change from {g_old} ({describe_layout(old)}) to "
            f"{g_new} ({describe_layout(new)}); the data position, the step counter and the LR schedule are counted "
            f"in global batches. Resume with processes x batch x accumulation = {g_old}")


def layout_of(cfg: TrainingConfig, processes: int | None = None) -> Layout:
    t = cfg.training
    return (processes or cfg.launch.num_processes, t.train_batch_size, t.gradient_accumulation_steps)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _frozen_reason(path: str) -> str | None:
    for key, reason in FROZEN.items():
        if path == key or path.startswith(key + "."):
            return reason
    return None


@dataclass
class ResumePlan:
    checkpoint: Path
    manifest: dict[str, Any]
    changed: list[tuple[str, Any, Any]] = field(default_factory=list)  # allowed changes (path, old, new)
    layout: tuple[Layout, Layout] | None = None  # (checkpoint's, new) when the layout changes
    refused: list[str] = field(default_factory=list)  # plain reasons; empty means the resume may start

    @property
    def ok(self) -> bool:
        return not self.refused

    def describe(self) -> list[str]:
        lines = [f"resume from {self.checkpoint} (step {self.manifest.get('step')}, epoch {C.epoch_label(self.manifest)})"]
        lines += [f"  refused: {r}" for r in self.refused]
        if self.layout and not self.refused:
            old, new = self.layout
            lines.append(f"  layout: {describe_layout(old)} -> {describe_layout(new)} (global batch {math.prod(new)} "
                         "kept: the same data order, noise and LR schedule; training continues where it stopped)")
        lines += [f"  changes: {p}: {json.dumps(a)} -> {json.dumps(b)}" for p, a, b in self.changed]
        if not self.changed and not self.refused:
            lines.append("  no settings changed")
        return lines


def dataset_fingerprint(ds: DatasetConfig) -> str:
    """The fingerprint of every image folder the dataset names: train_data_dir's alone (as before
    there were subsets) when it names no other, else sha256 over each folder's in config order."""
    folders = [(d, ds.caption_extension) for d in (ds.train_data_dir, ds.reg_data_dir) if d]
    folders += [(s.image_dir, s.caption_extension or ds.caption_extension) for s in ds.subsets]
    if len(folders) == 1 and ds.train_data_dir:
        return folder_fingerprint(Path(ds.train_data_dir).expanduser(), ds.caption_extension)
    h = hashlib.sha256()
    for d, ext in folders:
        h.update(f"{d}\0{folder_fingerprint(Path(d).expanduser(), ext)}\0".encode())
    return h.hexdigest()


def folder_fingerprint(data_dir: str | Path, caption_extension: str) -> str:
    """sha256 over the image files' names and sizes and the caption texts (no image decoding)."""
    root = Path(data_dir)
    h = hashlib.sha256()
    if not root.is_dir():
        return "missing"
    for p in sorted(root.rglob("*")):
        if p.is_file() and (p.suffix.lower() in IMAGE_EXTS or p.suffix == caption_extension or p.name == "metadata.jsonl"):
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
            if p.suffix.lower() not in IMAGE_EXTS:
                h.update(p.read_bytes())
    return h.hexdigest()


def total_steps_for(cfg: TrainingConfig, steps_per_epoch: int) -> int:
    t = cfg.training
    return t.max_train_steps if t.max_train_steps is not None else t.max_train_epochs * steps_per_epoch


def plan_resume(checkpoint: str | Path, new: TrainingConfig, check_dataset: bool = True) -> ResumePlan:
    """Compare the checkpoint's config with `new` and decide. Never raises for a bad checkpoint:
    the reasons go into `refused`."""
    ckpt = Path(checkpoint).expanduser()
    status, problems = C.checkpoint_status(ckpt) if ckpt.is_dir() else ("missing", ["folder does not exist"])
    manifest = C.read_manifest(ckpt) or {}
    plan = ResumePlan(ckpt, manifest)
    if status != "valid":
        plan.refused.append(f"checkpoint {ckpt.name} is {status}: {'; '.join(problems[:3])}")
        return plan
    try:
        old = validate_config(json.loads((ckpt / "config.json").read_text(encoding="utf-8")))
    except Exception as e:  # noqa: BLE001 - any unreadable config is a refusal with its reason
        plan.refused.append(f"checkpoint config.json is unreadable: {e}")
        return plan
    a, b = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    for path in sorted(set(a) | set(b)):
        if path == "resume_from" or a.get(path) == b.get(path):
            continue
        reason = _frozen_reason(path)
        if reason:
            plan.refused.append(f"{path} cannot change on resume ({json.dumps(a.get(path))} -> {json.dumps(b.get(path))}): {reason}")
        else:
            plan.changed.append((path, a.get(path), b.get(path)))
    old_layout = layout_of(old, int(manifest.get("world_size") or old.launch.num_processes))
    new_layout = layout_of(new)
    refusal = layout_refusal(old_layout, new_layout)
    if refusal:
        plan.refused.append(refusal)
    elif old_layout != new_layout:
        plan.layout = (old_layout, new_layout)
    if check_dataset and manifest.get("dataset_fingerprint"):
        now = dataset_fingerprint(new.dataset)
        if now != manifest["dataset_fingerprint"]:
            ds = new.dataset
            where = ", ".join(d for d in (ds.train_data_dir, ds.reg_data_dir, *(s.image_dir for s in ds.subsets)) if d)
            plan.refused.append(
                f"dataset.train_data_dir: the images or captions in {where} changed since this "
                "checkpoint was saved; the data position would no longer mean the same images"
            )
    spe = manifest.get("steps_per_epoch")
    if spe and not plan.refused:
        total = total_steps_for(new, int(spe))
        if int(manifest.get("step", 0)) >= total:
            epochs = math.ceil(total / int(spe))
            plan.refused.append(
                f"training is already complete at this checkpoint (step {manifest.get('step')} of {total}, "
                f"{epochs} epochs); raise training.max_train_epochs or max_train_steps to train further"
            )
    return plan
