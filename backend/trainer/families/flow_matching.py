"""What the flow-matching families (SD3/SD3.5, Flux.1) share: the settings they refuse, the CLIP
length, and the parts of the family interface that are the same for both (added conditioning, the
1000-step timestep scale, the loss from a prediction, the sampling scheduler)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from backend.trainer import flow
from backend.trainer.families.base import Geometry, ModelFamily

if TYPE_CHECKING:
    from backend.config import TrainingConfig, TrainingSection
    from backend.trainer.models import Components

CLIP_LENGTH = 77
# DDPM-schedule options that have no meaning for flow matching: refused, never silently ignored.
DDPM_ONLY = {
    "min_snr_gamma": None, "zero_terminal_snr": False, "debiased_estimation_loss": False,
    "scale_v_pred_loss_like_noise_pred": False, "v_pred_like_loss": None, "noise_offset": 0.0,
    "adaptive_noise_scale": None, "multires_noise_iterations": 0,
}


def flow_refusals(cfg: TrainingConfig, family_label: str, extra: dict[str, Any] | None = None) -> list[str]:
    """The settings a flow-matching family cannot train with, as plain messages."""
    t = cfg.training
    out = [f"training.{name}: a DDPM-schedule option; {family_label} trains by flow matching, where it has no "
           f"meaning (sd-scripts ignores it there); clear it" for name, off in {**DDPM_ONLY, **(extra or {})}.items()
           if getattr(t, name) != off]
    if t.loss_type in ("huber", "smooth_l1") and t.huber_schedule != "constant":
        out.append(f"training.huber_schedule: {t.huber_schedule} reads a DDPM noise schedule; with {family_label} "
                   "use constant")
    if cfg.model.v_parameterization:
        out.append(f"model.v_parameterization: {family_label} is trained by flow matching; leave it empty")
    return out


class FlowMatchingFamily(ModelFamily):
    """The base of the flow-matching families: each adds its text encoding, timestep draw and model call."""

    def added_conditioning(self, comps: Components, pooled: torch.Tensor | None, geometry: list[Geometry],
                           device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        return {"pooled_projections": pooled.to(device, dtype)}

    def num_timesteps(self, comps: Components) -> int:
        return flow.NUM_TIMESTEPS

    def flow_loss(self, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                  sigmas: torch.Tensor, ts: TrainingSection) -> torch.Tensor:
        """Per-sample loss of the model's prediction, as sd-scripts compares and weights it for this family."""
        from backend.trainer.loss import element_loss, huber_constant

        pred, target, weight = flow.prediction_and_target(self.name, pred.float(), latents.float(), noise.float(),
                                                          noisy.float(), sigmas, ts)
        elem = element_loss(pred, target, ts, huber_constant(ts, latents))
        if weight is not None:
            elem = elem * weight.view(-1, *([1] * (elem.ndim - 1)))
        return elem.mean(dim=tuple(range(1, elem.ndim)))

    def sampler(self, comps: Components) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(comps.noise_scheduler.config)
