"""Dataset discovery, captions and aspect-ratio buckets. The batch plan made of the items is
backend/batch_plan.py; its names are re-exported here (`D.epoch_plan`, ...).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from backend.batch_plan import (  # noqa: F401 - re-exported: the plan's names, where callers look for them
    Batch,
    PlanSettings,
    Sample,
    epoch_plan,
    global_batch,
    micro_batches_of,
    plan_steps,
    process_caption,
    steps_per_epoch,
)
from backend.config import DatasetConfig, SubsetConfig
from backend.image_pool import image_threads, ordered_map

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPEATS_RE = re.compile(r"^(\d+)_(.*)$")
# What opening an image may raise when the file is not a readable image: such images are skipped.
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
SKIPPED = "skipped unreadable image"  # how the warning for each such image starts


class DatasetError(Exception):
    """The dataset cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageItem:
    path: str
    caption: str
    repeats: int  # uses per epoch (for regularization images: after balancing, see balance_reg)
    size: tuple[int, int]  # original (width, height)
    subset: int = 0  # index into the resolved subsets (resolve_subsets)
    is_reg: bool = False


@dataclass(frozen=True)
class Subset:
    """One image folder as training uses it: a config subset, or one `<repeats>_<class>` folder of
    train_data_dir/reg_data_dir, with every caption setting resolved (the dataset's where the
    subset leaves it empty)."""

    image_dir: str
    num_repeats: int
    is_reg: bool
    class_tokens: str
    caption_extension: str
    shuffle_caption: bool
    keep_tokens: int
    random_flip: bool
    caption_dropout_rate: float
    label: str  # the config path messages name: dataset.train_data_dir, dataset.subsets.1.image_dir

    @property
    def name(self) -> str:
        """The folder's name, as sd-scripts keys ss_dataset_dirs and ss_tag_frequency."""
        return Path(self.image_dir).name


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


def header_size(path: Path) -> tuple[int, int]:
    """The image's (width, height) from its header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.size


def _subset(ds: DatasetConfig, image_dir: str, repeats: int, is_reg: bool, class_tokens: str, label: str,
            sub: SubsetConfig | None = None) -> Subset:
    def pick(name: str):  # the subset's own setting, else the dataset's
        own = getattr(sub, name) if sub is not None else None
        return getattr(ds, name) if own is None else own
    return Subset(image_dir, repeats, is_reg, class_tokens, pick("caption_extension"), pick("shuffle_caption"),
                  pick("keep_tokens"), pick("random_flip"), pick("caption_dropout_rate"), label)


def repeats_folders(root: Path) -> list[Path]:
    """The `<repeats>_<class words>` sub-folders of a kohya image folder, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and REPEATS_RE.match(p.name))


def _expand(ds: DatasetConfig, folder: str, is_reg: bool, label: str, warnings: list[str]) -> list[Subset]:
    """A kohya folder as subsets: one per `<repeats>_<class words>` sub-folder, or the folder itself
    (repeats 1, no class words) when it has none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{label}: folder {root} does not exist")
    subdirs = repeats_folders(root)
    if not subdirs:
        return [_subset(ds, str(root), 1, is_reg, "", label)]
    out = []
    for d in subdirs:
        m = REPEATS_RE.match(d.name)
        repeats, class_words = int(m.group(1)), m.group(2).strip()
        if repeats < 1:
            warnings.append(f"{d.name}: repeats is 0, folder skipped")
            continue
        out.append(_subset(ds, str(d), repeats, is_reg, class_words, label))
    return out


def resolve_subsets(ds: DatasetConfig) -> tuple[list[Subset], list[str]]:
    """(every subset of the dataset, warnings): train_data_dir's, then reg_data_dir's, then the listed
    subsets. Reads only folder listings."""
    warnings: list[str] = []
    out: list[Subset] = []
    if ds.train_data_dir:
        out += _expand(ds, ds.train_data_dir, False, "dataset.train_data_dir", warnings)
    if ds.reg_data_dir:
        out += _expand(ds, ds.reg_data_dir, True, "dataset.reg_data_dir", warnings)
    for i, sub in enumerate(ds.subsets):
        label = f"dataset.subsets.{i}.image_dir"
        out.append(_subset(ds, str(Path(sub.image_dir).expanduser()), sub.num_repeats, sub.is_reg,
                           sub.class_tokens or "", label, sub))
    return out, warnings


def images_in(folder: Path) -> list[Path]:
    """The image files of one subset folder (not its sub-folders), sorted by name: the order
    discovery and the Dataset view list them in."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _size_or_error(img: Path, decode: bool) -> tuple[int, int] | Exception:
    try:
        return _check_image(img) if decode else header_size(img)
    except UNREADABLE as e:
        return e


def discover_subsets(subsets: list[Subset], decode: bool = True, threads: int | None = None) -> Discovery:
    """Every usable image of the subsets, with its caption: metadata.jsonl's text, else its caption
    file, else the subset's class words. decode=False reads only each image's header (a quick count
    for estimates; a truncated file passes). The images are decoded on `threads` threads (default:
    this machine's cores, image_pool); the result does not depend on how many."""
    warnings: list[str] = []
    items: list[ImageItem] = []
    workers = (threads or image_threads()) if decode else 1  # a header read is too quick to share out
    for index, sub in enumerate(subsets):
        root = Path(sub.image_dir)
        if not root.is_dir():
            raise DatasetError(f"{sub.label}: folder {root} does not exist")
        meta = read_metadata(root, warnings)
        found = 0
        images = images_in(root)
        sizes = ordered_map(lambda img: _size_or_error(img, decode), images, workers)
        for img, size in zip(images, sizes, strict=True):
            caption = caption_of(img, sub, meta)
            if isinstance(size, Exception):
                warnings.append(f"{SKIPPED} {img}: {type(size).__name__}: {str(size)[:120]}")
                continue
            items.append(ImageItem(str(img), caption, sub.num_repeats, size, index, sub.is_reg))
            found += 1
        if not found and sub.label.startswith("dataset.subsets."):
            hint = (" (its sub-folders look like kohya '<repeats>_<name>' folders: give it as dataset.train_data_dir "
                    "or dataset.reg_data_dir instead)" if repeats_folders(root) else "")
            raise DatasetError(f"{sub.label}: no usable images in {root}{hint}")
    return Discovery(items, warnings)


def discover(data_dir: str | Path, caption_extension: str = ".txt", label: str = "dataset.train_data_dir",
             decode: bool = True, threads: int | None = None) -> Discovery:
    """Find the images of one kohya folder: `<repeats>_<class words>/` sub-folders, or a flat folder
    (metadata.jsonl or captions)."""
    ds = DatasetConfig(train_data_dir=str(data_dir), caption_extension=caption_extension)
    warnings: list[str] = []
    subsets = _expand(ds, str(data_dir), False, label, warnings)
    disc = discover_subsets(subsets, decode, threads)
    if not disc.items:
        raise DatasetError(_no_images(label, Path(data_dir).expanduser()))
    return Discovery(disc.items, warnings + disc.warnings)


def _no_images(label: str, root: Path) -> str:
    return (f"{label}: no usable images in {root} (expected <repeats>_<name>/ sub-folders with images, "
            "or images with a metadata.jsonl)")


def caption_of(img: Path, sub: Subset, meta: dict[str, str]) -> str:
    """An image's caption: its metadata.jsonl text (`meta`, from read_metadata), else its caption
    file, else the subset's class words."""
    return meta.get(img.name) or _read_caption(img.with_suffix(sub.caption_extension), sub.class_tokens)


def read_metadata(root: Path, warnings: list[str]) -> dict[str, str]:
    """{image file name: caption} from the folder's metadata.jsonl ({} when it has none)."""
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


def balance_reg(train: list[ImageItem], reg: list[ImageItem]) -> list[ImageItem]:
    """Regularization images with the repeats sd-scripts gives them (DreamBoothDataset.__init__): in
    order, each is taken with its folder's repeats until they add up to the training images' uses
    per epoch; if they still fall short, one more repeat each, round and round, until they match.
    Images left over when the first round already reaches the count are not used."""
    target = sum(it.repeats for it in train)
    counts: list[int] = []
    n = 0
    for it in reg:  # the first round: each with its folder's repeats
        if n >= target:
            break
        counts.append(it.repeats)
        n += it.repeats
    while counts and n < target:  # then one more each, round and round
        for i in range(len(counts)):
            counts[i] += 1
            n += 1
            if n >= target:
                break
    return [replace(it, repeats=c) for it, c in zip(reg, counts, strict=False)]


@dataclass
class Loaded:
    """A dataset as training uses it: its subsets, the training items (regularization ones last,
    balanced), the validation items and what was skipped."""

    subsets: list[Subset]
    items: list[ImageItem]
    val_items: list[ImageItem]
    warnings: list[str]
    found: list[ImageItem] = field(default_factory=list)  # every usable image, before hold-out and balancing


def load(ds: DatasetConfig, seed: int, decode: bool = True, threads: int | None = None) -> Loaded:
    """Resolve, discover (images decoded on `threads` threads), hold out validation images (never
    regularization ones), balance."""
    subsets, warnings = resolve_subsets(ds)
    disc = discover_subsets(subsets, decode, threads)
    train = [it for it in disc.items if not it.is_reg]
    if not train:
        where = ds.train_data_dir or "the subsets"
        raise DatasetError(_no_images("dataset.train_data_dir" if ds.train_data_dir else "dataset.subsets",
                                      Path(where).expanduser()))
    train, val_items = split_validation(train, ds.validation_split, seed)
    reg_found = [it for it in disc.items if it.is_reg]
    reg = balance_reg(train, reg_found)
    if (ds.reg_data_dir or any(s.is_reg for s in subsets)) and not reg_found:
        warnings.append("dataset.reg_data_dir: no usable regularization images found; training without them")
    elif len(reg) < len(reg_found):
        warnings.append(f"dataset.reg_data_dir: {len(reg_found) - len(reg)} of {len(reg_found)} regularization images "
                        "are not used: the others already balance the training images (as in sd-scripts)")
    if ds.validation_data_dir:
        val_items = discover(ds.validation_data_dir, ds.caption_extension, "dataset.validation_data_dir", decode,
                             threads).items
    return Loaded(subsets, train + reg, val_items, warnings + disc.warnings, disc.items)


def load_dataset(ds: DatasetConfig, seed: int) -> tuple[list[ImageItem], list[ImageItem], list[str]]:
    """(training items, validation items, warnings) for a config."""
    loaded = load(ds, seed)
    return loaded.items, loaded.val_items, loaded.warnings


# ---------------------------------------------------------------------------------------- buckets
@dataclass(frozen=True)
class Bucketing:
    """How images get their bucket: the nearest of a fixed set (aspect-ratio bucketing), one square
    (bucketing off), or each image's own size (bucket_no_upscale)."""

    resolution: int
    buckets: tuple[tuple[int, int], ...] = ()  # empty: square crops, or no_upscale
    no_upscale: bool = False
    step: int = 64

    def assign(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.no_upscale:
            return no_upscale_bucket(size, self.resolution * self.resolution, self.step)
        if self.buckets:
            return assign_bucket(size, list(self.buckets))
        return (self.resolution, self.resolution)


def buckets_for(ds: DatasetConfig) -> Bucketing:
    """The config's bucketing, with bucket_reso_steps and the bucket range as sd-scripts uses them
    (see DatasetConfig.bucket_steps, bucket_range)."""
    if not ds.enable_bucket:
        return Bucketing(ds.resolution)
    step = ds.bucket_steps()
    if ds.bucket_no_upscale:
        return Bucketing(ds.resolution, no_upscale=True, step=step)
    low, high = ds.bucket_range()
    return Bucketing(ds.resolution, tuple(make_buckets(ds.resolution, low, high, step)), step=step)


def no_upscale_bucket(size: tuple[int, int], max_area: int, step: int) -> tuple[int, int]:
    """sd-scripts' bucket for an image with bucket_no_upscale (BucketManager.select_bucket): an image
    above the area is shrunk to it keeping its aspect ratio (the side rounded to the step that keeps
    the ratio best); the bucket is that size rounded down to the step (the rest is cropped)."""
    w, h = size
    if w * h > max_area:
        ar = w / h
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw

        def to_step(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        bw = to_step(rw)
        bh_w = to_step(bw / ar)
        bh = to_step(rh)
        bw_h = to_step(bh * ar)
        if bh_w and bh and abs(bw / bh_w - ar) < abs(bw_h / bh - ar):
            w, h = bw, int(bw / ar + 0.5)
        else:
            w, h = int(bh * ar + 0.5), bh
    return max(step, w - w % step), max(step, h - h % step)


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


def geometry(item: ImageItem, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """An image's (original (h, w), crop (top, left), target (h, w)) in its bucket: what SDXL's size
    conditioning reads."""
    _, (left, top) = crop_box(item.size, bucket)
    return (item.size[1], item.size[0]), (top, left), (bucket[1], bucket[0])


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


# ------------------------------------------------------------------------- items in their buckets
def bucket_of_items(items: list[ImageItem], bucketing: Bucketing) -> list[tuple[int, int]]:
    return [bucketing.assign(it.size) for it in items]


def dataset_summary(items: list[ImageItem], item_buckets: list[tuple[int, int]]) -> dict[str, object]:
    counts: dict[str, int] = {}
    for b in item_buckets:
        counts[f"{b[0]}x{b[1]}"] = counts.get(f"{b[0]}x{b[1]}", 0) + 1
    return {
        "images": len(items),
        "images_with_repeats": sum(it.repeats for it in items),
        "buckets": counts,
    }


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for it in items:
        counts = out.setdefault(Path(it.path).parent.name, {})
        for tag in it.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return out
