"""The dataset section of the config: where the images are (one folder, regularization images, or a
list of subsets, each with its own repeats and caption settings), how they are bucketed, cached and
held out. Torch-free: the GUI and the CLI load it.

A dataset is a list of subsets, as in sd-scripts' dataset TOML. `train_data_dir` and `reg_data_dir`
are the short forms kohya users know: a folder of `<repeats>_<class words>` sub-folders, each of
which is one subset (backend.dataset.resolve_subsets expands them); `subsets` adds folders given
one by one. A subset's caption settings left empty take the dataset's.
"""

from __future__ import annotations

import re

from pydantic import AliasChoices, Field, field_validator, model_validator

from backend.config_base import Section

VAE_UNIT = 8  # pixels per latent cell: bucket sides are multiples of this


def _check_extension(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(r"\.[A-Za-z0-9_.-]{1,20}", v):
        raise ValueError(f"must start with '.' followed by letters or digits, e.g. .txt; got {v!r}")
    return v


class SubsetConfig(Section):
    """One image folder with its own repeats and caption settings (a `[[datasets.subsets]]` of
    sd-scripts' dataset TOML). Empty settings take the dataset's."""

    image_dir: str = Field(..., min_length=1, description="Folder holding this subset's images (and captions).")
    num_repeats: int = Field(1, ge=1, le=10_000, description="How many times each image is used per epoch.")
    is_reg: bool = Field(
        False, description="Regularization images (prior preservation): balanced against the training images and "
        "weighted by training.prior_loss_weight; never held out for validation.",
    )
    class_tokens: str | None = Field(
        None, max_length=500, description="Caption for images without a caption file. Empty: no caption.",
    )
    caption_extension: str | None = Field(None, description="Caption file extension. Empty: the dataset's.")
    shuffle_caption: bool | None = Field(None, description="Shuffle caption tags. Empty: the dataset's setting.")
    keep_tokens: int | None = Field(None, ge=0, le=75, description="Leading tags kept in place. Empty: the dataset's.")
    random_flip: bool | None = Field(
        None, validation_alias=AliasChoices("random_flip", "flip_aug"),
        description="Randomly mirror images (kohya: flip_aug). Empty: the dataset's setting.",
    )
    caption_dropout_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="Probability of an empty caption. Empty: the dataset's.",
    )

    @field_validator("caption_extension")
    @classmethod
    def _ext(cls, v: str | None) -> str | None:
        return _check_extension(v)


class DatasetConfig(Section):
    train_data_dir: str | None = Field(
        "demo/images",
        min_length=1,
        description="Image folder. kohya layout: sub-folders named '<repeats>_<class words>' holding "
        "images and caption files; or a flat folder with metadata.jsonl ({\"file_name\", \"text\"}). "
        "Empty: only the folders listed in subsets.",
    )
    reg_data_dir: str | None = Field(
        None, min_length=1,
        description="Regularization images (prior preservation), in the same '<repeats>_<class words>' layout. As in "
        "sd-scripts, their repeats grow until they balance the training images each epoch, and their loss is "
        "weighted by training.prior_loss_weight. Never used for validation. Empty: none.",
    )
    subsets: list[SubsetConfig] = Field(
        default_factory=list,
        description="More image folders, each with its own repeats and caption settings (sd-scripts' dataset TOML "
        "subsets). A subset's empty settings take the dataset's.",
    )
    caption_extension: str = Field(".txt", description="Extension of caption files, e.g. .txt or .caption.")
    resolution: int = Field(512, ge=32, le=4096, multiple_of=8, description="Training resolution (side of the square area).")
    enable_bucket: bool = Field(True, description="Aspect-ratio bucketing: keep each image's shape instead of cropping to a square.")
    min_bucket_reso: int = Field(256, ge=32, le=4096, multiple_of=8, description="Smallest bucket side in pixels.")
    max_bucket_reso: int = Field(1024, ge=32, le=8192, multiple_of=8, description="Largest bucket side in pixels.")
    bucket_reso_steps: int = Field(
        64, ge=1, le=512,
        description="Bucket sides are multiples of this. A value that is not a multiple of 8 is rounded up to one "
        "(the VAE works in 8-pixel units); the warning names the value used.",
    )
    bucket_no_upscale: bool = Field(
        False, description="Never enlarge an image: each image's bucket is its own size (shrunk to the resolution's "
        "area when larger), rounded down to bucket_reso_steps, as in sd-scripts. min/max_bucket_reso are then unused.",
    )
    random_flip: bool = Field(False, description="Randomly mirror images left-right (both versions are cached).")
    shuffle_caption: bool = Field(False, description="Shuffle comma-separated caption tags every time an image is used.")
    keep_tokens: int = Field(0, ge=0, le=75, description="With shuffle_caption: keep this many leading tags in place.")
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0, description="Probability of training an image with an empty caption.")
    cache_latents: bool = Field(True, description="Encode every image with the VAE once before training (much faster).")
    cache_latents_to_disk: bool = Field(
        False, description="Also keep the latent cache on disk (in <output_dir>/.cache) so later runs skip encoding."
    )
    latent_cache_gpu_mb: int | None = Field(
        None, ge=0, le=10_000_000,
        description="Keep the latent cache in GPU memory up to this many MB (empty: a quarter of the free GPU "
        "memory after the model is loaded; 0: never); a larger cache stays in pinned CPU memory and each batch is "
        "copied without blocking.",
    )
    validation_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of images held out for validation loss (0 = none)."
    )
    validation_data_dir: str | None = Field(None, description="A separate validation image folder (instead of validation_split).")
    num_workers: int = Field(0, ge=0, le=64, description="Data loader worker processes (used when latents are not cached).")

    @field_validator("caption_extension")
    @classmethod
    def _ext(cls, v: str | None) -> str | None:
        return _check_extension(v)

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(
                f"min_bucket_reso: must not be larger than max_bucket_reso ({self.min_bucket_reso} > {self.max_bucket_reso})"
            )
        if self.validation_split > 0 and self.validation_data_dir:
            raise ValueError("validation_data_dir: set either validation_split or validation_data_dir, not both")
        if not self.train_data_dir and not any(not s.is_reg for s in self.subsets):
            raise ValueError("train_data_dir: set an image folder, or list at least one subset that is not "
                             "regularization images in dataset.subsets")
        seen: set[str] = set()
        for i, s in enumerate(self.subsets):
            if s.image_dir in seen:
                raise ValueError(f"subsets.{i}.image_dir: {s.image_dir} is listed twice (sd-scripts ignores the "
                                 "second; list each folder once)")
            seen.add(s.image_dir)
        return self

    def bucket_steps(self) -> int:
        """The bucket step used: bucket_reso_steps rounded up to a multiple of 8."""
        return -(-self.bucket_reso_steps // VAE_UNIT) * VAE_UNIT

    def bucket_range(self) -> tuple[int, int]:
        """(min, max) bucket side used: min rounded down and max up to the bucket step (sd-scripts'
        adjust_min_max_bucket_reso_by_steps)."""
        step = self.bucket_steps()
        low = max(step, self.min_bucket_reso - self.min_bucket_reso % step)
        high = self.max_bucket_reso + (-self.max_bucket_reso) % step
        return low, high


# Fields added after schema 1: at these values they leave config_hash alone.
DATASET_HASH_NEUTRAL = {"reg_data_dir": None, "subsets": [], "bucket_no_upscale": False}


def dataset_warnings(ds: DatasetConfig) -> list[str]:
    """Allowed dataset settings that do something other than they say, as `path: message` lines."""
    out = []
    if ds.shuffle_caption and ds.keep_tokens == 0:
        out.append("dataset.keep_tokens: with shuffle_caption, keep_tokens=1 keeps a trigger word first")
    if not ds.enable_bucket:
        return out
    step = ds.bucket_steps()
    if step != ds.bucket_reso_steps:
        out.append(f"dataset.bucket_reso_steps: {ds.bucket_reso_steps} is not a multiple of 8; buckets use {step} "
                   "(the VAE works in 8-pixel units; current sd-scripts refuses it too, needing a multiple of 64 "
                   "for SD 1.x/2.x and of 32 for SDXL)")
    if ds.bucket_no_upscale:
        defaults = DatasetConfig.model_fields
        if (ds.min_bucket_reso, ds.max_bucket_reso) != (defaults["min_bucket_reso"].default,
                                                        defaults["max_bucket_reso"].default):
            out.append("dataset.min_bucket_reso: unused with bucket_no_upscale (each image's bucket comes from its "
                       "own size, as in sd-scripts)")
        return out
    low, high = ds.bucket_range()
    if low != ds.min_bucket_reso:
        out.append(f"dataset.min_bucket_reso: {ds.min_bucket_reso} is not a multiple of the bucket step {step}; "
                   f"buckets start at {low} (as sd-scripts rounds it)")
    if high != ds.max_bucket_reso:
        out.append(f"dataset.max_bucket_reso: {ds.max_bucket_reso} is not a multiple of the bucket step {step}; "
                   f"buckets go up to {high} (as sd-scripts rounds it)")
    return out
