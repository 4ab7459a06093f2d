"""The `scheduler` and `training` sections of the training configuration: the learning-rate schedule;
the length of a run, its batch and precision, and the noise, timestep and loss settings (sd-scripts'
names) with the rules between them. Part of `backend.config`, which re-exports every name here.

This module never imports torch: the GUI and the CLI load it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from backend.config_base import Section


# ----------------------------------------------------------------------------------------- scheduler
class SchedulerConfig(Section):
    type: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"] = Field(
        "constant", description="Learning-rate schedule."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0.")
    lr_warmup: float | None = Field(
        None, gt=0, lt=100, description="Warmup as a percentage of all optimizer steps (kohya_ss's lr_warmup), "
        "instead of warmup_steps. Empty: warmup_steps.",
    )
    num_cycles: int = Field(1, ge=1, le=1000, description="Restarts for cosine_with_restarts.")
    power: float = Field(1.0, gt=0, le=10.0, description="Power of the polynomial schedule.")

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        if self.type == "constant" and (self.warmup_steps > 0 or self.lr_warmup is not None):
            which = f"warmup_steps: the constant schedule has no warmup (got {self.warmup_steps}" if self.warmup_steps \
                else f"lr_warmup: the constant schedule has no warmup (got {self.lr_warmup}%"
            raise ValueError(f"{which}); choose constant_with_warmup, or clear the warmup")
        if self.warmup_steps > 0 and self.lr_warmup is not None:
            raise ValueError(f"lr_warmup: set either warmup_steps ({self.warmup_steps}) or lr_warmup "
                             f"({self.lr_warmup}%), not both")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """The warmup in optimizer steps: warmup_steps, or lr_warmup percent of all steps (rounded)."""
        return self.warmup_steps if self.lr_warmup is None else round(self.lr_warmup * total_steps / 100)

    @property
    def has_warmup(self) -> bool:
        return self.warmup_steps > 0 or self.lr_warmup is not None


# ------------------------------------------------------------------------------------------ training
class TrainingSection(Section):
    max_train_epochs: int | None = Field(10, ge=1, le=100_000, description="Train for this many epochs (or set max_train_steps).")
    max_train_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Train for this many optimizer steps (or set max_train_epochs)."
    )
    train_batch_size: int = Field(1, ge=1, le=1024, description="Images per batch on each process.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed: same seed, same data order, same run.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Mixed precision on GPU. CPU runs always compute in fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade speed for memory: recompute activations in backward.")
    blocks_to_swap: int = Field(
        0, ge=0, le=200,
        description="SD3/Flux.1 on a GPU: keep this many transformer blocks' frozen weights in CPU memory, each copied "
        "in just before it runs (forward and backward): less GPU memory, slower steps. 0: off.",
    )
    torch_compile: bool = Field(
        False, description="Compile the UNet with torch.compile (faster steps on a GPU after a slow first step)."
    )
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Noise offset (helps very dark/bright images). 0.05-0.1 typical.")
    min_snr_gamma: float | None = Field(
        None, gt=0, le=100.0, description="Min-SNR loss weighting gamma (5 is typical). Empty: off."
    )
    clip_skip: int = Field(
        1, ge=1, le=12,
        description="Use the output of the n-th last text-encoder layer (2 for anime models). SDXL ignores it "
        "and always uses the penultimate layer, as sd-scripts does.",
    )
    max_token_length: Literal[75, 150, 225] = Field(
        75,
        description="Caption and prompt length in tokens: 75 (CLIP's own), or 150/225, encoded in chunks of 75 as "
        "sd-scripts does. Longer text is cut.",
    )
    # Noise, timesteps and loss as sd-scripts has them (its names; see docs/training.md).
    noise_offset_random_strength: bool = Field(
        False, description="Draw each image's noise offset strength uniformly between 0 and noise_offset."
    )
    adaptive_noise_scale: float | None = Field(
        None, ge=-1.0, le=1.0,
        description="Add this times each latent channel's absolute mean to noise_offset (needs noise_offset; "
        "0.00375 typical, negative lowers it). Empty: off.",
    )
    multires_noise_iterations: int = Field(
        0, ge=0, le=64, description="Multi-resolution (pyramid) noise with this many levels (6-10 typical). 0: off."
    )
    multires_noise_discount: float = Field(
        0.3, ge=0.0, le=1.0, description="Multires noise: level i is weighted discount^i (0.3 default, 0.8 strong)."
    )
    ip_noise_gamma: float | None = Field(
        None, gt=0, le=1.0,
        description="Input-perturbation noise: the noisy latents get extra noise of this strength, the target "
        "stays the plain noise (0.1 typical). Empty: off.",
    )
    ip_noise_gamma_random_strength: bool = Field(
        False, description="Draw each image's input-perturbation strength uniformly between 0 and ip_noise_gamma."
    )
    min_timestep: int | None = Field(
        None, ge=0, le=999, description="Smallest timestep trained (0-999). Empty: 0."
    )
    max_timestep: int | None = Field(
        None, ge=1, le=1000, description="Timesteps trained are below this (1-1000). Empty: the whole schedule (1000)."
    )
    zero_terminal_snr: bool = Field(
        False,
        description="Rescale the noise schedule to zero terminal SNR (pure noise at the last timestep); meant for "
        "v-prediction. Training, evaluation and samples use the rescaled schedule.",
    )
    loss_type: Literal["l2", "huber", "smooth_l1", "l1"] = Field(
        "l2", description="Loss function: l2 (mean squared error), huber, smooth_l1 or l1."
    )
    huber_c: float = Field(
        0.1, gt=0, le=1.0, description="Huber loss threshold c (huber and smooth_l1; the schedule may vary it by timestep)."
    )
    huber_scale: float = Field(
        1.0, gt=0, le=10.0, description="Scales c in the exponential and constant Huber schedules."
    )
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr", description="How c varies with the timestep: snr (by the noise level), exponential, or constant."
    )
    debiased_estimation_loss: bool = Field(
        False, description="Weight each timestep's loss by 1/sqrt(SNR) (1/(SNR+1) with v-prediction): debiased estimation."
    )
    scale_v_pred_loss_like_noise_pred: bool = Field(
        False, description="v-prediction models: scale the loss by SNR/(SNR+1), like a noise-prediction loss."
    )
    v_pred_like_loss: float | None = Field(
        None, gt=0, le=10.0,
        description="Noise-prediction models: add this times a v-prediction-like loss (loss * (SNR+1)/SNR). Empty: off.",
    )
    prior_loss_weight: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Loss weight of regularization images (dataset.reg_data_dir, subsets with is_reg) against the "
        "training images' 1.0, as in sd-scripts.",
    )
    scale_weight_norms: float | None = Field(
        None, gt=0, le=100.0,
        description="Max-norm regularization: after each step, scale down every module whose update's norm is above "
        "this (1 typical). Empty: off.",
    )

    # Flow-matching families (SD3/SD3.5, Flux.1): sd-scripts' names and choices (docs/families.md).
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"] = Field(
        "sigma",
        description="Flow models: how each sample's noise level is drawn. sigma: from weighting_scheme's density "
        "(SD3's way); uniform; sigmoid (sigmoid of sigmoid_scale x a normal draw); shift (that, then "
        "discrete_flow_shift); flux_shift (that, shifted by the image size as Flux.1 samples).",
    )
    sigmoid_scale: float = Field(1.0, gt=0, le=100.0, description="Flow models: the scale of the sigmoid timestep draws.")
    discrete_flow_shift: float = Field(
        3.0, gt=0, le=100.0, description="Flow models, timestep_sampling shift: values above 1 train noisier steps more."
    )
    training_shift: float = Field(
        1.0, gt=0, le=100.0,
        description="Flow models, timestep_sampling sigma: shift the drawn noise levels (sd-scripts' SD3 training_shift).",
    )
    weighting_scheme: Literal["uniform", "none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = Field(
        "uniform",
        description="Flow models: the density noise levels are drawn from (logit_normal, mode, uniform) or the loss "
        "weighting (sigma_sqrt, cosmap), as in the SD3 paper and sd-scripts.",
    )
    logit_mean: float = Field(0.0, ge=-10.0, le=10.0, description="Flow models, logit_normal: the mean.")
    logit_std: float = Field(1.0, gt=0, le=10.0, description="Flow models, logit_normal: the standard deviation.")
    mode_scale: float = Field(1.29, ge=0.0, le=10.0, description="Flow models, mode weighting: its scale.")
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = Field(
        "raw",
        description="Flux.1: how the model's output is read: raw (the velocity, noise - latents), additive, or "
        "sigma_scaled (sd-scripts' default, see docs/families.md). SD3 always preconditions as sd-scripts does.",
    )
    guidance_scale: float = Field(
        3.5, ge=0.0, le=100.0, description="Flux.1 dev: the guidance value the model is conditioned on in training.",
    )
    t5xxl_max_token_length: int | None = Field(
        None, ge=16, le=512,
        description="Flow models: T5 tokens per caption. Empty: the family's (SD3 256; Flux.1 dev 512, schnell 256).",
    )

    @field_validator("max_token_length", mode="before")
    @classmethod
    def _token_count(cls, v: Any) -> Any:
        """kohya_ss and the GUI's choice give the length as text ("225")."""
        return int(v) if isinstance(v, str) and v.strip().isdigit() else v

    @model_validator(mode="after")
    def _check(self) -> TrainingSection:
        if (self.max_train_epochs is None) == (self.max_train_steps is None):
            which = "both are set" if self.max_train_epochs is not None else "neither is set"
            raise ValueError(
                f"max_train_epochs: set exactly one of max_train_epochs or max_train_steps ({which}; clear one)"
            )
        if self.adaptive_noise_scale is not None and self.noise_offset == 0:
            raise ValueError("adaptive_noise_scale: needs noise_offset above 0 (it is added to the noise offset, as in "
                             "sd-scripts); set noise_offset or clear adaptive_noise_scale")
        low = 0 if self.min_timestep is None else self.min_timestep
        high = 1000 if self.max_timestep is None else self.max_timestep
        if low >= high:
            raise ValueError(f"min_timestep: must be below max_timestep ({low} >= {high}"
                             f"{'' if self.max_timestep is not None else ', the whole schedule when max_timestep is empty'})")
        return self


# The noise/timestep/loss options came after schema 1: at their defaults they leave config_hash alone.
NOISE_AND_LOSS_FIELDS = (
    "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount",
    "ip_noise_gamma", "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "zero_terminal_snr",
    "loss_type", "huber_c", "huber_scale", "huber_schedule", "debiased_estimation_loss",
    "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "scale_weight_norms", "prior_loss_weight",
    "max_token_length", "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "training_shift",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "model_prediction_type", "guidance_scale",
    "t5xxl_max_token_length",
)
FLOW_FIELDS = NOISE_AND_LOSS_FIELDS[-11:]  # only the flow-matching families read these


def noise_and_loss_warnings(t: TrainingSection, v_pred: bool | None) -> list[str]:
    """Noise and loss settings that do nothing in combination with the others."""
    out = []
    defaults = TrainingSection.model_fields
    if t.loss_type not in ("huber", "smooth_l1"):
        for name in ("huber_c", "huber_scale", "huber_schedule"):
            if getattr(t, name) != defaults[name].default:
                out.append(f"training.{name}: only used with loss_type huber or smooth_l1 (loss_type is {t.loss_type})")
    if t.noise_offset_random_strength and t.noise_offset == 0:
        out.append("training.noise_offset_random_strength: has no effect while noise_offset is 0")
    if t.ip_noise_gamma_random_strength and t.ip_noise_gamma is None:
        out.append("training.ip_noise_gamma_random_strength: has no effect while ip_noise_gamma is empty")
    if t.multires_noise_iterations == 0 and t.multires_noise_discount != defaults["multires_noise_discount"].default:
        out.append("training.multires_noise_discount: has no effect while multires_noise_iterations is 0")
    if t.zero_terminal_snr and v_pred is False:
        out.append("training.zero_terminal_snr: meant for v-prediction; with noise prediction the last timestep "
                   "teaches nothing (sd-scripts warns the same)")
    return out
