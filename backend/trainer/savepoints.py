"""Save points and sample points: what happens at the end of a step, an epoch, the run, or a stop.

A save point writes the export (kohya LoRA file) and, with saving.save_state, a full state
checkpoint. Only rank 0 writes; every rank reaches the same decisions because they are pure
functions of the step and epoch counters.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from backend import checkpoints as C
from backend.config import LORAPLUS_FIELDS
from backend.trainer import evaluation, export
from backend.trainer.context import Progress, Setup
from backend.trainer.distributed import gather_shares, share
from backend.trainer.metadata import dataset_metadata
from backend.trainer.sampling import generate, write_samples
from backend.trainer.state import rng_state, write_state
from backend.trainer.trained import RanksDiverged, first_divergence


@dataclass
class SaveContext:
    version_dir: Path
    started_at: float = field(default_factory=time.time)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    resumed_from: str | None = None

    @property
    def exports(self) -> Path:
        return self.version_dir / "exports"


def _step_save_due(s: Setup, n: int) -> bool:
    return bool(s.cfg.saving.save_every_n_steps and n % s.cfg.saving.save_every_n_steps == 0)


def _step_sample_due(s: Setup, n: int) -> bool:
    return bool(s.cfg.sampling.every_n_steps and n % s.cfg.sampling.every_n_steps == 0 and n < s.total_steps)


def boundary_due(s: Setup, prog: Progress) -> bool:
    """Whether this step ends with a step save point or step samples (what after_step will do)."""
    return _step_save_due(s, prog.global_step) or _step_sample_due(s, prog.global_step)


def after_step(sc: SaveContext, s: Setup, prog: Progress) -> None:
    n = prog.global_step
    if _step_save_due(s, n):
        save(sc, s, prog, "step", n)
    if _step_sample_due(s, n):
        samples(sc, s, prog, C.state_name("step", n))


def after_epoch(sc: SaveContext, s: Setup, prog: Progress) -> None:
    e = prog.epoch
    last = e >= s.total_epochs or prog.global_step >= s.total_steps
    if s.cfg.saving.save_every_n_epochs and e % s.cfg.saving.save_every_n_epochs == 0:
        save(sc, s, prog, "epoch", e)
    if s.cfg.sampling.every_n_epochs and e % s.cfg.sampling.every_n_epochs == 0 and not last:
        samples(sc, s, prog, C.state_name("epoch", e))


def save(sc: SaveContext, s: Setup, prog: Progress, kind: str, number: int | None = None) -> None:
    """One save point, on every rank: RNG states are gathered, every rank evaluates its share of
    the evaluation images, rank 0 writes and prunes.

    Under several processes the ranks are first checked to hold one model (check_ranks_agree).
    Order matters: the new state folder and export are complete on disk before anything old is
    removed (save first, then prune), so a crash at any instant leaves a valid set behind.
    """
    if s.acc.num_processes > 1:
        check_ranks_agree(s)
    rngs = gather_object([rng_state()]) if s.acc.num_processes > 1 else [rng_state()]
    loss = evaluate(s)
    if not s.acc.is_main_process:
        return
    val_loss = loss if s.eval_kind == "val" else None
    improved = val_loss is not None and (prog.best_val_loss is None or val_loss < prog.best_val_loss)
    if val_loss is not None:
        s.io.emit("validation", epoch=prog.epoch, step=prog.global_step, val_loss=val_loss, best=improved)
        if improved:
            prog.best_val_loss = val_loss
    write_save_point(sc, s, prog, kind, number, rngs, loss)
    if improved:
        write_save_point(sc, s, prog, "best", None, rngs, loss)
    rotate(sc, s)


def check_ranks_agree(s: Setup) -> None:
    """Every rank holds the same trainable tensors, bit for bit (one small all-gather of digests);
    otherwise every rank stops here, before anything is written, so earlier save points stay the
    last good ones."""
    problem = first_divergence(gather_object([s.trained.fingerprints()]))
    if problem:
        raise RanksDiverged(problem)


def evaluate(s: Setup) -> float:
    """The evaluation loss, every rank doing its share of the samples on the plain modules (no DDP
    wrapper, all in eval mode); each sample's loss is computed alone and the mean is taken in sample
    order, so the figure is the one a single process (and `verify`) computes."""
    world, rank, n = s.acc.num_processes, s.acc.process_index, len(s.eval_samples)
    mine = [s.eval_samples[i] for i in share(n, rank, world)]
    losses = evaluation.sample_losses(s.comps, s.trained, s.text.bare(), mine, s.cfg.training.seed, s.acc.device,
                                      s.weight_dtype, s.cfg.training, s.acc.autocast)
    if world > 1:
        losses = gather_shares(gather_object([losses]), n)
    return evaluation.mean_loss(losses)


def write_save_point(sc: SaveContext, s: Setup, prog: Progress, kind: str, number: int | None,
                     rngs: list[dict[str, Any]], eval_loss: float) -> None:
    """The state folder (with save_state) and the export of one save point, each written atomically."""
    name = C.state_name(kind, number)
    if s.cfg.saving.save_state:
        t0 = time.perf_counter()
        info = manifest_info(sc, s, prog, kind, name, eval_loss)
        atomic = C.AtomicDir(sc.version_dir / "checkpoints", name)
        with atomic as tmp:
            write_state(tmp, s, prog, rngs, {"kind": kind, "name": name})
            manifest = atomic.commit(info)
        size = sum(f["bytes"] for f in manifest["files"].values())
        s.io.emit("checkpoint_saved", kind=kind, name=name, path=str(atomic.final), step=prog.global_step,
                  epoch=prog.epoch, bytes=size, seconds=round(time.perf_counter() - t0, 3), loss=prog.last_loss,
                  val_loss=info["val_loss"])
    t0 = time.perf_counter()
    path = write_export(sc, s, prog, kind, number)
    s.io.emit("export_saved", kind=kind, path=str(path), step=prog.global_step, epoch=prog.epoch,
              bytes=path.stat().st_size, seconds=round(time.perf_counter() - t0, 3))


def manifest_info(sc: SaveContext, s: Setup, prog: Progress, kind: str, name: str, eval_loss: float) -> dict[str, Any]:
    return {
        "format": 1, "run_name": s.cfg.run_name, "version": sc.version_dir.name, "kind": kind, "name": name,
        "step": prog.global_step, "epoch": prog.epoch, "batch_in_epoch": prog.batch_in_epoch,
        "loss": prog.last_loss, "val_loss": eval_loss if s.eval_kind == "val" else None,
        "ref_loss": eval_loss if s.eval_kind == "ref" else None, "eval_kind": s.eval_kind,
        "config_hash": s.cfg.config_hash(), "dataset_fingerprint": s.dataset_fingerprint,
        "world_size": s.acc.num_processes, "total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch,
        "resumed_from": sc.resumed_from,
    }


def rotate(sc: SaveContext, s: Setup) -> None:
    """Apply save_last_n_epochs / save_last_n_steps to this version's save points (pure plan, then delete)."""
    cfg = s.cfg.saving
    if cfg.save_last_n_epochs is None and cfg.save_last_n_steps is None:
        return
    points = existing_save_points(sc.version_dir, s.cfg.run_name)
    protected = frozenset({Path(sc.resumed_from).name}) if sc.resumed_from and \
        Path(sc.resumed_from).parent.parent == sc.version_dir else frozenset()
    for p in C.plan_rotation(list(points), cfg.save_last_n_epochs, cfg.save_last_n_steps, protected):
        keep = cfg.save_last_n_epochs if p.kind == "epoch" else cfg.save_last_n_steps
        reason = f"{C.ROTATED[p.kind]}={keep}: only the newest {keep} {p.kind} save points are kept"
        folder = sc.version_dir / "checkpoints" / p.name
        if folder.is_dir():
            C.remove_state_folder(folder)
            s.io.emit("checkpoint_removed", kind=p.kind, name=p.name, path=str(folder), reason=reason)
        export = sc.exports / C.export_name(s.cfg.run_name, p.kind, p.number)
        if export.is_file():
            export.unlink()
            s.io.emit("export_removed", path=str(export), kind=p.kind, step=points[p].get("step"),
                      epoch=points[p].get("epoch"), reason=reason)


def existing_save_points(version_dir: Path, run_name: str) -> dict[C.SavePoint, dict[str, Any]]:
    """Save points of this run found by exact names: state folders with a valid manifest of this run,
    and exports named exactly as this run names them. Foreign files never match."""
    found: dict[C.SavePoint, dict[str, Any]] = {}
    cdir = version_dir / "checkpoints"
    for folder in sorted(cdir.iterdir()) if cdir.is_dir() else []:
        parsed = C.parse_state_name(folder.name)
        manifest = C.read_manifest(folder) if parsed else None
        if parsed and manifest and manifest.get("run_name") == run_name:
            found[C.SavePoint(parsed[0], parsed[1], folder.name)] = manifest
    edir = version_dir / "exports"
    for f in sorted(edir.iterdir()) if edir.is_dir() else []:
        for kind, rx in ((k, re.compile("^" + re.escape(run_name) + pat + "$")) for k, pat in EXPORT_PATTERNS):
            m = rx.match(f.name)
            if m:
                point = C.SavePoint(kind, int(m.group(1)), C.state_name(kind, int(m.group(1))))
                found.setdefault(point, {"step": int(m.group(1)) if kind == "step" else None,
                                         "epoch": int(m.group(1)) if kind == "epoch" else None})
    return found


EXPORT_PATTERNS = (("epoch", r"-(\d{6})\.safetensors"), ("step", r"-step(\d{8})\.safetensors"))


def samples(sc: SaveContext, s: Setup, prog: Progress, label: str) -> None:
    """Sample images, the prompts spread over the ranks (prompt i has seed + i whoever draws it);
    rank 0 receives every image and writes them."""
    prompts = s.cfg.sampling.prompts
    if not prompts:
        return
    world, rank = s.acc.num_processes, s.acc.process_index
    with borrowed([s.comps.vae, *s.comps.text_encoders], s.acc.device), s.trained.evaluating():
        images = generate(s.comps, s.comps.unet, s.text.bare(), s.cfg.sampling, share(len(prompts), rank, world),
                          s.acc.device, s.acc.autocast)
    parts = gather_object([images]) if world > 1 else [images]
    if not s.acc.is_main_process:
        return
    drawn_by = {i: r for r, part in enumerate(parts) for i, _, _ in part}
    out = write_samples(sc.version_dir / "samples" / label, [img for part in parts for img in part])
    for path, prompt in out:
        s.io.emit("sample_saved", path=str(path), prompt=prompt, step=prog.global_step, epoch=prog.epoch,
                  rank=drawn_by[int(path.stem)])


@contextlib.contextmanager
def borrowed(modules: list[Any], device: Any) -> Iterator[None]:
    """Move frozen modules that were parked on the CPU to the device for a while, then back."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


def write_export(sc: SaveContext, s: Setup, prog: Progress, kind: str, number: int | None) -> Path:
    """Write the kohya LoRA file (atomically: export.save_export)."""
    cfg = s.cfg
    sc.exports.mkdir(parents=True, exist_ok=True)
    dtype = export.DTYPES[cfg.saving.save_precision]
    tensors = s.comps.spec.export_tensors(s.trained.export_groups(s.comps.spec), dtype, s.comps.spec.export_format(s.cfg))
    path = sc.exports / C.export_name(cfg.run_name, kind, number)
    export.save_export(path, tensors, export_metadata(sc, s, prog))
    return path


def optimizer_description(cfg: Any) -> str:
    o = cfg.optimizer.model_dump()
    kind = o.pop("type")
    cls = {"Prodigy": "prodigyopt.Prodigy", "AdamW": "torch.optim.AdamW", "Lion": "Lion", "SGD": "torch.optim.SGD",
           "Adafactor": "transformers.optimization.Adafactor", "AdamW8bit": "bitsandbytes.optim.AdamW8bit",
           "DAdaptAdam": "dadaptation.DAdaptAdam", "DAdaptLion": "dadaptation.DAdaptLion"}[kind]
    args = ",".join(f"{k}={v}" for k, v in o.items() if k not in ("learning_rate", "unet_lr", "text_encoder_lr", "max_grad_norm", *LORAPLUS_FIELDS))
    return f"{cls}({args})"


def noise_and_loss_metadata(t: Any) -> dict[str, str]:
    """The noise, timestep and loss keys sd-scripts' train_network.py writes, with its values: an
    option that is off is "None" there (Lathe's 0 multires iterations too); the timestep range is
    `modelspec.timestep_range` "min,max" when either bound is set (library/sai_model_spec.py)."""
    meta = {
        "ss_multires_noise_iterations": str(t.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(t.multires_noise_discount),
        "ss_adaptive_noise_scale": str(t.adaptive_noise_scale),
        "ss_zero_terminal_snr": str(t.zero_terminal_snr),
        "ss_scale_weight_norms": str(t.scale_weight_norms),
        "ss_ip_noise_gamma": str(t.ip_noise_gamma),
        "ss_debiased_estimation": str(t.debiased_estimation_loss),
        "ss_noise_offset_random_strength": str(t.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": str(t.ip_noise_gamma_random_strength),
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_scale": str(t.huber_scale),
        "ss_huber_c": str(t.huber_c),
    }
    if t.min_timestep is not None or t.max_timestep is not None:
        meta["modelspec.timestep_range"] = f"{t.min_timestep or 0},{1000 if t.max_timestep is None else t.max_timestep}"
    return meta


def export_metadata(sc: SaveContext, s: Setup, prog: Progress) -> dict[str, Any]:
    """kohya `ss_*` metadata (for people and A1111's info panel) plus modelspec fields."""
    cfg = s.cfg
    o = cfg.optimizer
    res = cfg.dataset.resolution
    return {
        **export.network_metadata(cfg.network),
        "ss_base_model_version": s.comps.spec.base_model_version,
        "ss_v2": str(s.comps.family == "sd2"),
        "ss_v_parameterization": str(s.comps.v_prediction),
        "ss_sd_model_name": Path(cfg.model.pretrained_model).name,
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": str(cfg.dataset.enable_bucket),
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
        "ss_lr_warmup_steps": str(cfg.scheduler.warmup_for(s.total_steps)),
        "ss_loraplus_lr_ratio": str(o.loraplus_lr_ratio),
        "ss_loraplus_unet_lr_ratio": str(o.loraplus_unet_lr_ratio),
        "ss_loraplus_text_encoder_lr_ratio": str(o.loraplus_text_encoder_lr_ratio),
        "ss_mixed_precision": cfg.training.mixed_precision,
        "ss_seed": str(cfg.training.seed),
        "ss_clip_skip": str(cfg.training.clip_skip),
        "ss_max_token_length": "None" if cfg.training.max_token_length == 75 else str(cfg.training.max_token_length),
        "ss_noise_offset": str(cfg.training.noise_offset),
        "ss_min_snr_gamma": str(cfg.training.min_snr_gamma),
        **noise_and_loss_metadata(cfg.training),
        **dataset_metadata(s),
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
        "modelspec.architecture": s.comps.spec.architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": "v" if s.comps.v_prediction else "epsilon",
        "modelspec.title": cfg.run_name,
        "lathe_config_hash": cfg.config_hash(),
        **s.comps.spec.metadata(cfg, s.comps),
    }
