"""SD3/SD3.5 and Flux.1 from the single files users download, fully offline.

`model.pretrained_model` is the transformer file: Flux.1 in Black Forest Labs' layout (`double_blocks.*`,
`single_blocks.*`, maybe under `model.diffusion_model.`) or diffusers' (`transformer_blocks.*`,
`single_transformer_blocks.*`); SD3/SD3.5 in Stability's (`joint_blocks.*`), where a full checkpoint
also holds the text encoders (`text_encoders.clip_l|clip_g|t5xxl.transformer.*`) and the VAE
(`first_stage_model.*`). The other parts come from the file itself or from `model.clip_l`,
`model.clip_g`, `model.t5xxl`, `model.vae` (set fields win): CLIP/T5 files in the transformers layout
(ComfyUI's clip_l.safetensors, t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors: fp8 is upcast),
the VAE in the original ("ae") or diffusers layout.

Configs: the ones embedded in the model file's metadata (`lathe.diffusers_configs`, as
single_file.save_single_file writes them; that is how the tiny test models load) over the shipped
configs of the variant read from the weights (model_configs/<variant>/, see its README.md).
Weights are converted with diffusers' converters and assigned strictly (single_file._assign): a
file that does not fit is refused with a message saying what is off.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from backend.config import TrainingConfig
from backend.model_family import keys_family
from backend.trainer.clip_tokenizer import load_tokenizer
from backend.trainer.models import Components, ModelLoadError, flow_extra
from backend.trainer.single_file import CONFIG_ROOT, META_CONFIGS, _assign, read_checkpoint

T5_TOKENIZER = CONFIG_ROOT / "t5_tokenizer"
DIFFUSION = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # SD3 checkpoints; ComfyUI's all-in-one Flux files
VARIANTS = ("flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large")
# Per family: (config field, diffusers subfolder of the encoder, of its tokenizer, what it is, usual file name).
TEXT_PARTS = {
    "flux": [("clip_l", "text_encoder", "tokenizer", "CLIP-L", "clip_l.safetensors"),
             ("t5xxl", "text_encoder_2", "tokenizer_2", "T5-XXL", "t5xxl_fp16.safetensors")],
    "sd3": [("clip_l", "text_encoder", "tokenizer", "CLIP-L", "clip_l.safetensors"),
            ("clip_g", "text_encoder_2", "tokenizer_2", "CLIP-G", "clip_g.safetensors"),
            ("t5xxl", "text_encoder_3", "tokenizer_3", "T5-XXL", "t5xxl_fp16.safetensors")],
}
FAMILY_NAME = {"flux": "Flux.1", "sd3": "SD3/SD3.5"}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
CONFIG_FILES = (
    "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
    *(f"text_encoder{s}/config.json" for s in ("", "_2", "_3")),
    *(f"tokenizer{s}/{name}" for s in ("", "_2", "_3") for name in _TOKENIZER_FILES),
)  # fmt: skip


# ------------------------------------------------------------------------------------ variants
def flow_variant(keys: set[str]) -> str:
    """The shipped config folder for a transformer's tensor names (either layout, any prefix):
    Flux.1 dev has a guidance embedder, schnell none; SD3.5 large has 38 joint blocks, SD3.5
    medium dual-attention (attn2) blocks, SD3 medium neither."""
    bare = {k.removeprefix(DIFFUSION) for k in keys}
    family = keys_family(sorted(bare))
    if family == "flux":
        guided = any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in bare)
        return "flux-dev" if guided else "flux-schnell"
    if family != "sd3":
        raise ValueError("not an SD3/SD3.5 or Flux.1 transformer")
    blocks = {k.split(".")[1] for k in bare if k.startswith(("joint_blocks.", "transformer_blocks."))}
    if any(".attn2." in k for k in bare):
        return "sd3.5-medium"
    return "sd3.5-large" if len(blocks) == 38 else "sd3-medium"


@contextlib.contextmanager
def config_folder(variant: str, metadata: Mapping[str, str]) -> Iterator[Path]:
    """The shipped configs of `variant`, with those embedded in the file's metadata laid over them."""
    embedded = metadata.get(META_CONFIGS)
    tree = json.loads(embedded) if embedded else {}
    if not isinstance(tree, dict) or not tree:
        yield CONFIG_ROOT / variant
        return
    import shutil

    with tempfile.TemporaryDirectory(prefix="lathe-flow-configs-") as tmp:
        root = Path(tmp) / variant
        shutil.copytree(CONFIG_ROOT / variant, root)
        for rel in CONFIG_FILES:  # only known names: the metadata never chooses where to write
            if rel in tree:
                content = tree[rel]
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(content if isinstance(content, str) else json.dumps(content), "utf-8")
        yield root


# ------------------------------------------------------------------------------------ loading
def load_flow_single_file(path: Path, cfg: TrainingConfig, dtype: torch.dtype = torch.float32,
                          clip_dtype: torch.dtype = torch.float32) -> Components:
    """Components of an SD3/SD3.5 or Flux.1 single file (+ the part files the config names) on the CPU,
    exactly as models._load_flow_folder returns them: the transformer and T5-XXL in `dtype`, the CLIPs
    in `clip_dtype`, the VAE in fp32. ModelLoadError names the field."""
    state, metadata = _read("model.pretrained_model", path)
    try:
        variant = flow_variant(set(state))
    except ValueError as e:
        raise ModelLoadError(f"model.pretrained_model: {path.name} is {e}") from e
    family = variant.split("-")[0].removesuffix(".5")
    parts = {field: _part_source(cfg, field, what, name, state, path, family)
             for field, _, _, what, name in TEXT_PARTS[family]}
    vae_state = _vae_source(cfg, state, path, family)
    model_file = ("model.pretrained_model", path)
    with config_folder(variant, metadata) as folder:
        model = _guard(model_file, variant, _transformer, family, state, folder / "transformer", dtype)
        vae = _guard(_origin(cfg, "vae", path), variant, _vae, vae_state, folder / "vae")
        tes, toks = [], []
        for field, enc, tok, what, _ in TEXT_PARTS[family]:
            tes.append(_guard(_origin(cfg, field, path), variant, _text_encoder, parts[field], folder / enc, what, family,
                              dtype, clip_dtype))
            toks.append(_guard(model_file, variant, _tokenizer, folder / tok, field == "t5xxl"))
        sched = _guard(model_file, variant, _scheduler, folder / "scheduler")
    return Components(family, False, model, vae, sched, tes, toks, str(path), extra=flow_extra(family, cfg))


def _origin(cfg: TrainingConfig, field: str, path: Path) -> tuple[str, Path]:
    """The config field and file a part comes from: its own field when set, else the model file."""
    setting = getattr(cfg.model, field)
    return (f"model.{field}", Path(setting)) if setting else ("model.pretrained_model", path)


def _guard(origin: tuple[str, Path], variant: str, load: Any, *args: Any) -> Any:
    """load(*args), its failure reported against the field and file the part came from."""
    try:
        return load(*args)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        field, path = origin
        raise ModelLoadError(f"{field}: cannot load {path.name} (with the {variant} configs): {e}") from e


def _read(field: str, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{field}: {path} does not exist" if not path.exists() else f"{field}: {path} is not a file")
    try:
        return read_checkpoint(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{field}: {e}") from e


def _part_source(cfg: TrainingConfig, field: str, what: str, usual: str, state: Mapping[str, torch.Tensor],
                 path: Path, family: str) -> dict[str, torch.Tensor]:
    """A text encoder's tensors in the transformers layout: from the file the field names, else from
    the model file's `text_encoders.<field>.transformer.*`; the message names the field to set."""
    setting = getattr(cfg.model, field)
    if setting:
        return _strip(_read(f"model.{field}", Path(setting))[0], "text_encoders.", f"{field}.transformer.")
    inside = _subset(state, f"text_encoders.{field}.transformer.")
    if inside:
        return inside
    holds = ("Flux.1 single file checkpoints hold only the transformer" if family == "flux"
             else f"{path.name} holds no {what} (no text_encoders.{field}.*)")
    raise ModelLoadError(f"model.{field}: {holds}; set model.{field} to the {what} .safetensors ({usual})")


def _vae_source(cfg: TrainingConfig, state: Mapping[str, torch.Tensor], path: Path, family: str) -> dict[str, torch.Tensor]:
    if cfg.model.vae:
        return _read("model.vae", Path(cfg.model.vae))[0]
    for prefix in VAE_PREFIXES:
        inside = _subset(state, prefix, keep_prefix=True)
        if inside:
            return inside
    holds = ("Flux.1 single file checkpoints hold only the transformer" if family == "flux"
             else f"{path.name} holds no VAE (no first_stage_model.*)")
    usual = "ae.safetensors" if family == "flux" else "the VAE of the same SD3/SD3.5 release"
    raise ModelLoadError(f"model.vae: {holds}; set model.vae to the VAE .safetensors ({usual})")


def _subset(state: Mapping[str, torch.Tensor], prefix: str, keep_prefix: bool = False) -> dict[str, torch.Tensor]:
    return {(k if keep_prefix else k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}


def _strip(state: Mapping[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """A part file's tensors without a leading wrapper some tools write (e.g. text_encoders.t5xxl.transformer.)."""
    out = dict(state)
    for prefix in prefixes:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _transformer(family: str, state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    config = cls.load_config(str(folder))
    # Buffers on meta too (both models' buffers are all in the file): SD3.5 medium's 384 x 384 sin-cos
    # position table is not computed only to be overwritten.
    with torch.device("meta"):
        model = cls.from_config(config)
    skip = ("text_encoders.", *VAE_PREFIXES)
    weights = {k.removeprefix(DIFFUSION): v for k, v in state.items() if not k.startswith(skip)}
    if not set(model.state_dict()) <= set(weights):  # the original layout: convert
        weights = _flux_to_diffusers(weights, config) if family == "flux" else _sd3_to_diffusers(weights)
    return _assign(model, weights, dtype, f"{FAMILY_NAME[family]} transformer")


def _sd3_to_diffusers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(weights)


def _flux_to_diffusers(weights: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' converter, except that it splits each single block's fused linear1 (q, k, v, mlp)
    at Flux.1's real widths (3072, 12288): split it here at the config's widths instead (the same
    for the real model, right for the tiny test model), handing the converter empty placeholders."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    sizes = (inner, inner, inner, 4 * inner)  # FluxSingleTransformerBlock's mlp_ratio 4.0
    fused = {k: weights.pop(k) for k in [k for k in weights if k.startswith("single_blocks.") and ".linear1." in k]}
    for key in fused:
        weights[key] = torch.empty(3 * 3072 + 4 * 3072, 0)  # what the converter's own split expects
    converted = convert_flux_transformer_checkpoint_to_diffusers(weights)
    for key, value in fused.items():
        block, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        if value.shape[0] != sum(sizes):
            raise ValueError(f"{key} is {tuple(value.shape)}, expected {sum(sizes)} rows for width {inner}")
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), torch.split(value, sizes), strict=True):
            converted[f"single_transformer_blocks.{block}.{name}.{kind}"] = part
    return converted


def _vae(state: Mapping[str, torch.Tensor], folder: Path) -> Any:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = AutoencoderKL.load_config(str(folder))
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:  # already in diffusers' layout
        weights = dict(state)
    else:
        weights = convert_ldm_vae_checkpoint(dict(state), config)
    return _assign(model, weights, torch.float32, "VAE")


def _text_encoder(state: Mapping[str, torch.Tensor], folder: Path, what: str, family: str,
                  dtype: torch.dtype = torch.float32, clip_dtype: torch.dtype = torch.float32) -> Any:
    """T5-XXL (in `dtype`: always frozen) or CLIP (in `clip_dtype`: fp32 when it may be trained)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type == "t5":
        return _t5(state, config, what, dtype)
    return _clip(state, config, what, family, clip_dtype)


def _clip(state: Mapping[str, torch.Tensor], config: Any, what: str, family: str,
          dtype: torch.dtype = torch.float32) -> Any:
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with_projection = "CLIPTextModelWithProjection" in (config.architectures or [])
    with init_empty_weights():
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    nested = hasattr(model, "text_model")  # transformers >= 5.6 flattened CLIPTextModel, not ...WithProjection
    weights = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        if bare.endswith("position_ids") or bare == "logit_scale" or (bare == "text_projection.weight" and not with_projection):
            continue  # a buffer; CLIP's image-side scale; a projection Flux's CLIPTextModel does not have
        weights[f"text_model.{bare}" if nested and bare != "text_projection.weight" else bare] = value
    if with_projection and "text_projection.weight" not in weights and family == "sd3":
        # SD3's CLIP-L files often lack it; sd-scripts (library/sd3_utils.py) uses the identity, as here.
        weights["text_projection.weight"] = torch.eye(config.hidden_size, config.projection_dim)
    return _assign(model, weights, dtype, what)


def _t5(state: Mapping[str, torch.Tensor], config: Any, what: str, dtype: torch.dtype = torch.float32) -> Any:
    from accelerate import init_empty_weights
    from transformers import T5EncoderModel

    if "scaled_fp8" in state or any(k.endswith(".scale_weight") for k in state):
        raise ValueError(f"the {what} file is a scaled fp8 file, which Lathe cannot read; use t5xxl_fp16.safetensors "
                         "or t5xxl_fp8_e4m3fn.safetensors")
    with init_empty_weights():
        model = T5EncoderModel(config)
    weights = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    # The token embedding is one tensor under two names; files keep either or both.
    shared = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    if shared is not None:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = shared
    return _assign(model, weights, dtype, what)  # fp8 files are upcast here


def _tokenizer(folder: Path, t5: bool) -> Any:
    if not t5:
        return load_tokenizer(folder)
    from transformers import AutoTokenizer

    source = folder if (folder / "tokenizer.json").is_file() else T5_TOKENIZER
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def _scheduler(folder: Path) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerDiscreteScheduler.load_config(str(folder)))
