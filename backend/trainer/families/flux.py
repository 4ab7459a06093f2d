"""Flux.1 dev and schnell: a double- and single-stream transformer on 2x2-packed 16-channel latents,
trained by flow matching (backend.trainer.flow, sd-scripts' Flux formulas), conditioned on T5-XXL's
states (the sequence) and CLIP-L's pooled output, with the guidance value as an input of the
guidance-distilled dev model (sd-scripts' flux_train_network.get_noise_pred_and_target; diffusers'
FluxPipeline packs and positions the latents the same way).

The LoRA is exported as sd-scripts writes it (networks/lora_flux.py: `lora_unet_double_blocks_N_...`,
`lora_unet_single_blocks_N_...`, the original Black Forest Labs module names), which ComfyUI,
sd-scripts' tools and diffusers' `load_lora_weights` read. Lathe trains diffusers' split layers
(to_q, to_k, to_v, ...); the original model fuses some of them (img_attn.qkv; a single block's
linear1 = q, k, v and the MLP input), so each fused layer's LoRA is written as sd-scripts writes a
split-trained one: the down matrices stacked, the up matrices block-diagonal. Its alpha is the parts'
alpha times their number, so every loader's alpha / rank gives each part the scale it trained with
(sd-scripts' split_qkv merge keeps alpha as it is, which makes loaders apply 1/3 of such an update).
`saving.export_format` diffusers writes diffusers' `transformer.` (peft) names instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from backend.trainer import flow
from backend.trainer.families.flow_matching import CLIP_LENGTH, FlowMatchingFamily, flow_refusals

if TYPE_CHECKING:
    from backend.config import TrainingConfig, TrainingSection
    from backend.trainer.models import Components

T5_LENGTH = {True: 512, False: 256}  # sd-scripts' t5xxl_max_token_length defaults: dev (guidance embedding), schnell
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # sd-scripts' DoubleStreamBlock, SingleStreamBlock
# diffusers' layer (within block N) -> (the original layer's name, its part of that layer's output).
DOUBLE = {
    "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0),
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
}
SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}
PARTS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}


def original_name(name: str) -> tuple[str, int]:
    """A transformer layer's diffusers name -> (its sd-scripts key stem, its part index in a fused layer)."""
    for prefix, table, stem in (("transformer_blocks.", DOUBLE, "double_blocks"),
                                ("single_transformer_blocks.", SINGLE, "single_blocks")):
        if name.startswith(prefix):
            index, _, layer = name[len(prefix):].partition(".")
            if layer in table:
                orig, part = table[layer]
                return f"lora_unet_{stem}_{index}_{orig}", part
    raise ValueError(f"{name}: not a layer sd-scripts' Flux LoRA format has (only the double and single blocks' "
                     "linear layers)")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, h w, 4C] (sd-scripts' flux_utils.pack_latents, diffusers' _pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h w, 4C] -> [B, C, 2h, 2w] for the packed height and width h, w (flux_utils.unpack_latents)."""
    b, _, cp = x.shape
    return x.view(b, h, w, cp // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, cp // 4, h * 2, w * 2)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[h w, 3]: (0, row, column) of each packed latent (flux_utils.prepare_img_ids, without the batch)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device, dtype)


class Flux(FlowMatchingFamily):
    name, label = "flux", "Flux.1"
    base_model_version, architecture = "flux1", "flux-1-dev/lora"

    def check(self, cfg: TrainingConfig, comps: Components) -> None:
        problems = flow_refusals(cfg, self.label)
        for name in ("min_timestep", "max_timestep"):
            if getattr(cfg.training, name) is not None:  # sd-scripts' flux_train_utils draws without them too
                problems.append(f"training.{name}: {self.label}'s noise levels come from training.timestep_sampling, "
                                "which does not read a timestep range; clear it")
        if cfg.network.type != "lora":
            problems.append(f"network.type: {cfg.network.type} is not trained for {self.label} yet (sd-scripts' Flux "
                            "LoRA format holds plain LoRA); use lora")
        if cfg.network.network_weights:
            problems.append(f"network.network_weights: starting a {self.label} run from a LoRA file is not built yet; "
                            "clear it")
        multiple = 2 * comps.vae_scale_factor  # latents are packed 2x2
        if cfg.dataset.bucket_reso_steps % multiple:
            problems.append(f"dataset.bucket_reso_steps: {cfg.dataset.bucket_reso_steps} must be a multiple of "
                            f"{multiple} for {self.label} (its latents are packed in 2x2 patches)")
        if cfg.dataset.resolution % multiple:
            problems.append(f"dataset.resolution: {cfg.dataset.resolution} must be a multiple of {multiple} for "
                            f"{self.label}")
        if problems:
            from backend.trainer.loss import LossSettingError

            raise LossSettingError("; ".join(problems))

    def default_targets(self, model: Any = None) -> list[str] | None:
        """Every linear layer of the double and single blocks, as sd-scripts' lora_flux targets them (by full
        name: a suffix such as proj_out would also catch the final layer)."""
        if model is None:
            return None
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS)]

    @staticmethod
    def guided(comps: Components) -> bool:
        """Flux.1 dev (and other guidance-distilled models) take the guidance value as an input; schnell does not."""
        return bool(comps.unet.config.guidance_embeds)

    # ------------------------------------------------------------------------------ text
    def encode_text(self, comps: Components, captions: list[str], clip_skip: int, max_token_length: int,
                    encoders: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T5 states [B, L, 4096], CLIP-L's pooled output [B, 768]), as FluxPipeline.encode_prompt and
        sd-scripts' strategy_flux encode them (no T5 attention mask: apply_t5_attn_mask off)."""
        clip, t5 = encoders[:2]
        tok, tok5 = comps.tokenizers[:2]
        ids = tok(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt").input_ids
        pooled = clip(ids.to(next(clip.parameters()).device), output_hidden_states=False).pooler_output
        length = comps.extra.get("t5_length") or T5_LENGTH[self.guided(comps)]
        ids5 = tok5(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        states = t5(ids5.to(next(t5.parameters()).device))[0]
        return states, pooled.to(states.dtype)

    def text_warnings(self, training: TrainingSection) -> list[str]:
        out = []
        if training.max_token_length != 75:
            out.append(f"training.max_token_length: {training.max_token_length} is for CLIP-only families; Flux.1 "
                       "reads 77 CLIP tokens and training.t5xxl_max_token_length T5 tokens")
        if training.clip_skip > 1:
            out.append(f"training.clip_skip: {training.clip_skip} is ignored for Flux.1, which reads CLIP-L's pooled "
                       "output only")
        return out

    # ------------------------------------------------------------------------------ the model call
    def draw_timestep(self, gen: torch.Generator, ts: TrainingSection, latent_hw: tuple[int, int]) -> torch.Tensor:
        return flow.flux_timestep(gen, ts, latent_hw)

    def predict(self, model: Any, comps: Components, noisy: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
                added: dict[str, torch.Tensor] | None, guidance: float, dtype: torch.dtype) -> torch.Tensor:
        """The transformer's output for unpacked noisy latents [B, C, H, W], unpacked."""
        b, _, height, width = noisy.shape
        h, w = height // 2, width // 2
        kw = dict(added or {})
        if self.guided(comps):
            kw["guidance"] = torch.full((b,), float(guidance), device=noisy.device, dtype=dtype)
        out = model(hidden_states=pack(noisy).to(dtype), timestep=sigmas.to(dtype),  # the model scales by 1000
                    encoder_hidden_states=context.to(dtype), img_ids=image_ids(h, w, noisy.device, dtype),
                    txt_ids=torch.zeros(context.shape[1], 3, device=noisy.device, dtype=dtype), **kw).sample
        return unpack(out, h, w)

    def loss(self, model: Any, comps: Components, latents: torch.Tensor, context: torch.Tensor,
             added: dict[str, torch.Tensor] | None, noise: torch.Tensor, timesteps: torch.Tensor,
             ts: TrainingSection, weight_dtype: torch.dtype, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = timesteps.float() / flow.NUM_TIMESTEPS
        noisy = flow.noisy_input(latents, noise if input_noise is None else input_noise, sigmas)
        pred = self.predict(model, comps, noisy, sigmas, context, added, ts.guidance_scale, weight_dtype)
        return self.flow_loss(pred, latents, noise, noisy, sigmas, ts)

    # ------------------------------------------------------------------------------ sampling
    def pipeline(self, comps: Components, model: Any, scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        tes, toks = comps.text_encoders, comps.tokenizers
        return FluxPipeline(transformer=model, scheduler=self.sampler(comps), vae=comps.vae, text_encoder=tes[0],
                            tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1])

    def prompt_embeddings(self, comps: Components, text: Any, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        """Flux.1 is guidance-distilled: the pipeline's guidance_scale is the model's guidance input, and a
        negative prompt is not read (sd-scripts reads one only for its true-CFG sampling)."""
        ctx, pooled = text.encode([prompt])
        return {"prompt_embeds": ctx, "pooled_prompt_embeds": pooled}

    def sample_latents(self, comps: Components, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = height // (2 * comps.vae_scale_factor), width // (2 * comps.vae_scale_factor)
        return unpack(latents, h, w) if latents.ndim == 3 else latents

    # ------------------------------------------------------------------------------ the exported file
    export_formats = ("sd-scripts", "diffusers")

    def export_tensors(self, groups: list[Any], dtype: torch.dtype, export_format: str = "sd-scripts") -> dict[str, torch.Tensor]:
        from backend.trainer.export import diffusers_groups, diffusers_state_dict

        if export_format == "diffusers":  # diffusers' names: `transformer.<module>`, CLIP-L's `text_encoder.<module>`
            return diffusers_state_dict(diffusers_groups(groups), dtype)
        return sd_scripts_state_dict(groups, dtype)

    def metadata(self, cfg: TrainingConfig, comps: Components) -> dict[str, str | None]:
        """sd-scripts' flux_train_network.update_metadata keys and its modelspec for Flux (no prediction type)."""
        t = cfg.training
        out = {f"ss_{name}": str(getattr(t, name)) for name in (
            "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale", "timestep_sampling",
            "sigmoid_scale", "model_prediction_type", "discrete_flow_shift")}
        out |= {"ss_model_type": "flux", "ss_apply_t5_attn_mask": "False",
                "modelspec.architecture": f"flux-1-{'dev' if self.guided(comps) else 'schnell'}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux", "modelspec.prediction_type": None}
        return out

    def model_prefix(self) -> str:
        return "lora_unet_"

    def text_encoder_prefix(self, index: int) -> str:
        return ("lora_te1_", "lora_te3_")[index]  # sd-scripts: CLIP-L lora_te1, T5-XXL lora_te3 (ComfyUI's names)

    def trained_text_encoders(self, count: int) -> list[int]:
        return [0]  # CLIP-L; T5-XXL stays frozen (sd-scripts' train_t5xxl is off by default)

    def memoizable_text_encoders(self, count: int) -> list[int]:
        return [1]  # T5-XXL: called as t5(ids)[0] in encode_text, never trained


def sd_scripts_state_dict(groups: list[Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformer's LoRA under sd-scripts' Flux keys (see the module docstring); CLIP-L's under
    `lora_te1_` with kohya's names, as sd-scripts' lora_flux writes it."""
    from backend.trainer.export import state_dict
    from backend.trainer.network import ADAPTER, network_modules

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    out = state_dict([g for g in groups if g[2]], dtype)
    for _, model, is_te, _ in groups:
        if is_te:
            continue
        for name, m in network_modules(model):
            if not (hasattr(m, "lora_A") and ADAPTER in m.lora_A) or hasattr(m, "dora_scale"):
                raise ValueError(f"{name}: sd-scripts' Flux LoRA format holds plain LoRA layers only")
            layers[name] = (m.lora_A[ADAPTER].weight.detach().float(), m.lora_B[ADAPTER].weight.detach().float(),
                            float(m.lora_alpha[ADAPTER]))
    return out | {k: t.to("cpu", dtype).contiguous() for k, t in to_sd_scripts(layers).items()}


def to_sd_scripts(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """{diffusers layer name: (down [r, in], up [out, r], alpha)} -> sd-scripts' Flux tensors: one
    lora_down/lora_up/alpha per original layer; a fused layer's parts stacked (down) and block-diagonal
    (up), with alpha x parts; a part that was not trained a zero block."""
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for name, t in layers.items():
        stem, part = original_name(name)
        fused.setdefault(stem, {})[part] = t
    out: dict[str, torch.Tensor] = {}
    for stem, parts in fused.items():
        n = next((k for suffix, k in PARTS.items() if stem.endswith("_" + suffix)), 1)
        alphas = {a for _, _, a in parts.values()}
        ranks = {d.shape[0] for d, _, _ in parts.values()}
        if len(alphas) > 1 or len(ranks) > 1:
            raise ValueError(f"{stem}: its parts were trained with different ranks or alphas, which one fused layer "
                             "cannot hold")
        rank, alpha = ranks.pop(), alphas.pop()
        down, up = (parts[0][0], parts[0][1]) if n == 1 else _fuse(stem, parts, n, rank)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(alpha * n)
    return out


def _fuse(stem: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]], n: int,
          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked down [n r, in] and block-diagonal up [sum of outs, n r] of a fused layer's parts; a part that
    is not trained has zero blocks (q, k and v are equally wide; the MLP part's width is only known when
    it is trained)."""
    in_features = next(iter(parts.values()))[0].shape[1]
    attention = [p[1].shape[0] for j, p in parts.items() if j < 3]
    outs = []
    for i in range(n):
        if i in parts:
            outs.append(parts[i][1].shape[0])
        elif i < 3 and attention:
            outs.append(attention[0])
        else:
            raise ValueError(f"{stem}: proj_mlp cannot be written without the attention layers of its block (the "
                             "original model fuses them into one layer); train to_q, to_k, to_v and proj_mlp together")
    down = torch.zeros(n * rank, in_features)
    up = torch.zeros(sum(outs), n * rank)
    row = 0
    for i in range(n):
        if i in parts:
            down[i * rank : (i + 1) * rank] = parts[i][0]
            up[row : row + outs[i], i * rank : (i + 1) * rank] = parts[i][1]
        row += outs[i]
    return down, up


FLUX = Flux()
