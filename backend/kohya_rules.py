"""How each kohya_ss setting becomes a Lathe setting: one function per topic, called by backend.kohya.

Each `map_*` function reads the kohya keys of its topic through a `Mapper` and records, per key, the
Lathe setting it became (`put`/`mapped`) or why it was not imported (`skip`), plus warnings and
errors. The order in backend.kohya.import_kohya matters only where a topic needs an earlier result
(the model family, the optimizer type). The network topic (`map_network`: LoRA_type -> network.type
and every network value) lives in backend.kohya_network and is re-exported here.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.config import OPTIMIZER_TYPES, TrainingConfig
from backend.config_keys import optimizer_classes
from backend.kohya_dataset import map_dataset_folders
from backend.kohya_flow import LABELS as FLOW_LABELS
from backend.kohya_flow import map_family
from backend.kohya_flow import map_flow as map_flow  # re-exported for backend.kohya
from backend.kohya_keys import (
    BOOL_ARGS,
    LATHE_MODELS,
    LIBRARY_DEFAULTS,
    NOT_ARGS,
    OPTIMIZERS,
    OTHER_MODEL_CHECKBOXES,
    OTHER_MODELS,
    SAVE_PRECISION,
    SCHEDULERS,
    SIMPLE,
    UNSET,
    UNSUPPORTED_ARGS,
    off,
    real,
    to_bool,
    to_float,
    to_int,
    to_str,
)
from backend.kohya_network import map_network as map_network  # re-exported for backend.kohya
from backend.kohya_noise import map_noise as map_noise  # re-exported for backend.kohya
from backend.prompts import OPTIONS as PROMPT_OPTIONS
from backend.prompts import SAMPLERS, PromptError, parse_prompt

if TYPE_CHECKING:
    from backend.kohya import Mapper


# ------------------------------------------------------------------------------------------ refusal
def refusal(m: Mapper) -> str | None:
    """Why this config cannot become a Lathe preset (a model or network Lathe does not train), or None."""
    d = m.data
    lora_type = m.get("LoRA_type", to_str)
    for key, name in OTHER_MODEL_CHECKBOXES.items():
        if m.get(key, to_bool):
            return f"{key} is set: a config for the {name} model: {LATHE_MODELS}"
    if m.get("flux1_checkbox", to_bool) and (m.get("model_type", to_str) or "flux").lower() != "flux":
        return (f"model_type {m.data['model_type']!r}: a LoRA for a model built on Flux.1 (not Flux.1 itself): "
                "Lathe trains Flux.1 dev and schnell")
    if lora_type in OTHER_MODELS:
        return f"LoRA_type {lora_type!r}: a LoRA for the {OTHER_MODELS[lora_type]} model: {LATHE_MODELS}"
    if "LoRA_type" not in d and "network_dim" not in d:
        if "num_vectors_per_token" in d or "token_string" in d:
            return "a Textual Inversion config: Lathe trains LoRAs only"
        if "train_dir" in d or "image_folder" in d:
            return "a fine-tuning config (it trains the whole model): Lathe trains LoRAs only"
        return ("a DreamBooth config (it trains the whole model; there is no LoRA_type or network_dim): "
                "Lathe trains LoRAs only")
    return None


# ----------------------------------------------------------------------------------------- handlers
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "owner/name", as on the Hugging Face hub
_WEIGHTS_FILE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin)$", re.I)


def map_model(m: Mapper) -> str | None:
    """Base model, image folder and model family; returns the family Lathe will use (None = auto)."""
    defaults = TrainingConfig()
    for key, path, what, default in (
        ("pretrained_model_name_or_path", "model.pretrained_model", "base model", defaults.model.pretrained_model),
        ("train_data_dir", "dataset.train_data_dir", "image folder", defaults.dataset.train_data_dir),
    ):
        if key == "train_data_dir" and m.get("dataset_config", to_str):
            continue  # the dataset TOML names the folders (backend.kohya_dataset)
        value = m.get(key, to_str)
        if value:
            m.put(key, path, value)
            if key.startswith("pretrained") and _HUB_ID.fullmatch(value) and not _WEIGHTS_FILE.search(value):
                m.warn(f"{key}: {value!r} looks like a Hugging Face model id; Lathe never downloads: "
                       f"make {path} a local diffusers folder or .safetensors file")
        elif key not in m.done:
            m.skip(key, "not applicable: empty in the kohya file")
            m.warn(f"{key}: the kohya file names no {what}; the preset keeps Lathe's placeholder "
                   f"{default!r}: set {path} before training")
    sdxl, v2 = m.get("sdxl", to_bool), m.get("v2", to_bool)
    flow = map_family(m)
    if flow and (sdxl or v2):
        key = "sdxl" if sdxl else "v2"
        m.error(f"{key}: {key} and {'flux1_checkbox' if flow == 'flux' else 'sd3_checkbox'} are both set; a model "
                f"is either {'SDXL' if sdxl else 'SD2'} or {FLOW_LABELS[flow]}")
        return None
    if flow:
        for key in ("sdxl", "v2"):
            m.skip(key, "not applicable: off")
        return flow
    if sdxl and v2:
        m.error("sdxl: both sdxl and v2 are set; a model is either SDXL or SD2")
        return None
    family = "sdxl" if sdxl else "sd2" if v2 else "sd15" if (sdxl is False or v2 is False) else None
    if family:
        decider = "v2" if family == "sd2" or "sdxl" not in m.data else "sdxl"
        m.put(decider, "model.family", family, "" if family != "sd15" else "neither sdxl nor v2 is set")
        for key in ("sdxl", "v2"):
            if key in m.data and key not in m.done:
                m.mapped(key, f"model.family (decided by {decider})")
    return family


def map_dataset(m: Mapper, base_dir: Path | None = None) -> None:
    key = "max_resolution" if "max_resolution" in m.data else "resolution"
    raw = m.get(key, to_str)
    if raw:
        parts = [p for p in re.split(r"[,x\s]+", raw) if p]
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            m.error(f"{key}: expected WIDTH,HEIGHT such as 512,512; got {raw!r}")
        else:
            w, h = int(parts[0]), int(parts[-1])
            side = w if w == h else round(math.sqrt(w * h) / 8) * 8
            note = "" if w == h else f"{w}x{h} is not square: Lathe trains at the same area, {side}x{side}"
            m.put(key, "dataset.resolution", side, note)
            if note:
                m.warn(f"{key}: {note}")
    steps = m.get("bucket_reso_steps", to_int)
    if steps is not None:  # one not a multiple of 8 is rounded up by the trainer (config_warnings names the value)
        m.put("bucket_reso_steps", "dataset.bucket_reso_steps", steps)
    m.skip("bucket_reso_steps", "not applicable: empty in the kohya file, so Lathe's default is kept")
    map_dataset_folders(m, base_dir)
    if "caption_extension" in m.data:
        ext = m.get("caption_extension", to_str)
        if ext is None and "caption_extension" not in m.done:
            m.put("caption_extension", "dataset.caption_extension", ".caption", "empty means .caption in kohya_ss")
        elif ext is not None:
            m.put("caption_extension", "dataset.caption_extension", ext)


def map_duration(m: Mapper) -> None:
    """kohya: max_train_epochs overrides max_train_steps, which overrides epoch (0 or "" = unset)."""
    values = {k: m.get(k, off(to_int)) for k in ("max_train_epochs", "max_train_steps", "epoch")}
    chosen = next((k for k, v in values.items() if real(v)), None)
    if chosen:
        target = "training.max_train_steps" if chosen == "max_train_steps" else "training.max_train_epochs"
        m.put(chosen, target, values[chosen])
    elif not any(k in m.data for k in values):
        m.warn(f"the kohya file sets no training length; Lathe's default ({TrainingConfig().training.max_train_epochs} epochs) is kept")
    for k, v in values.items():
        m.skip(k, f"not applicable: kohya_ss's {chosen} takes precedence" if real(v) else
               "not applicable: 0 or empty means unset in kohya_ss")
    steps = values["max_train_steps"] if chosen == "max_train_steps" else None
    _map_warmup(m, steps)


def _map_warmup(m: Mapper, _total_steps: int | None) -> None:
    """lr_warmup is a percentage of all steps; lr_warmup_steps (newer kohya_ss) a count that wins."""
    warm_steps, pct = m.get("lr_warmup_steps", off(to_int)), m.get("lr_warmup", off(to_float))
    if real(warm_steps):
        m.put("lr_warmup_steps", "scheduler.warmup_steps", warm_steps)
        m.skip("lr_warmup", "not applicable: lr_warmup_steps takes precedence")
    elif real(pct) and 0 < pct < 100:
        m.put("lr_warmup", "scheduler.lr_warmup", pct, "a percentage of all steps, as in kohya_ss")
    elif real(pct):
        m.error(f"lr_warmup: a percentage of all steps, above 0 and below 100; got {pct:g}")
    else:
        for key, value in (("lr_warmup_steps", warm_steps), ("lr_warmup", pct)):
            if value is UNSET:
                m.put(key, "scheduler.warmup_steps", 0)
    for key in ("lr_warmup_steps", "lr_warmup"):
        m.skip(key, "not applicable: 0 or empty means no warmup in kohya_ss")


def map_optimizer(m: Mapper) -> str | None:
    name = m.get("optimizer", to_str)
    if name is None and m.get("use_8bit_adam", to_bool):
        name = "AdamW8bit"
        m.mapped("use_8bit_adam", "optimizer.type = \"AdamW8bit\"")
    m.skip("use_8bit_adam", "not applicable: superseded by optimizer")
    entry = OPTIMIZERS.get((name or "AdamW").lower())
    if entry is None:
        m.skip("optimizer", "unsupported feature: this optimizer")
        m.skip("optimizer_args", "not applicable: arguments of an optimizer Lathe does not have")
        m.res.refused = m.res.refused or (
            f"optimizer {name!r} is not available in Lathe (it has {', '.join(OPTIMIZER_TYPES)})")
        return None
    otype, variant = entry
    lib = LIBRARY_DEFAULTS.get(otype, {})
    note = ", ".join(f"{k}={json.dumps(v)}" for k, v in lib.items())
    if "optimizer" in m.data:
        m.put("optimizer", "optimizer.type", otype, f"kohya's library defaults {note}" if note else "")
    m.set("optimizer.type", otype)
    for k, v in lib.items():
        m.set(f"optimizer.{k}", v)
    if variant:
        m.warn(f"optimizer: {name} is the {variant} variant of {otype}; Lathe trains with its {otype}")
    map_optimizer_args(m, otype)
    return otype


def _split_args(raw: str) -> list[str]:
    out: list[str] = []
    for token in shlex.split(raw):
        if "=" in token or not out:
            out.append(token)
        else:
            out[-1] += " " + token  # "betas=0.9, 0.99" was split at the space
    return out


def _arg_value(name: str, text: str) -> Any:
    if name in BOOL_ARGS:
        value = to_bool(text)
    elif name == "betas":
        parts = [p for p in re.split(r"[\s,()\[\]]+", text) if p]
        if len(parts) != 2:
            raise ValueError(f"expected two numbers such as 0.9,0.999; got {text!r}")
        return [to_float(p) for p in parts]
    elif name in ("beta3", "growth_rate") and text.lower() in ("none", "inf"):
        return None  # Lathe's "empty": sqrt(beta2) / no growth limit
    else:
        value = to_float(text)
    if value is None:
        raise ValueError("no value given")
    return value


def map_optimizer_args(m: Mapper, otype: str) -> None:
    if "optimizer_args" not in m.data:
        return
    raw = m.get("optimizer_args", to_str) or ""
    try:
        tokens = _split_args(raw)
    except ValueError as e:
        m.error(f"optimizer_args: cannot split {raw!r} into arguments ({e})")
        return
    accepted = sorted(set(optimizer_classes()[otype].model_fields) - NOT_ARGS)
    if not tokens and "optimizer_args" not in m.done:
        m.mapped("optimizer_args", "optimizer (no extra arguments)")
    for token in tokens:
        name, sep, text = (part.strip() for part in token.partition("="))
        if name in accepted and sep:
            try:
                m.put("optimizer_args", f"optimizer.{name}", _arg_value(name, text))
            except ValueError as e:
                m.error(f"optimizer_args: {name}: {e}")
        elif name in UNSUPPORTED_ARGS and sep:
            m.res.unmapped.append((f"optimizer_args {name}", "unsupported feature: an optimizer argument Lathe does not expose"))
            m.warn(f"optimizer_args: {name}={text} is not supported by Lathe and is not imported")
        elif not sep:
            m.error(f"optimizer_args: {token!r} is not NAME=VALUE")
        else:
            guess = difflib.get_close_matches(name, accepted + sorted(UNSUPPORTED_ARGS), n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]}?" if guess else f"{otype} takes {', '.join(accepted)}"
            m.error(f"optimizer_args: unknown argument {name!r} for {otype}; {hint}")
    m.done.add("optimizer_args")


TE_CACHE_KEYS = {"sdxl": "sdxl_cache_text_encoder_outputs", "flux": "flux1_cache_text_encoder_outputs",
                 "sd3": "sd3_cache_text_encoder_outputs"}


def map_learning_rates(m: Mapper, family: str | None) -> None:
    """kohya_ss trains the text encoder too, unless its learning rate is 0 (or its outputs are cached).
    For SD3 and Flux.1 that is their CLIP encoders (T5-XXL stays frozen, as kohya_ss leaves it by default)."""
    unet, te = m.get("unet_lr", off(to_float)), m.get("text_encoder_lr", off(to_float))
    for key, value in (("unet_lr", unet), ("text_encoder_lr", te)):
        if value is not None:
            m.put(key, f"optimizer.{key}", value if real(value) else None)
    why_not_te = ""
    if m.get("network_train_unet_only", to_bool):
        why_not_te, key = "network_train_unet_only is set", "network_train_unet_only"
    elif family in TE_CACHE_KEYS and m.get(TE_CACHE_KEYS[family], to_bool):
        why_not_te, key = "cached text-encoder outputs leave them untrained", TE_CACHE_KEYS[family]
    elif te is UNSET and real(unet):
        why_not_te, key = "kohya_ss trains only the UNet when text_encoder_lr is 0", "text_encoder_lr"
    else:
        key = "text_encoder_lr" if "text_encoder_lr" in m.data else "(kohya default)"
    te_only = m.get("network_train_text_encoder_only", to_bool) or (unet is UNSET and real(te))
    if family in FLOW_LABELS and te_only:
        m.res.refused = m.res.refused or (f"a text-encoder-only LoRA on {FLOW_LABELS[family]}: Lathe trains the "
                                          f"transformer of {FLOW_LABELS[family]}, with or without its CLIP encoders")
    if te_only:
        m.put("unet_lr" if unet is UNSET else "network_train_text_encoder_only", "network.train_unet", False,
              "kohya_ss trains only the text encoder")
    m.put(key, "network.train_text_encoder", not why_not_te,
          why_not_te or "kohya_ss trains the text encoder too unless text_encoder_lr is 0")


def map_scheduler(m: Mapper, otype: str | None) -> None:
    name = m.get("lr_scheduler", to_str)
    if name and name.lower() in SCHEDULERS:
        m.put("lr_scheduler", "scheduler.type", name.lower())
    elif name and name.lower() == "adafactor":
        m.put("lr_scheduler", "scheduler.type", "constant", "kohya's adafactor scheduler lets Adafactor set its own step")
        if otype != "Adafactor":
            m.warn(f"lr_scheduler: 'adafactor' belongs to the Adafactor optimizer; {otype} gets a constant schedule")
    elif name:
        m.error(f"lr_scheduler: {name!r} is not available in Lathe (it has {', '.join(SCHEDULERS)})")
    for key, path, conv in (("lr_scheduler_num_cycles", "scheduler.num_cycles", to_int),
                            ("lr_scheduler_power", "scheduler.power", to_float)):
        value = m.get(key, conv)
        if value is not None:
            m.put(key, path, value)
        m.skip(key, "not applicable: empty in the kohya file, so Lathe's default is kept")
    map_scheduler_args(m)


SCHEDULER_ARGS = {"num_cycles": ("scheduler.num_cycles", to_int), "power": ("scheduler.power", to_float)}


def map_scheduler_args(m: Mapper) -> None:
    """lr_scheduler_args, NAME=VALUE each: sd-scripts passes them to the schedule's function, whose
    arguments Lathe has as scheduler.num_cycles and scheduler.power (they win over the
    lr_scheduler_num_cycles/power keys, as the later keyword does in sd-scripts)."""
    raw = m.get("lr_scheduler_args", to_str)
    if not raw:
        m.skip("lr_scheduler_args", "not applicable: empty in the kohya file")
        return
    if m.get("lr_scheduler_type", to_str):
        m.skip("lr_scheduler_args", "not applicable: arguments of the custom lr_scheduler_type, which is not imported")
        return
    m.done.add("lr_scheduler_args")
    try:
        tokens = _split_args(raw)
    except ValueError as e:
        m.error(f"lr_scheduler_args: cannot split {raw!r} into arguments ({e})")
        return
    for token in tokens:
        name, sep, text = (part.strip() for part in token.partition("="))
        if not sep:
            m.error(f"lr_scheduler_args: {token!r} is not NAME=VALUE")
        elif name in SCHEDULER_ARGS:
            path, conv = SCHEDULER_ARGS[name]
            try:
                m.put("lr_scheduler_args", path, conv(text))
            except ValueError as e:
                m.error(f"lr_scheduler_args: {name}: {e}")
        elif name == "last_epoch":
            m.res.unmapped.append(("lr_scheduler_args last_epoch", "not needed: Lathe restores the schedule on resume"))
        else:
            guess = difflib.get_close_matches(name, list(SCHEDULER_ARGS), n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]}?" if guess else "Lathe's schedules take num_cycles and power"
            m.error(f"lr_scheduler_args: unknown argument {name!r}; {hint}")


def check_combinations(m: Mapper, family: str | None) -> None:
    """Pairs of settings that sd-scripts itself refuses or ignores, made plain in the report."""
    sched = m.out.get("scheduler", {})
    if sched.get("type", "constant") == "constant" and (sched.get("warmup_steps") or 0) > 0:
        steps = sched.pop("warmup_steps")
        m.warn(f"lr_warmup: the constant schedule has no warmup (sd-scripts refuses the pair); the {steps} warmup "
               "steps were dropped: choose scheduler.type constant_with_warmup to keep them")
    if sched.get("type", "constant") == "constant" and sched.get("lr_warmup") is not None:
        pct = sched.pop("lr_warmup")
        m.warn(f"lr_warmup: the constant schedule has no warmup (sd-scripts refuses the pair); the {pct:g}% warmup "
               "was dropped: choose scheduler.type constant_with_warmup to keep it")
    clip_skip = m.out.get("training", {}).get("clip_skip") or 1
    if family == "sdxl" and clip_skip > 1:
        m.warn(f"clip_skip: {clip_skip} has no effect on SDXL, in sd-scripts as in Lathe (SDXL always uses the "
               "penultimate text-encoder layer)")


def map_saving(m: Mapper) -> None:
    for kind in ("epochs", "steps"):
        every_key, last_key = f"save_every_n_{kind}", f"save_last_n_{kind}"
        every, last = m.get(every_key, off(to_int)), m.get(last_key, off(to_int))
        if every is not None:
            m.put(every_key, f"saving.{every_key}", every if real(every) else None)
        if real(last) and not real(every):
            m.skip(last_key, f"not applicable: there are no {kind[:-1]} saves ({every_key} is 0)")
        elif real(last) and kind == "steps":
            count = max(1, last // every)
            m.put(last_key, f"saving.{last_key}", count, f"kohya keeps saves within the last {last} steps: "
                  f"{count} save(s) of every {every} steps")
        elif last is not None:
            m.put(last_key, f"saving.{last_key}", last if real(last) else None)
    precision = m.get("save_precision", to_str)
    if precision and precision.lower() in SAVE_PRECISION:
        m.put("save_precision", "saving.save_precision", SAVE_PRECISION[precision.lower()])
    elif precision:
        m.error(f"save_precision: expected fp16, bf16 or float; got {precision!r}")


def map_sampling(m: Mapper) -> None:
    sampler = m.get("sample_sampler", to_str)
    if sampler and sampler.lower() in SAMPLERS:
        m.put("sample_sampler", "sampling.sample_sampler", sampler.lower())
    elif sampler:
        m.error(f"sample_sampler: {sampler!r} is not a sampler Lathe has; one of {', '.join(SAMPLERS)}")
    m.skip("sample_sampler", "not applicable: empty in the kohya file")
    text = m.get("sample_prompts", to_str)
    if text is None:
        if "sample_prompts" in m.data and "sample_prompts" not in m.done:
            m.put("sample_prompts", "sampling.prompts", [])
        return
    if re.fullmatch(r"\S+\.(txt|toml|json)", text):
        m.skip("sample_prompts", "unsupported feature: a prompt file; paste its prompts into sampling.prompts", warn=True)
        return
    prompts = []
    for n, line in enumerate((ln.strip() for ln in text.splitlines()), 1):
        if not line or line.startswith("#"):
            continue
        prompt, *opts = line.split(" --")
        kept = []
        for opt in opts:  # Lathe reads kohya's per-prompt options itself (backend.prompts)
            flag = opt.strip().partition(" ")[0].lower()
            if flag in PROMPT_OPTIONS:
                kept.append(opt)
            else:
                m.warn(f"sample_prompts: line {n}: option --{opt.strip()} is not supported and is left out")
        line = " --".join([prompt.strip(), *kept])
        try:
            parse_prompt(line)
        except PromptError as e:
            m.error(f"sample_prompts: line {n}: {e}")
        prompts.append(line)
    m.put("sample_prompts", "sampling.prompts", prompts, "each line's --n/--w/--h/--s/--l/--d/--ss options kept")


def map_names(m: Mapper) -> None:
    name = m.get("output_name", to_str)
    if name:
        clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
        if clean in (".", ".."):
            m.skip("output_name", "not applicable: not usable as a run name", warn=True)
        else:
            m.put("output_name", "run_name", clean, "" if clean == name else f"from {name!r}: file-name characters only")
    resume = m.get("resume", to_str)
    if "resume" in m.data and "resume" not in m.done:
        m.put("resume", "resume_from", resume)
        if resume:
            m.warn("resume: Lathe resumes only from its own checkpoint folders (with manifest.json); "
                   "a kohya_ss state folder is refused when training starts")
    seed = m.get("seed", off(to_int))
    if real(seed):
        m.put("seed", "training.seed", seed)
    m.skip("seed", "not applicable: empty or 0 is a random seed in kohya_ss; Lathe always seeds its runs so they can be repeated")
    if m.get("training_comment", to_str):
        m.mapped("training_comment", "preset description")
    m.skip("training_comment", "not applicable: empty")


def map_simple(m: Mapper) -> None:
    for key, (path, conv) in SIMPLE.items():
        value = m.get(key, conv)
        if value is UNSET:
            m.put(key, path, None)
        elif value is not None:
            m.put(key, path, value)
        else:
            m.skip(key, "not applicable: empty in the kohya file, so Lathe's default is kept")
