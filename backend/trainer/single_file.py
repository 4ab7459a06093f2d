"""Single-file Stable Diffusion checkpoints (.safetensors / .ckpt in the original "LDM" layout).

Loading never touches the network: component configs come from (in this order) the caller's
`config_dir`, configs that `save_single_file` embedded in the file's metadata, or the configs
shipped under model_configs/<family>/ (the published SD1.5, SD2.1-base, SD2.1-768-v and SDXL-base
configs). Weights are converted with diffusers' LDM -> diffusers helpers and loaded strictly: a
file whose tensors do not fit the configs is refused with a message that says what is off.

`save_single_file` is the inverse: diffusers-format components -> one LDM-layout .safetensors file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from backend.trainer.clip_tokenizer import clip_vocab_and_merges, load_tokenizer
from backend.trainer.model_configs.ldm_layout import (
    SD1_TE,
    SD2_TE,
    UNET,
    VAE,
    XL_TE1,
    XL_TE2,
    describe_unrecognised,
    to_ldm_state_dict,
)

CONFIG_ROOT = Path(__file__).parent / "model_configs"
FAMILIES = ("sd15", "sd2", "sd2-v", "sdxl")
META_CONFIGS = "lathe.diffusers_configs"
META_FAMILY = "lathe.family"


_CONFIG_FILES = (
    "unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
    "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json",
    "tokenizer_2/tokenizer_config.json", "tokenizer_2/tokenizer.json",
)  # fmt: skip


# ------------------------------------------------------------------------------------ detection
def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(state_dict_keys: Iterable[str], tensors_shape_lookup: Callable[[str], Sequence[int]]) -> str:
    """"sd15", "sd2" or "sdxl" from an LDM-layout checkpoint's key names and shapes.

    SD2's v-prediction cannot be read from the weights: this returns "sd2" and the caller decides.
    Raises ValueError, saying what the file looks like, for anything else (LoRA, SD3, Flux, ...).
    """
    keys = set(state_dict_keys)
    conv_in = UNET + "input_blocks.0.0.weight"
    if conv_in not in keys:
        raise ValueError(describe_unrecognised(keys))
    in_channels = int(tensors_shape_lookup(conv_in)[1])
    if in_channels != 4:
        raise ValueError(
            f"The UNet takes {in_channels} input channels, not 4: this looks like an inpainting, depth or "
            "instruct-pix2pix model. Lathe trains on plain text-to-image SD1.x, SD2.x and SDXL models."
        )
    if "edm_mean" in keys:
        raise ValueError("This looks like Playground v2.5 (an EDM-trained SDXL variant), which Lathe does not support.")
    if _has_prefix(keys, XL_TE2) and _has_prefix(keys, XL_TE1):
        family = "sdxl"
    elif _has_prefix(keys, "conditioner.embedders.0.model."):
        raise ValueError("This looks like the SDXL refiner (one OpenCLIP-G text encoder); train on an SDXL base model.")
    elif _has_prefix(keys, SD2_TE):
        family = "sd2"
    elif _has_prefix(keys, SD1_TE):
        family = "sd15"
    else:
        raise ValueError(
            "The file has a Stable Diffusion UNet (model.diffusion_model.*) but no text encoder "
            "(cond_stage_model.* or conditioner.embedders.*): Lathe needs a full checkpoint."
        )
    if not _has_prefix(keys, VAE):
        raise ValueError("The file has no VAE (first_stage_model.*): Lathe needs a full checkpoint with its VAE.")
    return family


def detect_file_family(path: Path) -> str:
    """detect_family for a file on disk (reads only the header of a .safetensors file)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                return detect_family(keys, lambda k: f.get_slice(k).get_shape())
        except SafetensorError as e:
            raise ValueError(f"{path.name} is not a readable .safetensors file ({e})") from e
    state, _ = read_checkpoint(path)
    return detect_family(state.keys(), lambda k: tuple(state[k].shape))


# ------------------------------------------------------------------------------------ reading
def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors or .ckpt file; .ckpt is opened with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise ValueError(f"{path.name} is not a readable .safetensors file ({e})") from e
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _read_pickled(path), {}
    raise ValueError(f"{path.name}: expected a .safetensors or .ckpt checkpoint")


def _read_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path.name} is not a readable PyTorch checkpoint ({e})") from e
        raise ValueError(
            f"{path.name} stores Python objects besides tensors, and opening it would run code from the file. "
            "Lathe only opens .ckpt files that hold plain tensors; use a .safetensors version of this model "
            "(or convert it with a tool you trust)."
        ) from e
    except Exception as e:  # torch.load reports garbage as KeyError, RuntimeError, EOFError ...
        raise ValueError(f"{path.name} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------ loading
def load_single_file(
    path: Path, family: str | None = None, config_dir: Path | None = None, torch_dtype: torch.dtype = torch.float32,
    v_prediction: bool | None = None, part_dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, Any]:
    """Load an LDM-layout checkpoint into diffusers/transformers components, fully offline.

    Returns {"family", "unet", "vae", "text_encoder", "tokenizer", "noise_scheduler" (a
    DDPMScheduler), "v_pred_key"} plus "text_encoder_2" and "tokenizer_2" for SDXL. `family` is
    "sd15", "sd2", "sd2-v" (v-prediction, 768) or "sdxl"; None or "auto" detects it from the weights.
    `v_prediction` (the user's setting, None = unknown) picks the SD2 config variant: the 768-v
    configs differ beyond the scheduler (upcast attention, sample size). Whether to train with
    v-prediction is decided by the caller (backend.trainer.models.resolve_v_prediction); this
    only reports the file's `v_pred` marker key. `config_dir` (a diffusers folder) replaces the
    shipped configs. `part_dtypes` ("unet", "text_encoder": both CLIPs) overrides torch_dtype for those
    parts (models.load_components: the frozen parts in the run's weight dtype).
    """
    path = Path(path)
    state, metadata = read_checkpoint(path)
    detected = detect_family(state.keys(), lambda k: tuple(state[k].shape))
    hint = v_prediction if v_prediction is not None else (True if "v_pred" in state else None)
    fam = _resolve_family(family, detected, path.name, metadata, hint)
    with _config_source(fam, config_dir, metadata) as cfg_dir:
        comps = components_from_ldm(state, fam, cfg_dir, torch_dtype, part_dtypes)
    comps["v_pred_key"] = "v_pred" in state
    return comps


def _resolve_family(requested: str | None, detected: str, name: str, metadata: Mapping[str, str],
                    v_pred: bool | None) -> str:
    """The config variant to build: the requested or detected family; for SD2, "sd2-v" when the
    model is known to predict v (the user's setting, else the file's marker), "sd2" when known not to."""
    if requested not in (None, "auto"):
        if requested not in FAMILIES:
            raise ValueError(f"Unknown model family {requested!r}; expected one of {', '.join(FAMILIES)} or auto.")
        if _base_family(requested) != detected:
            raise ValueError(f"The family is set to {requested}, but {name} looks like {detected}.")
        chosen = requested
    else:
        embedded = metadata.get(META_FAMILY)
        chosen = embedded if embedded in FAMILIES and _base_family(embedded) == detected else detected
    if detected == "sd2" and v_pred is not None:
        return "sd2-v" if v_pred else "sd2"
    return chosen


def _base_family(family: str) -> str:
    return "sd2" if family.startswith("sd2") else family


@contextlib.contextmanager
def _config_source(family: str, config_dir: Path | None, metadata: Mapping[str, str]) -> Iterator[Path]:
    """The folder to read component configs from; embedded configs are laid out in a temp folder."""
    if config_dir is not None:
        yield Path(config_dir)
        return
    embedded = metadata.get(META_CONFIGS)
    if not embedded:
        yield CONFIG_ROOT / family
        return
    tree = json.loads(embedded)
    tree = tree if isinstance(tree, dict) else {}
    with tempfile.TemporaryDirectory(prefix="lathe-configs-") as tmp:
        root = Path(tmp) / family
        shutil.copytree(CONFIG_ROOT / family, root)
        for rel in _CONFIG_FILES:  # only known names: the metadata never chooses where to write
            if rel in tree:
                content = tree[rel]
                text = content if isinstance(content, str) else json.dumps(content)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text, encoding="utf-8")
        yield root


def components_from_ldm(
    state: Mapping[str, torch.Tensor], family: str, config_dir: Path, torch_dtype: torch.dtype = torch.float32,
    part_dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, Any]:
    """Build the components of `family` from an LDM-layout state dict and a diffusers config folder, each
    in torch_dtype unless `part_dtypes` names it ("unet", "vae", "text_encoder": every CLIP)."""
    from diffusers import DDPMScheduler

    config_dir = Path(config_dir)
    comps: dict[str, Any] = {"family": family}
    dtypes = {"unet": torch_dtype, "vae": torch_dtype, "text_encoder": torch_dtype, **(part_dtypes or {})}
    comps["unet"] = _load_diffusers_model("unet", state, config_dir / "unet", dtypes["unet"])
    comps["vae"] = _load_diffusers_model("vae", state, config_dir / "vae", dtypes["vae"])
    te_dtype = dtypes["text_encoder"]
    if family == "sdxl":
        comps["text_encoder"] = _load_text_encoder(state, config_dir / "text_encoder", XL_TE1, te_dtype)
        comps["text_encoder_2"] = _load_text_encoder(state, config_dir / "text_encoder_2", XL_TE2, te_dtype)
        comps["tokenizer_2"] = load_tokenizer(config_dir / "tokenizer_2")
    else:
        prefix = SD2_TE if family.startswith("sd2") else SD1_TE
        comps["text_encoder"] = _load_text_encoder(state, config_dir / "text_encoder", prefix, te_dtype)
    comps["tokenizer"] = load_tokenizer(config_dir / "tokenizer")
    sched_cfg = DDPMScheduler.load_config(str(config_dir / "scheduler"))
    comps["noise_scheduler"] = DDPMScheduler.from_config(sched_cfg)
    return comps


def _subset(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _load_diffusers_model(kind: str, state: Mapping[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> Any:
    """The UNet ("unet") or the VAE ("vae"), converted by diffusers' LDM helpers."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    cls, convert, prefix = (
        (UNet2DConditionModel, convert_ldm_unet_checkpoint, UNET)
        if kind == "unet"
        else (AutoencoderKL, convert_ldm_vae_checkpoint, VAE)
    )
    config = cls.load_config(str(folder))
    weights = convert(_subset(state, prefix), config)
    with init_empty_weights():
        model = cls.from_config(config)
    return _assign(model, weights, dtype, kind.upper() if kind == "vae" else "UNet")


def _load_text_encoder(state: Mapping[str, torch.Tensor], folder: Path, prefix: str, dtype: torch.dtype) -> Any:
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    with_projection = "CLIPTextModelWithProjection" in (config.architectures or [])
    with init_empty_weights():
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    sub = _subset(state, prefix)
    if prefix.endswith(".transformer."):  # OpenAI CLIP, already in the transformers layout
        weights = {k[len(prefix) :]: v for k, v in sub.items()}
    else:  # OpenCLIP: fused qkv, transposed projection, other names
        weights = convert_open_clip_checkpoint(model, sub, prefix=prefix)
    nested = hasattr(model, "text_model")  # transformers >= 5.6 flattened CLIPTextModel, not ...WithProjection
    fitted = {}
    for key, value in weights.items():
        bare = key.removeprefix("text_model.")
        if bare.endswith("position_ids"):
            continue
        fitted[f"text_model.{bare}" if nested and bare != "text_projection.weight" else bare] = value
    return _assign(model, fitted, dtype, f"text encoder ({prefix}*)")


def _assign(model: Any, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str) -> Any:
    """Load `weights` into a model built on the meta device; every parameter must be matched."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [
        f"{k} is {tuple(weights[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in expected
        if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise ValueError(
            f"The {what} weights do not fit its configuration: {', '.join(problems)}. "
            "Is the model family right, and is this a standard checkpoint of that family?"
        )
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------ saving
def save_single_file(
    components_or_pipeline_dir: Mapping[str, Any] | Path | str,
    out_path: Path | str,
    family: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write diffusers-format SD1.x / SD2.x / SDXL components (a dict with "unet", "vae",
    "text_encoder"[, "text_encoder_2", tokenizers, scheduler] or a diffusers folder) as one
    LDM-layout .safetensors file. Their configs go into the file's metadata, so a non-standard
    (e.g. tiny) model loads back from the file alone."""
    comps = _gather_components(components_or_pipeline_dir)
    fam = family or _diffusers_family(comps)
    tensors = {
        k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        for k, v in to_ldm_state_dict(comps, fam).items()
    }
    metadata = {"format": "pt", META_FAMILY: fam, META_CONFIGS: json.dumps(_config_tree(comps))}
    from safetensors.torch import save_file

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def _gather_components(source: Mapping[str, Any] | Path | str) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(source)
    kw: dict[str, Any] = {"local_files_only": True}
    comps: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", **kw),
        "vae": AutoencoderKL.from_pretrained(str(root), subfolder="vae", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(str(root / "text_encoder"), **kw),
    }
    if (root / "text_encoder_2").is_dir():
        comps["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(str(root / "text_encoder_2"), **kw)
    for name in ("tokenizer", "tokenizer_2"):
        if (root / name).is_dir():
            comps[name] = CLIPTokenizer.from_pretrained(str(root / name), **kw)
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        comps["scheduler_config"] = json.loads(sched.read_text(encoding="utf-8"))
    return comps


def _diffusers_family(comps: Mapping[str, Any]) -> str:
    if comps.get("text_encoder_2") is not None:
        return "sdxl"
    if not comps["unet"].config.get("use_linear_projection"):
        return "sd15"  # SD2's LDM UNet uses linear projections in its transformers, SD1's 1x1 convs
    return "sd2-v" if _scheduler_config(comps).get("prediction_type") == "v_prediction" else "sd2"


def _scheduler_config(comps: Mapping[str, Any]) -> dict[str, Any]:
    for name in ("noise_scheduler", "scheduler"):
        if comps.get(name) is not None:
            return dict(comps[name].config)
    return dict(comps.get("scheduler_config") or {})


def _config_tree(comps: Mapping[str, Any]) -> dict[str, Any]:
    """The components' configs, keyed like the files of a diffusers folder (see _CONFIG_FILES)."""
    tree: dict[str, Any] = {
        "unet/config.json": _public_config(comps["unet"].to_json_string()),
        "vae/config.json": _public_config(comps["vae"].to_json_string()),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if comps.get(name) is not None:
            cfg = _public_config(comps[name].config.to_json_string())
            tree[f"{name}/config.json"] = {**cfg, "architectures": [type(comps[name]).__name__]}
    sched = _scheduler_config(comps)
    if sched:
        tree["scheduler/scheduler_config.json"] = _public_config(json.dumps(sched, default=str))
    for name in ("tokenizer", "tokenizer_2"):
        if comps.get(name) is not None:
            tree.update(_tokenizer_files(comps[name], name))
    return tree


def _public_config(text: str) -> dict[str, Any]:
    """A config without the local path it was loaded from (it would leak into the file)."""
    return {k: v for k, v in json.loads(text).items() if k != "_name_or_path"}


def _tokenizer_files(tokenizer: Any, name: str) -> dict[str, Any]:
    """Its tokenizer_config.json, and its tokenizer.json unless it is the standard CLIP vocabulary."""
    with tempfile.TemporaryDirectory(prefix="lathe-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {f"{name}/tokenizer_config.json": json.loads(Path(tmp, "tokenizer_config.json").read_text("utf-8"))}
        if tokenizer.get_vocab() != clip_vocab_and_merges()[0] and Path(tmp, "tokenizer.json").is_file():
            files[f"{name}/tokenizer.json"] = Path(tmp, "tokenizer.json").read_text("utf-8")
    return files
