"""Optimizers (AdamW, AdamW8bit, Prodigy, DAdaptAdam, DAdaptLion, Lion, Adafactor, SGD) and
learning-rate schedules."""

from __future__ import annotations

from typing import Any

import torch

from backend.config import TrainingConfig


class OptimizerUnavailable(Exception):
    pass


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def param_groups(cfg: TrainingConfig, unet_params: list, te_params: list,
                 up: set[int] | frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """One group per trained part at its learning rate; with LoRA+ (sd-scripts' loraplus_*_lr_ratio,
    networks/lora.py `assemble_params`) the part's up-projections (`up`: their ids) get a second
    group at the learning rate times the ratio."""
    opt = cfg.optimizer
    groups = []
    for role, params, lr in (("unet", unet_params, opt.unet_lr or opt.learning_rate),
                             ("text_encoder", te_params, opt.text_encoder_lr or opt.learning_rate)):
        ratio = opt.loraplus_ratio(role)
        plain = [p for p in params if ratio is None or id(p) not in up]
        plus = [p for p in params if ratio is not None and id(p) in up]
        if plain:
            groups.append({"params": plain, "lr": lr, "name": role})
        if plus:
            groups.append({"params": plus, "lr": lr * ratio, "name": f"{role}_plus"})
    return groups


def build_optimizer(cfg: TrainingConfig, groups: list[dict[str, Any]], device_type: str) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.type == "AdamW":
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=o.learning_rate, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=fused)
    if o.type == "AdamW8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise OptimizerUnavailable(
                "optimizer.type: AdamW8bit needs the bitsandbytes package and a CUDA GPU; it is not installed "
                "here. Use AdamW, or `pip install bitsandbytes` on a GPU machine."
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=o.learning_rate, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.type == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(
            groups,
            lr=o.learning_rate,
            betas=o.betas,
            beta3=o.beta3,
            eps=o.eps,
            weight_decay=o.weight_decay,
            decouple=o.decouple,
            use_bias_correction=o.use_bias_correction,
            safeguard_warmup=o.safeguard_warmup,
            d0=o.d0,
            d_coef=o.d_coef,
            growth_rate=o.growth_rate if o.growth_rate is not None else float("inf"),
        )
    if o.type == "DAdaptAdam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(groups, lr=o.learning_rate, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                          decouple=o.decouple, use_bias_correction=o.use_bias_correction, d0=o.d0,
                          growth_rate=o.growth_rate if o.growth_rate is not None else float("inf"))
    if o.type == "DAdaptLion":
        from dadaptation import DAdaptLion

        return DAdaptLion(groups, lr=o.learning_rate, betas=o.betas, weight_decay=o.weight_decay, d0=o.d0)
    if o.type == "Lion":
        return Lion(groups, lr=o.learning_rate, betas=o.betas, weight_decay=o.weight_decay)
    if o.type == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=None if o.relative_step else o.learning_rate,
            weight_decay=o.weight_decay,
            relative_step=o.relative_step,
            scale_parameter=o.scale_parameter,
            warmup_init=o.warmup_init,
        )
    if o.type == "SGD":
        return torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    raise OptimizerUnavailable(f"optimizer.type: unknown optimizer {o.type!r}")


def build_scheduler(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    s = cfg.scheduler
    return get_scheduler(
        s.type,
        optimizer,
        num_warmup_steps=s.warmup_for(total_steps),
        num_training_steps=total_steps,
        num_cycles=s.num_cycles,
        power=s.power,
    )


def prodigy_d(optimizer: torch.optim.Optimizer) -> float | None:
    """Prodigy's or D-Adaptation's current step-size estimate d (None for other optimizers)."""
    g = optimizer.param_groups[0]
    return float(g["d"]) if "d" in g and ("d_coef" in g or "d0" in g) else None
