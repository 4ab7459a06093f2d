"""The exported network file: kohya/LyCORIS keys, as AUTOMATIC1111's and ComfyUI's loaders read them.

Keys are `<stem>.<tensor>` with the stem `lora_unet_<module path with _>` (SDXL: the original LDM
module names, as sd-scripts writes them, see backend.sdxl_names), `lora_te_text_model_<...>` (SD1/SD2)
or `lora_te1_`/`lora_te2_` (SDXL's two encoders). Per type:
  lora, locon  lora_down.weight, lora_up.weight, alpha            (conv: down (r,in,k,k), up (out,r,1,1))
  dora         the same plus dora_scale, shape (1, in[, 1, 1])
  loha         hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b[, hada_t1, hada_t2], alpha
  lokr         lokr_w1 | lokr_w1_a+lokr_w1_b, lokr_w2 | lokr_w2_a+lokr_w2_b[, lokr_t2], alpha
Alpha is a tensor per module because ComfyUI never reads file metadata. A LoKr module with both
factors whole is applied with scale 1 by LyCORIS and ComfyUI (they have no rank to divide by): its
alpha/rank is folded into lokr_w1, so every loader computes the trained update.

`read_network_file` reads such a file back (Lathe's or sd-scripts', either SDXL naming) into the peft
names of a network, undoing that fold: the start point of `network.network_weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.hashed_io import fsync_dir, write_durable
from backend.trainer import tensorfile
from backend.trainer.network import ADAPTER, network_modules

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_TENSORS = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
LYCORIS_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

Group = tuple[str, torch.nn.Module, bool, Callable[[str], str]]  # (prefix, module, is a text encoder, module name map)


def kohya_stem(prefix: str, module_name: str, text_encoder: bool) -> str:
    """The kohya name of one module; transformers 5 dropped `text_model.` from CLIP names: put it back."""
    if text_encoder and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


def _lokr_whole(m: torch.nn.Module) -> bool:
    return ADAPTER in m.lokr_w1 and ADAPTER in m.lokr_w2


def module_tensors(m: torch.nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """One layer's tensors under their file names (fp32, detached) and its alpha."""
    out: dict[str, torch.Tensor] = {}
    if hasattr(m, "lora_A") and ADAPTER in m.lora_A:
        for attr, key in LORA_TENSORS.items():
            out[key] = getattr(m, attr)[ADAPTER].weight.detach().float()
        if hasattr(m, "dora_scale"):
            out["dora_scale"] = m.dora_scale.detach().float()
        return out, float(m.lora_alpha[ADAPTER])
    for attr in LYCORIS_TENSORS:
        store = getattr(m, attr, None)
        if store is not None and ADAPTER in store:
            out[attr] = store[ADAPTER].detach().float()
    if hasattr(m, "lokr_w1") and _lokr_whole(m):
        out["lokr_w1"] = out["lokr_w1"] * m.scaling[ADAPTER]
    return out, float(m.alpha[ADAPTER])


def diffusers_state_dict(groups: list[Group], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The export in diffusers' (peft) LoRA format, `<prefix>.<module>.lora_A.weight` / `lora_B.weight`,
    which diffusers' load_lora_weights and ComfyUI read for the transformer families. The format has no
    alpha, so alpha/rank is folded into lora_B (the update up @ down * alpha/rank is unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model, _, rename in groups:
        for name, m in network_modules(model):
            if not (hasattr(m, "lora_A") and ADAPTER in m.lora_A) or hasattr(m, "dora_scale"):
                raise ValueError(f"{name}: diffusers' LoRA format holds plain LoRA layers only")
            down, up = m.lora_A[ADAPTER].weight.detach().float(), m.lora_B[ADAPTER].weight.detach().float()
            stem = f"{prefix}{rename(name)}"
            out[f"{stem}.lora_A.weight"] = down.to("cpu", dtype).contiguous()
            out[f"{stem}.lora_B.weight"] = (up * m.scaling[ADAPTER]).to("cpu", dtype).contiguous()
    return out


DIFFUSERS_TEXT_ENCODERS = {"lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}  # kohya prefix -> diffusers


def _clip_name(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name  # as kohya_stem


def diffusers_groups(groups: list[Group], model_prefix: str = "transformer.") -> list[Group]:
    """Export groups renamed for diffusers_state_dict: the denoiser under `model_prefix`, the CLIP text
    encoders under `text_encoder.` / `text_encoder_2.` with CLIP's `text_model.` names (diffusers'
    loader strips that prefix where transformers has none; ComfyUI reads it)."""
    out: list[Group] = []
    for prefix, model, is_te, rename in groups:
        if not is_te:
            out.append((model_prefix, model, False, rename))
        elif prefix in DIFFUSERS_TEXT_ENCODERS:
            out.append((DIFFUSERS_TEXT_ENCODERS[prefix], model, True, _clip_name))
        else:
            raise ValueError(f"{prefix}: diffusers' LoRA format has no name for this text encoder")
    return out


def state_dict(groups: list[Group], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The export's tensors; `groups` are (key prefix, module, is a text encoder, name map), see
    Trained.export_groups."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model, is_te, rename in groups:
        for name, m in network_modules(model):
            stem = kohya_stem(prefix, rename(name), is_te)
            tensors, alpha = module_tensors(m)
            for key, t in tensors.items():
                out[f"{stem}.{key}"] = t.to("cpu", dtype).contiguous()
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def network_metadata(net: Any) -> dict[str, str]:
    """`ss_network_*` as sd-scripts (networks.lora) and LyCORIS (lycoris.kohya) write them."""
    meta = {"ss_network_dim": str(net.rank), "ss_network_alpha": str(net.alpha)}
    if hasattr(net, "dropout"):
        meta["ss_network_dropout"] = str(net.dropout)
    args: dict[str, str] = {}
    if getattr(net, "conv_rank", 0) > 0:
        args |= {"conv_dim": str(net.conv_rank), "conv_alpha": str(net.conv_alpha)}
    for name in ("rank_dropout", "module_dropout"):  # network_args in sd-scripts
        if getattr(net, name, 0.0) > 0:
            args[name] = str(getattr(net, name))
    if net.type in ("lora", "locon"):
        meta["ss_network_module"] = "networks.lora"
    else:
        meta["ss_network_module"] = "lycoris.kohya"
        args = {"algo": {"loha": "loha", "lokr": "lokr", "dora": "lora"}[net.type], **args}
        if net.type in ("loha", "lokr"):
            args["use_tucker"] = str(net.use_tucker)
        if net.type == "lokr":
            args |= {"factor": str(net.lokr_factor), "decompose_both": str(net.decompose_both)}
        if net.type == "dora":
            args |= {"dora_wd": "True", "wd_on_output": "False"}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def addnet_hashes(parts: list[memoryview], ss_header: bytes) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them for sd-webui-additional-networks
    (library/train_util.py `precalculate_safetensors_hashes`): of the file serialized with only its
    ss_* metadata (`ss_header`, then the tensor bytes `parts`); the model hash is the sha256 of
    everything after the header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB
    at offset 1 MiB. Hashed from the tensors' own memory: that file is never built."""
    model = hashlib.sha256()
    for part in parts:
        model.update(part)
    legacy = hashlib.sha256(tensorfile.window([ss_header, *parts], 0x100000, 0x10000))
    return model.hexdigest(), legacy.hexdigest()[:8]


def save_export(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a network file atomically and durably: `<path>.tmp`, straight from the tensors' memory (no
    serialized copy), fsynced, renamed into place, its folder fsynced; after a failure (a full disk) no
    half-written file is left. Metadata values must be strings in safetensors. The sshs_* hashes
    A1111's additional-networks extension indexes by are added, as sd-scripts adds them."""
    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if v is not None}
    entries, parts = tensorfile.layout(tensors)
    ss_header = tensorfile.header(entries, {k: v for k, v in meta.items() if k.startswith("ss_")})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(parts, ss_header)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_durable(tmp, [tensorfile.header(entries, meta), *parts])
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename is durable too
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- reading back
PEFT_NAME = {"lora_down.weight": "lora_A.default.weight", "lora_up.weight": "lora_B.default.weight",
             "dora_scale": "dora_scale", **{t: f"{t}.default" for t in LYCORIS_TENSORS}}
FIRST_FACTOR = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")  # the factor that carries a change of scale


class NetworkFileError(ValueError):
    """A network file that cannot start this network; the message names the first module that differs."""


def _file_scale(t: dict[str, torch.Tensor]) -> float:
    """The scale a loader applies to one module's update (see the module docstring)."""
    rank = next((t[k].shape[0] for k in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b") if k in t), None)
    if rank is None:
        return 1.0  # LoKr with both factors whole
    alpha = float(t["alpha"]) if "alpha" in t else float(rank)  # no alpha: sd-scripts and LyCORIS take alpha = rank
    return alpha / rank


def _module_scale(m: torch.nn.Module) -> float:
    return float(m.scaling[ADAPTER])


def read_network_file(path: str, groups: list[Group], alternatives: list[Group] | None = None,
                      what: str = "network.network_weights") -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Read a kohya/LyCORIS file into the peft tensors of the modules of `groups`.

    Returns ({group index as str: {peft parameter name: tensor}}, stems of network modules the file
    does not hold), with each update rescaled so the module applies exactly what the file's loaders
    apply. `alternatives` name the same modules another way (SDXL: diffusers names as well as LDM)."""
    from safetensors.torch import load_file

    try:
        raw = load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one plain line
        raise NetworkFileError(f"{what}: {path} is not a readable .safetensors file ({e})") from None
    by_stem: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        stem, _, rest = key.partition(".")
        by_stem.setdefault(stem, {})[rest] = t.float()
    where: dict[str, tuple[int, str, torch.nn.Module]] = {}
    for naming in [groups, *([alternatives] if alternatives else [])]:
        for gi, (prefix, model, is_te, rename) in enumerate(naming):
            for name, m in network_modules(model):
                where.setdefault(kohya_stem(prefix, rename(name), is_te), (gi, name, m))
    out: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for stem, t in by_stem.items():
        if stem not in where:
            raise NetworkFileError(f"{what}: the file holds {stem}, a module this network does not have (check "
                                   "network.type, target_modules, conv_rank and train_text_encoder)")
        gi, name, m = where[stem]
        seen.add(id(m))
        tensors, _ = module_tensors(m)
        want, got = set(tensors), set(t) - {"alpha"}
        if want != got:
            raise NetworkFileError(f"{what}: {stem} holds {', '.join(sorted(got))} in the file; this network has "
                                   f"{', '.join(sorted(want))} there (the file is another network type or shape)")
        ratio = _file_scale(t) / _module_scale(m)
        for key in sorted(got):
            if tensors[key].shape != t[key].shape:
                raise NetworkFileError(f"{what}: {stem}.{key} is {tuple(t[key].shape)} in the file and "
                                       f"{tuple(tensors[key].shape)} in this network (set network.rank/conv_rank "
                                       "to the file's)")
            value = t[key] * ratio if key in FIRST_FACTOR else t[key]
            out.setdefault(str(gi), {})[f"{name}.{PEFT_NAME[key]}"] = value
    fresh = [kohya_stem(p, r(n), te) for p, model, te, r in groups for n, m in network_modules(model) if id(m) not in seen]
    return out, fresh
