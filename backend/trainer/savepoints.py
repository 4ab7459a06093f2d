"""Save points and sample points: what happens at the end of a step, an epoch, the run, or a stop.

A save point writes the export (kohya LoRA file) and, with saving.save_state, a full state
checkpoint. Only rank 0 writes; every rank reaches the same decisions because they are pure
functions of the step and epoch counters.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend import checkpoints as C
from backend.trainer import lora
from backend.trainer.sampling import generate

if TYPE_CHECKING:
    from backend.trainer.loop import Progress, Setup

BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


@dataclass
class SaveContext:
    version_dir: Path
    started_at: float = field(default_factory=time.time)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    resumed_from: str | None = None

    @property
    def exports(self) -> Path:
        return self.version_dir / "exports"


def after_step(sc: SaveContext, s: Setup, prog: Progress) -> None:
    n = prog.global_step
    if s.cfg.saving.save_every_n_steps and n % s.cfg.saving.save_every_n_steps == 0 and n < s.total_steps:
        save(sc, s, prog, "step", n)
    if s.cfg.sampling.every_n_steps and n % s.cfg.sampling.every_n_steps == 0 and n < s.total_steps:
        samples(sc, s, prog, C.state_name("step", n))


def after_epoch(sc: SaveContext, s: Setup, prog: Progress) -> None:
    e = prog.epoch
    last = e >= s.total_epochs or prog.global_step >= s.total_steps
    if s.cfg.saving.save_every_n_epochs and e % s.cfg.saving.save_every_n_epochs == 0 and not last:
        save(sc, s, prog, "epoch", e)
    if s.cfg.sampling.every_n_epochs and e % s.cfg.sampling.every_n_epochs == 0 and not last:
        samples(sc, s, prog, C.state_name("epoch", e))


def save(sc: SaveContext, s: Setup, prog: Progress, kind: str, number: int | None = None) -> None:
    """One save point: the export now; the resumable state folder arrives with the checkpoints work."""
    if not s.acc.is_main_process:
        return
    t0 = time.perf_counter()
    path = write_export(sc, s, prog, kind, number)
    s.io.emit("export_saved", path=str(path), step=prog.global_step, epoch=prog.epoch, kind=kind,
              bytes=path.stat().st_size, seconds=round(time.perf_counter() - t0, 3))


def samples(sc: SaveContext, s: Setup, prog: Progress, label: str) -> None:
    if not s.cfg.sampling.prompts or not s.acc.is_main_process:
        return
    comps = s.comps
    comps.vae.to(s.acc.device)
    tes = [s.acc.unwrap_model(te) for te in s.text_encoders]
    for te in tes:
        te.to(s.acc.device)
    out = generate(comps, s.acc.unwrap_model(s.unet), tes, s.cfg.sampling, sc.version_dir / "samples" / label,
                   s.acc.device, s.acc.autocast)
    for path, prompt in out:
        s.io.emit("sample_saved", path=str(path), prompt=prompt, step=prog.global_step, epoch=prog.epoch)


def write_export(sc: SaveContext, s: Setup, prog: Progress, kind: str, number: int | None) -> Path:
    """Write the kohya LoRA file atomically (tmp name, fsync, rename)."""
    cfg = s.cfg
    sc.exports.mkdir(parents=True, exist_ok=True)
    dtype = lora.DTYPES[cfg.saving.save_precision]
    unet = s.acc.unwrap_model(s.unet) if cfg.network.train_unet else None
    tes = [s.acc.unwrap_model(te) for te in s.text_encoders] if cfg.network.train_text_encoder else []
    tensors = lora.kohya_state_dict(unet, tes, s.comps.is_sdxl, cfg.network.alpha, dtype)
    path = sc.exports / C.export_name(cfg.run_name, kind, number)
    tmp = path.with_name(path.name + ".tmp")
    lora.save_export(str(tmp), tensors, export_metadata(sc, s, prog))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def optimizer_description(cfg: Any) -> str:
    o = cfg.optimizer.model_dump()
    kind = o.pop("type")
    cls = {"Prodigy": "prodigyopt.Prodigy", "AdamW": "torch.optim.AdamW", "Lion": "Lion", "SGD": "torch.optim.SGD",
           "Adafactor": "transformers.optimization.Adafactor", "AdamW8bit": "bitsandbytes.optim.AdamW8bit"}[kind]
    args = ",".join(f"{k}={v}" for k, v in o.items() if k not in ("learning_rate", "unet_lr", "text_encoder_lr", "max_grad_norm"))
    return f"{cls}({args})"


def export_metadata(sc: SaveContext, s: Setup, prog: Progress) -> dict[str, Any]:
    """kohya `ss_*` metadata (for people and A1111's info panel) plus modelspec fields."""
    cfg = s.cfg
    o = cfg.optimizer
    dirs: dict[str, dict[str, int]] = {}
    for it in s.items:
        d = dirs.setdefault(Path(it.path).parent.name, {"n_repeats": it.repeats, "img_count": 0})
        d["img_count"] += 1
    res = cfg.dataset.resolution
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.network.rank),
        "ss_network_alpha": str(cfg.network.alpha),
        "ss_network_dropout": str(cfg.network.dropout),
        "ss_base_model_version": BASE_MODEL_VERSION[s.comps.family],
        "ss_v2": str(s.comps.family == "sd2"),
        "ss_sd_model_name": Path(cfg.model.pretrained_model).name,
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": str(cfg.dataset.enable_bucket),
        "ss_num_train_images": str(sum(it.repeats for it in s.items)),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_epoch": str(prog.epoch),
        "ss_num_epochs": str(s.total_epochs),
        "ss_steps": str(prog.global_step),
        "ss_max_train_steps": str(s.total_steps),
        "ss_batch_size_per_device": str(cfg.training.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.training.gradient_accumulation_steps),
        "ss_optimizer": optimizer_description(cfg),
        "ss_learning_rate": str(o.learning_rate),
        "ss_unet_lr": str(o.unet_lr or o.learning_rate),
        "ss_text_encoder_lr": str(o.text_encoder_lr or o.learning_rate),
        "ss_lr_scheduler": cfg.scheduler.type,
        "ss_lr_warmup_steps": str(cfg.scheduler.warmup_steps),
        "ss_mixed_precision": cfg.training.mixed_precision,
        "ss_seed": str(cfg.training.seed),
        "ss_clip_skip": str(cfg.training.clip_skip),
        "ss_noise_offset": str(cfg.training.noise_offset),
        "ss_min_snr_gamma": str(cfg.training.min_snr_gamma),
        "ss_caption_dropout_rate": str(cfg.dataset.caption_dropout_rate),
        "ss_shuffle_caption": str(cfg.dataset.shuffle_caption),
        "ss_keep_tokens": str(cfg.dataset.keep_tokens),
        "ss_flip_aug": str(cfg.dataset.random_flip),
        "ss_training_started_at": str(sc.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_session_id": sc.session_id,
        "ss_output_name": cfg.run_name,
        "ss_training_comment": "trained with Lathe",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE[s.comps.family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": cfg.run_name,
        "lathe_config_hash": cfg.config_hash(),
    }
