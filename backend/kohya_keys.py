"""What each kohya_ss GUI config key means to Lathe: value coercion and the key tables.

kohya_ss stores many numbers and booleans as strings ("1", "True", "5e-05") and uses 0 or "" for
"off"; the converters here turn them into typed values or raise ValueError with a plain message.
The tables say where a key goes (backend.kohya does the mapping) or why it is not imported.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

UNSET: Any = object()  # kohya's 0 / "" for a setting that Lathe leaves empty ("off")


def show(v: Any) -> str:
    """A value as a short JSON-ish string for messages."""
    s = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def to_bool(v: Any) -> bool | None:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    text = v.strip().lower() if isinstance(v, str) else None
    if text == "":
        return None
    if text in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return text in ("true", "1", "yes", "on")
    raise ValueError(f"expected true or false; got {show(v)}")


def to_float(v: Any) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        f = float(v)
        if not math.isfinite(f):
            raise ValueError
    except ValueError:
        raise ValueError(f"expected a number; got {show(v)}") from None
    return f


def to_int(v: Any) -> int | None:
    f = to_float(v)
    if f is not None and not f.is_integer():
        raise ValueError(f"expected a whole number; got {show(v)}")
    return None if f is None else int(f)


def to_str(v: Any) -> str | None:
    if isinstance(v, (dict, list)):
        raise ValueError(f"expected text; got {show(v)}")
    return (str(v).strip() or None) if v is not None else None


def off(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a converter for kohya settings where 0 or "" means off: those give UNSET."""

    def convert(v: Any) -> Any:
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            try:
                if float(v or 0) == 0:
                    return UNSET
            except ValueError:
                pass
        return UNSET if v is None else conv(v)

    return convert


def real(v: Any) -> bool:
    """True for a value that was given and is not kohya's 'off'."""
    return v is not None and v is not UNSET


# ------------------------------------------------------------------------------ where keys are mapped
# kohya key -> (Lathe path, converter): one value, one setting. The others have handlers in kohya.py.
SIMPLE: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "train_batch_size": ("training.train_batch_size", to_int),
    "gradient_accumulation_steps": ("training.gradient_accumulation_steps", to_int),
    "gradient_checkpointing": ("training.gradient_checkpointing", to_bool),
    "mixed_precision": ("training.mixed_precision", to_str),
    "clip_skip": ("training.clip_skip", to_int),
    "max_token_length": ("training.max_token_length", to_int),
    "min_snr_gamma": ("training.min_snr_gamma", off(to_float)),
    "enable_bucket": ("dataset.enable_bucket", to_bool),
    "min_bucket_reso": ("dataset.min_bucket_reso", to_int),
    "max_bucket_reso": ("dataset.max_bucket_reso", to_int),
    "shuffle_caption": ("dataset.shuffle_caption", to_bool),
    "keep_tokens": ("dataset.keep_tokens", to_int),
    "caption_dropout_rate": ("dataset.caption_dropout_rate", to_float),
    "flip_aug": ("dataset.random_flip", to_bool),
    "cache_latents": ("dataset.cache_latents", to_bool),
    "cache_latents_to_disk": ("dataset.cache_latents_to_disk", to_bool),
    "max_data_loader_n_workers": ("dataset.num_workers", to_int),
    "save_state": ("saving.save_state", to_bool),
    "sample_every_n_epochs": ("sampling.every_n_epochs", off(to_int)),
    "sample_every_n_steps": ("sampling.every_n_steps", off(to_int)),
    "num_processes": ("launch.num_processes", to_int),
    "num_machines": ("launch.num_machines", to_int),
    "main_process_ip": ("launch.main_process_ip", off(to_str)),
    "main_process_port": ("launch.main_process_port", off(to_int)),
    "gpu_ids": ("launch.gpu_ids", off(to_str)),
    "num_cpu_threads_per_process": ("launch.num_cpu_threads_per_process", off(to_int)),
    "v_parameterization": ("model.v_parameterization", to_bool),
    "fp8_base": ("model.fp8_base", to_bool),
    "output_dir": ("output_dir", to_str),
    "learning_rate": ("optimizer.learning_rate", to_float),
    "max_grad_norm": ("optimizer.max_grad_norm", off(to_float)),
    "loraplus_lr_ratio": ("optimizer.loraplus_lr_ratio", off(to_float)),
    "loraplus_unet_lr_ratio": ("optimizer.loraplus_unet_lr_ratio", off(to_float)),
    "loraplus_text_encoder_lr_ratio": ("optimizer.loraplus_text_encoder_lr_ratio", off(to_float)),
}

# ------------------------------------------------------------------------------------------ networks
LYCORIS = "lycoris.kohya"
# kohya LoRA_type -> (the module kohya_ss trains it with, the Lathe network.type). The module decides
# which GUI fields kohya_ss passes on (GUI_NETWORK_ARGS); dora_wd and conv_dim can still change the type.
NETWORK_KINDS: dict[str, tuple[str, str]] = {
    "Standard": ("networks.lora", "lora"),
    "Kohya LoCon": ("networks.lora", "locon"),
    "LoCon": (LYCORIS, "locon"), "LyCORIS/LoCon": (LYCORIS, "locon"),
    "LyCORIS/LoHa": (LYCORIS, "loha"), "LyCORIS/LoKr": (LYCORIS, "lokr"),
    "Kohya LoHa": ("networks.loha", "loha"), "Kohya LoKr": ("networks.lokr", "lokr"),
    "Flux1": ("networks.lora_flux", "lora"),
}
NETWORK_MODULES = {  # sd-scripts network_module (a config without LoRA_type) -> Lathe type
    "networks.lora": "lora", LYCORIS: "locon", "networks.loha": "loha", "networks.lokr": "lokr",
    "networks.lora_flux": "lora", "networks.lora_sd3": "lora",
}
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr"}  # network_args algo=
# What Lathe does not train: kohya LoRA_type or LyCORIS algo -> plain name, for the refusal.
NOT_TRAINED = {
    "Kohya DyLoRA": "DyLoRA", "LyCORIS/DyLoRA": "DyLoRA", "dylora": "DyLoRA", "LoRA-FA": "LoRA-FA",
    "LyCORIS/iA3": "(IA)^3", "ia3": "(IA)^3", "LyCORIS/GLoRA": "GLoRA", "glora": "GLoRA",
    "LyCORIS/Diag-OFT": "Diag-OFT", "diag-oft": "Diag-OFT", "LyCORIS/BOFT": "BOFT", "boft": "BOFT",
    "LyCORIS/Native Fine-Tuning": "LyCORIS native fine-tuning", "full": "LyCORIS native fine-tuning",
    "Flux1 OFT": "OFT (networks.oft_flux)",
}
OTHER_MODELS = {"Anima": "Anima", "Lumina": "Lumina", "HunyuanImage-2.1": "HunyuanImage-2.1"}
OTHER_MODEL_CHECKBOXES = {"hunyuan_image_checkbox": "HunyuanImage-2.1", "anima_checkbox": "Anima",
                          "lumina_checkbox": "Lumina Image 2.0"}
LATHE_NETWORKS = ("LoRA (Standard, Flux1), LoCon (Kohya LoCon, LyCORIS/LoCon), LoHa (LyCORIS/LoHa, Kohya LoHa), "
                  "LoKr (LyCORIS/LoKr, Kohya LoKr) and DoRA (dora_wd on LyCORIS/LoCon)")
LATHE_MODELS = "Lathe trains LoRAs for Stable Diffusion 1.x, 2.x, SDXL, SD3/SD3.5 and Flux.1 only"

# The GUI fields that kohya_ss passes to each network module (as --network_args), besides network_dim,
# network_alpha, network_dropout and network_weights, which every type gets. A field not listed here for
# the config's type is not used by kohya_ss, so not carried (NOT_IMPORTED says why, without a warning).
_LYCORIS_ARGS = ("conv_dim conv_alpha use_tucker dora_wd LyCORIS_preset use_scalar bypass_mode train_norm rank_dropout_scale "
                 "rank_dropout module_dropout")
GUI_NETWORK_ARGS: dict[tuple[str, str], set[str]] = {
    ("networks.lora", "lora"): {"rank_dropout", "module_dropout"},
    ("networks.lora_flux", "lora"): {"rank_dropout", "module_dropout"},
    ("networks.lora_sd3", "lora"): {"rank_dropout", "module_dropout"},
    ("networks.lora", "locon"): {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout"},
    (LYCORIS, "locon"): set(_LYCORIS_ARGS.split()),
    (LYCORIS, "loha"): {*_LYCORIS_ARGS.split(), "use_cp"},  # use_cp: the older name of use_tucker
    (LYCORIS, "lokr"): {*_LYCORIS_ARGS.split(), "use_cp", "factor", "decompose_both"},
    ("networks.loha", "loha"): {"conv_dim", "conv_alpha", "use_tucker"},
    ("networks.lokr", "lokr"): {"conv_dim", "conv_alpha", "use_tucker", "factor"},
}
# LyCORIS switches Lathe does not have: a warning when on.
LYCORIS_UNSUPPORTED = {
    "use_scalar": "a trained scalar in front of the update (LyCORIS use_scalar)",
    "bypass_mode": "LyCORIS bypass mode (for 8-bit/4-bit base layers)",
    "train_norm": "training the normalization layers (LyCORIS train_norm)",
    "rank_dropout_scale": "rescaled rank dropout (LyCORIS rank_dropout_scale)",
    "rs_lora": "rank-stabilized scaling (LyCORIS rs_lora)",
    "full_matrix": "full-matrix LoKr factors (LyCORIS full_matrix)",
    "unbalanced_factorization": "unbalanced LoKr factorization (LyCORIS unbalanced_factorization)",
}
NETWORK_ARG_NAMES = {"conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "algo", "preset", "dora_wd", "wd_on_output", "use_tucker",
                     "use_cp", "factor", "decompose_both"}  # network_args that map_network reads

OPTIMIZERS = {  # kohya name (lower case) -> (Lathe type, the variant Lathe replaces with it)
    "adamw": ("AdamW", ""), "adamw8bit": ("AdamW8bit", ""), "pagedadamw": ("AdamW", "paged"),
    "pagedadamw32bit": ("AdamW", "paged 32-bit"), "pagedadamw8bit": ("AdamW8bit", "paged"),
    "prodigy": ("Prodigy", ""), "lion": ("Lion", ""), "lion8bit": ("Lion", "8-bit"),
    "pagedlion8bit": ("Lion", "paged 8-bit"), "adafactor": ("Adafactor", ""), "sgdnesterov": ("SGD", ""),
    "sgdnesterov8bit": ("SGD", "8-bit"), "dadaptadam": ("DAdaptAdam", ""), "dadaptlion": ("DAdaptLion", ""),
}
# Defaults of the libraries kohya_ss calls, where they differ from Lathe's defaults for the same type.
LIBRARY_DEFAULTS: dict[str, dict[str, Any]] = {
    "Lion": {"weight_decay": 0.0},
    "Adafactor": {"relative_step": True, "scale_parameter": True},
    "SGD": {"nesterov": True},
}
BOOL_ARGS = {"use_bias_correction", "safeguard_warmup", "decouple", "relative_step", "scale_parameter",
             "warmup_init", "nesterov"}
NOT_ARGS = {"type", "learning_rate", "unet_lr", "text_encoder_lr", "max_grad_norm"}  # fields, not optimizer_args
# Arguments the optimizer libraries accept that Lathe does not expose: reported, not errors.
UNSUPPORTED_ARGS = {"amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused", "fsdp_in_use",
                    "slice_p", "prodigy_steps", "clip_threshold", "decay_rate", "beta1", "dampening",
                    "optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "is_paged", "use_triton"}

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
SAVE_PRECISION = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


# ------------------------------------------------------------------------ keys that are not imported
SECRET = "secret: never copied into a preset"
_FLUX = "not applicable: a Flux.1 setting (kohya_ss passes it only with flux1_checkbox)"
_SD3 = "not applicable: an SD3 setting (kohya_ss passes it only with sd3_checkbox)"
_FLOW = "not applicable: a Flux.1/SD3 setting (kohya_ss passes it only with flux1_checkbox or sd3_checkbox)"


def _table(*groups: tuple[str, bool, str]) -> dict[str, tuple[str, bool]]:
    return {key: (reason, warn) for reason, warn, keys in groups for key in keys.split()}


# key -> (reason, warn): warn=True when a value other than the neutral one would change training.
NOT_IMPORTED = _table(
    ("GUI-only setting: the GUI's model dropdown", False, "model_list"),
    ("GUI-only setting", False, "save_as_bool training_preset log_config file_path"),
    ("GUI-only setting: Lathe uses several GPUs when launch.num_processes is above 1", False, "multi_gpu"),
    ("not applicable: Lathe uses PyTorch SDPA attention (scaled_dot_product_attention) itself", False, "xformers mem_eff_attn sdpa"),
    ("not applicable: memory and loading tuning that Lathe manages itself", False,
     "vae_batch_size persistent_data_loader_workers sdxl_no_half_vae no_half_vae lowram lowvram highvram "
     "disable_mmap_load_safetensors skip_cache_check mem_eff_save"),
    ("not applicable: Lathe decides what to cache itself", False, "sdxl_cache_text_encoder_outputs"),
    ("not applicable: Lathe writes TensorBoard logs into each version folder", False,
     "logging_dir log_with log_prefix log_tracker_name log_tracker_config use_wandb wandb_run_name"),
    ("not applicable: Lathe never uploads or downloads", False,
     "async_upload save_state_to_huggingface resume_from_huggingface"),
    ("not applicable: Lathe always writes .safetensors LoRA files", True, "save_model_as"),
    ("not applicable: Lathe rotates a save point's state and LoRA file together (saving.save_last_n_*)", False,
     "save_last_n_epochs_state save_last_n_steps_state"),
    ("not applicable: Lathe's final save follows saving.save_state", False, "save_state_on_train_end"),
    ("not applicable: only used with network_weights", False, "dim_from_weights"),
    ("not applicable: LoRA_type decides kohya_ss's network module", False, "network_module"),
    ("not applicable: only used with dynamo_backend", False, "dynamo_mode dynamo_use_dynamic dynamo_use_fullgraph"),
    ("not applicable: kohya_ss passes conv_dim and conv_alpha only to LoCon, LoHa and LoKr networks", False,
     "conv_dim conv_alpha"),
    ("not applicable: kohya_ss does not pass it to this config's LoRA_type", False,
     "LyCORIS_preset factor use_cp use_tucker use_scalar decompose_both rank_dropout_scale train_norm bypass_mode "
     "dora_wd rank_dropout module_dropout"),
    ("not applicable: an (IA)^3 setting (kohya_ss passes train_on_input only to LyCORIS/iA3)", False,
     "train_on_input"),
    ("not applicable: a DyLoRA setting", False, "unit"),
    ("not applicable: a Diag-OFT/BOFT setting", False, "constrain rescaled"),
    ("not applicable: a DreamBooth text-encoder learning rate (LoRA configs use text_encoder_lr)", False,
     "learning_rate_te learning_rate_te1 learning_rate_te2"),
    ("unsupported feature: color augmentation", True, "color_aug"),
    ("unsupported feature: random crop", True, "random_crop"),
    ("unsupported feature: dropping every caption every N epochs", True, "caption_dropout_every_n_epochs"),
    ("unsupported feature: tag dropout", True, "caption_tag_dropout_rate"),
    ("unsupported feature: weighted captions", True, "weighted_captions"),
    ("unsupported feature: disabling token padding", True, "no_token_padding"),
    ("unsupported feature: masked loss", True, "masked_loss"),
    ("unsupported feature: block-wise ranks and learning rates", True,
     "block_dims block_alphas block_lr_zero_threshold down_lr_weight mid_lr_weight up_lr_weight "
     "conv_block_dims conv_block_alphas conv_dims conv_alphas"),
    ("unsupported feature: stopping text-encoder training part-way", True,
     "stop_text_encoder_training stop_text_encoder_training_pct"),
    ("unsupported feature: full fp16/bf16 training (Lathe keeps LoRA weights in fp32)", True, "full_fp16 full_bf16"),
    ("unsupported feature: fused backward pass", True,
     "fused_backward_pass fused_optimizer_groups blockwise_fused_optimizers"),
    ("unsupported feature: a separate VAE file for SD 1.x/2.x/SDXL (Lathe uses the base model's VAE; an SD3 config's "
     "vae becomes model.vae)", True, "vae"),
    ("unsupported feature: extra accelerate arguments (use launch.accelerate_config_file)", True,
     "extra_accelerate_launch_args"),
    ("unsupported feature: torch.compile", True, "dynamo_backend"),
    ("unsupported feature: a custom scheduler class", True, "lr_scheduler_type"),
    (_FLUX, False,
     "ae clip_l t5xxl model_type fp8_base_unet apply_t5_attn_mask double_blocks_to_swap single_blocks_to_swap "
     "cpu_offload_checkpointing discrete_flow_shift guidance_scale model_prediction_type timestep_sampling split_mode "
     "train_blocks split_qkv train_t5xxl t5xxl_lr t5xxl_max_token_length enable_all_linear train_lora_ggpo ggpo_sigma "
     "ggpo_beta img_attn_dim img_mlp_dim img_mod_dim single_dim txt_attn_dim txt_mlp_dim txt_mod_dim single_mod_dim "
     "in_dims train_double_block_indices train_single_block_indices flux1_cache_text_encoder_outputs "
     "flux1_cache_text_encoder_outputs_to_disk"),
    (_SD3, False,
     "clip_g clip_g_dropout_rate sd3_clip_l sd3_clip_l_dropout_rate sd3_t5xxl sd3_t5_dropout_rate "
     "sd3_enable_scaled_pos_embed pos_emb_random_crop_rate save_clip save_t5xxl t5xxl_device t5xxl_dtype "
     "sd3_text_encoder_batch_size weighting_scheme logit_mean logit_std mode_scale sd3_cache_text_encoder_outputs "
     "sd3_cache_text_encoder_outputs_to_disk sd3_fused_backward_pass sd3_disable_mmap_load_safetensors"),
    (_FLOW, False, "blocks_to_swap show_timesteps show_timesteps_resolution"),
    ("not applicable: a flow-model setting (Flux.1, SD3), and this config is for another model", False,
     "sigmoid_scale training_shift apply_lg_attn_mask"),
    ("unsupported feature: inpainting training (random masks over the source image)", True, "train_inpainting"),
    (SECRET, False, "wandb_api_key huggingface_token"),
)
_PREFIXES = (
    ("flux", _FLUX), ("sd3_", _SD3), ("t5xxl", _FLOW),
    ("hunyuan_", "not applicable: a HunyuanImage-2.1 setting"), ("anima_", "not applicable: an Anima setting"),
    ("lumina_", "not applicable: a Lumina Image 2.0 setting"),
    ("huggingface_", "not applicable: Lathe never uploads or downloads"),
    ("metadata_", "not applicable: Lathe writes its own metadata into exported LoRA files"),
)
_SECRET_NAME = re.compile(r"(?:^|_)(?:token|api_?key|secret|password|passwd|credentials?)$", re.I)
_NEUTRAL = {"save_model_as": "safetensors", "dynamo_backend": "no", "train_blocks": "all",
            "train_double_block_indices": "all", "train_single_block_indices": "all"}
UNKNOWN = "unknown kohya_ss setting: this importer does not know it"


def reason_for(key: str) -> tuple[str, bool]:
    """(reason, warn_when_set) for a key that no handler imported."""
    if key in NOT_IMPORTED:
        return NOT_IMPORTED[key]
    if _SECRET_NAME.search(key):
        return SECRET, False
    for prefix, reason in _PREFIXES:
        if key.startswith(prefix):
            return reason, False
    return UNKNOWN, True


def is_set(key: str, value: Any) -> bool:
    """Whether a kohya value turns its feature on (differs from 'off' or from the key's neutral value)."""
    if key in _NEUTRAL:
        neutral = _NEUTRAL[key]
        try:
            return float(value) != float(neutral)
        except (TypeError, ValueError):
            return str(value).strip().lower() not in (str(neutral), "")
    if isinstance(value, str):
        text = value.strip().lower()
        return text not in ("", "false", "none", "no") and _nonzero(text)
    return bool(value)


def _nonzero(text: str) -> bool:
    try:
        return float(text) != 0
    except ValueError:
        return True
