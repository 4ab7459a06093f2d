"""Stable Diffusion 1.x, 2.x and SDXL: a UNet on 4-channel latents, the DDPM noise schedule with an
epsilon or v-prediction target (models.resolve_v_prediction decides), CLIP text encoders (SDXL: two,
the penultimate layers concatenated, the second's pooled output and the size conditioning as added
conditioning). The loss is backend.trainer.loss.diffusion_loss (sd-scripts' options)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from backend.trainer.families.base import Geometry, ModelFamily

if TYPE_CHECKING:
    from backend.config import TrainingSection
    from backend.trainer.models import Components


class StableDiffusion(ModelFamily):
    def __init__(self, name: str, label: str, base_model_version: str, architecture: str, xl: bool = False):
        self.name, self.label, self.xl = name, label, xl
        self.base_model_version, self.architecture = base_model_version, architecture

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int, max_token_length: int,
                    encoders: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        from backend.trainer.models import encode_tokens, tokenize

        return encode_tokens(comps, tokenize(comps, captions, max_token_length), clip_skip, encoders)

    def text_warnings(self, training: TrainingSection) -> list[str]:
        if self.xl and training.clip_skip > 1:
            return [f"training.clip_skip: {training.clip_skip} is ignored for SDXL, which always uses the "
                    "penultimate text-encoder layer (as sd-scripts does)"]
        return []

    def added_conditioning(self, comps: Components, pooled: torch.Tensor | None, geometry: list[Geometry],
                           device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """SDXL: the pooled text embedding and the size/crop conditioning (orig_h, orig_w, crop_top,
        crop_left, target_h, target_w) of each sample."""
        if not self.xl:
            return None
        ids = [[*original, *crop, *target] for original, crop, target in geometry]
        return {"text_embeds": pooled.to(dtype), "time_ids": torch.tensor(ids, device=device, dtype=dtype)}

    def num_timesteps(self, comps: Components) -> int:
        return comps.noise_scheduler.config.num_train_timesteps

    def loss(self, model: Any, comps: Components, latents: torch.Tensor, context: torch.Tensor,
             added: dict[str, torch.Tensor] | None, noise: torch.Tensor, timesteps: torch.Tensor,
             ts: TrainingSection, weight_dtype: torch.dtype, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        from backend.trainer.loss import diffusion_loss

        return diffusion_loss(model, comps.noise_scheduler, latents, context, added, noise, timesteps,
                              comps.v_prediction, ts, weight_dtype, input_noise)

    def pipeline(self, comps: Components, model: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        tes, toks = comps.text_encoders, comps.tokenizers
        if self.xl:
            return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=toks[0],
                                             tokenizer_2=toks[1], unet=model, scheduler=scheduler)
        return StableDiffusionPipeline(vae=comps.vae, text_encoder=tes[0], tokenizer=toks[0], unet=model,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def prompt_embeddings(self, comps: Components, text: Any, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        ctx, pooled = text.encode([prompt])
        if self.xl and not negative:
            # diffusers' SDXL default (force_zeros_for_empty_prompt): an empty negative prompt is zeros.
            neg_ctx, neg_pooled = torch.zeros_like(ctx), torch.zeros_like(pooled)
        else:
            neg_ctx, neg_pooled = text.encode([negative])
        out = {"prompt_embeds": ctx, "negative_prompt_embeds": neg_ctx}
        if self.xl:
            out.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        return out

    def text_encoder_prefix(self, index: int) -> str:
        return f"lora_te{index + 1}_" if self.xl else "lora_te_"

    def model_module_names(self, unet_config: Any, ldm: bool = True) -> Any:
        """SDXL's UNet modules carry their original (LDM) names in the file, as sd-scripts writes them,
        unless `ldm` is off (diffusers names, which Lathe also reads)."""
        if self.xl and ldm:
            from backend.sdxl_names import ldm_module_name

            return functools.partial(ldm_module_name, unet_config=unet_config)
        return str


SD15 = StableDiffusion("sd15", "SD 1.x", "sd_v1", "stable-diffusion-v1/lora")
SD2 = StableDiffusion("sd2", "SD 2.x", "sd_v2", "stable-diffusion-v2-512/lora")
SDXL = StableDiffusion("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", xl=True)
