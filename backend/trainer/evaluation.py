"""Deterministic evaluation loss: fixed images, fixed noise, fixed timesteps.

The loss is the training's definition (loss_type, the Huber schedule, the timestep weights, the
noise schedule with zero_terminal_snr) at fixed fractions of the timesteps training draws from; the
noise is plain Gaussian (no offset, multires or input perturbation), so it measures denoising alone.

Used for the validation loss (best checkpoint) when a validation set exists, and otherwise as a
reference loss on a fixed training batch. Stored in each checkpoint's manifest; `verify` recomputes
it by running the model again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backend import dataset as D
from backend.trainer.caching import encode_pixels
from backend.trainer.distributed import split_work
from backend.trainer.models import Components
from backend.trainer.noise import timestep_range
from backend.trainer.trained import Trained

TIMESTEP_FRACTIONS = (0.1, 0.35, 0.6, 0.85)
REFERENCE_IMAGES = 4


@dataclass
class EvalSample:
    latent: torch.Tensor  # [C, h, w] on CPU
    caption: str
    geometry: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # data.geometry
    index: int


def eval_items(train_items: list[D.ImageItem], val_items: list[D.ImageItem]) -> tuple[str, list[D.ImageItem]]:
    """('val', the validation set) or ('ref', the first few training images by path)."""
    if val_items:
        return "val", val_items
    return "ref", sorted((it for it in train_items if not it.is_reg), key=lambda it: it.path)[:REFERENCE_IMAGES]


def prepare(comps: Components, items: list[D.ImageItem], buckets: D.Bucketing, rank: int = 0, world: int = 1, exchange: Callable[[list[Any]], list[Any]] | None = None) -> list[EvalSample]:
    """Encode the evaluation images once (VAE mean, no flip), each rank its share (`split_work`)."""
    item_buckets = D.bucket_of_items(items, buckets)

    def encode(idx: list[int]) -> dict[int, torch.Tensor]:
        return {i: encode_pixels(comps.vae, torch.from_numpy(D.load_pixels(items[i], item_buckets[i], flip=False)[None]))[0].cpu()
                for i in idx}

    latents, _ = split_work(list(range(len(items))), rank, world, encode, exchange)
    out = []
    for i, (it, b) in enumerate(zip(items, item_buckets, strict=True)):
        out.append(EvalSample(latents[i], it.caption, D.geometry(it, b), i))
    return out


@torch.no_grad()
def eval_loss(comps: Components, trained: Trained, text: Any, samples: list[EvalSample], seed: int,
              device: torch.device, weight_dtype: torch.dtype, training: Any, autocast: Any) -> float:
    """Mean loss over every sample x fixed timestep, every module in eval mode (no dropout), called
    through the plain modules. Identical inputs give identical results."""
    return mean_loss(sample_losses(comps, trained, text, samples, seed, device, weight_dtype, training, autocast))


def mean_loss(losses: list[float]) -> float:
    """The evaluation loss from every sample's loss, summed in sample order (so splitting the
    samples over ranks gives the same number as one process)."""
    return sum(losses) / max(1, len(losses))


@torch.no_grad()
def sample_losses(comps: Components, trained: Trained, text: Any, samples: list[EvalSample], seed: int,
                  device: torch.device, weight_dtype: torch.dtype, training: Any, autocast: Any) -> list[float]:
    """Each sample's loss (mean over the fixed timesteps); each is computed alone, so the value does
    not depend on which other samples a rank evaluates."""
    with trained.evaluating():
        return [_sample_loss(comps, trained.unet, text, smp, seed, device, weight_dtype, training, autocast)
                for smp in samples]


def eval_timesteps(training: Any, num_timesteps: int) -> list[int]:
    """The fixed timesteps: TIMESTEP_FRACTIONS of the range training draws from (the whole schedule
    unless training.min_timestep / max_timestep narrow it)."""
    low, high = timestep_range(training, num_timesteps)
    if (low, high) == (0, num_timesteps):
        return [int(f * num_timesteps) for f in TIMESTEP_FRACTIONS]
    return [low + int(f * (high - low)) for f in TIMESTEP_FRACTIONS]


def _sample_loss(comps: Components, unet: Any, text: Any, smp: EvalSample, seed: int, device: torch.device,
                 weight_dtype: torch.dtype, training: Any, autocast: Any) -> float:
    spec = comps.spec
    steps = torch.tensor(eval_timesteps(training, spec.num_timesteps(comps)), device=device)
    k = len(steps)
    lat = smp.latent.to(device)[None].expand(k, -1, -1, -1).contiguous()
    rng = np.random.default_rng([seed, 7919, smp.index])
    noise = torch.from_numpy(rng.standard_normal(lat.shape).astype(np.float32)).to(device)
    ctx, pooled = text([smp.caption] * k, device)
    added = spec.added_conditioning(comps, pooled, [smp.geometry] * k, device, weight_dtype)
    with autocast():
        loss = spec.loss(unet, comps, lat, ctx, added, noise, steps, training, weight_dtype)
    return float(loss.mean())
