"""The kohya dataset settings: the image folders (train_data_dir, reg_data_dir or a dataset TOML),
buckets and regularization weight. Called by backend.kohya (through backend.kohya_rules).

A `dataset_config` TOML (sd-scripts' library/config_util.py: `[general]`, `[[datasets]]`,
`[[datasets.subsets]]`) becomes `dataset.subsets`. Each subset setting is looked up as sd-scripts
does: the subset's own value, else its dataset's, else `[general]`'s, else the command-line (here:
the kohya JSON) value, which Lathe keeps at the dataset level. When a TOML is given, sd-scripts
ignores train_data_dir and reg_data_dir, and so does the import. Lathe trains one dataset: several
`[[datasets]]` are merged into one list of subsets when their resolution and bucket settings agree,
and refused naming the setting when they do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from backend.kohya_keys import show, to_bool, to_float, to_int, to_str

if TYPE_CHECKING:
    from backend.kohya import Mapper

TOML = "dataset_config"
# subset key -> (Lathe subset field, converter)
SUBSET_KEYS = {
    "image_dir": ("image_dir", to_str), "num_repeats": ("num_repeats", to_int), "is_reg": ("is_reg", to_bool),
    "class_tokens": ("class_tokens", to_str), "caption_extension": ("caption_extension", to_str),
    "shuffle_caption": ("shuffle_caption", to_bool), "keep_tokens": ("keep_tokens", to_int),
    "flip_aug": ("random_flip", to_bool), "caption_dropout_rate": ("caption_dropout_rate", to_float),
}
# dataset key -> (Lathe path, converter): one value for the whole dataset
DATASET_KEYS = {
    "batch_size": ("training.train_batch_size", to_int), "enable_bucket": ("dataset.enable_bucket", to_bool),
    "min_bucket_reso": ("dataset.min_bucket_reso", to_int), "max_bucket_reso": ("dataset.max_bucket_reso", to_int),
    "bucket_reso_steps": ("dataset.bucket_reso_steps", to_int),
    "bucket_no_upscale": ("dataset.bucket_no_upscale", to_bool),
    "validation_split": ("dataset.validation_split", to_float),
    "prior_loss_weight": ("training.prior_loss_weight", to_float),
    "max_token_length": ("training.max_token_length", to_int),
}
NOT_NEEDED = {
    "cache_info": "not needed: Lathe reads image sizes from the file headers itself",
    "validation_seed": "not needed: Lathe's validation split follows training.seed",
    "debug_dataset": "not needed: a debugging switch",
}
NEUTRAL = {"resize_interpolation": ("lanczos", "area", ""), "network_multiplier": (1, 1.0),
           "caption_prefix": ("",), "caption_suffix": ("",), "token_warmup_step": (0,), "token_warmup_min": (1,),
           "caption_dropout_every_n_epochs": (0,), "caption_tag_dropout_rate": (0, 0.0), "color_aug": (False,),
           "random_crop": (False,), "enable_wildcard": (False,), "alpha_mask": (False,), "custom_attributes": ({},)}
UNSUPPORTED = {
    "color_aug": "color augmentation", "random_crop": "random crop", "face_crop_aug_range": "face-crop augmentation",
    "keep_tokens_separator": "a keep-tokens separator", "secondary_separator": "a secondary caption separator",
    "caption_separator": "a caption separator other than ','", "enable_wildcard": "caption wildcards",
    "token_warmup_min": "token warmup", "token_warmup_step": "token warmup", "caption_prefix": "a caption prefix",
    "caption_suffix": "a caption suffix", "custom_attributes": "custom subset attributes",
    "resize_interpolation": "a resize interpolation other than Lanczos",
    "caption_dropout_every_n_epochs": "dropping every caption every N epochs",
    "caption_tag_dropout_rate": "tag dropout", "alpha_mask": "alpha-masked loss",
    "network_multiplier": "a per-dataset network multiplier",
    "metadata_file": "fine-tuning subsets (captions from a metadata JSON): give the images with caption files",
    "conditioning_data_dir": "ControlNet subsets",
}


def map_dataset_folders(m: Mapper, base_dir: Path | None) -> None:
    """train_data_dir/reg_data_dir, or the dataset TOML in their place; the regularization weight
    and the no-upscale bucketing."""
    weight = m.get("prior_loss_weight", to_float)
    if weight is not None:
        m.put("prior_loss_weight", "training.prior_loss_weight", weight)
    no_upscale = m.get("bucket_no_upscale", to_bool)
    if no_upscale is not None:
        m.put("bucket_no_upscale", "dataset.bucket_no_upscale", no_upscale)
    toml_path = m.get(TOML, to_str)
    if toml_path:
        for key in ("train_data_dir", "reg_data_dir"):
            if m.get(key, to_str):
                m.skip(key, f"not applicable: {TOML} lists the image folders (sd-scripts ignores {key} then)")
        _map_toml(m, toml_path, base_dir)
    else:
        m.skip(TOML, "not applicable: empty in the kohya file")
        reg = m.get("reg_data_dir", to_str)
        if reg:
            m.put("reg_data_dir", "dataset.reg_data_dir", reg)
        m.skip("reg_data_dir", "not applicable: empty in the kohya file (no regularization images)")


def _read_toml(m: Mapper, raw: str, base_dir: Path | None) -> dict[str, Any] | None:
    path = Path(raw).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        m.error(f"{TOML}: the dataset TOML {raw} is not there; the import reads its subsets from it (put the file "
                "there, or clear dataset_config and set train_data_dir)")
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        m.error(f"{TOML}: {raw} is not a readable TOML file ({e})")
        return None
    return data


def _map_toml(m: Mapper, raw: str, base_dir: Path | None) -> None:
    m.done.add(TOML)
    data = _read_toml(m, raw, base_dir)
    if data is None:
        return
    general = data.get("general") or {}
    datasets = data.get("datasets")
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets or \
            not all(isinstance(d, dict) for d in datasets):
        m.error(f"{TOML}: {raw} has no [[datasets]] tables (sd-scripts' dataset config layout)")
        return
    report: list[str] = []
    for key in set(data) - {"general", "datasets"}:
        _other(m, f"{key}", data[key], report)
    shared: dict[str, tuple[Any, str]] = {}  # Lathe path -> (value, where)
    subsets: list[dict[str, Any]] = []
    for di, ds in enumerate(datasets):
        where_ds = f"datasets[{di}]"
        for key, value in {**general, **ds}.items():
            if key == "subsets" or key in SUBSET_KEYS or key == "resolution" or key not in DATASET_KEYS:
                continue
            _dataset_value(m, key, value, ds if key in ds else general, where_ds if key in ds else "general",
                           shared, report)
        if "resolution" in ds or "resolution" in general:
            _resolution(m, ds.get("resolution", general.get("resolution")),
                        where_ds if "resolution" in ds else "general", shared, report)
        for key, value in {**general, **ds}.items():
            if key != "subsets" and key not in SUBSET_KEYS and key not in DATASET_KEYS and key != "resolution":
                _other(m, f"{where_ds if key in ds else 'general'}.{key}", value, report)
        rows = ds.get("subsets") or []
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            m.error(f"{TOML}: {where_ds}.subsets must be a list of [[datasets.subsets]] tables")
            continue
        for si, sub in enumerate(rows):
            row = _subset(m, f"{where_ds}.subsets[{si}]", sub, ds, general, report)
            if row is not None:
                subsets.append(row)
    if not subsets:
        m.error(f"{TOML}: {raw} lists no [[datasets.subsets]] with an image_dir")
        return
    for path, (value, where) in shared.items():
        m.set(path, value)
        m.sources[path] = TOML
        _overridden(m, path, where)
    m.set("dataset.train_data_dir", None)
    m.set("dataset.reg_data_dir", None)
    m.set("dataset.subsets", subsets)
    m.sources.setdefault("dataset.subsets", TOML)
    n_reg = sum(1 for s in subsets if s.get("is_reg"))
    m.mapped(TOML, f"dataset.subsets = {len(subsets)} subset(s) from {raw} ({n_reg} of regularization images); "
             + "; ".join(report))


# Lathe path -> the kohya file keys that set it too: a TOML value wins over them, as in sd-scripts
FILE_KEYS = {
    "training.train_batch_size": ("train_batch_size",), "dataset.enable_bucket": ("enable_bucket",),
    "dataset.min_bucket_reso": ("min_bucket_reso",), "dataset.max_bucket_reso": ("max_bucket_reso",),
    "dataset.bucket_reso_steps": ("bucket_reso_steps",), "dataset.bucket_no_upscale": ("bucket_no_upscale",),
    "training.prior_loss_weight": ("prior_loss_weight",), "dataset.resolution": ("max_resolution", "resolution"),
}


def _overridden(m: Mapper, path: str, where: str) -> None:
    """The kohya file's own key for a setting the TOML sets: reported as overridden, not as applied."""
    for key in FILE_KEYS.get(path, ()):
        if key in m.data:
            m.res.mapped = [(k, t) for k, t in m.res.mapped if k != key]
            m.done.discard(key)
            m.skip(key, f"not applicable: {TOML} sets it ({where})")
        m.done.add(key)


def _dataset_value(m: Mapper, key: str, value: Any, _table: dict, where: str,
                   shared: dict[str, tuple[Any, str]], report: list[str]) -> None:
    path, conv = DATASET_KEYS[key]
    try:
        v = conv(value)
    except ValueError as e:
        m.error(f"{TOML}: {where}.{key}: {e}")
        return
    _share(m, path, v, f"{where}.{key}", shared, report)


def _share(m: Mapper, path: str, v: Any, where: str, shared: dict[str, tuple[Any, str]], report: list[str]) -> None:
    if path in shared and shared[path][0] != v:
        m.error(f"{TOML}: {where} is {show(v)} but {shared[path][1]} is {show(shared[path][0])}; Lathe trains one "
                "dataset with one value of it: make them equal, or import the datasets as separate presets")
        return
    if path not in shared:
        shared[path] = (v, where)
        report.append(f"{where} -> {path} = {show(v)}")


def _resolution(m: Mapper, value: Any, where: str, shared: dict[str, tuple[Any, str]], report: list[str]) -> None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) for x in value):
        w, h = value
    elif isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    else:
        m.error(f"{TOML}: {where}.resolution: expected a number or [width, height]; got {show(value)}")
        return
    side = w if w == h else round((w * h) ** 0.5 / 8) * 8
    if w != h:
        m.warn(f"{TOML}: {where}.resolution: {w}x{h} is not square: Lathe trains at the same area, {side}x{side}")
    _share(m, "dataset.resolution", side, f"{where}.resolution", shared, report)


def _subset(m: Mapper, where: str, sub: dict[str, Any], ds: dict[str, Any], general: dict[str, Any],
            report: list[str]) -> dict[str, Any] | None:
    if "metadata_file" in sub or "conditioning_data_dir" in sub:
        key = "metadata_file" if "metadata_file" in sub else "conditioning_data_dir"
        m.error(f"{TOML}: {where}: unsupported feature: {UNSUPPORTED[key]}")
        return None
    row: dict[str, Any] = {}
    for key in SUBSET_KEYS:  # the subset's value, else its dataset's, else [general]'s
        for table, source in ((sub, where), (ds, where.rsplit(".", 1)[0]), (general, "general")):
            if key in table and (key != "image_dir" or table is sub):
                field, conv = SUBSET_KEYS[key]
                try:
                    value = conv(table[key])
                except ValueError as e:
                    m.error(f"{TOML}: {source}.{key}: {e}")
                    break
                if value is not None:
                    row[field] = value
                break
    for key, value in sub.items():
        if key not in SUBSET_KEYS:
            _other(m, f"{where}.{key}", value, report)
    if not row.get("image_dir"):
        m.error(f"{TOML}: {where}: has no image_dir")
        return None
    report.append(f"{where}: {row['image_dir']} x{row.get('num_repeats', 1)}{' (reg)' if row.get('is_reg') else ''}")
    return row


def _other(m: Mapper, where: str, value: Any, report: list[str]) -> None:
    """A TOML key Lathe does not map: not needed, at a neutral value, or an unsupported feature (warned)."""
    key = where.rsplit(".", 1)[-1]
    if key in NOT_NEEDED:
        report.append(f"{where}: {NOT_NEEDED[key]}")
    elif key in UNSUPPORTED:
        if value in NEUTRAL.get(key, ()):
            report.append(f"{where}: not applicable: at its neutral value {show(value)}")
        else:
            m.warn(f"{TOML}: {where}: unsupported feature: {UNSUPPORTED[key]}; the value {show(value)} is not "
                   "imported")
    else:
        m.warn(f"{TOML}: {where}: unknown dataset setting (sd-scripts' dataset config has no such key); "
               f"the value {show(value)} is not imported")
