"""Parsing kohya_ss's `additional_parameters`: the extra sd-scripts command-line arguments a kohya_ss
config passes after its own. Each `--name value` (or `--name=value`, a bare `--flag`, several
values for the `*_args` lists) is read as the kohya key of the same name and goes through the same
import rules (backend.kohya), winning over the config's own key as it does on sd-scripts' command
line. A name sd-scripts does not have is an error with the closest one ("did you mean").

SD_SCRIPTS_ARGS: the argument names of sd-scripts' LoRA training (train_network.py,
sdxl_train_network.py, flux_train_network.py, sd3_train_network.py and the library/ modules they add arguments from), read from their argparse
definitions (kohya-ss/sd-scripts, February 2026).
"""

from __future__ import annotations

import difflib
import shlex
from typing import Any

SD_SCRIPTS_ARGS = frozenset(["adaptive_noise_scale", "alpha_mask", "async_upload", "base_weights", "base_weights_multiplier", "blocks_to_swap", "bucket_no_upscale", "bucket_reso_steps", "cache_info", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_extension", "caption_extention", "caption_prefix", "caption_separator", "caption_suffix", "caption_tag_dropout_rate", "clip_skip", "color_aug", "conditioning_data_dir", "config_file", "cpu_offload_checkpointing", "dataset_class", "dataset_config", "dataset_repeats", "ddp_gradient_as_bucket_view", "ddp_static_graph", "ddp_timeout", "debiased_estimation_loss", "debug_dataset", "deepspeed", "dim_from_weights", "disable_mmap_load_safetensors", "dynamo_backend", "enable_bucket", "enable_wildcard", "face_crop_aug_range", "flip_aug", "fp16_master_weights_and_gradients", "fp8_base", "fp8_base_unet", "full_bf16", "full_fp16", "fused_backward_pass", "gradient_accumulation_steps", "gradient_checkpointing", "highvram", "huber_c", "huber_scale", "huber_schedule", "huggingface_path_in_repo", "huggingface_repo_id", "huggingface_repo_type", "huggingface_repo_visibility", "huggingface_token", "in_json", "initial_epoch", "initial_step", "ip_noise_gamma", "ip_noise_gamma_random_strength", "keep_tokens", "keep_tokens_separator", "learning_rate", "log_config", "log_prefix", "log_tracker_config", "log_tracker_name", "log_with", "logging_dir", "logit_mean", "logit_std", "loss_type", "lowram", "lr_decay_steps", "lr_scheduler", "lr_scheduler_args", "lr_scheduler_min_lr_ratio", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_timescale", "lr_scheduler_type", "lr_warmup_steps", "masked_loss", "max_bucket_reso", "max_data_loader_n_workers", "max_grad_norm", "max_timestep", "max_token_length", "max_train_epochs", "max_train_steps", "max_validation_steps", "mem_eff_attn", "min_bucket_reso", "min_snr_gamma", "min_timestep", "mixed_precision", "mode_scale", "multires_noise_discount", "multires_noise_iterations", "network_alpha", "network_args", "network_dim", "network_dropout", "network_module", "network_train_text_encoder_only", "network_train_unet_only", "network_weights", "no_half_vae", "no_metadata", "noise_offset", "noise_offset_random_strength", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device", "offload_param_nvme_path", "optimizer_args", "optimizer_type", "output_config", "output_dir", "output_name", "persistent_data_loader_workers", "pretrained_model_name_or_path", "prior_loss_weight", "random_crop", "reg_data_dir", "resize_interpolation", "resolution", "resume", "resume_from_huggingface", "sample_at_first", "sample_every_n_epochs", "sample_every_n_steps", "sample_prompts", "sample_sampler", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state", "save_model_as", "save_n_epoch_ratio", "save_precision", "save_state", "save_state_on_train_end", "save_state_to_huggingface", "scale_v_pred_loss_like_noise_pred", "scale_weight_norms", "sdpa", "secondary_separator", "seed", "shuffle_caption", "skip_cache_check", "skip_until_initial_step", "support_controlnet", "support_dreambooth", "support_dropout", "support_finetuning", "text_encoder_batch_size", "text_encoder_lr", "token_warmup_min", "token_warmup_step", "tokenizer_cache_dir", "torch_compile", "train_batch_size", "train_data_dir", "training_comment", "unet_lr", "use_8bit_adam", "use_lion_optimizer", "use_safetensors", "v2", "v_parameterization", "v_pred_like_loss", "vae", "vae_batch_size", "validate_every_n_epochs", "validate_every_n_steps", "validation_seed", "validation_split", "wandb_api_key", "wandb_run_name", "weighted_captions", "weighting_scheme", "xformers", "zero3_init_flag", "zero3_save_16bit_model", "zero_stage", "zero_terminal_snr"]) | frozenset([
    # flux_train_network.py / sd3_train_network.py (library/flux_train_utils.py, sd3_train_utils.py)
    "ae", "clip_l", "clip_g", "t5xxl", "apply_t5_attn_mask", "apply_lg_attn_mask", "guidance_scale",
    "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift", "training_shift",
    "t5xxl_max_token_length", "model_type", "split_mode", "cpu_offload_checkpointing", "fp8_base_unet",
    "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype", "clip_l_dropout_rate", "clip_g_dropout_rate",
    "t5_dropout_rate", "pos_emb_random_crop_rate", "enable_scaled_pos_embed", "mem_eff_save"])


def parse_additional(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """({name: value}, errors) of an additional_parameters string. A flag with no value is True; a
    list argument's values are joined as one shell-quoted string (as the config's own key holds it)."""
    if not isinstance(raw, str) or not raw.strip():
        return {}, []
    try:
        tokens = shlex.split(raw)
    except ValueError as e:
        return {}, [f"additional_parameters: cannot read it as command-line arguments ({e})"]
    out: dict[str, Any] = {}
    errors: list[str] = []
    name: str | None = None
    values: list[str] = []
    skipping = False  # the values of an unknown argument: reported with it, not again

    def close() -> None:
        if name is not None:
            out[name] = True if not values else values[0] if len(values) == 1 else " ".join(shlex.quote(v) for v in values)

    for token in tokens:
        if token.startswith("--"):
            close()
            name, values, skipping = token[2:], [], False
            if "=" in name:
                name, _, value = name.partition("=")
                values = [value]
            if name not in SD_SCRIPTS_ARGS:
                close_match = difflib.get_close_matches(name, SD_SCRIPTS_ARGS, n=1)
                hint = f"; did you mean --{close_match[0]}?" if close_match else ""
                errors.append(f"additional_parameters: --{name} is not an sd-scripts argument{hint}")
                name, skipping = None, True
        elif name is not None:
            values.append(token)
        elif skipping:
            continue
        else:
            errors.append(f"additional_parameters: {token!r} is not after an --argument")
    close()
    return out, errors
