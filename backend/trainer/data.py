"""Dataset discovery, captions, aspect-ratio buckets and the deterministic batch plan.

The order of global batches in an epoch is a pure function of (seed, epoch, global batch size):
`epoch_plan`. A position in training is therefore just (epoch, global batches done), which is what
exact resume records, whatever the number of processes. Caption shuffling, caption dropout and flips
are drawn from generators seeded by (seed, epoch, batch, slot), so they too replay identically after
a resume and on any layout of the same global batch (`micro_batches_of` splits a global batch over
ranks and micro-batches).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from backend.config import DatasetConfig

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPEATS_RE = re.compile(r"^(\d+)_(.*)$")


class DatasetError(Exception):
    """The dataset cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageItem:
    path: str
    caption: str
    repeats: int
    size: tuple[int, int]  # original (width, height)


@dataclass
class Discovery:
    items: list[ImageItem]
    warnings: list[str] = field(default_factory=list)


def _check_image(path: Path) -> tuple[int, int]:
    """Decode the image fully (a truncated file fails here, not mid-epoch); return its size."""
    with Image.open(path) as im:
        im.load()
        return im.size


def _read_caption(path: Path, fallback: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return fallback
    except (OSError, UnicodeDecodeError):
        return fallback
    return " ".join(text.split()) or fallback


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def discover(data_dir: str | Path, caption_extension: str = ".txt", label: str = "dataset.train_data_dir",
             decode: bool = True) -> Discovery:
    """Find images: kohya `<repeats>_<class words>/` sub-folders, or a flat folder (metadata.jsonl or captions).
    decode=False reads only each image's header (a quick count for estimates; a truncated file passes)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{label}: folder {root} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and REPEATS_RE.match(p.name))
    candidates: list[tuple[Path, str, int]] = []  # (image, caption, repeats)
    warnings: list[str] = []
    if subdirs:
        for d in subdirs:
            m = REPEATS_RE.match(d.name)
            repeats, class_words = int(m.group(1)), m.group(2).strip()
            if repeats < 1:
                warnings.append(f"{d.name}: repeats is 0, folder skipped")
                continue
            for img in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")):
                candidates.append((img, _read_caption(img.with_suffix(caption_extension), class_words), repeats))
    else:
        meta = _read_metadata(root, warnings)
        for img in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")):
            caption = meta.get(img.name) or _read_caption(img.with_suffix(caption_extension), "")
            candidates.append((img, caption, 1))
    items = []
    for img, caption, repeats in candidates:
        try:
            size = _check_image(img) if decode else _header_size(img)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            warnings.append(f"skipped unreadable image {img}: {type(e).__name__}: {str(e)[:120]}")
            continue
        items.append(ImageItem(str(img), caption, repeats, size))
    if not items:
        raise DatasetError(
            f"{label}: no usable images in {root} (expected <repeats>_<name>/ sub-folders with images, "
            "or images with a metadata.jsonl)"
        )
    return Discovery(items, warnings)


def _read_metadata(root: Path, warnings: list[str]) -> dict[str, str]:
    meta_path = root / "metadata.jsonl"
    out: dict[str, str] = {}
    if not meta_path.is_file():
        return out
    for n, line in enumerate(meta_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[Path(str(rec["file_name"])).name] = " ".join(str(rec.get("text", "")).split())
        except (json.JSONDecodeError, KeyError, TypeError):
            warnings.append(f"metadata.jsonl line {n}: not a JSON object with file_name/text; ignored")
    return out


def split_validation(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Hold out a deterministic fraction of the images (at least one, never all)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = np.random.default_rng(seed).permutation(len(items))
    val_idx = set(order[:n_val].tolist())
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


def load_dataset(ds: DatasetConfig, seed: int) -> tuple[list[ImageItem], list[ImageItem], list[str]]:
    """(training items, validation items, warnings) for a config: the split, or validation_data_dir."""
    disc = discover(ds.train_data_dir, ds.caption_extension)
    items, val_items = split_validation(disc.items, ds.validation_split, seed)
    if ds.validation_data_dir:
        val_items = discover(ds.validation_data_dir, ds.caption_extension, "dataset.validation_data_dir").items
    return items, val_items, disc.warnings


# ---------------------------------------------------------------------------------------- buckets
def buckets_for(ds: DatasetConfig) -> list[tuple[int, int]] | None:
    """The config's bucket set, or None when bucketing is off (square crops)."""
    return make_buckets(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) if ds.enable_bucket else None


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """All (w, h) with sides multiples of `step` in [min, max] and area <= resolution^2, as kohya does."""
    area = resolution * resolution
    out = set()
    w = min_reso
    while w <= max_reso:
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            out.add((w, h))
            out.add((h, w))
        w += step
    sq = min(max(resolution // step * step, min_reso), max_reso)
    out.add((sq, sq))
    return sorted(out)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space); ties go to the larger area."""
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def crop_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize-to-cover then centre-crop: returns ((resized_w, resized_h), (crop_left, crop_top))."""
    w, h = size
    tw, th = target
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    return (rw, rh), ((rw - tw) // 2, (rh - th) // 2)


def load_pixels(item: ImageItem, target: tuple[int, int], flip: bool) -> np.ndarray:
    """The image as float32 CHW in [-1, 1], resized to cover `target` and centre-cropped."""
    (rw, rh), (left, top) = crop_box(item.size, target)
    with Image.open(item.path) as im:
        im = im.convert("RGB")
        im = im.resize((rw, rh), Image.Resampling.LANCZOS)
        im = im.crop((left, top, left + target[0], top + target[1]))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.float32)
    return (arr.transpose(2, 0, 1) / 127.5) - 1.0


# ------------------------------------------------------------------------------------ batch planning
@dataclass(frozen=True)
class Sample:
    item: int  # index into the item list
    flip: bool
    caption: str
    index: int  # position in the epoch (global batch x global batch size + slot): keys its noise and timestep


@dataclass(frozen=True)
class Batch:
    """A global batch (one optimizer step, all ranks and micro-batches together) or, after
    `micro_batches_of`, one rank's micro-batch of it. `share` weights each sample's loss so that the
    step's gradient is the mean over the whole global batch: world / samples in the global batch
    (0 for a filler: a rank with no sample in a short tail batch still takes part in the all-reduce)."""

    bucket: tuple[int, int]
    samples: tuple[Sample, ...]
    share: float = 1.0


def bucket_of_items(items: list[ImageItem], buckets: list[tuple[int, int]] | None, square: int) -> list[tuple[int, int]]:
    return [assign_bucket(it.size, buckets) if buckets else (square, square) for it in items]


def process_caption(caption: str, rng: np.random.Generator, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout, then shuffle the comma-separated tags after the first `keep_tokens`."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


@dataclass(frozen=True)
class PlanSettings:
    seed: int
    global_batch: int  # train_batch_size x processes x gradient_accumulation_steps
    random_flip: bool
    shuffle_caption: bool
    keep_tokens: int
    caption_dropout_rate: float


def epoch_plan(items: list[ImageItem], item_buckets: list[tuple[int, int]], s: PlanSettings, epoch: int) -> list[Batch]:
    """Every global batch of one epoch (0-based), in order: one per optimizer step, each from one
    bucket. A pure function of its arguments; the process count, the per-device batch size and the
    accumulation enter only through their product, so any layout of the same global batch trains
    on the same samples in the same steps, with the same flips and captions."""
    rng = np.random.default_rng([s.seed, epoch])
    g = s.global_batch
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        by_bucket.setdefault(item_buckets[i], []).extend([i] * it.repeats)
    chunks: list[tuple[tuple[int, int], list[int]]] = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        perm = rng.permutation(len(idx))
        shuffled = [idx[j] for j in perm]
        chunks += [(bucket, shuffled[k : k + g]) for k in range(0, len(shuffled), g)]
    order = rng.permutation(len(chunks))
    batches = []
    for b, j in enumerate(order):
        bucket, members = chunks[j]
        samples = []
        for slot, i in enumerate(members):
            srng = np.random.default_rng([s.seed, epoch, b, slot])
            flip = bool(s.random_flip and srng.random() < 0.5)
            cap = process_caption(items[i].caption, srng, s.shuffle_caption, s.keep_tokens, s.caption_dropout_rate)
            samples.append(Sample(i, flip, cap, b * g + slot))
        batches.append(Batch(bucket, tuple(samples)))
    return batches


def micro_batches_of(step: Batch, rank: int, world: int, accum: int) -> list[Batch]:
    """One rank's micro-batches of a global batch. Micro-batch m of rank r takes the samples at
    positions k, k + world*accum, ... with k = m*world + r: a full global batch gives everyone
    train_batch_size samples, a short tail is spread as evenly as it goes. Empty micro-batches are
    left out; a rank left with none gets one filler (a copy of the first sample, weight 0)."""
    n, slots = len(step.samples), world * accum
    share = world / n
    out = [Batch(step.bucket, step.samples[m * world + rank :: slots], share) for m in range(accum)]
    out = [b for b in out if b.samples]
    return out or [Batch(step.bucket, step.samples[:1], 0.0)]


def steps_per_epoch(items: list[ImageItem], item_buckets: list[tuple[int, int]], s: PlanSettings) -> int:
    """Optimizer steps in one epoch: the global batches of the plan (the same for every epoch)."""
    return len(epoch_plan(items, item_buckets, s, 0))


def dataset_summary(items: list[ImageItem], item_buckets: list[tuple[int, int]]) -> dict[str, object]:
    counts: dict[str, int] = {}
    for b in item_buckets:
        counts[f"{b[0]}x{b[1]}"] = counts.get(f"{b[0]}x{b[1]}", 0) + 1
    return {
        "images": len(items),
        "images_with_repeats": sum(it.repeats for it in items),
        "buckets": counts,
    }
