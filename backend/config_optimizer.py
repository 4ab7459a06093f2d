"""The `optimizer` section of the training configuration: one model per optimizer type (AdamW, Prodigy,
D-Adaptation, Lion, Adafactor, SGD), told apart by `type`. Part of `backend.config`, which
re-exports every name here.

This module never imports torch: the GUI and the CLI load it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from backend.config_base import Section

Betas = tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]]


class OptimizerBase(Section):
    learning_rate: float = Field(1e-4, gt=0, le=10.0, description="Learning rate.")
    unet_lr: float | None = Field(None, gt=0, le=10.0, description="UNet learning rate. Empty: use learning_rate.")
    text_encoder_lr: float | None = Field(
        None, gt=0, le=10.0, description="Text-encoder learning rate. Empty: use learning_rate."
    )
    weight_decay: float = Field(0.01, ge=0.0, le=10.0, description="Weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm. Empty: no clipping.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, le=1000.0,
        description="LoRA+ (Hayou et al. 2024): the up-projections (lora_B) learn this many times faster than the "
        "down-projections (16 typical). lora, locon and dora networks. Empty: off.",
    )
    loraplus_unet_lr_ratio: float | None = Field(
        None, gt=0, le=1000.0, description="LoRA+ ratio for the UNet only. Empty: loraplus_lr_ratio.",
    )
    loraplus_text_encoder_lr_ratio: float | None = Field(
        None, gt=0, le=1000.0, description="LoRA+ ratio for the text encoder only. Empty: loraplus_lr_ratio.",
    )

    def loraplus_ratio(self, role: str) -> float | None:
        """The LoRA+ ratio of a role ('unet' or 'text_encoder'), as sd-scripts resolves it."""
        own = self.loraplus_unet_lr_ratio if role == "unet" else self.loraplus_text_encoder_lr_ratio
        return own if own is not None else self.loraplus_lr_ratio


LORAPLUS_FIELDS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
OPTIMIZER_HASH_NEUTRAL = dict.fromkeys(LORAPLUS_FIELDS)  # added after schema 1, see config_hash


class AdamWConfig(OptimizerBase):
    type: Literal["AdamW"] = "AdamW"
    betas: Betas = Field((0.9, 0.999), description="Adam betas (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, le=1.0, description="Adam epsilon.")


class AdamW8bitConfig(AdamWConfig):
    type: Literal["AdamW8bit"] = "AdamW8bit"  # type: ignore[assignment]


def _d0_field() -> Any:
    """The adaptive optimizers' initial step-size estimate (Prodigy, D-Adaptation)."""
    return Field(1e-6, gt=0, le=1.0, description="Initial step-size estimate. Rarely needs changing.")


def _dadapt_lr_field() -> Any:
    return Field(1.0, gt=0, le=10.0,
                 description="Keep at about 1.0: D-Adaptation estimates the step size itself (this scales it).")


class ProdigyConfig(OptimizerBase):
    type: Literal["Prodigy"] = "Prodigy"
    learning_rate: float = Field(
        1.0, gt=0, le=10.0, description="Keep at 1.0: Prodigy estimates the step size itself; tune d_coef instead."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Weight decay (decoupled when 'decouple' is on).")
    betas: Betas = Field((0.9, 0.999), description="Adam-style betas (beta1, beta2).")
    beta3: float | None = Field(
        None, ge=0.0, lt=1.0, description="Coefficient for Prodigy's step-size estimate. Empty: sqrt(beta2)."
    )
    eps: float = Field(1e-8, gt=0, le=1.0, description="Epsilon.")
    d_coef: float = Field(
        1.0,
        gt=0,
        le=100.0,
        description="Scales Prodigy's adaptive learning-rate estimate: above 1 is more aggressive, below 1 more conservative.",
    )
    d0: float = _d0_field()
    growth_rate: float | None = Field(
        None, gt=1.0, description="Limit on how fast the estimate may grow per step (e.g. 1.02). Empty: no limit."
    )
    use_bias_correction: bool = Field(False, description="Adam-style bias correction. Off by default, as in prodigyopt and sd-scripts; many diffusion-LoRA "
        "recipes turn it on.")
    safeguard_warmup: bool = Field(False, description="Keep the step-size estimate from growing too fast during warmup. Off by default, as in prodigyopt; "
        "turn it on with scheduler.warmup_steps > 0 (a warning says so).")
    decouple: bool = Field(True, description="AdamW-style decoupled weight decay.")


class DAdaptAdamConfig(OptimizerBase):
    """D-Adaptation Adam (Defazio & Mishchenko 2023, the `dadaptation` package sd-scripts uses)."""

    type: Literal["DAdaptAdam"] = "DAdaptAdam"
    learning_rate: float = _dadapt_lr_field()
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Weight decay (decoupled when 'decouple' is on).")
    betas: Betas = Field((0.9, 0.999), description="Adam betas (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, le=1.0, description="Epsilon.")
    d0: float = _d0_field()
    growth_rate: float | None = Field(
        None, gt=1.0, description="Limit on how fast the estimate may grow per step (e.g. 1.02). Empty: no limit."
    )
    use_bias_correction: bool = Field(False, description="Adam-style bias correction (off in dadaptation).")
    decouple: bool = Field(False, description="AdamW-style decoupled weight decay (off in dadaptation; kohya "
                           "presets often turn it on).")


class DAdaptLionConfig(OptimizerBase):
    """D-Adaptation Lion (the `dadaptation` package)."""

    type: Literal["DAdaptLion"] = "DAdaptLion"
    learning_rate: float = _dadapt_lr_field()
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Weight decay.")
    betas: Betas = Field((0.9, 0.99), description="Lion betas.")
    d0: float = _d0_field()


class LionConfig(OptimizerBase):
    type: Literal["Lion"] = "Lion"
    learning_rate: float = Field(3e-5, gt=0, le=10.0, description="Learning rate (Lion wants 3-10x smaller than AdamW).")
    betas: Betas = Field((0.9, 0.99), description="Lion betas.")


class AdafactorConfig(OptimizerBase):
    type: Literal["Adafactor"] = "Adafactor"
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Weight decay.")
    relative_step: bool = Field(False, description="Let Adafactor choose its own step size (then learning_rate is ignored).")
    scale_parameter: bool = Field(False, description="Scale the step by the parameter's RMS.")
    warmup_init: bool = Field(False, description="Warm-up initialisation (only with relative_step).")


class SGDConfig(OptimizerBase):
    type: Literal["SGD"] = "SGD"
    learning_rate: float = Field(1e-2, gt=0, le=10.0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum.")


ADAPTIVE_OPTIMIZERS = ("Prodigy", "DAdaptAdam", "DAdaptLion")  # they estimate the step size: one learning rate
OptimizerConfig = Annotated[
    AdamWConfig | AdamW8bitConfig | ProdigyConfig | DAdaptAdamConfig | DAdaptLionConfig | LionConfig | AdafactorConfig
    | SGDConfig,
    Field(discriminator="type"),
]


