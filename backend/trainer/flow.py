"""Flow matching as sd-scripts trains SD3/SD3.5 and Flux.1: each sample's noise level, the noisy
input, the target and the loss weighting. Every draw comes from the sample's own generator
(`loss.sample_generator`), as for the DDPM families, so resume and layouts stay exact.

From sd-scripts (library/sd3_train_utils.py, library/flux_train_utils.py, sd3_train_network.py,
flux_train_network.py):

* SD3 (`get_noisy_model_input_and_timesteps`): u from `compute_density_for_timestep_sampling`
  (logit_normal: sigmoid(normal(logit_mean, logit_std)); mode: 1 - u - mode_scale (cos(pi u / 2)^2
  - 1 + u); otherwise uniform), shifted u' = u s / (1 + (s - 1) u) with s = training_shift, then
  t = floor(u' (t_max - t_min) + t_min) and sigma = t / 1000. The prediction is preconditioned,
  pred' = pred (-sigma) + x_t, the target is the latents, and the loss is weighted by
  `compute_loss_weighting_for_sd3` (sigma_sqrt: sigma^-2; cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2));
  otherwise 1).
* Flux.1 (`timestep_sampling`): uniform sigma = rand; sigmoid sigma = sigmoid(sigmoid_scale randn);
  shift: that, then sigma s / (1 + (s - 1) sigma) with s = discrete_flow_shift; flux_shift: that,
  then time_shift(mu, 1, sigma) = e^mu / (e^mu + (1 / sigma - 1)) with mu linear in the packed
  image size (0.5 at 256 tokens, 1.15 at 4096); sigma: u from the density above, t = the
  shifted schedule's timesteps[floor(u 1000)], sigma its sigma. The target is noise - latents, the
  prediction read by model_prediction_type (raw; additive: pred + x_t; sigma_scaled: pred (-sigma) +
  x_t with the SD3 weighting).

In both, x_t = (1 - sigma) latents + sigma noise (with ip_noise_gamma: sigma (noise + gamma xi)).
"""

from __future__ import annotations

import math

import torch

from backend.config import TrainingSection

NUM_TIMESTEPS = 1000


def density(gen: torch.Generator, ts: TrainingSection) -> torch.Tensor:
    """One draw of sd-scripts' compute_density_for_timestep_sampling, in [0, 1]: shape (1,)."""
    if ts.weighting_scheme == "logit_normal":
        z = torch.randn(1, generator=gen, device=gen.device) * ts.logit_std + ts.logit_mean
        return torch.sigmoid(z)
    u = torch.rand(1, generator=gen, device=gen.device)
    if ts.weighting_scheme == "mode":
        return 1 - u - ts.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sd-scripts' and diffusers' timestep shift: sigma s / (1 + (s - 1) sigma)."""
    return (sigma * shift) / (1 + (shift - 1) * sigma)


def flux_mu(image_tokens: int) -> float:
    """sd-scripts' get_lin_function(y1=0.5, y2=1.15) over (256, 4096) packed image tokens."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * image_tokens + (0.5 - slope * 256)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """sd-scripts' time_shift(mu, 1.0, t) = e^mu / (e^mu + (1 / t - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def sd3_timestep(gen: torch.Generator, ts: TrainingSection) -> torch.Tensor:
    """SD3's timestep in [t_min, t_max): shape (1,), float."""
    u = shifted(density(gen, ts), ts.training_shift)
    t_min = 0 if ts.min_timestep is None else ts.min_timestep
    t_max = NUM_TIMESTEPS if ts.max_timestep is None else ts.max_timestep
    return (u * (t_max - t_min) + t_min).long().float()


def flux_timestep(gen: torch.Generator, ts: TrainingSection, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Flux.1's timestep, sigma x 1000: shape (1,), float."""
    kind = ts.timestep_sampling
    if kind == "uniform":
        sigma = torch.rand(1, generator=gen, device=gen.device)
    elif kind == "sigma":
        u = density(gen, ts)
        index = min(int(u.item() * NUM_TIMESTEPS), NUM_TIMESTEPS - 1)
        # The shifted schedule of FlowMatchEulerDiscreteScheduler(1000, shift=discrete_flow_shift): its
        # timesteps run from 1000 down, timesteps[i] = 1000 * shifted(1 - i / 1000).
        sigma = shifted(torch.tensor([1.0 - index / NUM_TIMESTEPS], device=gen.device), ts.discrete_flow_shift)
    else:
        sigma = torch.sigmoid(ts.sigmoid_scale * torch.randn(1, generator=gen, device=gen.device))
        if kind == "shift":
            sigma = shifted(sigma, ts.discrete_flow_shift)
        elif kind == "flux_shift":
            sigma = time_shift(flux_mu((latent_hw[0] // 2) * (latent_hw[1] // 2)), sigma)
    return sigma * NUM_TIMESTEPS


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise


def loss_weighting(ts: TrainingSection, sigmas: torch.Tensor) -> torch.Tensor | None:
    """compute_loss_weighting_for_sd3 per sample, or None for a weight of 1."""
    if ts.weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if ts.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return None


def prediction_and_target(family: str, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                          noisy: torch.Tensor, sigmas: torch.Tensor,
                          ts: TrainingSection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(prediction, target, per-sample weight or None) as sd-scripts compares them."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    if family == "sd3":
        return pred * (-s) + noisy, latents, loss_weighting(ts, sigmas)
    weight = None
    if ts.model_prediction_type == "additive":
        pred = pred + noisy
    elif ts.model_prediction_type == "sigma_scaled":
        pred, weight = pred * (-s) + noisy, loss_weighting(ts, sigmas)
    return pred, noise - latents, weight
