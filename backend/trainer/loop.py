"""The training recipe: setup -> train loop -> save. Reads top to bottom.

Run under `accelerate launch ... -m backend.trainer --run-dir VERSION_DIR`. Everything the GUI needs
goes into the version folder: events.jsonl, status.json, train.log (our stdout), samples/, exports/.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from backend.config import TrainingConfig
from backend.resume import dataset_fingerprint
from backend.trainer import data as D
from backend.trainer import evaluation, lora
from backend.trainer.caching import LatentCache, PixelBatches, TextEncoder, encode_pixels
from backend.trainer.loss import diffusion_loss, draw_noise, step_generator
from backend.trainer.models import Components, load_components, sdxl_time_ids
from backend.trainer.optim import build_optimizer, build_scheduler, param_groups
from backend.trainer.run_io import RunIO
from backend.trainer.savepoints import SaveContext, after_epoch, after_step, boundary_due
from backend.trainer.steplog import StepLog
from backend.trainer.stopping import StopWatch


@dataclass
class Progress:
    """Where training is: the sampler position is (epoch, batch) and is all exact resume needs."""

    global_step: int = 0
    epoch: int = 0  # completed epochs = 0-based index of the epoch being trained
    batch_in_epoch: int = 0  # batches of this epoch already consumed (this rank's shard)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    best_val_loss: float | None = None
    last_loss: float | None = None


@dataclass
class Setup:
    cfg: TrainingConfig
    acc: Any
    io: RunIO
    comps: Components
    items: list[D.ImageItem]
    item_buckets: list[tuple[int, int]]
    plan: D.PlanSettings
    latents: LatentCache | None
    text: TextEncoder
    unet: Any
    text_encoders: list[Any]
    optimizer: Any
    lr_scheduler: Any
    weight_dtype: torch.dtype
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    eval_kind: str = "ref"
    eval_samples: list[Any] = field(default_factory=list)
    dataset_fingerprint: str = ""

    def bare(self, module: Any) -> Any:
        """The plain module behind accelerate's wrappers and torch.compile (to save, sample, evaluate)."""
        return self.acc.unwrap_model(module, keep_torch_compile=False)


def weight_dtype_for(cfg: TrainingConfig, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision, torch.float32)


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a module; cast only when needed (models load in fp32)."""
    return module.to(device) if dtype == torch.float32 else module.to(device, dtype=dtype)


def setup(cfg: TrainingConfig, acc: Any, io: RunIO, version_dir: Path) -> Setup:
    device = acc.device
    torch.manual_seed(cfg.training.seed + acc.process_index)
    comps = load_components(cfg)
    wdtype = weight_dtype_for(cfg, device)

    # Data: discover, hold out validation images, bucket, plan.
    ds = cfg.dataset
    items, val_items, warnings = D.load_dataset(ds, cfg.training.seed)
    for w in warnings:
        io.warn(w)
    buckets = D.buckets_for(ds)
    item_buckets = D.bucket_of_items(items, buckets, ds.resolution)
    plan = D.PlanSettings(
        cfg.training.seed, cfg.training.train_batch_size, ds.random_flip, ds.shuffle_caption, ds.keep_tokens, ds.caption_dropout_rate
    )

    # VAE: fp32 unless bf16 (fp16 VAEs overflow); evaluation images and (when caching) latents encoded once.
    _place(comps.vae, device, torch.bfloat16 if wdtype == torch.bfloat16 else torch.float32)
    eval_kind, eval_list = evaluation.eval_items(items, val_items)
    eval_samples = evaluation.prepare(comps, eval_list, buckets, ds.resolution)
    latents = _cache_latents(cfg, acc, comps, items, item_buckets) if ds.cache_latents else None

    # Text encoders: trained (LoRA) or frozen; frozen + fixed captions -> embeddings cached.
    train_te = cfg.network.train_text_encoder
    for te in comps.text_encoders:
        _place(te, device, torch.float32 if train_te else wdtype)
    text = TextEncoder(comps, cfg.training.clip_skip, cache=not train_te and not ds.shuffle_caption)
    if text.cache:
        caps = {it.caption for it in items} | ({""} if ds.caption_dropout_rate > 0 else set())
        text.precompute(caps | {smp.caption for smp in eval_samples})
        if device.type == "cuda":
            for te in comps.text_encoders:
                te.to("cpu")  # every embedding is cached; sampling borrows the encoders back

    unet, tes = _attach_lora(cfg, comps, device, wdtype)
    unet_params = lora.lora_parameters(unet) if cfg.network.train_unet else []
    te_params = [p for te in tes for p in lora.lora_parameters(te)] if train_te else []
    optimizer = build_optimizer(cfg, param_groups(cfg, unet_params, te_params), device.type)
    spe, total_steps, total_epochs = _schedule_length(cfg, acc, items, item_buckets, plan)
    lr_scheduler = build_scheduler(cfg, optimizer, total_steps)

    prepared = acc.prepare(unet, *(tes if train_te else []), optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    if cfg.training.torch_compile:
        unet = torch.compile(unet)  # Setup.bare() sees through it for saving and sampling
    if train_te:
        tes = list(prepared[1:-1])
    return Setup(cfg, acc, io, comps, items, item_buckets, plan, latents, text, unet, tes, optimizer, lr_scheduler,
                 wdtype, spe, total_steps, total_epochs, eval_kind, eval_samples,
                 dataset_fingerprint(ds.train_data_dir, ds.caption_extension))


def _cache_latents(cfg: TrainingConfig, acc: Any, comps: Components, items: list[D.ImageItem],
                   item_buckets: list[tuple[int, int]]) -> LatentCache:
    ds = cfg.dataset
    disk = Path(cfg.output_dir) / ".cache" / "latents" if ds.cache_latents_to_disk else None
    latents = LatentCache(comps.vae, items, item_buckets, disk, model_id=comps.source)
    flips = (False, True) if ds.random_flip else (False,)
    if acc.is_main_process:
        print(f"caching latents for {len(items)} images ({len(flips)} variant(s) each)", flush=True)
    latents.fill(flips)
    if acc.device.type == "cuda":
        latents.to(acc.device)  # a few hundred MB at most; saves a host->device copy every step
        comps.vae.to("cpu")  # not needed until sampling, which borrows it back
    return latents


def _attach_lora(cfg: TrainingConfig, comps: Components, device: torch.device, wdtype: torch.dtype) -> tuple[Any, list[Any]]:
    """LoRA on the UNet (and text encoders): frozen base weights in weight_dtype, LoRA weights in fp32."""
    train_te = cfg.network.train_text_encoder
    unet = _place(comps.unet, device, wdtype)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)  # faster convolutions under autocast on tensor cores
    if cfg.network.train_unet:
        lora.inject(unet, cfg.network, cfg.network.target_modules, "unet")
    else:
        unet.requires_grad_(False)
    tes = comps.text_encoders
    if train_te:
        for te in tes:
            lora.inject(te, cfg.network, cfg.network.text_encoder_target_modules, "text encoder")
    for m in (unet, *tes):
        for p in lora.lora_parameters(m):
            p.data = p.data.float()
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in tes if train_te else []:
            te.gradient_checkpointing_enable()
    unet.train()
    for te in tes:
        te.train(train_te)
    return unet, tes


def _schedule_length(cfg: TrainingConfig, acc: Any, items: list[D.ImageItem], item_buckets: list[tuple[int, int]],
                     plan: D.PlanSettings) -> tuple[int, int, int]:
    """(steps per epoch, total steps, total epochs): this rank's batches per epoch, grouped into optimizer steps."""
    n_batches = len(D.shard(D.epoch_plan(items, item_buckets, plan, 0), acc.process_index, acc.num_processes))
    spe = D.steps_per_epoch(n_batches, cfg.training.gradient_accumulation_steps)
    if cfg.training.max_train_steps is not None:
        return spe, cfg.training.max_train_steps, math.ceil(cfg.training.max_train_steps / spe)
    return spe, cfg.training.max_train_epochs * spe, cfg.training.max_train_epochs


def batch_tensors(s: Setup, b: D.Batch, pixels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """Latents, text context and (SDXL) added conditioning for one micro-batch."""
    device = s.acc.device
    if s.latents is not None:
        lat = s.latents.batch(b).to(device, non_blocking=True)
    else:
        lat = encode_pixels(s.comps.vae, pixels)
    captions = [smp.caption for smp in b.samples]
    ctx, pooled = s.text(captions, device)
    added = None
    if s.comps.is_sdxl:
        ids = []
        for smp in b.samples:
            it = s.items[smp.item]
            (rw, rh), (left, top) = D.crop_box(it.size, b.bucket)
            ids.append(sdxl_time_ids((it.size[1], it.size[0]), (top, left), (b.bucket[1], b.bucket[0])))
        added = {"text_embeds": pooled.to(s.weight_dtype), "time_ids": torch.tensor(ids, device=device, dtype=s.weight_dtype)}
    return lat, ctx, added


def micro_batches(s: Setup, batches: list[D.Batch]):
    """Yield (batch, pixels-or-None); pixels come from DataLoader workers when latents are not cached."""
    if s.latents is not None:
        for b in batches:
            yield b, None
        return
    loader = torch.utils.data.DataLoader(
        PixelBatches(s.items, batches),
        batch_size=None,
        shuffle=False,
        num_workers=s.cfg.dataset.num_workers,
        pin_memory=s.acc.device.type == "cuda",
    )
    yield from zip(batches, loader, strict=True)


def train_step(s: Setup, chunk: list[tuple[D.Batch, Any]], step: int) -> torch.Tensor:
    """One optimizer step over `chunk` (gradient-accumulation micro-batches). Returns the mean loss."""
    acc, total = s.acc, torch.zeros((), device=s.acc.device)
    for micro, (b, pixels) in enumerate(chunk):
        lat, ctx, added = batch_tensors(s, b, pixels)
        gen = step_generator(s.cfg.training.seed, step, micro, acc.process_index, acc.device)
        noise, t = draw_noise(lat, gen, s.cfg.training.noise_offset, s.comps.noise_scheduler.config.num_train_timesteps)
        sync = micro == len(chunk) - 1
        ctx_mgr = acc.no_sync(s.unet) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
        with ctx_mgr:
            with acc.autocast():
                loss = diffusion_loss(s.unet, s.comps.noise_scheduler, lat, ctx, added, noise, t, s.comps.v_prediction,
                                      s.cfg.training, s.weight_dtype)
            acc.backward(loss / len(chunk))
        total = total + loss.detach()
    if s.cfg.optimizer.max_grad_norm is not None:
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        acc.clip_grad_norm_(params, s.cfg.optimizer.max_grad_norm)
    s.optimizer.step()
    s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total / len(chunk)


def run_training(s: Setup, prog: Progress, stop: StopWatch, sc: SaveContext) -> str:
    """The loop. Returns the final state: 'finished' or 'stopped'."""
    s.io.total_steps = s.total_steps
    images_per_step = s.cfg.training.train_batch_size * s.cfg.training.gradient_accumulation_steps * s.acc.num_processes
    slow = float(os.environ.get("LATHE_TEST_SLOW_STEP_S", "0") or 0)  # test hook: widen the window for stop tests
    bar = tqdm(total=s.total_steps, initial=prog.global_step, desc="train", unit="step", mininterval=2.0,
               disable=not s.acc.is_main_process, ascii=True, file=sys.stdout)
    try:
        return _loop(s, prog, stop, sc, bar, slow, images_per_step)
    finally:
        bar.close()


def _loop(s: Setup, prog: Progress, stop: StopWatch, sc: SaveContext, bar: Any, slow: float, images_per_step: int) -> str:
    io, ga = s.io, s.cfg.training.gradient_accumulation_steps
    log = StepLog(s, prog, images_per_step)
    while prog.epoch < s.total_epochs and prog.global_step < s.total_steps:
        plan = D.shard(D.epoch_plan(s.items, s.item_buckets, s.plan, prog.epoch), s.acc.process_index, s.acc.num_processes)
        it = micro_batches(s, plan[prog.batch_in_epoch :])
        while prog.batch_in_epoch < len(plan) and prog.global_step < s.total_steps:
            t0 = time.perf_counter()
            chunk = [next(it) for _ in range(min(ga, len(plan) - prog.batch_in_epoch))]
            t1 = time.perf_counter()
            loss = train_step(s, chunk, prog.global_step)
            io.data_wait_s += t1 - t0
            io.busy_s += time.perf_counter() - t1
            prog.global_step += 1
            prog.batch_in_epoch += len(chunk)
            io.step = prog.global_step
            bar.update(1)
            log.record(loss)
            if slow:
                time.sleep(slow)
            if stop.requested():
                log.flush()
                return "stopped"
            if boundary_due(s, prog):
                log.flush()  # save points and samples record the latest loss
            after_step(sc, s, prog)
        if prog.batch_in_epoch >= len(plan):
            log.flush()
            prog.epoch += 1
            prog.batch_in_epoch = 0
            mean = prog.epoch_loss_sum / prog.epoch_loss_count if prog.epoch_loss_count else None
            prog.epoch_loss_sum, prog.epoch_loss_count = 0.0, 0
            io.emit("epoch_end", epoch=prog.epoch, step=prog.global_step, mean_loss=mean)
            after_epoch(sc, s, prog)
    log.flush()
    return "finished"
