"""Which model family (SD1.x/2.x/XL, SD3/SD3.5, Flux.1) a model on disk is, read without torch (the GUI imports it).

A diffusers folder tells from its UNet config (the rule the trainer's loader uses) or, without one,
from model_index.json; a .safetensors file from the tensor names in its JSON header (the first 8
bytes are the header's length, little-endian; nothing else of the file is read). A pickled .ckpt
cannot be read safely without torch, so it is not detected here; the trainer checks it at load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

FAMILY_NAMES = {"sd15": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "Flux.1"}
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}  # a diffusers folder's model_index.json _class_name
MAX_HEADER_BYTES = 100 * 2**20  # safetensors refuses larger headers itself
# Text-encoder prefixes of the original ("LDM") single-file layout, as in backend/trainer/model_configs/ldm_layout.py.
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
SD2_TE = "cond_stage_model.model."
SD1_TE = "cond_stage_model.transformer."
# Transformer tensor names of the flow families' single files (see backend/trainer/single_file_flow.py).
DIFFUSION_PREFIX = "model.diffusion_model."
FLUX_ORIGINAL = {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"}  # Black Forest Labs' layout
FLUX_DIFFUSERS = "transformer_blocks.0.attn.to_q.weight"  # + single_transformer_blocks.*
SD3_DIFFUSERS = {"pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight"}  # no single blocks


class ModelReadError(ValueError):
    """The model cannot be read; the message says why, in plain words."""


def family_from_unet_config(cfg: dict[str, Any]) -> str:
    """SDXL has size/crop ('text_time') conditioning; SD2 has linear projections in its transformers
    and a 1024-wide context; anything else is SD1 (the same rule as backend/trainer/models.py)."""
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cfg.get("cross_attention_dim") == 1024 or cfg.get("use_linear_projection"):
        return "sd2"
    return "sd15"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_family(folder: Path) -> str | None:
    """The family of a diffusers folder, or None when its configs do not say."""
    index = _read_json(folder / "model_index.json") or {}
    if str(index.get("_class_name")) in FLOW_PIPELINES:
        return FLOW_PIPELINES[str(index["_class_name"])]
    unet = _read_json(folder / "unet" / "config.json")
    if unet is not None:
        return family_from_unet_config(unet)
    if "XL" in str(index.get("_class_name", "")) or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    return None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's header; ModelReadError when it is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelReadError(f"{path} is too short to be a .safetensors file")
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER_BYTES or size > path.stat().st_size - 8:
                raise ModelReadError(f"{path} is not a .safetensors file (its header length is {size} bytes)")
            header = json.loads(fh.read(size))
    except ModelReadError:
        raise
    except OSError as e:
        raise ModelReadError(f"{path} cannot be read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelReadError(f"{path} is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelReadError(f"{path} is not a .safetensors file (its header is not a JSON object)")
    return [k for k in header if k != "__metadata__"]


def keys_family(keys: list[str]) -> str | None:
    """The family of a single-file checkpoint from its tensor names, or None when they do not say."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(SDXL_TE1) and has(SDXL_TE2):
        return "sdxl"
    if has(SD2_TE):
        return "sd2"
    if has(SD1_TE):
        return "sd15"
    return flow_keys_family(keys)


def flow_keys_family(keys: list[str]) -> str | None:
    """"sd3" or "flux" for an SD3/SD3.5 or Flux.1 transformer file (the original or the diffusers
    layout, with or without the `model.diffusion_model.` prefix; an SD3 checkpoint that also holds
    `text_encoders.*` and `first_stage_model.*` counts), else None."""
    bare = {k.removeprefix(DIFFUSION_PREFIX) for k in keys}
    if FLUX_ORIGINAL & bare or (FLUX_DIFFUSERS in bare and any(k.startswith("single_transformer_blocks.") for k in bare)):
        return "flux"
    if any(k.startswith("joint_blocks.") for k in bare) or SD3_DIFFUSERS.issubset(bare):
        return "sd3"
    return None


def detect_family(path: Path) -> str | None:
    """"sd15", "sd2", "sdxl", "sd3", "flux", or None when it cannot be told without torch (a .ckpt, an unknown
    layout). ModelReadError for a .safetensors file that is not one."""
    path = Path(path)
    if path.is_dir():
        return folder_family(path)
    if path.suffix.lower() == ".safetensors":
        return keys_family(safetensors_keys(path))
    return None
