"""The training loop: epochs of planned batches, one optimizer step per `gradient_accumulation_steps`
micro-batches, save points and samples between steps. The recipe (recipe.py) calls `run_training`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from backend.trainer import data as D
from backend.trainer.caching import PixelBatches, encode_pixels
from backend.trainer.context import Progress, Setup
from backend.trainer.loss import diffusion_loss, draw_noise, mix_seed, seed_micro_step, step_generator
from backend.trainer.models import sdxl_time_ids
from backend.trainer.savepoints import SaveContext, after_epoch, after_step, boundary_due
from backend.trainer.steplog import StepLog
from backend.trainer.stopping import StopWatch


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


def micro_batches(s: Setup, batches: list[D.Batch], epoch: int) -> Iterator[tuple[D.Batch, Any]]:
    """Yield (batch, pixels-or-None); pixels come from DataLoader workers when latents are not cached.
    The loader has its own generator: it never draws from the global RNG."""
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
        generator=torch.Generator().manual_seed(mix_seed(s.cfg.training.seed, epoch)),
    )
    yield from zip(batches, loader, strict=True)


def optimizer_step(optimizer: Any, lr_scheduler: Any) -> bool:
    """Step the optimizer, then the schedule unless the fp16 loss scaler skipped the step (an
    overflow: the scaler lowers its scale and the weights stay as they were). True when it stepped."""
    optimizer.step()
    skipped = bool(getattr(optimizer, "step_was_skipped", False))
    if not skipped:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return not skipped


def train_step(s: Setup, chunk: list[tuple[D.Batch, Any]], step: int) -> tuple[torch.Tensor, bool]:
    """One optimizer step over `chunk` (gradient-accumulation micro-batches): (mean loss, stepped)."""
    acc, total = s.acc, torch.zeros((), device=s.acc.device)
    unet, seed = s.trained.unet_runner(), s.cfg.training.seed
    for micro, (b, pixels) in enumerate(chunk):
        seed_micro_step(seed, step, micro, acc.process_index)
        lat, ctx, added = batch_tensors(s, b, pixels)
        gen = step_generator(seed, step, micro, acc.process_index, acc.device)
        noise, t = draw_noise(lat, gen, s.cfg.training.noise_offset, s.comps.noise_scheduler.config.num_train_timesteps)
        # Every trained module skips its all-reduce until the last micro-batch of the step.
        with s.trained.no_sync(acc, active=micro < len(chunk) - 1):
            with acc.autocast():
                loss = diffusion_loss(unet, s.comps.noise_scheduler, lat, ctx, added, noise, t, s.comps.v_prediction,
                                      s.cfg.training, s.weight_dtype)
            acc.backward(loss / len(chunk))
        total = total + loss.detach()
    if s.cfg.optimizer.max_grad_norm is not None:
        acc.clip_grad_norm_(s.trained.parameters(), s.cfg.optimizer.max_grad_norm)
    return total / len(chunk), optimizer_step(s.optimizer, s.lr_scheduler)


def run_training(s: Setup, prog: Progress, stop: StopWatch, sc: SaveContext) -> str:
    """The loop. Returns the final state: 'finished' or 'stopped'."""
    s.io.total_steps = s.total_steps
    bar = tqdm(total=s.total_steps, initial=prog.global_step, desc="train", unit="step", mininterval=2.0,
               disable=not s.acc.is_main_process, ascii=True, file=sys.stdout)
    try:
        return _loop(s, prog, stop, sc, bar)
    finally:
        bar.close()


def _loop(s: Setup, prog: Progress, stop: StopWatch, sc: SaveContext, bar: Any) -> str:
    io, ga = s.io, s.cfg.training.gradient_accumulation_steps
    log = StepLog(s, prog, s.cfg.training.train_batch_size * ga * s.acc.num_processes)
    while prog.epoch < s.total_epochs and prog.global_step < s.total_steps:
        plan = D.shard(D.epoch_plan(s.items, s.item_buckets, s.plan, prog.epoch), s.acc.process_index, s.acc.num_processes)
        it = micro_batches(s, plan[prog.batch_in_epoch :], prog.epoch)
        while prog.batch_in_epoch < len(plan) and prog.global_step < s.total_steps:
            t0 = time.perf_counter()
            chunk = [next(it) for _ in range(min(ga, len(plan) - prog.batch_in_epoch))]
            t1 = time.perf_counter()
            loss, stepped = train_step(s, chunk, prog.global_step)
            io.data_wait_s += t1 - t0
            io.busy_s += time.perf_counter() - t1
            prog.global_step += 1
            prog.batch_in_epoch += len(chunk)
            io.step = prog.global_step
            bar.update(1)
            log.record(loss, stepped)
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
