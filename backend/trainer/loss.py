"""The diffusion training loss: noise, timesteps, prediction target, Min-SNR weighting."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch
import torch.nn.functional as F

from backend.config import TrainingSection

NOISE, DROPOUT = 0, 1  # what a derived seed is for


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers: a cryptographic hash, so distinct tuples
    never share a seed in practice (a linear formula collides, e.g. micro 1 / rank 0 and micro 0 / rank 31)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}Q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, epoch: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of one sample's noise and timestep: a pure function of (seed, epoch, the sample's
    position in the epoch), never of the rank or the micro-batch it landed in."""
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(mix_seed(seed, NOISE, epoch, index))
    return gen


def seed_micro_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed the global RNG (CPU and every GPU) for one micro-step: what draws from it inside the
    forward pass (network dropout) is then a pure function of the position too, whatever ran
    before (a data loader, an evaluation, a resume). Dropout masks are drawn per micro-batch tensor,
    so they (alone) depend on the layout: with network dropout, two layouts of one global batch are
    statistically the same training, not the same numbers."""
    torch.manual_seed(mix_seed(seed, DROPOUT, step, micro, rank))


def draw_noise(latents: torch.Tensor, gens: list[torch.Generator], noise_offset: float,
               num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and a timestep for each sample of a batch, each from its own generator (`sample_generator`)."""
    noises, steps = [], []
    shape = tuple(latents.shape[1:])
    for gen in gens:
        n = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
        if noise_offset > 0:
            n = n + noise_offset * torch.randn((shape[0], 1, 1), generator=gen, device=gen.device)
        noises.append(n)
        steps.append(torch.randint(0, num_timesteps, (1,), generator=gen, device=gen.device))
    return torch.stack(noises).to(latents.device), torch.cat(steps).to(latents.device)


def diffusion_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    context: torch.Tensor,
    added_cond: dict[str, torch.Tensor] | None,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    v_prediction: bool,
    ts: TrainingSection,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """The loss of each sample of the batch ([batch]): MSE over its latent, optionally Min-SNR weighted."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    pred = unet(
        noisy.to(weight_dtype), timesteps, encoder_hidden_states=context.to(weight_dtype), added_cond_kwargs=added_cond
    ).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if ts.min_snr_gamma is not None:
        ac = scheduler.alphas_cumprod.to(latents.device)[timesteps]
        snr = ac / (1 - ac)
        weight = torch.clamp(snr, max=ts.min_snr_gamma) / (snr + 1 if v_prediction else snr)
        loss = loss * weight
    return loss
