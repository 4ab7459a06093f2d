"""Which Setup fields each model family reads, and so which the form shows (pure: no Gradio, no torch).

The form shows the fields of the family that will train: `model.family` when it names one, else the
family detected from the base model (backend.model_family.detect_family, torch-free); when that
cannot be told (a .ckpt, a missing path), every field. A hidden field keeps its value and still goes
into the config, so switching families back and forth loses nothing, and a hidden field at its
default is valid for every family.

A flow-matching family (SD3, Flux.1) refuses a few of the settings it does not read when they hold
anything but their "off" value (a DDPM option such as min_snr_gamma, v-prediction): such a
field stays shown while it holds a refused value, and Validate and Start name it
(`family_problems`), so a value typed for SD 1.x never stops a Flux.1 run unseen. The facts mirror
the trainer's (backend/trainer/families: flow_matching.flow_refusals and each family's check(), what
backend/trainer/flow.py reads); tests/test_gui_family.py holds them against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from backend.config import TrainingConfig
from backend.model_family import FAMILY_NAMES, ModelReadError, detect_family
from gui.form import parse_value
from gui.schema import FieldSpec, field_specs

DDPM = ("sd15", "sd2", "sdxl")  # UNet, DDPM noise schedule, CLIP text encoders
FLOW = ("sd3", "flux")  # transformer, flow matching, CLIP + T5
FAMILIES = DDPM + FLOW

# config path -> the families that read it; a path not listed is read by every family.
READ_BY: dict[str, tuple[str, ...]] = {
    # the parts of a single-file flow model (backend/config.py ModelConfig)
    "model.clip_l": FLOW, "model.t5xxl": FLOW, "model.vae": FLOW, "model.clip_g": ("sd3",),
    "model.v_parameterization": DDPM,
    "training.blocks_to_swap": FLOW,  # the transformer's blocks
    # text: SDXL takes the penultimate layer whatever clip_skip says, Flux.1 only CLIP-L's pooled output;
    # the flow families read 77 CLIP tokens and t5xxl_max_token_length T5 tokens (their text_warnings)
    "training.clip_skip": ("sd15", "sd2", "sd3"),
    "training.max_token_length": DDPM,
    "training.t5xxl_max_token_length": FLOW,
    # the DDPM noise schedule's options (flow_matching.DDPM_ONLY, refused by the flow families) and the two that
    # only qualify them (no effect while noise_offset / multires_noise_iterations is off)
    "training.noise_offset": DDPM, "training.noise_offset_random_strength": DDPM,
    "training.adaptive_noise_scale": DDPM, "training.multires_noise_iterations": DDPM,
    "training.multires_noise_discount": DDPM, "training.min_snr_gamma": DDPM, "training.zero_terminal_snr": DDPM,
    "training.debiased_estimation_loss": DDPM, "training.scale_v_pred_loss_like_noise_pred": DDPM,
    "training.v_pred_like_loss": DDPM,
    # the timestep range: the DDPM draw and SD3's (flow.sd3_timestep); Flux.1's draw has none
    "training.min_timestep": (*DDPM, "sd3"), "training.max_timestep": (*DDPM, "sd3"),
    # flow matching (flow.sd3_timestep, flow.flux_timestep, flow.prediction_and_target)
    "training.timestep_sampling": ("flux",), "training.sigmoid_scale": ("flux",),
    "training.discrete_flow_shift": ("flux",), "training.training_shift": ("sd3",),
    "training.weighting_scheme": FLOW, "training.logit_mean": FLOW, "training.logit_std": FLOW,
    "training.mode_scale": FLOW, "training.model_prediction_type": ("flux",), "training.guidance_scale": ("flux",),
    # the flow families start from no LoRA file (yet)
    "network.network_weights": DDPM,
    # a flow family samples with its own scheduler (families' sampler())
    "sampling.sample_sampler": DDPM,
}

# Among the fields a flow family does not read, those it refuses unless they hold one of these values.
FLOW_ACCEPTS: dict[str, tuple[Any, ...]] = {
    "training.noise_offset": (0.0,), "training.adaptive_noise_scale": (None,),
    "training.multires_noise_iterations": (0,), "training.min_snr_gamma": (None,),
    "training.zero_terminal_snr": (False,), "training.debiased_estimation_loss": (False,),
    "training.scale_v_pred_loss_like_noise_pred": (False,), "training.v_pred_like_loss": (None,),
    "model.v_parameterization": (None, False), "network.network_weights": (None,),
    "training.min_timestep": (None,), "training.max_timestep": (None,),  # Flux.1 (SD3 reads them)
}
DDPM_OPTION = "a DDPM-schedule option; {label} trains by flow matching, where it has no meaning: clear it"
FLOW_REASONS = {
    "model.v_parameterization": "{label} is trained by flow matching: leave it empty",
    "network.network_weights": "starting a {label} run from a LoRA file is not built yet: clear it",
    "training.min_timestep": "{label}'s noise levels come from training.timestep_sampling, which does not read a "
    "timestep range: clear it",
    "training.max_timestep": "{label}'s noise levels come from training.timestep_sampling, which does not read a "
    "timestep range: clear it",
}


def training_family(family: str, model_path: Any) -> str | None:
    """The family that will train: `family` when it names one, else (auto) the one detected from the
    base model at `model_path`; None when that cannot be told without torch."""
    family = str(family or "auto").strip()
    if family in FAMILIES:
        return family
    path = str(model_path or "").strip()
    if not path:
        return None
    try:
        found = detect_family(Path(path).expanduser())
    except (ModelReadError, OSError, ValueError):  # unreadable, or not a path at all (a NUL byte)
        return None
    return found if found in FAMILIES else None


def reads(family: str | None, path: str) -> bool:
    """Whether `family` reads the setting at config `path` (an unknown family reads everything)."""
    return family is None or family in READ_BY.get(path, FAMILIES)


def refused(family: str | None, path: str, value: Any) -> bool:
    """Whether `family` refuses `value` (a config value) in a setting it does not read."""
    accepts = FLOW_ACCEPTS.get(path) if family in FLOW else None
    return accepts is not None and not reads(family, path) and value not in accepts


@cache
def family_specs() -> tuple[FieldSpec, ...]:
    """The form fields whose showing depends on the family."""
    return tuple(s for s in field_specs() if s.path in READ_BY)


def shown(spec: FieldSpec, family: str | None, value: Any) -> bool:
    """Whether the form shows `spec` holding form `value` for `family`: when the family reads it, or
    while it holds a value the family refuses (or one that does not parse), so it can be fixed."""
    if reads(family, spec.path):
        return True
    try:
        parsed = parse_value(spec, value)
    except ValueError:
        return True
    return refused(family, spec.path, parsed)


def visibility(values: Mapping[str, Any]) -> dict[str, bool]:
    """{form key: shown} for every family-dependent field of the form `values`."""
    family = training_family(values.get("model.family", "auto"), values.get("model.pretrained_model"))
    return {s.key: shown(s, family, values.get(s.key, s.default)) for s in family_specs()}


def _config_value(cfg: TrainingConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def family_problems(cfg: TrainingConfig) -> list[str]:
    """`path: message` lines for the settings the family that will train refuses (the flow families'
    trainer refuses the same at setup; these are found before anything starts)."""
    family = training_family(cfg.model.family, cfg.model.pretrained_model)
    if family not in FLOW:
        return []
    label = FAMILY_NAMES[family]
    out = [f"{path}: {FLOW_REASONS.get(path, DDPM_OPTION).format(label=label)}" for path in FLOW_ACCEPTS
           if refused(family, path, _config_value(cfg, path))]
    t = cfg.training
    if t.loss_type in ("huber", "smooth_l1") and t.huber_schedule != "constant":
        out.append(f"training.huber_schedule: {t.huber_schedule} reads a DDPM noise schedule; with {label} use constant")
    if cfg.network.type != "lora":
        out.append(f"network.type: {cfg.network.type} is not trained for {label} yet: use lora")
    return out
