"""Stable Diffusion 3 / 3.5 (MMDiT): a transformer on 16-channel latents trained by flow matching
(backend.trainer.flow, sd-scripts' SD3 formulas), conditioned on CLIP-L and CLIP-G (their
penultimate layers side by side, zero-padded to T5's width) followed by T5-XXL's states, and on the
two CLIPs' pooled embeddings side by side (diffusers' StableDiffusion3Pipeline.encode_prompt, which
sd-scripts' strategy_sd3 matches)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from backend.trainer import flow
from backend.trainer.families.flow_matching import CLIP_LENGTH, DDPM_ONLY, FlowMatchingFamily, flow_refusals

__all__ = ["CLIP_LENGTH", "DDPM_ONLY", "SD3", "StableDiffusion3", "flow_refusals"]

if TYPE_CHECKING:
    from backend.config import TrainingConfig, TrainingSection
    from backend.trainer.models import Components

T5_LENGTH = 256  # sd-scripts' t5xxl_max_token_length default for SD3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


class StableDiffusion3(FlowMatchingFamily):
    name, label = "sd3", "SD3/SD3.5"
    base_model_version, architecture = "sd3", "stable-diffusion-3/lora"

    def check(self, cfg: TrainingConfig, comps: Components) -> None:
        problems = flow_refusals(cfg, self.label)
        if cfg.network.type != "lora":
            problems.append(f"network.type: {cfg.network.type} is not trained for {self.label} yet (its LoRA is "
                            "exported in diffusers' format, which holds plain LoRA); use lora")
        if cfg.network.network_weights:
            problems.append(f"network.network_weights: starting an {self.label} run from a LoRA file is not built yet; "
                            "clear it")
        if problems:
            from backend.trainer.loss import LossSettingError

            raise LossSettingError("; ".join(problems))

    def default_targets(self, model: Any = None) -> list[str]:
        return list(TARGETS)

    # ------------------------------------------------------------------------------ text
    def encode_text(self, comps: Components, captions: list[str], clip_skip: int, max_token_length: int,
                    encoders: list[Any], t5_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        clips, pooled = [], []
        for te, tok in zip(encoders[:2], comps.tokenizers[:2], strict=True):
            ids = tok(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt")
            out = te(ids.input_ids.to(next(te.parameters()).device), output_hidden_states=True)
            clips.append(out.hidden_states[-(clip_skip + 1)])  # diffusers: hidden_states[-(clip_skip + 2)], skip None
            pooled.append(out.text_embeds)
        t5, tok = encoders[2], comps.tokenizers[2]
        ids = tok(captions, padding="max_length", max_length=t5_length or comps.extra.get("t5_length", T5_LENGTH),
                  truncation=True, return_tensors="pt").input_ids
        t5_states = t5(ids.to(next(t5.parameters()).device))[0]
        clip = torch.cat(clips, dim=-1)
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def text_warnings(self, training: TrainingSection) -> list[str]:
        if training.max_token_length != 75:
            return [f"training.max_token_length: {training.max_token_length} is for CLIP-only families; SD3 reads 77 "
                    "CLIP tokens and training.t5xxl_max_token_length T5 tokens"]
        return []

    # ------------------------------------------------------------------------------ the model call
    def draw_timestep(self, gen: torch.Generator, ts: TrainingSection, latent_hw: tuple[int, int]) -> torch.Tensor:
        return flow.sd3_timestep(gen, ts)

    def loss(self, model: Any, comps: Components, latents: torch.Tensor, context: torch.Tensor,
             added: dict[str, torch.Tensor] | None, noise: torch.Tensor, timesteps: torch.Tensor,
             ts: TrainingSection, weight_dtype: torch.dtype, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = timesteps.float() / flow.NUM_TIMESTEPS
        noisy = flow.noisy_input(latents, noise if input_noise is None else input_noise, sigmas)
        pred = model(hidden_states=noisy.to(weight_dtype), timestep=timesteps.to(weight_dtype),
                     encoder_hidden_states=context.to(weight_dtype), **(added or {})).sample
        return self.flow_loss(pred, latents, noise, noisy, sigmas, ts)

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, comps: Components, model: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        tes, toks = comps.text_encoders, comps.tokenizers
        return StableDiffusion3Pipeline(transformer=model, scheduler=self.sampler(comps), vae=comps.vae,
                                        text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1],
                                        tokenizer_2=toks[1], text_encoder_3=tes[2], tokenizer_3=toks[2])

    def prompt_embeddings(self, comps: Components, text: Any, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        ctx, pooled = text.encode([prompt])
        neg_ctx, neg_pooled = text.encode([negative])
        return {"prompt_embeds": ctx, "negative_prompt_embeds": neg_ctx, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": neg_pooled}

    # ------------------------------------------------------------------------------ the exported file
    export_formats = ("diffusers",)

    def export_tensors(self, groups: list[Any], dtype: torch.dtype, export_format: str = "auto") -> dict[str, torch.Tensor]:
        from backend.trainer.export import diffusers_groups, diffusers_state_dict

        return diffusers_state_dict(diffusers_groups(groups), dtype)

    def metadata(self, cfg: TrainingConfig, comps: Components) -> dict[str, str]:
        """sd-scripts' sd3_train_network.update_metadata keys."""
        t = cfg.training
        return {f"ss_{name}": str(getattr(t, name)) for name in (
            "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_shift")}

    def model_prefix(self) -> str:
        return "transformer."

    def text_encoder_prefix(self, index: int) -> str:
        return ("lora_te1_", "lora_te2_", "lora_te3_")[index]

    def trained_text_encoders(self, count: int) -> list[int]:
        return [0, 1]  # CLIP-L and CLIP-G; T5-XXL stays frozen (sd-scripts' train_t5xxl is off by default)

    def memoizable_text_encoders(self, count: int) -> list[int]:
        return [2]  # T5-XXL: called as t5(ids)[0] in encode_text, never trained


SD3 = StableDiffusion3()
