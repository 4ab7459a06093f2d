"""The Flux.1 and SD3/SD3.5 topic of the kohya_ss import: flux1_checkbox / sd3_checkbox -> model.family,
the separate model files, the flow-matching settings, and what those families do not carry.

kohya_ss (kohya_gui/lora_gui.py) saves every family's fields in every config and passes each to
sd-scripts only for its family: with flux1_checkbox `ae`, `clip_l`, `t5xxl`, `timestep_sampling`,
`discrete_flow_shift`, `model_prediction_type`, `guidance_scale`, `t5xxl_max_token_length`,
`apply_t5_attn_mask`, `split_mode`, `blocks_to_swap` and the lora_flux layer settings; with sd3_checkbox
`sd3_clip_l`, `clip_g`, `sd3_t5xxl`, `vae`, `weighting_scheme`, `logit_mean`, `logit_std`, `mode_scale` and
the text-encoder dropouts. An sd-scripts argument given in additional_parameters (`--sigmoid_scale`,
`--training_shift`, ...) is passed for either family. sd-scripts' flux_train_network.py and
sd3_train_network.py draw plain Gaussian noise and leave the loss unweighted by the DDPM schedule, so
noise offsets, min-SNR and the v-prediction options have no effect there: they are not carried, and a
value that is on is a warning (Lathe refuses them for flow models). A setting Lathe has no equivalent for
(split mode, per-layer ranks, T5 training, ...) is a warning naming what Lathe does
instead; a network Lathe does not train for these families is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backend.kohya_keys import LYCORIS, NETWORK_KINDS, is_set, show, to_bool, to_float, to_int, to_str

if TYPE_CHECKING:
    from backend.kohya import Mapper

LABELS = {"flux": "Flux.1", "sd3": "SD3/SD3.5"}
CHECKBOXES = {"flux1_checkbox": "flux", "sd3_checkbox": "sd3"}
FLUX, SD3, BOTH = frozenset({"flux"}), frozenset({"sd3"}), frozenset({"flux", "sd3"})
NONE: frozenset[str] = frozenset()  # no GUI field (additional_parameters, sd-scripts' shape): either family

# kohya key -> (Lathe path, converter, the families kohya_ss passes it for).
PATHS: dict[str, tuple[str, Callable[[Any], Any], frozenset[str]]] = {
    "ae": ("model.vae", to_str, FLUX),
    "clip_l": ("model.clip_l", to_str, FLUX),
    "t5xxl": ("model.t5xxl", to_str, FLUX),
    "sd3_clip_l": ("model.clip_l", to_str, SD3),
    "clip_g": ("model.clip_g", to_str, SD3),
    "sd3_t5xxl": ("model.t5xxl", to_str, SD3),
    "vae": ("model.vae", to_str, SD3),
}
SETTINGS: dict[str, tuple[str, Callable[[Any], Any], frozenset[str]]] = {
    "timestep_sampling": ("training.timestep_sampling", to_str, FLUX),
    "sigmoid_scale": ("training.sigmoid_scale", to_float, NONE),
    "discrete_flow_shift": ("training.discrete_flow_shift", to_float, FLUX),
    "model_prediction_type": ("training.model_prediction_type", to_str, FLUX),
    "guidance_scale": ("training.guidance_scale", to_float, FLUX),
    "t5xxl_max_token_length": ("training.t5xxl_max_token_length", to_int, FLUX),
    "training_shift": ("training.training_shift", to_float, NONE),
    "weighting_scheme": ("training.weighting_scheme", to_str, SD3),
    "logit_mean": ("training.logit_mean", to_float, SD3),
    "logit_std": ("training.logit_std", to_float, SD3),
    "mode_scale": ("training.mode_scale", to_float, SD3),
    "blocks_to_swap": ("training.blocks_to_swap", to_int, BOTH),
}
SD_SCRIPTS_DEFAULTS = {"flux": {"model_prediction_type": "sigma_scaled"}}  # where sd-scripts' default is not Lathe's

_SWAP = "Lathe swaps whole blocks by training.blocks_to_swap (sd-scripts' current option): set blocks_to_swap instead"
_LAYERS = "Lathe trains every linear layer of the double and single blocks at network_dim"
# Settings Lathe does not have: kohya key -> (families, what it is, what Lathe does instead). A warning when on.
UNSUPPORTED: dict[str, tuple[frozenset[str], str, str]] = {
    "single_blocks_to_swap": (FLUX, "block swapping to CPU memory", _SWAP),
    "double_blocks_to_swap": (FLUX, "block swapping to CPU memory", _SWAP),
    "cpu_offload_checkpointing": (FLUX, "offloading checkpointed activations to CPU memory",
                                  "Lathe keeps them on the GPU (training.gradient_checkpointing still applies)"),
    "split_mode": (FLUX, "split mode (training the single blocks only, to save memory)", _LAYERS),
    "split_qkv": (FLUX, "separate LoRAs for the q, k and v parts of the fused attention layers",
                  "Lathe trains one LoRA per layer"),
    "apply_t5_attn_mask": (FLUX, "masking T5's padding tokens in attention",
                           "Lathe encodes captions without T5's attention mask"),
    "train_t5xxl": (FLUX, "training a LoRA on T5-XXL", "Lathe trains the transformer and CLIP-L; T5-XXL stays frozen"),
    "t5xxl_lr": (FLUX, "a T5-XXL learning rate", "Lathe does not train T5-XXL"),
    "train_lora_ggpo": (FLUX, "GGPO (gradient-guided perturbation) of the LoRA weights", "Lathe trains without it"),
    **{key: (FLUX, f"lora_flux's {key} (per-layer ranks and block selection)", _LAYERS) for key in (
        "img_attn_dim", "img_mlp_dim", "img_mod_dim", "single_dim", "txt_attn_dim", "txt_mlp_dim", "txt_mod_dim",
        "single_mod_dim", "in_dims", "train_double_block_indices", "train_single_block_indices")},
    "sd3_fused_backward_pass": (SD3, "fused backward pass", "Lathe steps the optimizer after the backward pass"),
    "clip_g_dropout_rate": (SD3, "CLIP-G caption-embedding dropout", "Lathe drops whole captions only "
                            "(dataset.caption_dropout_rate)"),
    "sd3_clip_l_dropout_rate": (SD3, "CLIP-L caption-embedding dropout", "Lathe drops whole captions only "
                                "(dataset.caption_dropout_rate)"),
    "sd3_t5_dropout_rate": (SD3, "T5 caption-embedding dropout", "Lathe drops whole captions only "
                            "(dataset.caption_dropout_rate)"),
    "sd3_enable_scaled_pos_embed": (SD3, "scaled positional embeddings for multi-resolution training",
                                    "Lathe uses the model's own positional embedding"),
    "pos_emb_random_crop_rate": (SD3, "random crops of the positional embedding",
                                 "Lathe uses the model's own positional embedding"),
}
# Keys that change nothing for the family in Lathe (or in kohya_ss): kohya key -> (families, reason).
NOT_NEEDED: dict[str, tuple[frozenset[str], str]] = {
    "flux1_cache_text_encoder_outputs": (FLUX, "not applicable: Lathe decides what to cache itself"),
    "flux1_cache_text_encoder_outputs_to_disk": (FLUX, "not applicable: Lathe decides what to cache itself"),
    "sd3_cache_text_encoder_outputs": (SD3, "not applicable: Lathe decides what to cache itself"),
    "sd3_cache_text_encoder_outputs_to_disk": (SD3, "not applicable: Lathe decides what to cache itself"),
    "mem_eff_save": (FLUX, "not applicable: memory and loading tuning that Lathe manages itself"),
    "sd3_disable_mmap_load_safetensors": (SD3, "not applicable: memory and loading tuning that Lathe manages itself"),
    "t5xxl_device": (SD3, "not applicable: memory and loading tuning that Lathe manages itself"),
    "t5xxl_dtype": (SD3, "not applicable: memory and loading tuning that Lathe manages itself"),
    "sd3_text_encoder_batch_size": (SD3, "not applicable: memory and loading tuning that Lathe manages itself"),
    "save_clip": (SD3, "not applicable: a full fine-tuning option (a LoRA run saves no text encoders)"),
    "save_t5xxl": (SD3, "not applicable: a full fine-tuning option (a LoRA run saves no text encoders)"),
    "train_blocks": (FLUX, "not applicable: kohya_ss passes it only with split_mode (then as single)"),
    "enable_all_linear": (FLUX, "not applicable: a Flux1 OFT setting"),
    "ggpo_sigma": (FLUX, "not applicable: only used with train_lora_ggpo"),
    "ggpo_beta": (FLUX, "not applicable: only used with train_lora_ggpo"),
    "show_timesteps": (BOTH, "not applicable: a debugging aid (sd-scripts shows the timesteps instead of training)"),
    "show_timesteps_resolution": (BOTH, "not applicable: only used with show_timesteps"),
}
# The DDPM-schedule settings, which sd-scripts' flow-matching scripts do not read: key -> why, or "" (no warning).
NOT_FOR_FLOW = {
    "noise_offset_type": "", "multires_noise_discount": "", "max_token_length": "",
    **{key: "trains by flow matching on plain Gaussian noise" for key in (
        "noise_offset", "adaptive_noise_scale", "noise_offset_random_strength", "multires_noise_iterations")},
    **{key: "leaves the loss unweighted by a DDPM noise schedule" for key in (
        "min_snr_gamma", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
        "zero_terminal_snr")},
    "v_parameterization": "trains by flow matching (no v-prediction)",
}
CLIP_SKIP = {"flux": "reads CLIP-L's pooled output only", "sd3": "always uses CLIP's penultimate layer"}


def map_family(m: Mapper) -> str | None:
    """flux1_checkbox / sd3_checkbox -> model.family; the family, or None (an SD family decides)."""
    on = [(key, family) for key, family in CHECKBOXES.items() if m.get(key, to_bool)]
    lora_type = m.data.get("LoRA_type")
    if len(on) > 1:
        m.error("flux1_checkbox: both flux1_checkbox and sd3_checkbox are set; a model is either Flux.1 or SD3")
        return None
    for key in CHECKBOXES:
        if key in m.data and not any(k == key for k, _ in on):
            m.skip(key, "not applicable: off")
    if not on:
        if isinstance(lora_type, str) and lora_type.startswith("Flux") and not m.res.refused:
            m.error(f"LoRA_type: {lora_type!r} trains a Flux.1 LoRA, but flux1_checkbox is off; turn it on for a "
                    "Flux.1 model or choose LoRA_type Standard")
        return None
    key, family = on[0]
    m.put(key, "model.family", family)
    return family


def map_flow(m: Mapper, family: str | None) -> None:
    """Every Flux.1/SD3 key of a config of that family (before the noise and simple handlers, which
    then leave the keys this one skipped alone)."""
    if family not in LABELS:
        return
    label = LABELS[family]
    _check_network(m, family)
    for key, (path, conv, families) in {**PATHS, **SETTINGS}.items():
        if key not in m.data or not (family in families or key in m.from_args or not families):
            continue
        if path.startswith("model.") and m.sources.get(path) in m.from_args:
            m.skip(key, f"not applicable: {m.sources[path]} in additional_parameters takes precedence")
            continue
        value = m.get(key, conv)
        if value is not None or key not in m.done:
            m.put(key, path, value, "" if value is not None else "empty: from the model file")
    for key, value in SD_SCRIPTS_DEFAULTS.get(family, {}).items():
        if key not in m.data:
            m.put("(sd-scripts default)", SETTINGS[key][0], value, f"{label} without {key} in the kohya file")
    if family == "flux":
        m.skip("vae", "not applicable: Flux.1 reads its autoencoder from ae")
    _map_fp8(m)
    _map_unsupported(m, family)
    _map_not_for_flow(m, family, label)


def _check_network(m: Mapper, family: str) -> None:
    """Lathe trains a plain LoRA (sd-scripts' networks.lora_flux / lora_sd3 shape) for these families."""
    if m.res.refused:
        return
    lora_type = m.data.get("LoRA_type") if isinstance(m.data.get("LoRA_type"), str) else None
    ntype = m.out.get("network", {}).get("type", "lora")
    module = NETWORK_KINDS.get(lora_type or "Standard", ("", ""))[0]
    if family == "sd3" and (lora_type or "").startswith("Flux"):
        m.error(f"LoRA_type: {lora_type!r} trains a Flux.1 LoRA, and sd3_checkbox is set; choose Standard for SD3")
    elif ntype != "lora" or module == LYCORIS:
        what = f"LoRA_type {lora_type!r}" if lora_type else f"network.type {ntype}"
        plain = "Flux1" if family == "flux" else "Standard"
        m.res.refused = (f"{what} on {LABELS[family]}: Lathe trains plain LoRA networks for {LABELS[family]} "
                         f"(LoRA_type {plain}), not {ntype if module != LYCORIS else 'LyCORIS'} networks")


def _map_fp8(m: Mapper) -> None:
    """sd-scripts' fp8_base_unet (the transformer in fp8, text encoders not) is what Lathe's model.fp8_base is."""
    if m.get("fp8_base_unet", to_bool) and not m.get("fp8_base", to_bool):
        m.put("fp8_base_unet", "model.fp8_base", True, "the transformer's frozen weights in fp8")
        m.skip("fp8_base", "not applicable: fp8_base_unet is set")
    else:
        m.skip("fp8_base_unet", "not applicable: fp8_base covers it" if m.get("fp8_base", to_bool) else
               "not applicable: off")


def _map_unsupported(m: Mapper, family: str) -> None:
    for key, (families, what, instead) in UNSUPPORTED.items():
        if key not in m.data or key in m.done or family not in families:
            continue
        value = m.data[key]
        if key == "t5xxl_lr" and not is_set("train_t5xxl", m.data.get("train_t5xxl")):
            m.skip(key, "not applicable: only used with train_t5xxl")
        elif is_set(key, value):
            m.skip(key, f"unsupported feature: {what}; {instead}", warn=True)
        else:
            m.skip(key, "not applicable: off")
    for key, (families, reason) in NOT_NEEDED.items():
        if family in families:
            m.skip(key, reason)


def _map_not_for_flow(m: Mapper, family: str, label: str) -> None:
    """The DDPM-schedule settings (and CLIP-only ones): listed, and a warning when one is on."""
    kind = str(m.data.get("noise_offset_type") or "").strip().lower()
    passed = {"noise_offset": kind != "multires", "adaptive_noise_scale": kind != "multires",
              "noise_offset_random_strength": kind != "multires", "multires_noise_iterations": kind != "original"}
    for key, why in NOT_FOR_FLOW.items():
        if key not in m.data or key in m.done:
            continue
        value = m.data[key]
        m.skip(key, f"not applicable: sd-scripts does not use it for {label}")
        if why and passed.get(key, True) and is_set(key, value):
            m.warn(f"{key}: {show(value)} has no effect on {label} in sd-scripts, which {why}; not carried (Lathe "
                   f"refuses it for {label})")
    skip = m.get("clip_skip", to_int)
    if skip is not None and skip > 1:
        m.skip("clip_skip", f"not applicable: {label} {CLIP_SKIP[family]}")
        m.warn(f"clip_skip: {skip} has no effect on {label} in sd-scripts, which {CLIP_SKIP[family]}; not carried")
    loss = (m.get("loss_type", to_str) or "").lower()
    schedule = m.get("huber_schedule", to_str)
    if loss in ("huber", "smooth_l1") and schedule and schedule.lower() != "constant":
        m.error(f"huber_schedule: {schedule} reads a DDPM noise schedule, which {label} does not have; Lathe trains "
                f"{label} with the constant Huber schedule only: set huber_schedule to constant")
