"""Key layout of the original Stable Diffusion ("LDM") checkpoints: diffusers -> LDM names.

The inverse of diffusers' single-file conversion (diffusers.loaders.single_file_utils), written for
UNet2DConditionModel (SD1.x / SD2.x / SDXL shapes, any block count), AutoencoderKL, OpenAI CLIP
(SD1.x, SDXL's first encoder) and OpenCLIP (SD2.x, SDXL's second encoder). Keys are returned
without the component prefix (model.diffusion_model., first_stage_model.) except for the text
encoders, whose prefix depends on the family and is passed in. describe_unrecognised() names
the other layouts users point at by mistake (LoRA, SD3, Flux, a lone VAE ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
XL_TE1 = "conditioner.embedders.0.transformer."
XL_TE2 = "conditioner.embedders.1.model."

Rename = Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]
Table = dict[str, tuple[str, Rename | None]]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _unet_resnet(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(head, head)}.{tail}", value


def _vae_resnet(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1), value


def _vae_attention(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """diffusers' linear q/k/v/out -> the LDM VAE's 1x1 convolutions."""
    for new, old in _VAE_ATTENTION.items():
        if rest.startswith(new + "."):
            rest = old + rest[len(new) :]
            break
    if rest.endswith(".weight") and value.dim() == 2 and not rest.startswith("norm."):
        value = value.reshape(*value.shape, 1, 1)
    return rest, value


def _remap(weights: Mapping[str, torch.Tensor], table: Table, what: str) -> dict[str, torch.Tensor]:
    """Rename each key by the longest dotted head found in `table` (then its Rename, if any)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n]) + "."
            if head in table:
                new_head, rename = table[head]
                rest, new_value = rename(key[len(head) :], value) if rename else (key[len(head) :], value)
                out[new_head + rest] = new_value
                break
        else:
            raise ValueError(f"Cannot place the {what} weight {key} in the LDM layout")
    return out


def _unet_table(config: Mapping[str, Any]) -> Table:
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError("The LDM layout needs one layers_per_block for every UNet block")
    table: Table = {
        "time_embedding.linear_1.": ("time_embed.0.", None),
        "time_embedding.linear_2.": ("time_embed.2.", None),
        "add_embedding.linear_1.": ("label_emb.0.0.", None),
        "add_embedding.linear_2.": ("label_emb.0.2.", None),
        "conv_in.": ("input_blocks.0.0.", None),
        "conv_norm_out.": ("out.0.", None),
        "conv_out.": ("out.2.", None),
        "mid_block.resnets.0.": ("middle_block.0.", _unet_resnet),
        "mid_block.attentions.0.": ("middle_block.1.", None),
        "mid_block.resnets.1.": ("middle_block.2.", _unet_resnet),
    }
    for i in range(len(config["down_block_types"])):
        for j in range(per):
            n = (per + 1) * i + j + 1
            table[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{n}.0.", _unet_resnet)
            table[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{n}.1.", None)
        table[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(per + 1) * (i + 1)}.0.op.", None)
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(per + 1):
            n = (per + 1) * i + j
            table[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{n}.0.", _unet_resnet)
            table[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{n}.1.", None)
        slot = 2 if "CrossAttn" in block_type else 1  # the upsampler follows the attention, if any
        table[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{(per + 1) * i + per}.{slot}.conv.", None)
    return table


def unet_to_ldm(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> LDM UNet keys (without "model.diffusion_model.")."""
    return _remap(weights, _unet_table(config), "UNet")


def _vae_table(config: Mapping[str, Any]) -> Table:
    blocks, per = len(config["block_out_channels"]), int(config["layers_per_block"])
    table: Table = {"quant_conv.": ("quant_conv.", None), "post_quant_conv.": ("post_quant_conv.", None)}
    for side in ("encoder", "decoder"):
        for new, old in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            table[f"{side}.{new}."] = (f"{side}.{old}.", None)
        for j in range(2):
            table[f"{side}.mid_block.resnets.{j}."] = (f"{side}.mid.block_{j + 1}.", _vae_resnet)
        table[f"{side}.mid_block.attentions.0."] = (f"{side}.mid.attn_1.", _vae_attention)
    for i in range(blocks):
        up = blocks - 1 - i  # the LDM decoder numbers its levels from the bottom
        for j in range(per + 1):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _vae_resnet)
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{up}.block.{j}.", _vae_resnet)
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", None)
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{up}.upsample.conv.", None)
    return table


def vae_to_ldm(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> LDM VAE keys (without "first_stage_model.")."""
    return _remap(weights, _vae_table(config), "VAE")


def clip_to_ldm(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text model (transformers) -> `prefix` + "text_model.*" (its own layout)."""
    out = {}
    for key, value in weights.items():
        bare = key.removeprefix("text_model.")
        if bare.endswith("position_ids") or bare == "text_projection.weight":
            continue  # a buffer, and a projection SD's FrozenCLIPEmbedder does not have
        out[f"{prefix}text_model.{bare}"] = value
    return out


def openclip_to_ldm(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP text model (transformers) -> OpenCLIP's layout under `prefix` (fused qkv, resblocks)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        bare = key.removeprefix("text_model.")
        if bare.endswith("position_ids"):
            continue
        if bare == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP multiplies x @ P
            continue
        if bare in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[bare]] = value
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", bare)
        if match is None:
            raise ValueError(f"Cannot place the text encoder weight {key} in the OpenCLIP layout")
        block, rest = f"{prefix}transformer.resblocks.{match.group(1)}.", match.group(2)
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if proj is not None:
            qkv.setdefault((block, proj.group(2)), {})[proj.group(1)] = value
            continue
        new = next((b + rest[len(a) :] for a, b in _OPENCLIP_LAYER.items() if rest.startswith(a)), None)
        if new is None:
            raise ValueError(f"Cannot place the text encoder weight {key} in the OpenCLIP layout")
        out[block + new] = value
    for (block, kind), parts in qkv.items():
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_ldm_state_dict(comps: Mapping[str, Any], family: str) -> dict[str, torch.Tensor]:
    """The LDM-layout state dict of diffusers components (tensors are not copied or moved)."""
    unet, vae = comps["unet"], comps["vae"]
    out = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    out.update({VAE + k: v for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    te = comps["text_encoder"].state_dict()
    if family == "sdxl":
        out.update(clip_to_ldm(te, XL_TE1))
        out.update(openclip_to_ldm(comps["text_encoder_2"].state_dict(), XL_TE2))
    elif family.startswith("sd2"):
        out.update(openclip_to_ldm(te, SD2_TE))
    else:
        out.update(clip_to_ldm(te, SD1_TE))
    return out


def describe_unrecognised(keys: set[str]) -> str:
    """A plain sentence saying what a file that is not an SD1.x/SD2.x/SDXL checkpoint looks like."""
    if not keys:
        return "The file holds no tensors."

    def contains(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if contains("lora_down", "lora_up", "lora.down.", "lora.up.", "lora_A.", "lora_B.", "hada_w1", "lokr_w1") or any(
        k.startswith(("lora_unet_", "lora_te")) for k in keys
    ):
        what = "a LoRA/LyCORIS network (lora_* keys), not a base model to train on"
    elif contains("emb_params", "string_to_param") or keys <= {"clip_l", "clip_g"}:
        what = "a textual-inversion embedding, not a base model"
    elif contains("joint_blocks."):
        what = "a Stable Diffusion 3 model (joint_blocks.*), which Lathe loads from a .safetensors file only"
    elif contains("double_blocks.", "single_blocks.", "double_stream_blocks"):
        what = "a Flux-style transformer model (double_blocks.*), which Lathe loads from a .safetensors file only"
    elif contains("control_model.", "controlnet_cond_embedding", "input_hint_block"):
        what = "a ControlNet, not a base model"
    elif all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        what = "a standalone VAE, not a full checkpoint"
    elif any(k.startswith(("down_blocks.", "text_model.")) for k in keys):
        what = "one diffusers-format component (down_blocks.* / text_model.*); point at the whole diffusers folder"
    elif any(k.startswith(("first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keys):
        what = "a Stable Diffusion checkpoint without its UNet (no model.diffusion_model.*)"
    else:
        what = "something other than a Stable Diffusion checkpoint"
    sample = ", ".join(sorted(keys)[:3])
    return f"Unrecognised model file: it looks like {what}. Lathe loads SD1.x, SD2.x and SDXL checkpoints (first keys: {sample})."
