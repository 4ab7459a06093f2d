"""The training loop: epochs of planned global batches, one optimizer step per global batch (this
rank's micro-batches of it, `data.micro_batches_of`), save points and samples between steps. The
recipe (recipe.py) calls `run_training`.

Each sample's loss is weighted by its micro-batch's `share` (world / samples in the global batch)
and summed, so after DDP's mean over the ranks the gradient is the mean over the global batch,
whatever the layout: 1 process x batch 4, 2 x 2 and 1 x 2 x accumulation 2 take the same step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from backend import dataset as D
from backend.trainer.caching import PixelBatches, encode_pixels
from backend.trainer.context import Progress, Setup
from backend.trainer.loss import mix_seed, sample_generator, seed_micro_step
from backend.trainer.max_norm import apply_max_norm
from backend.trainer.noise import draw_noise
from backend.trainer.savepoints import SaveContext, after_epoch, after_step, boundary_due
from backend.trainer.steplog import StepLog
from backend.trainer.stopping import StopWatch


def batch_tensors(s: Setup, b: D.Batch, pixels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """Latents, text context and the family's added conditioning (SDXL: pooled text and sizes) for one
    micro-batch."""
    device = s.acc.device
    if s.latents is not None:
        lat = s.latents.batch(b).to(device, non_blocking=True)
    else:
        lat = encode_pixels(s.comps.vae, pixels)
    captions = [smp.caption for smp in b.samples]
    ctx, pooled = s.text(captions, device)
    shapes = [D.geometry(s.items[smp.item], b.bucket) for smp in b.samples]
    return lat, ctx, s.comps.spec.added_conditioning(s.comps, pooled, shapes, device, s.weight_dtype)


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


def train_step(s: Setup, chunk: list[tuple[D.Batch, Any]], step: int,
               epoch: int) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """One optimizer step over `chunk`, this rank's micro-batches of a global batch: (this rank's
    share of the step's loss, stepped, the max-norm figures or None). The mean of the shares over the
    ranks is the step's loss."""
    acc, total, ts = s.acc, torch.zeros((), device=s.acc.device), s.cfg.training
    unet, seed, spec = s.trained.unet_runner(), ts.seed, s.comps.spec
    n_timesteps = spec.num_timesteps(s.comps)
    for micro, (b, pixels) in enumerate(chunk):
        seed_micro_step(seed, step, micro, acc.process_index)
        lat, ctx, added = batch_tensors(s, b, pixels)
        gens = [sample_generator(seed, epoch, smp.index, acc.device) for smp in b.samples]
        noise, t, input_noise = draw_noise(lat, gens, ts, n_timesteps, spec)
        # Every trained module skips its all-reduce until the last micro-batch of the step.
        with s.trained.no_sync(acc, active=micro < len(chunk) - 1):
            with acc.autocast():
                per_sample = spec.loss(unet, s.comps, lat, ctx, added, noise, t, ts, s.weight_dtype, input_noise)
                if any(smp.weight != 1.0 for smp in b.samples):  # regularization images: prior_loss_weight
                    per_sample = per_sample * torch.tensor([smp.weight for smp in b.samples], device=per_sample.device,
                                                           dtype=per_sample.dtype)
                loss = per_sample.sum() * b.share
            acc.backward(loss)
        total = total + loss.detach()
    if s.cfg.optimizer.max_grad_norm is not None:
        acc.clip_grad_norm_(s.trained.parameters(), s.cfg.optimizer.max_grad_norm)
    stepped = optimizer_step(s.optimizer, s.lr_scheduler)
    norms = None
    if ts.scale_weight_norms is not None:  # sd-scripts: after every optimizer step, on the weights it left
        norms = apply_max_norm([e.module for e in s.trained.entries], ts.scale_weight_norms, s.cfg.network.type)
    return total, stepped, norms


def run_training(s: Setup, prog: Progress, stop: StopWatch, sc: SaveContext) -> str:
    """The loop. Returns the final state: 'finished' or 'stopped'."""
    s.io.total_steps = s.total_steps
    bar = tqdm(total=s.total_steps, initial=prog.global_step, desc="train", unit="step", mininterval=2.0,
               disable=not s.acc.is_main_process, ascii=True, file=sys.stdout)
    try:
        state = _loop(s, prog, stop, sc, bar)
        stop.close()
        return state
    finally:
        bar.close()


def _loop(s: Setup, prog: Progress, stop: StopWatch, sc: SaveContext, bar: Any) -> str:
    io, acc = s.io, s.acc
    t = s.cfg.training
    log = StepLog(s, prog, s.plan.global_batch)
    while prog.epoch < s.total_epochs and prog.global_step < s.total_steps:
        plan = D.epoch_plan(s.items, s.item_buckets, s.plan, prog.epoch)  # global batches: one per step
        mine = [D.micro_batches_of(b, acc.process_index, acc.num_processes, t.gradient_accumulation_steps)
                for b in plan]
        it = micro_batches(s, [m for step in mine[prog.batch_in_epoch :] for m in step], prog.epoch)
        while prog.batch_in_epoch < len(plan) and prog.global_step < s.total_steps:
            t0 = time.perf_counter()
            chunk = [next(it) for _ in mine[prog.batch_in_epoch]]
            t1 = time.perf_counter()
            loss, stepped, norms = train_step(s, chunk, prog.global_step, prog.epoch)
            io.data_wait_s += t1 - t0
            io.busy_s += time.perf_counter() - t1
            prog.global_step += 1
            prog.batch_in_epoch += 1
            io.step = prog.global_step
            bar.update(1)
            log.record(loss, stepped, norms)
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
