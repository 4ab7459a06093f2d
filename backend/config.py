"""The training configuration: one validated pydantic model, `TrainingConfig`.

Every fact about a field is said once, here or in the section modules it re-exports
(config_dataset, config_network, config_optimizer, config_training): its type, default, bounds and
description. The GUI's labels and tooltips and the CLI's messages are derived from these. Cross-field rules live in
model validators with plain-language messages; soft advice (a setting that is allowed but likely a
mistake) comes from `config_warnings`.

This module never imports torch: the GUI and the CLI load it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backend.config_base import Section
from backend.config_dataset import (  # noqa: F401 (DatasetConfig and SubsetConfig are re-exported)
    DATASET_HASH_NEUTRAL,
    DatasetConfig,
    SubsetConfig,
    dataset_warnings,
)
from backend.config_messages import (  # noqa: F401 (the type lists are re-exported)
    NETWORK_TYPES,
    OPTIMIZER_TYPES,
    format_validation_error,
)
from backend.config_network import (  # noqa: F401 (the network section's names are re-exported)
    NETWORK_HASH_NEUTRAL,
    TEXT_ENCODER_TARGETS_DEFAULT,
    UNET_TARGETS_DEFAULT,
    DoRANetwork,
    LoConNetwork,
    LoHaNetwork,
    LoKrNetwork,
    LoRANetwork,
    NetworkBase,
    NetworkConfig,
)
from backend.config_optimizer import (  # noqa: F401 (the optimizer section's names are re-exported)
    ADAPTIVE_OPTIMIZERS,
    LORAPLUS_FIELDS,
    OPTIMIZER_HASH_NEUTRAL,
    AdafactorConfig,
    AdamW8bitConfig,
    AdamWConfig,
    Betas,
    DAdaptAdamConfig,
    DAdaptLionConfig,
    LionConfig,
    OptimizerBase,
    OptimizerConfig,
    ProdigyConfig,
    SGDConfig,
)
from backend.config_training import (  # noqa: F401 (the scheduler and training sections' names are re-exported)
    FLOW_FIELDS,
    NOISE_AND_LOSS_FIELDS,
    SchedulerConfig,
    TrainingSection,
    noise_and_loss_warnings,
)
from backend.prompts import SAMPLERS, PromptError, parse_prompt

SCHEMA_VERSION = 1

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


# --------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    pretrained_model: str = Field(
        "demo/model",
        description="Base model: a diffusers folder (with model_index.json) or a single "
        ".safetensors/.ckpt checkpoint file. Nothing is downloaded.",
        min_length=1,
    )
    family: Literal["auto", "sd15", "sd2", "sdxl", "sd3", "flux"] = Field(
        "auto", description="Model family. 'auto' detects SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 from the weights."
    )
    v_parameterization: bool | None = Field(
        None,
        description="Train with v-prediction (SD2.x 768 models). Empty: read it from the model's "
        "scheduler config (diffusers folder) or assume epsilon (single file).",
    )
    # SD3/SD3.5 and Flux.1 as users download them: the transformer as pretrained_model, the rest beside it
    # (sd-scripts' names; its Flux --ae is `vae` here).
    clip_l: str | None = Field(
        None, description="SD3/Flux.1 single file: the CLIP-L text encoder (.safetensors). Empty: from the model file."
    )
    clip_g: str | None = Field(
        None, description="SD3 single file: the CLIP-G text encoder (.safetensors). Empty: from the model file."
    )
    t5xxl: str | None = Field(
        None, description="SD3/Flux.1 single file: the T5-XXL text encoder (.safetensors). Empty: from the model file."
    )
    vae: str | None = Field(
        None, description="SD3/Flux.1 single file: the VAE / autoencoder (.safetensors; sd-scripts' --ae for Flux.1). "
        "Empty: from the model file.",
    )
    fp8_base: bool = Field(
        False, description="Store the frozen base weights of the transformer/UNet in fp8 and upcast each layer as "
        "it runs (about half the memory of bf16; the LoRA trains in full precision).",
    )


# ------------------------------------------------------------------------- the sections' hash-neutral fields
HASH_NEUTRAL_DEFAULTS = {"network": NETWORK_HASH_NEUTRAL, "optimizer": OPTIMIZER_HASH_NEUTRAL,
                         "dataset": DATASET_HASH_NEUTRAL,
                         "scheduler": {"lr_warmup": None},
                         "model": {"clip_l": None, "clip_g": None, "t5xxl": None, "vae": None, "fp8_base": False}}
# added after schema 1, see config_hash


HASH_NEUTRAL_DEFAULTS["training"] = {name: TrainingSection.model_fields[name].default for name in NOISE_AND_LOSS_FIELDS}
HASH_NEUTRAL_DEFAULTS["training"]["blocks_to_swap"] = 0


# -------------------------------------------------------------------------------------------- saving
class SavingConfig(Section):
    save_every_n_epochs: int | None = Field(None, ge=1, description="Save a checkpoint every N epochs. Empty: no epoch saves.")
    save_last_n_epochs: int | None = Field(
        None, ge=1, description="Keep only the newest N epoch checkpoints; older ones are deleted after each new save."
    )
    save_every_n_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps. Empty: none.")
    save_last_n_steps: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest N step checkpoints (a count of saves; kohya's option of the same "
        "name is a window in steps).",
    )
    save_state: bool = Field(True, description="Save the full training state (resumable), not only the LoRA file.")
    save_on_stop: bool = Field(True, description="When stopped (Stop button, Ctrl+C), save a resumable checkpoint first.")
    save_precision: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="Precision of exported LoRA files.")
    export_format: Literal["auto", "sd-scripts", "diffusers"] = Field(
        "auto",
        description="Key names of exported LoRA files. auto: the family's usual (SD 1.x/2.x/SDXL and Flux.1: "
        "sd-scripts' (kohya) names; SD3: diffusers'); diffusers: diffusers' transformer.* names (Flux.1). ComfyUI, "
        "diffusers and A1111 read the usual one.",
    )

    @model_validator(mode="after")
    def _check(self) -> SavingConfig:
        if self.save_last_n_epochs is not None and self.save_every_n_epochs is None:
            raise ValueError("save_last_n_epochs: needs save_every_n_epochs (how often to save an epoch checkpoint)")
        if self.save_last_n_steps is not None and self.save_every_n_steps is None:
            raise ValueError("save_last_n_steps: needs save_every_n_steps (how often to save a step checkpoint)")
        return self


# ------------------------------------------------------------------------------------------ sampling
class SamplingConfig(Section):
    prompts: list[Annotated[str, Field(max_length=2000)]] = Field(
        default_factory=list, max_length=64,
        description="Sample prompts, one image each, in kohya's syntax: options after the prompt override the settings "
        "below for that image: --n negative prompt, --w width, --h height, --s steps, --l guidance scale, --d seed, "
        "--ss sampler (e.g. 'a cat --w 512 --h 768 --d 7').",
    )
    sample_sampler: Literal[tuple(SAMPLERS)] = Field(  # type: ignore[valid-type]
        "ddim", description="Sampler of the sample images (sd-scripts' names; 'dpm++ 2m karras' and 'dpm++ 2m' too), "
        "built from the model's own noise schedule.",
    )
    negative_prompt: str = Field("", max_length=2000, description="Negative prompt for every sample.")
    every_n_epochs: int | None = Field(None, ge=1, description="Sample every N epochs. Empty: not by epoch.")
    every_n_steps: int | None = Field(None, ge=1, description="Sample every N steps. Empty: not by step.")
    steps: int = Field(20, ge=1, le=200, description="Denoising steps per sample image.")
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for sample images (the same at every save point).")
    width: int = Field(512, ge=32, le=4096, multiple_of=8, description="Sample width in pixels.")
    height: int = Field(512, ge=32, le=4096, multiple_of=8, description="Sample height in pixels.")

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        for i, line in enumerate(v):
            try:
                parse_prompt(line)
            except PromptError as e:
                raise ValueError(f"prompt {i + 1} ({line[:40]!r}): {e}") from None
        return v


HASH_NEUTRAL_DEFAULTS["sampling"] = {"sample_sampler": "ddim"}
HASH_NEUTRAL_DEFAULTS["saving"] = {"export_format": "auto"}


# ------------------------------------------------------------------------------------------- logging
class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard scalars into the version folder.")
    log_every_n_steps: int = Field(
        1, ge=1, le=100_000,
        description="Read the loss back from the GPU every N steps (one sync per N steps); every step still gets its event.",
    )


# -------------------------------------------------------------------------------------------- launch
class LaunchConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train. 'auto' uses CUDA when present.")
    num_processes: int = Field(1, ge=1, le=1024, description="Training processes in all (one per GPU).")
    gpu_ids: str | None = Field(None, description="GPUs to use, e.g. '0,1'. Empty: all visible.")
    num_cpu_threads_per_process: int | None = Field(
        None, ge=1, le=1024,
        description="PyTorch CPU threads of each training process (CPU training; ignored on GPUs). Empty: "
        "chosen for the run: 1 when a step's work is tiny (the demo at 64 px: more threads only add overhead, "
        "and a browser showing the page then slows nothing), otherwise this machine's cores shared among "
        "its training processes.",
    )
    num_machines: int = Field(1, ge=1, le=1024, description="Machines taking part.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank (0 is the main one).")
    main_process_ip: str | None = Field(None, description="Address of machine 0 (several machines only).")
    main_process_port: int | None = Field(None, ge=1, le=65535, description="Port on machine 0 (several machines only).")
    accelerate_config_file: str | None = Field(
        None,
        description="An accelerate config file (one machine or several, plain DDP). It overrides the settings "
        "above. DeepSpeed and FSDP configs are refused: Lathe's checkpoints hold unsharded state.",
    )

    @field_validator("gpu_ids")
    @classmethod
    def _gpu_ids(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"all|\d{1,3}(,\d{1,3})*", v.replace(" ", "")):
            raise ValueError(f"use 'all' or GPU numbers separated by commas, e.g. 0,1; got {v!r}")
        return None if v is None else v.replace(" ", "")

    @field_validator("main_process_ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}", v):
            raise ValueError(f"must be a host name or IP address; got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> LaunchConfig:
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank: must be below num_machines ({self.machine_rank} >= {self.num_machines})")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("main_process_ip: several machines need the address of machine 0")
        if self.num_processes % self.num_machines and not self.accelerate_config_file:
            raise ValueError(f"num_processes: counts the processes of all machines together and must be a multiple "
                             f"of num_machines ({self.num_processes} processes on {self.num_machines} machines)")
        if self.device == "cpu" and self.gpu_ids:
            raise ValueError("gpu_ids: not used with device 'cpu'; clear it or choose device 'cuda'")
        return self


HASH_NEUTRAL_DEFAULTS["launch"] = {"num_cpu_threads_per_process": None}


# ------------------------------------------------------------------------------------------ the root
class TrainingConfig(Section):
    schema_version: int = Field(SCHEMA_VERSION, description="Config schema version (for migrations).")
    run_name: str = Field(
        "lora", description="Name of the run, used in folder and file names: letters, digits, '.', '_', '-'."
    )
    output_dir: str = Field("runs", min_length=1, description="Folder that holds every run.")
    resume_from: str | None = Field(None, description="A checkpoint folder to resume from.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    network: NetworkConfig = Field(default_factory=LoRANetwork)
    optimizer: OptimizerConfig = Field(default_factory=AdamWConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    training: TrainingSection = Field(default_factory=TrainingSection)
    saving: SavingConfig = Field(default_factory=SavingConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"this Lathe reads schema_version {SCHEMA_VERSION}; got {v} (load old files as presets to migrate them)")
        return v

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v) or v.startswith("."):
            raise ValueError("use 1-80 letters, digits, '.', '_' or '-', not starting with '.' (it names a folder)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> TrainingConfig:
        opt = self.optimizer
        if opt.type in ADAPTIVE_OPTIMIZERS and self.network.train_unet and self.network.train_text_encoder:
            u = opt.unet_lr or opt.learning_rate
            t = opt.text_encoder_lr or opt.learning_rate
            if u != t:
                raise ValueError(
                    f"optimizer.text_encoder_lr: {opt.type} needs one learning rate for UNet and text encoder (unet_lr {u} "
                    f"!= text_encoder_lr {t}); {'scale the step with d_coef' if opt.type == 'Prodigy' else 'it sets the step size itself'} instead"
                )
        if any(getattr(opt, f) is not None for f in LORAPLUS_FIELDS) and self.network.type not in ("lora", "locon", "dora"):
            raise ValueError(f"optimizer.loraplus_lr_ratio: LoRA+ speeds up a LoRA's up-projections; a {self.network.type} "
                             "network has none (use lora, locon or dora, or clear the LoRA+ ratios)")
        v_pred, t = self.model.v_parameterization, self.training
        if v_pred is False and t.scale_v_pred_loss_like_noise_pred:
            raise ValueError("training.scale_v_pred_loss_like_noise_pred: only for v-prediction, and "
                             "model.v_parameterization is false (sd-scripts refuses the pair)")
        if v_pred is True and t.v_pred_like_loss is not None:
            raise ValueError("training.v_pred_like_loss: only for noise-prediction (epsilon) models, and "
                             "model.v_parameterization is true (sd-scripts refuses the pair)")
        return self

    def config_hash(self) -> str:
        """sha256 of the canonical JSON form; identical configs give identical hashes. Fields added
        after schema 1 leave the hash alone while at their defaults (HASH_NEUTRAL_DEFAULTS), so the
        checkpoints of a run started before they existed still match its config.json."""
        data = self.model_dump(mode="json")
        for section, fields in HASH_NEUTRAL_DEFAULTS.items():
            for name, default in fields.items():
                if data[section].get(name, default) == default:
                    data[section].pop(name, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def canonical_json(cfg: BaseModel) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_warnings(cfg: TrainingConfig) -> list[str]:
    """Allowed but probably mistaken settings, as `path: message` lines."""
    out: list[str] = []
    opt = cfg.optimizer
    if opt.type == "Prodigy":
        for name in ("learning_rate", "unet_lr", "text_encoder_lr"):
            lr = getattr(opt, name)
            if lr is not None and not (0.5 <= lr <= 2.0):
                out.append(
                    f"optimizer.{name}: Prodigy sets its own step size and expects about 1.0 (got {lr}); "
                    "tune optimizer.d_coef instead"
                )
        if cfg.scheduler.has_warmup and not opt.safeguard_warmup:
            out.append("optimizer.safeguard_warmup: recommended with Prodigy when scheduler.warmup_steps > 0")
    if cfg.dataset.random_flip and cfg.sampling.prompts and any("left" in p or "right" in p for p in cfg.sampling.prompts):
        out.append("dataset.random_flip: flipping mixes up left and right, which your sample prompts mention")
    if cfg.training.mixed_precision != "no" and cfg.launch.device == "cpu":
        out.append("training.mixed_precision: ignored on CPU (training runs in fp32)")
    if cfg.model.family == "sdxl" and cfg.training.clip_skip > 1:
        out.append("training.clip_skip: ignored for SDXL, which always uses the penultimate layer (as sd-scripts does)")
    if cfg.training.prior_loss_weight != 1.0 and not (cfg.dataset.reg_data_dir or any(s.is_reg for s in cfg.dataset.subsets)):
        out.append("training.prior_loss_weight: only weights regularization images, and the dataset has none")
    return out + dataset_warnings(cfg.dataset) + noise_and_loss_warnings(cfg.training, cfg.model.v_parameterization)


class ConfigError(Exception):
    """A config that does not validate; `lines` are `path: message` strings."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def validate_config(data: dict[str, Any]) -> TrainingConfig:
    """Validate a full config dict; raise ConfigError with readable lines."""
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON file whose top level is an object; ConfigError with a plain reason otherwise."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"{p}: not readable JSON ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: expected a JSON object at the top level"])
    return data


def load_config_file(path: str | Path) -> TrainingConfig:
    """Read a full config.json (as written into a version folder) and validate it."""
    return validate_config(read_json_object(path))
