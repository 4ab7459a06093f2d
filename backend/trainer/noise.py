"""What each training sample is noised with: the noise, its timestep and (input perturbation) the
noise its noisy latent is made from, as sd-scripts draws them (library/train_util.py,
get_noise_noisy_latents_and_timesteps), but each sample from its own generator.

Every random number of a sample comes from that sample's generator (`loss.sample_generator`), in
this fixed order, so a sample's draws do not depend on the batch it landed in, the rank, or what
ran before (exact resume, the same run in every layout of a global batch):

  1. the noise, randn(latent shape)
  2. with noise_offset > 0: its random strength, rand(1), when noise_offset_random_strength; then
     the offset, randn(channels, 1, 1)
  3. with multires noise: the level sizes, rand(iterations); then one randn per level
  4. the timestep, randint(min_timestep, max_timestep)
  5. with ip_noise_gamma: its random strength, rand(1), when ip_noise_gamma_random_strength; then
     the perturbation, randn(latent shape)

With every option off this is exactly randn then randint: the draws of the runs before the options
existed. Where sd-scripts takes a figure over the whole batch (one random strength per batch, the
multires noise's standard deviation), Lathe takes it per sample, so it does not depend on the layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from backend.config import TrainingSection
from backend.trainer.loss import LossSettingError


def timestep_range(ts: TrainingSection, num_timesteps: int) -> tuple[int, int]:
    """[low, high) of the drawn timesteps: training.min_timestep / max_timestep, the whole schedule
    when empty (sd-scripts' get_noise_noisy_latents_and_timesteps: max_timestep is exclusive)."""
    low = 0 if ts.min_timestep is None else ts.min_timestep
    high = num_timesteps if ts.max_timestep is None else ts.max_timestep
    if high > num_timesteps:
        raise LossSettingError(f"training.max_timestep: {high} is beyond this model's noise schedule, which has "
                         f"{num_timesteps} timesteps; set it to at most {num_timesteps} or leave it empty")
    if low >= high:
        raise LossSettingError(f"training.min_timestep: must be below the largest timestep drawn ({low} >= {high})")
    return low, high


def offset_noise(noise: torch.Tensor, latent: torch.Tensor, gen: torch.Generator, ts: TrainingSection) -> torch.Tensor:
    """sd-scripts' apply_noise_offset (library/custom_train_functions.py) for one sample: a constant
    per channel, noise_offset * randn(C, 1, 1), added to the noise. With noise_offset_random_strength
    the strength is rand(1) * noise_offset; with adaptive_noise_scale it grows by that times the
    channel's absolute latent mean, clamped at 0 (a negative scale may lower it)."""
    strength: float | torch.Tensor = ts.noise_offset
    if ts.noise_offset_random_strength:
        strength = torch.rand(1, generator=gen, device=gen.device) * ts.noise_offset
    if ts.adaptive_noise_scale is not None:
        mean = latent.to(noise.device).float().mean(dim=(1, 2), keepdim=True).abs()
        strength = torch.clamp(strength + ts.adaptive_noise_scale * mean, min=0.0)
    return noise + strength * torch.randn((noise.shape[0], 1, 1), generator=gen, device=gen.device)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, ratios: list[float], discount: float) -> torch.Tensor:
    """sd-scripts' pyramid_noise_like (library/custom_train_functions.py) for one sample [C, H, W]:
    level i adds randn at the size divided by r**i (r = 2 + 2 * ratios[i], ratios drawn uniform in
    [0, 1)), upsampled bilinearly and weighted discount**i, stopping after a level 1 pixel wide; the
    sum is divided by its standard deviation (this sample's: sd-scripts takes the whole batch's)."""
    c, w, h = noise.shape  # as sd-scripts names them: w is the height, h the width
    for i, u in enumerate(ratios):
        r = u * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        level = torch.randn((1, c, wn, hn), generator=gen, device=gen.device)
        noise = noise + F.interpolate(level, size=(w, h), mode="bilinear")[0] * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def draw_noise(latents: torch.Tensor, gens: list[torch.Generator], ts: TrainingSection,
               num_timesteps: int, family: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(noise, timesteps, input noise) for a batch, each sample from its own generator in the order of
    the module docstring. The noise is the target's; the input noise (None unless ip_noise_gamma) is
    what the noisy latents are made from: the noise plus strength * randn, sd-scripts' input
    perturbation (arXiv 2301.11706)."""
    shape = tuple(latents.shape[1:])
    noises = []
    for i, gen in enumerate(gens):
        n = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
        if ts.noise_offset > 0:
            n = offset_noise(n, latents[i], gen, ts)
        noises.append(n)
    if ts.multires_noise_iterations:
        # Every sample's level sizes first, read back together: one host sync per batch on a GPU.
        draws = [torch.rand(ts.multires_noise_iterations, generator=gen, device=gen.device) for gen in gens]
        ratios = torch.stack(draws).tolist()
        noises = [pyramid_noise(n, gen, r, ts.multires_noise_discount) for n, gen, r in zip(noises, gens, ratios, strict=True)]
    drawn = family.draw_timestep(gens[0], ts, tuple(shape[-2:])) if family is not None and gens else None
    if drawn is not None:  # the family's own draw (flow matching): the first sample's is `drawn`
        steps = [drawn] + [family.draw_timestep(gen, ts, tuple(shape[-2:])) for gen in gens[1:]]
    else:
        low, high = timestep_range(ts, num_timesteps)
        steps = [torch.randint(low, high, (1,), generator=gen, device=gen.device) for gen in gens]
    inputs = None
    if ts.ip_noise_gamma:
        inputs = []
        for n, gen in zip(noises, gens, strict=True):
            strength: float | torch.Tensor = ts.ip_noise_gamma
            if ts.ip_noise_gamma_random_strength:
                strength = torch.rand(1, generator=gen, device=gen.device) * ts.ip_noise_gamma
            inputs.append(n + strength * torch.randn(shape, generator=gen, device=gen.device))
        inputs = torch.stack(inputs).to(latents.device)
    return torch.stack(noises).to(latents.device), torch.cat(steps).to(latents.device), inputs
