"""What the Dataset tab and `python -m backend dataset` show: a dataset as training resolves it.

- `summarize(cfg)`: the subsets, counts, samples and steps per epoch, buckets, tag frequencies,
  warnings and errors, from the trainer's own discovery (backend.dataset.load with
  decode=False: image headers only). A dataset that cannot be used comes back with `errors`.
- `page(summary_or_cfg, offset, limit)`: one page of images in a stable order (subset by subset,
  file names sorted, as discovery lists them); from a config it reads only that page's headers.
- `thumbnail(cfg, image, max_side)`: JPEG bytes of one image, confined by backend.captions.
- `cmd_dataset`: the CLI command (its arguments: backend/dataset_cli.py).

Torch-free and GUI-free (a test imports it in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from backend import dataset as D
from backend.captions import PathRefused, entry_id, resolve_image
from backend.config import ConfigError, TrainingConfig
from backend.resume import total_steps_for

FIRST_FEW = 5  # file names a warning lists
MAX_PAGE = 1000


class UnreadableImage(ValueError):
    """The image exists in the dataset but cannot be decoded."""


@dataclass
class Entry:
    """One image of the dataset as the Dataset view lists it."""

    id: str  # "<subset index>:<file name>": what resolve_image, thumbnail and save_caption accept
    subset: int
    path: str  # relative to its subset folder
    caption: str  # the caption it trains with (metadata.jsonl, caption file or class words)
    caption_file: bool  # a caption file with the subset's caption_extension exists
    size: tuple[int, int] | None  # (width, height) from the header; None when unreadable
    bucket: tuple[int, int] | None
    error: str | None = None  # why it cannot be read

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.size) if self.size else None
        out["bucket"] = list(self.bucket) if self.bucket else None
        return out


@dataclass
class SubsetSummary:
    index: int
    folder: str
    label: str  # the config path that names it: dataset.train_data_dir, dataset.subsets.1.image_dir
    repeats: int
    is_reg: bool
    class_tokens: str
    caption_extension: str
    images: int  # readable images found
    captioned: int  # of those, with a caption file or a metadata.jsonl text
    uncaptioned: int
    unreadable: list[str]  # file names that cannot be read (skipped by training)
    samples: int  # uses per epoch in training (after hold-out and regularization balancing)


@dataclass
class DatasetSummary:
    subsets: list[SubsetSummary]
    images: int  # training images (not regularization), validation hold-out included
    reg_images: int  # regularization images found
    validation_images: int
    unused_reg_images: int  # left out by balancing, as in sd-scripts
    samples_per_epoch: int  # images x repeats of what trains, regularization images balanced
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    resolution: int
    buckets: list[dict[str, Any]]  # [{"bucket": [w, h], "images": n, "samples": n x repeats}], sorted
    tag_frequency: dict[str, dict[str, int]]  # ss_tag_frequency: {folder name: {tag: captions}}
    top_tags: list[tuple[str, int]]  # every folder together, most frequent first
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list, repr=False)  # for page(); not in to_json

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "entries"}
        out["top_tags"] = [[t, n] for t, n in self.top_tags]
        return out


# ---------------------------------------------------------------------------------------- summary
def repeats_folder_warnings(cfg: TrainingConfig) -> list[str]:
    """train_data_dir / reg_data_dir given as one `<repeats>_<class>` folder: it trains as a flat
    folder with repeats 1, which is rarely what was meant."""
    out = []
    for label, value in (("dataset.train_data_dir", cfg.dataset.train_data_dir),
                         ("dataset.reg_data_dir", cfg.dataset.reg_data_dir)):
        if not value:
            continue
        root = Path(value).expanduser()
        if D.REPEATS_RE.match(root.name) and root.is_dir() and not D.repeats_folders(root):
            out.append(f"{label}: {value} looks like a repeats folder; did you mean its parent "
                       f"{Path(value).parent}? As given, it trains with repeats 1")
    return out


def _discover_each(subsets: list[D.Subset], errors: list[str]) -> list[D.ImageItem]:
    """When the dataset as a whole cannot load: what each folder that can be read holds."""
    found = []
    for index, sub in enumerate(subsets):
        try:
            found += [replace(it, subset=index) for it in D.discover_subsets([sub], decode=False).items]
        except D.DatasetError as e:
            if str(e) not in errors:
                errors.append(str(e))
    return found


def _entry(index: int, sub: D.Subset, img: Path, caption: str, has_file: bool, size: tuple[int, int] | None,
           bucketing: D.Bucketing, error: str | None = None) -> Entry:
    return Entry(entry_id(index, img.name), index, img.name, caption, has_file, size,
                 bucketing.assign(size) if size else None, error)


def _read_error(img: Path) -> str:
    try:
        D.header_size(img)
    except D.UNREADABLE as e:
        return f"{type(e).__name__}: {str(e)[:120]}"
    return "cannot be read"


def _scan(subsets: list[D.Subset], found: list[D.ImageItem], used: list[D.ImageItem], bucketing: D.Bucketing,
          resolution: int, no_upscale: bool) -> tuple[list[SubsetSummary], list[Entry], list[str]]:
    """Per-subset counts, every image as an Entry, and the per-folder warnings."""
    by_path = {it.path: it for it in found}
    samples: dict[int, int] = {}
    for it in used:
        samples[it.subset] = samples.get(it.subset, 0) + it.repeats
    summaries, entries, warnings = [], [], []
    for index, sub in enumerate(subsets):
        root = Path(sub.image_dir)
        if not root.is_dir():
            continue
        names = {p.name for p in root.iterdir()}
        meta = D.read_metadata(root, [])
        rows, bad, bare, small = [], [], [], []
        for img in D.images_in(root):
            has_file = img.with_suffix(sub.caption_extension).name in names
            item = by_path.get(str(img))
            if item is None:
                bad.append(img.name)
                rows.append(_entry(index, sub, img, D.caption_of(img, sub, meta), has_file, None, bucketing,
                                   _read_error(img)))
                continue
            rows.append(_entry(index, sub, img, item.caption, has_file, item.size, bucketing))
            if not has_file and img.name not in meta:
                bare.append(img.name)
            if not no_upscale and item.size[0] * item.size[1] < resolution * resolution:
                small.append(img.name)
        entries += rows
        n = len(rows) - len(bad)
        summaries.append(SubsetSummary(index, str(root), sub.label, sub.num_repeats, sub.is_reg, sub.class_tokens,
                                       sub.caption_extension, n, n - len(bare), len(bare), bad, samples.get(index, 0)))
        warnings += _folder_warnings(sub, root, n, bad, bare, small, resolution)
    return summaries, entries, warnings


def _few(names: list[str]) -> str:
    more = f" and {len(names) - FIRST_FEW} more" if len(names) > FIRST_FEW else ""
    return ", ".join(names[:FIRST_FEW]) + more


def _folder_warnings(sub: D.Subset, root: Path, n: int, bad: list[str], bare: list[str], small: list[str],
                     resolution: int) -> list[str]:
    out = []
    if bad:
        out.append(f"{sub.label}: {len(bad)} image(s) in {root} cannot be read and are skipped: {_few(bad)}")
    if bare:
        fallback = f"the class words {sub.class_tokens!r}" if sub.class_tokens else "an empty caption"
        out.append(f"{sub.label}: {len(bare)} of {n} image(s) in {root} have no {sub.caption_extension} caption "
                   f"file (they train with {fallback}): {_few(bare)}")
    if small:
        out.append(f"{sub.label}: {len(small)} image(s) in {root} are smaller than {resolution}x{resolution} in "
                   f"area and will be upscaled: {_few(small)}")
    return out


def _buckets(items: list[D.ImageItem], item_buckets: list[tuple[int, int]]) -> list[dict[str, Any]]:
    images: dict[tuple[int, int], int] = {}
    samples: dict[tuple[int, int], int] = {}
    for it, b in zip(items, item_buckets, strict=True):
        images[b] = images.get(b, 0) + 1
        samples[b] = samples.get(b, 0) + it.repeats
    return [{"bucket": list(b), "images": images[b], "samples": samples[b]} for b in sorted(images)]


def _top_tags(freq: dict[str, dict[str, int]]) -> list[tuple[str, int]]:
    total: dict[str, int] = {}
    for counts in freq.values():
        for tag, n in counts.items():
            total[tag] = total.get(tag, 0) + n
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))


def summarize(cfg: TrainingConfig) -> DatasetSummary:
    """The dataset as training will use it (see the module docstring); never raises for a dataset
    problem: those are in `errors`."""
    ds, t = cfg.dataset, cfg.training
    warnings = repeats_folder_warnings(cfg)
    errors: list[str] = []
    bucketing = D.buckets_for(ds)
    g = D.global_batch(t.train_batch_size, cfg.launch.num_processes, t.gradient_accumulation_steps)
    try:
        loaded = D.load(ds, t.seed, decode=False)
        subsets, found, used, val = loaded.subsets, loaded.found, loaded.items, loaded.val_items
        warnings += [w for w in loaded.warnings if not w.startswith(D.SKIPPED)]  # listed per folder below
    except D.DatasetError as e:
        errors.append(str(e))
        try:
            subsets, _ = D.resolve_subsets(ds)
        except D.DatasetError:
            subsets = []
        found, used, val = _discover_each(subsets, errors), [], []
    summaries, entries, folder_warnings = _scan(subsets, found, used, bucketing, ds.resolution, ds.bucket_no_upscale)
    warnings += folder_warnings
    if cfg.launch.accelerate_config_file:
        warnings.append(f"launch.accelerate_config_file: steps per epoch assume launch.num_processes="
                        f"{cfg.launch.num_processes}; the accelerate config file may start another number")
    used_buckets = D.bucket_of_items(used, bucketing)
    spe = D.plan_steps(used, used_buckets, g) if used else 0
    total = total_steps_for(cfg, spe) if spe else 0
    epochs = (math.ceil(total / spe) if t.max_train_steps is not None else t.max_train_epochs) if spe else 0
    freq = D.tag_frequency(used)
    reg_found = sum(1 for it in found if it.is_reg)
    return DatasetSummary(
        subsets=summaries, images=sum(1 for it in found if not it.is_reg), reg_images=reg_found,
        validation_images=len(val), unused_reg_images=reg_found - sum(1 for it in used if it.is_reg),
        samples_per_epoch=sum(it.repeats for it in used), global_batch=g, steps_per_epoch=spe, total_steps=total,
        total_epochs=epochs, resolution=ds.resolution, buckets=_buckets(used, used_buckets), tag_frequency=freq,
        top_tags=_top_tags(freq), warnings=warnings, errors=errors, entries=entries)


# ----------------------------------------------------------------------------------------- paging
def _page_from_config(cfg: TrainingConfig, offset: int, limit: int) -> list[Entry]:
    """One page read from the folders: listings, then only the page's headers and captions."""
    try:
        subsets, _ = D.resolve_subsets(cfg.dataset)
    except D.DatasetError:
        return []
    bucketing = D.buckets_for(cfg.dataset)
    out: list[Entry] = []
    for index, sub in enumerate(subsets):
        root = Path(sub.image_dir)
        if len(out) >= limit or not root.is_dir():
            continue
        imgs = D.images_in(root)
        if offset >= len(imgs):
            offset -= len(imgs)
            continue
        meta = D.read_metadata(root, [])
        names = {p.name for p in root.iterdir()}
        for img in imgs[offset : offset + limit - len(out)]:
            has_file = img.with_suffix(sub.caption_extension).name in names
            caption = D.caption_of(img, sub, meta)
            try:
                out.append(_entry(index, sub, img, caption, has_file, D.header_size(img), bucketing))
            except D.UNREADABLE as e:
                out.append(_entry(index, sub, img, caption, has_file, None, bucketing,
                                  f"{type(e).__name__}: {str(e)[:120]}"))
        offset = 0
    return out


def page(source: DatasetSummary | TrainingConfig, offset: int = 0, limit: int = 100) -> list[Entry]:
    """Images offset..offset+limit of the dataset (limit at most MAX_PAGE), in summarize's order."""
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"page: offset must be >= 0 and limit 1..{MAX_PAGE} (got {offset}, {limit})")
    if isinstance(source, DatasetSummary):
        return source.entries[offset : offset + limit]
    return _page_from_config(source, offset, limit)


def thumbnail(cfg: TrainingConfig, image: str, max_side: int = 256) -> bytes:
    """A JPEG of a dataset image (an entry id or a path, confined as resolve_image), at most
    max_side pixels on its longer side, in RGB as training reads it."""
    if not 16 <= max_side <= 2048:
        raise ValueError(f"thumbnail: max_side must be 16..2048 (got {max_side})")
    path = resolve_image(cfg, image)
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
            small = im.convert("RGB")
    except D.UNREADABLE as e:
        raise UnreadableImage(f"{image}: cannot be read ({type(e).__name__})") from None
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- CLI
def load_source(source: str, sets: list[str]) -> TrainingConfig:
    """A folder (as dataset.train_data_dir, the other settings at their defaults) or a config or
    preset file, with --set overrides. Raises ConfigError."""
    from backend.presets import load_config_or_preset, resolve

    p = Path(source).expanduser()
    if p.is_dir():
        return resolve({"dataset": {"train_data_dir": source}}, sets)
    if p.is_file():
        return load_config_or_preset(p, sets)
    raise ConfigError([f"dataset: {source} is neither an image folder nor a config file"])


def format_summary(s: DatasetSummary, tags: int = 15) -> str:
    """The human-readable report `python -m backend dataset` prints."""
    lines = [f"{'#':>2}  {'folder':<40} {'repeats':>7} {'reg':>3} {'images':>6} {'captioned':>9} "
             f"{'no caption':>10} {'unreadable':>10} {'samples':>7}"]
    for sub in s.subsets:
        lines.append(f"{sub.index:>2}  {sub.folder:<40} {sub.repeats:>7} {'yes' if sub.is_reg else 'no':>3} "
                     f"{sub.images:>6} {sub.captioned:>9} {sub.uncaptioned:>10} {len(sub.unreadable):>10} "
                     f"{sub.samples:>7}")
    lines.append(f"images {s.images} (validation {s.validation_images}), regularization images {s.reg_images} "
                 f"(unused {s.unused_reg_images}): {s.samples_per_epoch} samples per epoch")
    lines.append(f"steps per epoch {s.steps_per_epoch} at global batch {s.global_batch}; "
                 f"{s.total_steps} steps in {s.total_epochs} epoch(s)")
    lines.append(f"buckets (resolution {s.resolution}): " + (", ".join(
        f"{b['bucket'][0]}x{b['bucket'][1]}: {b['images']} image(s)" for b in s.buckets) or "none"))
    if s.top_tags:
        lines.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in s.top_tags[:tags]))
    lines += [f"warning: {w}" for w in s.warnings]
    lines += [f"error: {e}" for e in s.errors]
    return "\n".join(lines)


def cmd_dataset(args: argparse.Namespace) -> int:
    """`python -m backend dataset DIR_OR_CONFIG [--json] [--set K=V ...]`: exit 0, or 2 when the
    config is invalid or the dataset unusable."""
    try:
        cfg = load_source(args.source, args.set)
    except ConfigError as e:
        print("invalid configuration:", file=sys.stderr)
        for line in e.lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    summary = summarize(cfg)
    print(json.dumps(summary.to_json(), indent=1) if args.json else format_summary(summary))
    return 2 if summary.errors else 0


__all__ = ["DatasetSummary", "Entry", "PathRefused", "SubsetSummary", "UnreadableImage",
           "cmd_dataset", "page", "summarize", "thumbnail"]
