"""The Setup form's fields, derived from TrainingConfig's pydantic metadata (pure: no Gradio).

Every fact about a setting (type, default, bounds, choices, help text) is read from backend.config;
this module only decides where a field goes on the page (section, folded "advanced" or not) and how
it is edited (`kind`). One FieldSpec per form value; a discriminated section (network, optimizer:
its `type` picks its fields) gets one spec per type and field (`network.loha.rank`,
`optimizer.Prodigy.d_coef`), so each type shows only its own settings with its own defaults.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from backend.config import TrainingConfig
from backend.config_keys import default_type, union_classes, union_sections

SECTIONS = ("Model", "Dataset", "Network", "Optimizer", "Schedule", "Saving", "Sampling", "Launch")
# config section (or top-level field) -> Setup section
SECTION_OF = {
    "model": "Model", "dataset": "Dataset", "network": "Network", "optimizer": "Optimizer",
    "scheduler": "Schedule", "training": "Schedule", "saving": "Saving", "logging": "Saving",
    "sampling": "Sampling", "launch": "Launch", "run_name": "Saving", "output_dir": "Saving",
    "resume_from": "Launch",
}
# Shown unfolded; everything else sits in the section's "Advanced" fold.
BASIC = {
    "model.pretrained_model", "model.family",
    "dataset.train_data_dir", "dataset.reg_data_dir", "dataset.resolution", "dataset.enable_bucket", "dataset.validation_split",
    "network.rank", "network.alpha", "network.conv_rank", "network.conv_alpha", "network.train_unet",
    "network.train_text_encoder",
    "optimizer.type", "optimizer.learning_rate", "optimizer.weight_decay", "optimizer.betas",
    "optimizer.d_coef", "optimizer.d0", "optimizer.growth_rate", "optimizer.use_bias_correction",
    "optimizer.safeguard_warmup", "optimizer.decouple", "optimizer.relative_step", "optimizer.momentum",
    "training.max_train_epochs", "training.max_train_steps", "training.train_batch_size",
    "training.gradient_accumulation_steps", "training.mixed_precision", "scheduler.type", "scheduler.warmup_steps",
    "run_name", "output_dir", "saving.save_every_n_epochs", "saving.save_last_n_epochs",
    "saving.save_every_n_steps", "saving.save_last_n_steps",
    "sampling.prompts", "sampling.every_n_epochs", "sampling.every_n_steps",
    "launch.device", "launch.num_processes", "launch.gpu_ids",
}
LABELS = {
    "pretrained_model": "Base model", "family": "Model family", "v_parameterization": "v-prediction",
    "train_data_dir": "Image folder", "reg_data_dir": "Regularization image folder", "subsets": "More subsets",
    "max_token_length": "Caption length (tokens)", "rank_dropout": "Rank dropout", "module_dropout": "Module dropout",
    "bucket_no_upscale": "Never upscale (bucket_no_upscale)", "prior_loss_weight": "Regularization loss weight", "enable_bucket": "Aspect-ratio buckets", "min_bucket_reso": "Smallest bucket side",
    "max_bucket_reso": "Largest bucket side", "bucket_reso_steps": "Bucket side step", "keep_tokens": "Keep leading tags",
    "validation_data_dir": "Validation image folder", "num_workers": "Data loader workers",
    "rank": "Rank (network_dim)", "alpha": "Alpha (network_alpha)", "train_unet": "Train the UNet",
    "train_text_encoder": "Train the text encoder", "target_modules": "UNet target modules",
    "text_encoder_target_modules": "Text-encoder target modules", "type": "Type",
    "network_weights": "Start from a LoRA file", "conv_rank": "Conv rank (conv_dim)", "conv_alpha": "Conv alpha",
    "use_tucker": "Tucker decomposition", "lokr_factor": "LoKr factor", "decompose_both": "Decompose both factors",
    "unet_lr": "UNet learning rate", "text_encoder_lr": "Text-encoder learning rate",
    "max_train_epochs": "Epochs", "max_train_steps": "Steps (instead of epochs)", "train_batch_size": "Batch size",
    "gradient_accumulation_steps": "Gradient accumulation", "min_snr_gamma": "Min-SNR gamma",
    "run_name": "Run name", "output_dir": "Output folder",
    "save_every_n_epochs": "Save every N epochs", "save_last_n_epochs": "Keep newest N epoch saves",
    "save_every_n_steps": "Save every N steps", "save_last_n_steps": "Keep newest N step saves",
    "save_state": "Save resumable state", "save_on_stop": "Save when stopped", "save_precision": "LoRA file precision",
    "every_n_epochs": "Sample every N epochs", "every_n_steps": "Sample every N steps", "steps": "Denoising steps",
    "tensorboard": "TensorBoard", "log_every_n_steps": "Log every N steps", "gpu_ids": "GPU ids",
    "num_processes": "Processes (GPUs)", "resume_from": "Resume from checkpoint",
}
PATH_LABELS = {
    "scheduler.type": "LR schedule", "scheduler.lr_warmup": "Warmup (% of all steps)", "sampling.seed": "Sample seed", "sampling.steps": "Denoising steps",
    "scheduler.num_cycles": "Cycles", "launch.main_process_ip": "Main machine address",
    "launch.main_process_port": "Main machine port", "launch.num_machines": "Machines",
    "dataset.cache_latents_to_disk": "Keep the latent cache on disk",
    "dataset.latent_cache_gpu_mb": "GPU memory for the latent cache (MB)", "dataset.shuffle_caption": "Shuffle caption tags",
}
# Prodigy's arguments keep their own names: that is the vocabulary its users know.
RAW_NAMES = {"d_coef", "d0", "growth_rate", "use_bias_correction", "safeguard_warmup", "decouple", "beta3"}
TRISTATE = ("auto", "yes", "no")  # bool | None
Kind = Literal["text", "int", "float", "bool", "choice", "tristate", "lines", "pair", "table"]


@dataclass(frozen=True)
class FieldSpec:
    """One form value. `key` names it in the form; `path` in the config (they differ only for the
    fields of a discriminated section, whose key carries the type: `network.loha.rank` is
    `network.rank` of a loha network)."""

    key: str
    path: str
    section: str
    label: str
    help: str
    kind: Kind
    default: Any  # as a form value
    optional: bool = False  # empty means None
    choices: tuple[str, ...] = ()
    advanced: bool = False
    union: str | None = None  # the discriminated section this field belongs to ("network", "optimizer")
    variant: str | None = None  # ...and the type it is shown for ("loha", "Prodigy")
    columns: tuple[str, ...] = ()  # a table's columns: the fields of each row's model (dataset.subsets)

    def applies(self, chosen: Mapping[str, str]) -> bool:
        """Whether this field is part of the config when each union has the type in `chosen`."""
        return self.union is None or chosen.get(self.union) == self.variant

    @property
    def as_text(self) -> bool:
        """Optional numbers are edited as text: an empty box means None (Gradio's Number shows None as 0)."""
        return self.optional and self.kind in ("int", "float")

    @property
    def title(self) -> str:
        """How messages name the field: 'Saving › Keep newest N epoch saves'."""
        return f"{self.section} › {self.label}"


def _unwrap_optional(ann: Any) -> tuple[Any, bool]:
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1 and len(get_args(ann)) == 2:
            return args[0], True
    return ann, False


def _kind(ann: Any) -> tuple[Kind, tuple[str, ...]]:
    origin = get_origin(ann)
    if origin is Literal:
        return "choice", tuple(str(a) for a in get_args(ann))
    if origin is list:
        (item,) = get_args(ann) or (str,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "table", tuple(item.model_fields)
        return "lines", ()
    if origin is tuple:
        return "pair", ()
    if ann is bool:
        return "bool", ()
    if ann is int:
        return "int", ()
    if ann is float:
        return "float", ()
    return "text", ()


def bounds_text(info: FieldInfo) -> str:
    """'at least 1, at most 1024, a multiple of 8' from the field's constraints."""
    words = []
    for m in info.metadata:
        for attr, word in (("gt", "more than"), ("ge", "at least"), ("lt", "less than"), ("le", "at most"),
                           ("multiple_of", "a multiple of")):
            value = getattr(m, attr, None) if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le, at.MultipleOf)) else None
            if value is not None:
                words.append(f"{word} {_num(value)}")
    return ", ".join(words)


def _num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)


def _label(name: str, path: str) -> str:
    if path in PATH_LABELS:
        return PATH_LABELS[path]
    if name in RAW_NAMES:
        return name
    return LABELS.get(name, name.replace("_", " ").capitalize())


def number_text(value: Any) -> str:
    """An optional number as the text box shows it: '' for None."""
    if value is None:
        return ""
    return _num(float(value)) if isinstance(value, float) else str(value)


def _form_default(kind: Kind, value: Any, optional: bool = False) -> Any:
    if kind == "tristate":
        return "auto" if value is None else ("yes" if value else "no")
    if kind == "lines":
        return "\n".join(value or [])
    if kind == "table":
        return []
    if kind == "pair":
        return ", ".join(_num(float(v)) for v in value)
    if kind == "text" or (kind in ("int", "float") and optional):
        return number_text(value) if kind != "text" else ("" if value is None else str(value))
    return value


def _spec(key: str, path: str, name: str, info: FieldInfo, union: str | None = None,
          variant: str | None = None) -> FieldSpec:
    ann, optional = _unwrap_optional(info.annotation)
    kind, choices = _kind(ann)
    columns = ()
    if kind == "table":
        columns, choices = choices, ()
    if kind == "bool" and optional:
        kind, choices = "tristate", TRISTATE
    default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    top = path.split(".")[0]
    rule = bounds_text(info)
    hint = (info.description or "").strip()
    if kind == "lines":
        hint += " One per line."
    if kind == "table":
        (row_model,) = get_args(ann)
        hint += " One row each; an empty cell takes the default. Columns: " + "; ".join(
            f"{c}: {(row_model.model_fields[c].description or '').rstrip('.')}" for c in columns) + "."
    if optional and kind in ("int", "float", "text") and "Empty" not in hint:
        hint += " Leave empty for none."
    help_text = " · ".join(x for x in (hint, rule, path) if x)
    return FieldSpec(key, path, SECTION_OF[top], _label(name, path), help_text, kind, _form_default(kind, default, optional),
                     optional, choices, path not in BASIC, union, variant, columns)


def _section_fields(name: str, cls: type[BaseModel]) -> list[FieldSpec]:
    return [_spec(f"{name}.{f}", f"{name}.{f}", f, info) for f, info in cls.model_fields.items()]


TYPE_FIELDS = {  # the type selector of each discriminated section: label, help
    "network": ("Network type", "Which network is trained: lora (kohya's LoRA), locon (LoRA on the 3x3 convolutions "
                "too), loha and lokr (LyCORIS's Hadamard and Kronecker products) or dora (LoRA with a learned "
                "magnitude)."),
    "optimizer": ("Optimizer", "Which optimizer trains the LoRA."),
}


def _union_fields(section: str) -> list[FieldSpec]:
    """The type selector of a discriminated section, then every type's own fields."""
    path = f"{section}.type"
    label, hint = TYPE_FIELDS.get(section, (f"{section.capitalize()} type", ""))
    classes = union_classes(section)
    out = [FieldSpec(path, path, SECTION_OF[section], label,
                     f"{hint} Each one shows its own settings below. · {path}".lstrip(),
                     "choice", default_type(section), choices=tuple(classes))]
    for kind, cls in classes.items():
        for f, info in cls.model_fields.items():
            if f != "type":
                out.append(_spec(f"{section}.{kind}.{f}", f"{section}.{f}", f, info, section, kind))
    return out


@cache
def field_specs() -> tuple[FieldSpec, ...]:
    """Every form field, in schema order (schema_version is not a form field: it is fixed)."""
    out: list[FieldSpec] = []
    for name, info in TrainingConfig.model_fields.items():
        if name == "schema_version":
            continue
        if name in union_sections():
            out += _union_fields(name)
            continue
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _section_fields(name, ann)
        else:
            out.append(_spec(name, name, name, info))
    return tuple(out)


@cache
def specs_by_key() -> dict[str, FieldSpec]:
    return {s.key: s for s in field_specs()}


def chosen_types(values: Mapping[str, Any]) -> dict[str, str]:
    """The type of each discriminated section in a form: {"network": "loha", "optimizer": "Prodigy"}
    (read as the form reads a choice: trimmed)."""
    kinds = {s: values.get(f"{s}.type", default_type(s)) for s in union_sections()}
    return {s: k.strip() if isinstance(k, str) else k for s, k in kinds.items()}


def spec_for_path(path: str, chosen: Mapping[str, str] | None = None) -> FieldSpec | None:
    """The field a config path (as in a validation message) belongs to, for the chosen types of the
    discriminated sections (a section not in `chosen` has its default type)."""
    by_key = specs_by_key()
    section, _, rest = path.partition(".")
    key = path
    if section in union_sections():
        if not rest:
            key = f"{section}.type"  # "network: unknown network type ..." belongs to the type selector
        elif rest != "type":
            key = f"{section}.{(chosen or {}).get(section, default_type(section))}.{rest}"
    while key:
        if key in by_key:
            return by_key[key]
        key = key.rpartition(".")[0]  # optimizer.AdamW.betas.0 -> optimizer.AdamW.betas
    return None


ORDER_IN_SECTION = ("training", "scheduler")  # the Schedule section reads: how long, then the LR schedule


def section_specs(section: str) -> list[FieldSpec]:
    """The fields of one Setup section, in the order they are shown."""
    mine = [s for s in field_specs() if s.section == section]
    top = [s.path.split(".")[0] for s in mine]
    return [s for _, s in sorted(zip(top, mine, strict=True),
                                 key=lambda t: ORDER_IN_SECTION.index(t[0]) if t[0] in ORDER_IN_SECTION else -1)]
