"""The diffusion training loss: the generators of each sample's draws, the prediction target, the
loss function (sd-scripts' loss_type) and the per-timestep weights (Min-SNR, debiased estimation,
the v-prediction scalings). The noise itself is drawn in backend.trainer.noise."""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import torch
import torch.nn.functional as F

from backend.config import TrainingSection

NOISE, DROPOUT = 0, 1  # what a derived seed is for
SNR_CAP = 1000.0  # sd-scripts caps the SNR here in its debiased and v-prediction weights (t = 0 is nearly inf)


class LossSettingError(Exception):
    """A loss setting that does not fit the model (its message names the setting)."""


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


def check_loss_settings(ts: TrainingSection, v_prediction: bool) -> None:
    """The settings sd-scripts refuses for the model's prediction type (train_util.verify_training_args),
    checked once the model has said which it is."""
    if ts.scale_v_pred_loss_like_noise_pred and not v_prediction:
        raise LossSettingError("training.scale_v_pred_loss_like_noise_pred: only for v-prediction models, and this "
                               "model predicts noise (epsilon); turn it off, or set model.v_parameterization if the "
                               "model is a v-prediction one")
    if ts.v_pred_like_loss is not None and v_prediction:
        raise LossSettingError("training.v_pred_like_loss: only for noise-prediction (epsilon) models, and this model "
                               "is trained with v-prediction; clear it")


# --------------------------------------------------------------------------------------- timesteps
def snr_alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """The alphas_cumprod that the SNR weights read. With training.zero_terminal_snr that is the
    schedule before the rescale, as in sd-scripts: prepare_scheduler_for_custom_training stores
    all_snr before fix_noise_scheduler_betas_for_zero_terminal_snr changes the betas (so the last
    timestep's SNR is not 0, which would divide by zero)."""
    return getattr(scheduler, "snr_alphas_cumprod", scheduler.alphas_cumprod)


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """sd-scripts' all_snr at the timesteps: (sqrt(a) / sqrt(1 - a))**2, a = alphas_cumprod
    (custom_train_functions.prepare_scheduler_for_custom_training)."""
    ac = snr_alphas_cumprod(scheduler).to(timesteps.device)[timesteps]
    return (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2


def huber_threshold(ts: TrainingSection, timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """Each sample's Huber c (sd-scripts' train_util.get_huber_threshold_if_needed):
    exponential exp(-alpha t) * huber_scale with alpha = -ln(huber_c) / T; snr (1 - huber_c) /
    (1 + sigma)**2 + huber_c with sigma = sqrt((1 - a) / a) of the noise schedule (huber_scale not
    applied, as in sd-scripts); constant huber_c * huber_scale."""
    if ts.huber_schedule == "exponential":
        alpha = -math.log(ts.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * ts.huber_scale
    if ts.huber_schedule == "snr":
        ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - ts.huber_c) / (1 + sigmas) ** 2 + ts.huber_c
    return torch.full((timesteps.shape[0],), ts.huber_c * ts.huber_scale, device=timesteps.device)


def huber_constant(ts: TrainingSection, latents: torch.Tensor) -> torch.Tensor | None:
    """Each sample's Huber c with the constant schedule (huber_c * huber_scale), or None for l2/l1."""
    if ts.loss_type not in ("huber", "smooth_l1"):
        return None
    return torch.full((latents.shape[0],), ts.huber_c * ts.huber_scale, device=latents.device)


def element_loss(pred: torch.Tensor, target: torch.Tensor, ts: TrainingSection, huber_c: torch.Tensor | None) -> torch.Tensor:
    """The loss per latent element (sd-scripts' train_util.conditional_loss, reduction none): l2
    (pred - target)**2; l1 |pred - target|; huber 2c(sqrt((pred - target)**2 + c**2) - c);
    smooth_l1 2(sqrt((pred - target)**2 + c**2) - c)."""
    if ts.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if ts.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if ts.loss_type == "huber" else 2 * root


def timestep_weights(loss: torch.Tensor, ts: TrainingSection, scheduler: Any, timesteps: torch.Tensor,
                     v_prediction: bool) -> torch.Tensor:
    """sd-scripts' train_network.post_process_loss, in its order, on the per-sample loss:
    apply_snr_weight, scale_v_prediction_loss_like_noise_prediction, add_v_prediction_like_loss,
    apply_debiased_estimation (library/custom_train_functions.py)."""
    if ts.min_snr_gamma is not None:
        ac = snr_alphas_cumprod(scheduler).to(loss.device)[timesteps]
        s = ac / (1 - ac)
        loss = loss * (torch.clamp(s, max=ts.min_snr_gamma) / (s + 1 if v_prediction else s))
    if not (ts.scale_v_pred_loss_like_noise_pred or ts.v_pred_like_loss or ts.debiased_estimation_loss):
        return loss
    capped = torch.clamp(snr(scheduler, timesteps.to(loss.device)), max=SNR_CAP)
    scale = capped / (capped + 1)  # get_snr_scale
    if ts.scale_v_pred_loss_like_noise_pred:
        loss = loss * scale
    if ts.v_pred_like_loss:
        loss = loss + loss / scale * ts.v_pred_like_loss
    if ts.debiased_estimation_loss:
        loss = loss * (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped))
    return loss


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
    input_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each sample of the batch ([batch]): the loss_type's mean over its latent, then the
    timestep weights. The noisy latents are made from `input_noise` when given (input perturbation),
    the target from `noise`, as in sd-scripts."""
    noisy = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    pred = unet(
        noisy.to(weight_dtype), timesteps, encoder_hidden_states=context.to(weight_dtype), added_cond_kwargs=added_cond
    ).sample
    huber_c = huber_threshold(ts, timesteps, scheduler) if ts.loss_type in ("huber", "smooth_l1") else None
    loss = element_loss(pred.float(), target.float(), ts, huber_c).mean(dim=(1, 2, 3))
    return timestep_weights(loss, ts, scheduler, timesteps, v_prediction)
