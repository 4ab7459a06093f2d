"""The interface every model family implements (see the package docstring). A family object holds
no state: the loaded weights are in `models.Components`, which names its family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from backend.config import TrainingConfig, TrainingSection
    from backend.trainer.models import Components

# One sample's image geometry, as size conditioning reads it: (original (h, w), crop (top, left), target (h, w)).
Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class ModelFamily:
    name: str = ""
    label: str = ""  # for people: "SDXL"
    base_model_version: str = ""  # ss_base_model_version, as sd-scripts writes it
    architecture: str = ""  # modelspec.architecture of a LoRA for this family

    # ------------------------------------------------------------------------------ text
    def encode_text(self, comps: Components, captions: list[str], clip_skip: int, max_token_length: int,
                    encoders: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, L, C], pooled [B, P] or None): what the model is conditioned on."""
        raise NotImplementedError

    def text_warnings(self, training: TrainingSection) -> list[str]:
        """Settings this family ignores, as warnings for the run's log."""
        return []

    # ------------------------------------------------------------------------------ the model call
    def added_conditioning(self, comps: Components, pooled: torch.Tensor | None, geometry: list[Geometry],
                           device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """What the model needs besides the noisy latents, timesteps and context (SDXL: pooled text
        and size conditioning), or None."""
        return None

    def num_timesteps(self, comps: Components) -> int:
        raise NotImplementedError

    def draw_timestep(self, gen: torch.Generator, ts: TrainingSection, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """One sample's timestep from its generator (shape (1,)), or None for the DDPM draw
        (noise.draw_noise: randint over training.min_timestep..max_timestep)."""
        return None

    def default_targets(self, model: Any = None) -> list[str] | None:
        """The denoiser's LoRA targets (for `model`, the loaded denoiser) when network.target_modules is left
        at its (SD) default; None: that default."""
        return None

    def loss(self, model: Any, comps: Components, latents: torch.Tensor, context: torch.Tensor,
             added: dict[str, torch.Tensor] | None, noise: torch.Tensor, timesteps: torch.Tensor,
             ts: TrainingSection, weight_dtype: torch.dtype, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's training loss ([batch]), weights included."""
        raise NotImplementedError

    def check(self, cfg: TrainingConfig, comps: Components) -> None:
        """Refuse (with a plain message) settings this family cannot train with; called once at setup."""

    # ------------------------------------------------------------------------------ sampling
    def sampler(self, comps: Components) -> Any:
        """The sampling scheduler when the family has one only (flow matching), else None (sample_sampler)."""
        return None

    def pipeline(self, comps: Components, model: Any, scheduler: Any) -> Any:
        """A diffusers pipeline over the training modules (the trained model, not a copy)."""
        raise NotImplementedError

    def prompt_embeddings(self, comps: Components, text: Any, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments for one prompt, encoded as training encodes captions."""
        raise NotImplementedError

    def sample_latents(self, comps: Components, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's latent output as the VAE decodes it (Flux: unpacked)."""
        return latents

    # ------------------------------------------------------------------------------ the exported file
    export_formats: tuple[str, ...] = ("sd-scripts",)  # saving.export_format values this family writes; the first is auto

    def metadata(self, cfg: TrainingConfig, comps: Components) -> dict[str, str | None]:
        """The export's family-specific `ss_*`/modelspec keys (they replace the common ones; None: not written)."""
        return {}

    def export_format(self, cfg: TrainingConfig) -> str:
        """saving.export_format resolved for this family; a format it does not write is refused by name."""
        fmt = cfg.saving.export_format
        if fmt == "auto":
            return self.export_formats[0]
        if fmt not in self.export_formats:
            from backend.trainer.loss import LossSettingError

            raise LossSettingError(f"saving.export_format: {self.label} LoRAs are written with "
                                   f"{' or '.join(self.export_formats)} names, not {fmt}; use auto")
        return fmt

    def export_tensors(self, groups: list[Any], dtype: torch.dtype, export_format: str = "auto") -> dict[str, torch.Tensor]:
        """The exported LoRA file's tensors (kohya/LyCORIS names unless the family says otherwise)."""
        from backend.trainer.export import state_dict

        return state_dict(groups, dtype)

    def model_prefix(self) -> str:
        """The kohya key prefix of the denoiser's modules."""
        return "lora_unet_"

    def text_encoder_prefix(self, index: int) -> str:
        raise NotImplementedError

    def trained_text_encoders(self, count: int) -> list[int]:
        """The text encoders (by index) that network.train_text_encoder trains: all of them unless the
        family says otherwise (Flux.1 and SD3 train their CLIPs, not T5, as sd-scripts does by default)."""
        return list(range(count))

    def memoizable_text_encoders(self, count: int) -> list[int]:
        """The text encoders (by index) this family calls as `encoder(ids)[0]` from the token ids alone
        and never trains (T5-XXL): when a run trains the others on fixed captions, their output per
        caption is computed once (caching.FrozenOutputs) instead of every step. None by default."""
        return []

    def model_module_names(self, comps_or_config: Any, ldm: bool = True) -> Any:
        """The map from the denoiser's diffusers module names to the names its exported keys use."""
        return str
