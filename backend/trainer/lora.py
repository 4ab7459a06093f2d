"""LoRA: inject adapters with peft, collect the trainable tensors, export kohya-format files.

Dropout is kohya's `network_dropout`: on the output of the down projection (the rank-sized
activation), not on the layer input as peft's `lora_dropout` would do.

Export format (what A1111 and ComfyUI read, and diffusers' load_lora_weights converts):
  lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha
  lora_te_text_model_<...> (SD1/SD2) or lora_te1_/lora_te2_ (SDXL's two encoders)
Alpha is a tensor per module because ComfyUI never reads file metadata.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from backend.config import NetworkConfig

ADAPTER = "default"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NoTargetsError(Exception):
    pass


def inject(model: torch.nn.Module, net: NetworkConfig, targets: list[str], what: str) -> None:
    """Add LoRA adapters to `model` in place (weights: A random, B zero, so the start is the base model)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise NoTargetsError(
            f"network.{'target_modules' if what == 'unet' else 'text_encoder_target_modules'}: "
            f"none of {targets} matches a layer of the {what} ({e})"
        ) from None
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    if net.dropout > 0:
        for _, m in _lora_modules(model):
            add_down_dropout(m.lora_A[ADAPTER], net.dropout)


def add_down_dropout(down: torch.nn.Module, p: float) -> None:
    """kohya's network_dropout: drop entries of lora_down's output while the module trains."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=p, training=module.training)

    down.register_forward_hook(hook)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors by their peft names (detached fp32 CPU copies)."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in params if "lora_" in n and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise ValueError(f"LoRA tensors do not match the network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{n}: shape {tuple(t.shape)} in checkpoint, {tuple(params[n].shape)} in the network")
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _lora_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})]


def te_prefix(index: int, is_sdxl: bool) -> str:
    return f"lora_te{index + 1}_" if is_sdxl else "lora_te_"


def kohya_key(prefix: str, module_name: str, text_encoder: bool) -> str:
    """The kohya name of one module; transformers 5 dropped `text_model.` from CLIP names: put it back."""
    if text_encoder and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


def kohya_state_dict(groups: list[tuple[str, torch.nn.Module, bool]], alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The export's tensors; `groups` are (key prefix, module, is a text encoder), see Trained.export_groups."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model, is_te in groups:
        for name, m in _lora_modules(model):
            key = kohya_key(prefix, name, is_te)
            out[f"{key}.lora_down.weight"] = m.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = m.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def save_export(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a kohya LoRA file; metadata values must be strings in safetensors."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if v is not None}
    save_file(tensors, path, metadata=meta)
