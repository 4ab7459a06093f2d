"""Load the base model (SD1.x, SD2.x, SDXL, SD3/SD3.5, Flux.1) from a diffusers folder or single checkpoint files,
and encode prompts the way each family expects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backend.config import TrainingConfig
from backend.model_family import (  # one rule, shared with preflight
    FLOW_PIPELINES,
    ModelReadError,
    family_from_unet_config,
    keys_family,
    safetensors_keys,
)

FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "flux")


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says why in plain words."""


@dataclass
class Components:
    family: str
    v_prediction: bool
    unet: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def spec(self) -> Any:
        """The family's implementation (backend.trainer.families): what differs between families."""
        from backend.trainer.families import family

        return family(self.family)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def resolve_v_prediction(setting: bool | None, scheduler_says: bool, file_marker: bool = False) -> bool:
    """The one decision on v-prediction: `model.v_parameterization` when set; otherwise the model's
    own word (its scheduler config, or a single file's `v_pred` marker key)."""
    if setting is not None:
        return setting
    return scheduler_says or file_marker


def load_components(cfg: TrainingConfig, dtype: torch.dtype = torch.float32) -> Components:
    """Load every component on the CPU; the caller moves and casts them. What stays frozen loads in
    `dtype`, the run's weight dtype: the denoiser and T5-XXL (never trained, nearly all of the bytes),
    and the CLIP encoders unless network.train_text_encoder may train them. The same numbers as an fp32
    load cast on the way to the device, without an fp32 copy in RAM (Flux.1's transformer and T5-XXL are
    67 GB in fp32, 33 GB in bf16). The VAE loads in fp32 (its dtype is the trainer's choice)."""
    clip_dtype = torch.float32 if cfg.network.train_text_encoder else dtype
    path = Path(cfg.model.pretrained_model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model.pretrained_model: {path} does not exist")
    if path.is_dir() and (path / "transformer").is_dir():
        comps = _load_flow_folder(path, cfg, dtype, clip_dtype)
    elif path.is_dir():
        comps = _load_diffusers_folder(path, dtype, clip_dtype)
    elif _is_flow_file(path):
        from backend.trainer.single_file_flow import load_flow_single_file

        comps = load_flow_single_file(path, cfg, dtype, clip_dtype)
    elif path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        comps = _load_single_file(path, cfg.model.family, cfg.model.v_parameterization, dtype, clip_dtype)
    else:
        raise ModelLoadError(
            f"model.pretrained_model: {path} is neither a diffusers folder nor a .safetensors/.ckpt file"
        )
    _check_part_files(cfg, path, comps.family, from_parts=not path.is_dir() and _is_flow_file(path))
    if cfg.model.family != "auto" and cfg.model.family != comps.family:
        raise ModelLoadError(
            f"model.family: set to {cfg.model.family} but {path.name} looks like {comps.family}; "
            "set family to 'auto' or pick the right model"
        )
    if comps.extra.get("flow"):  # flow matching: no prediction type, no DDPM schedule to rescale
        _freeze(comps)
        return comps
    marker = bool(comps.extra.get("v_pred_key"))
    comps.v_prediction = resolve_v_prediction(cfg.model.v_parameterization, comps.v_prediction, marker)
    # The scheduler carries the decision, so every scheduler built from its config (sampling) agrees.
    comps.noise_scheduler.register_to_config(prediction_type="v_prediction" if comps.v_prediction else "epsilon")
    if cfg.training.zero_terminal_snr:
        comps.noise_scheduler = zero_terminal_snr_scheduler(comps.noise_scheduler)
    _freeze(comps)
    return comps


PART_FIELDS = {"clip_l": ("sd3", "flux"), "clip_g": ("sd3",), "t5xxl": ("sd3", "flux"), "vae": ("sd3", "flux")}


def _check_part_files(cfg: TrainingConfig, path: Path, family: str, from_parts: bool) -> None:
    """model.clip_l/clip_g/t5xxl/vae name the parts of an SD3/Flux.1 single-file model; set anywhere else they
    would be ignored, so they are refused by name."""
    for name, families in PART_FIELDS.items():
        if getattr(cfg.model, name) is None:
            continue
        if not from_parts:
            what = "a diffusers folder, which holds its own parts" if path.is_dir() else f"a {family} checkpoint"
            raise ModelLoadError(f"model.{name}: only for SD3/Flux.1 single-file models; {path.name} is {what}: "
                                 "clear it")
        if family not in families:
            raise ModelLoadError(f"model.{name}: {family} has no such part ({name} is for "
                                 f"{' and '.join(families)}): clear it")


def _freeze(comps: Components) -> None:
    for m in (comps.unet, comps.vae, *comps.text_encoders):
        m.requires_grad_(False)
        m.eval()




# The parts of each flow family's diffusers folder: (subfolder, what it is) in the pipeline's order.
FLOW_PARTS = {
    "sd3": [("transformer", "the MMDiT"), ("vae", "the VAE"), ("scheduler", "the scheduler"),
            ("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G"), ("text_encoder_3", "T5-XXL"),
            ("tokenizer", "CLIP-L's tokenizer"), ("tokenizer_2", "CLIP-G's tokenizer"), ("tokenizer_3", "T5's tokenizer")],
    "flux": [("transformer", "the transformer"), ("vae", "the VAE"), ("scheduler", "the scheduler"),
             ("text_encoder", "CLIP-L"), ("text_encoder_2", "T5-XXL"), ("tokenizer", "CLIP-L's tokenizer"),
             ("tokenizer_2", "T5's tokenizer")],
}


def _load_flow_folder(path: Path, cfg: TrainingConfig, dtype: torch.dtype = torch.float32,
                      clip_dtype: torch.dtype = torch.float32) -> Components:
    """A diffusers folder of a flow-matching family (SD3/SD3.5, Flux.1): the transformer in `unet`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        AutoTokenizer,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
    )

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.pretrained_model: {path} has no readable model_index.json ({e})") from e
    family = FLOW_PIPELINES.get(str(index.get("_class_name")))
    if family is None:
        raise ModelLoadError(f"model.pretrained_model: {path} is a {index.get('_class_name')} folder; Lathe trains "
                             f"SD 1.x, SD 2.x, SDXL, SD3/SD3.5 and Flux.1 ({', '.join(FLOW_PIPELINES)})")
    kw = {"local_files_only": True}
    clip = {**kw, "dtype": clip_dtype}
    missing = [f"{sub} ({what})" for sub, what in FLOW_PARTS[family] if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"model.pretrained_model: {path} lacks {', '.join(missing)}")
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if family == "sd3":
            model = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **kw)
            tes = [CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **clip),
                   CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **clip),
                   T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype, **kw)]
            toks = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
                    CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
                    AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **kw)]
        else:
            model = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **kw)
            tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **clip),
                   T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **kw)]
            toks = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
                    AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)]
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.pretrained_model: cannot load {path}: {e}") from e
    return Components(family, False, model, vae, sched, tes, toks, str(path), extra=flow_extra(family, cfg))


def flow_extra(family: str, cfg: TrainingConfig) -> dict[str, Any]:
    """Components.extra of a flow-matching family, whether loaded from a folder or single files."""
    extra = {"flow": True, "t5_length": cfg.training.t5xxl_max_token_length}
    if family == "sd3":
        extra["t5_length"] = extra["t5_length"] or 256
    return extra


def _is_flow_file(path: Path) -> bool:
    """An SD3/SD3.5 or Flux.1 .safetensors file, told from its header's tensor names."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        return keys_family(safetensors_keys(path)) in ("sd3", "flux")
    except ModelReadError:
        return False  # the single-file loader says what is wrong with it


def _load_diffusers_folder(path: Path, dtype: torch.dtype = torch.float32,
                           clip_dtype: torch.dtype = torch.float32) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
        raise ModelLoadError(
            f"model.pretrained_model: {path} is a folder but not a diffusers model (no model_index.json / unet/)"
        )
    try:
        unet_cfg = json.loads((path / "unet" / "config.json").read_text())
        family = family_from_unet_config(unet_cfg)
        kw = {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=clip_dtype, **kw)]
        toks = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=clip_dtype, **kw))
            toks.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"model.pretrained_model: cannot load {path}: {e}") from e
    v_pred = sched.config.get("prediction_type") == "v_prediction"
    return Components(family, v_pred, unet, vae, _training_scheduler(sched), tes, toks, str(path))


def _load_single_file(path: Path, family: str, v_prediction: bool | None, dtype: torch.dtype = torch.float32,
                      clip_dtype: torch.dtype = torch.float32) -> Components:
    try:
        from backend.trainer.single_file import load_single_file
    except ImportError as e:  # pragma: no cover - shipped with the project
        raise ModelLoadError(f"single-file loading is unavailable: {e}") from e
    try:
        parts = load_single_file(path, None if family == "auto" else family, v_prediction=v_prediction,
                                 part_dtypes={"unet": dtype, "text_encoder": clip_dtype})
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"model.pretrained_model: cannot load {path.name}: {e}") from e
    fam = parts.get("family") or family_from_unet_config(dict(parts["unet"].config))
    fam = "sd2" if fam.startswith("sd2") else fam
    sched = parts["noise_scheduler"]
    tes = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    toks = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if "tokenizer_2" in parts else [])
    v_pred = sched.config.get("prediction_type") == "v_prediction"
    return Components(fam, v_pred, parts["unet"], parts["vae"], _training_scheduler(sched), tes, toks, str(path),
                      extra={"v_pred_key": parts.get("v_pred_key", False)})


def _training_scheduler(sched: Any) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sched.config)


def zero_terminal_snr_scheduler(sched: Any) -> Any:
    """The training scheduler with its betas rescaled to zero terminal SNR (training.zero_terminal_snr):
    diffusers' `rescale_betas_zero_snr`, the same arithmetic as sd-scripts'
    fix_noise_scheduler_betas_for_zero_terminal_snr (arXiv 2305.08891, algorithm 1). The flag is in
    the scheduler's config, so the sampler built from it (sampling.py) has the same schedule; the
    evaluation and `verify` load the model through load_components and so get it too.
    `snr_alphas_cumprod` keeps the schedule before the rescale: sd-scripts computes the SNR its loss
    weights read (all_snr) before it fixes the betas (loss.snr_alphas_cumprod)."""
    from diffusers import DDPMScheduler

    fixed = DDPMScheduler.from_config(sched.config, rescale_betas_zero_snr=True)
    fixed.snr_alphas_cumprod = sched.alphas_cumprod
    return fixed


# ------------------------------------------------------------------------------------ text encoding
def tokenize(comps: Components, captions: list[str], max_token_length: int = 75) -> list[torch.Tensor]:
    """Token ids for each tokenizer: [B, 77] each, or [B, n, 77] for max_token_length 75 * n (n = 2, 3)."""
    out = []
    for tok in comps.tokenizers:
        size = tok.model_max_length if max_token_length == 75 else max_token_length + 2
        ids = tok(captions, padding="max_length", max_length=size, truncation=True, return_tensors="pt").input_ids
        out.append(ids if max_token_length == 75 else chunk_ids(ids, tok))
    return out


def chunk_ids(ids: torch.Tensor, tok: Any) -> torch.Tensor:
    """[B, n * 75 + 2] ids -> [B, n, 77]: each chunk <BOS> + 75 ids + the last id, as sd-scripts'
    TokenizeStrategy._get_input_ids (library/strategy_base.py) builds them. With a pad token that is not
    <EOS> (SD2.x, SDXL's second tokenizer) a chunk that ends inside the text ends in <EOS>, and an empty
    chunk (<BOS> <PAD> ...) starts <BOS> <EOS>."""
    width = tok.model_max_length - 2
    chunks = []
    for i in range(1, ids.shape[1] - tok.model_max_length + 2, width):
        c = torch.cat([ids[:, :1], ids[:, i : i + width], ids[:, -1:]], dim=1)
        if tok.pad_token_id != tok.eos_token_id:
            c[(c[:, -2] != tok.eos_token_id) & (c[:, -2] != tok.pad_token_id), -1] = tok.eos_token_id
            c[c[:, 1] == tok.pad_token_id, 1] = tok.eos_token_id
        chunks.append(c)
    return torch.stack(chunks, dim=1)


def merge_chunks(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """[B * n, 77, C] encoder states of the chunks -> [B, n * 75 + 2, C]: the first <BOS>, the 75 inner
    states of each chunk, the last chunk's final state, as sd-scripts' encode_tokens joins them
    (library/strategy_sd.py, strategy_sdxl.py)."""
    if n == 1:
        return hidden
    length = hidden.shape[1]
    flat = hidden.reshape(hidden.shape[0] // n, n * length, hidden.shape[-1])
    parts = [flat[:, :1]] + [flat[:, k * length + 1 : (k + 1) * length - 1] for k in range(n)] + [flat[:, -1:]]
    return torch.cat(parts, dim=1)


def encode_tokens(comps: Components, ids: list[torch.Tensor], clip_skip: int = 1,
                  encoders: list[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the text encoder(s): (context [B, L, C], pooled [B, P] for SDXL else None); L is 77, or
    n * 75 + 2 for chunked ids [B, n, 77] (each chunk encoded on its own; SDXL's pooled output is the
    first chunk's, as in sd-scripts).

    `encoders` are the modules to call (the training step's DDP wrappers); default the components'.
    SDXL always takes the penultimate layer and ignores clip_skip, as sd-scripts does."""
    encoders = encoders if encoders is not None else comps.text_encoders
    n = ids[0].shape[1] if ids[0].dim() == 3 else 1
    flat = [t.reshape(-1, t.shape[-1]) for t in ids]
    if not comps.is_sdxl:
        te = encoders[0]
        device = next(te.parameters()).device
        if clip_skip == 1:
            return merge_chunks(te(flat[0].to(device)).last_hidden_state, n), None
        out = te(flat[0].to(device), output_hidden_states=True)
        return merge_chunks(_final_norm(comps.text_encoders[0])(out.hidden_states[-clip_skip]), n), None
    # SDXL: penultimate layer of both encoders (no final norm), concatenated; pooled from encoder 2.
    layer = -2
    hidden = []
    pooled = None
    for te, tok_ids in zip(encoders, flat, strict=True):
        device = next(te.parameters()).device
        out = te(tok_ids.to(device), output_hidden_states=True)
        hidden.append(merge_chunks(out.hidden_states[layer], n))
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds[::n]
    return torch.cat(hidden, dim=-1), pooled


def _final_norm(te: Any) -> Any:
    """CLIP's final LayerNorm (transformers 5 flattened `text_model` away; older versions have it)."""
    return te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
