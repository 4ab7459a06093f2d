"""The dataset figures sd-scripts writes into a LoRA's metadata, which AUTOMATIC1111's LoRA panel
shows (tag frequencies, buckets): computed as sd-scripts computes them (library/train_util.py
`BaseDataset.set_tag_frequency` and `make_buckets`/`bucket_info`, train_network.py's metadata).

- `ss_tag_frequency`: {image folder name: {tag: number of captions holding it}}; a caption's tags are
  its comma-separated parts, stripped and lower-cased, empty ones skipped; each image counts once
  (not times its repeats), with the caption it trains with (class words when it has no caption file).
- `ss_bucket_info`: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error":
  mean |image aspect ratio - bucket aspect ratio|}; a bucket's count includes the repeats, as the
  sd-scripts bucket lists hold each image once per repeat.
- `ss_dataset_dirs`/`ss_reg_dataset_dirs`: {folder name: {"n_repeats": the folder's repeats,
  "img_count": its images}} for the training and the regularization subsets; `ss_num_train_images`:
  the training images' uses per epoch (images x repeats); `ss_num_reg_images`: the regularization
  images used x their folders' repeats, before balancing (sd-scripts also counts the images that
  balancing leaves unused, when there are more than the training images need).
- `ss_total_batch_size` (batch per device x processes x accumulation), `ss_num_batches_per_epoch`,
  `modelspec.resolution` ("512x512"), `modelspec.date` (ISO 8601, local time, as sd-scripts).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from backend import dataset as D


def bucket_info(items: list[Any], item_buckets: list[tuple[int, int]]) -> dict[str, Any]:
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for it, (w, h) in zip(items, item_buckets, strict=True):
        counts[(w, h)] = counts.get((w, h), 0) + it.repeats
        errors.append(abs(it.size[0] / it.size[1] - w / h))
    buckets = {str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(sorted(counts.items()))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def dataset_dirs(subsets: list[Any], items: list[Any], reg: bool) -> dict[str, dict[str, int]]:
    counts: dict[int, int] = {}
    for it in items:
        counts[it.subset] = counts.get(it.subset, 0) + 1
    return {sub.name: {"n_repeats": sub.num_repeats, "img_count": counts.get(i, 0)}
            for i, sub in enumerate(subsets) if sub.is_reg == reg and counts.get(i)}


def dataset_metadata(s: Any) -> dict[str, str]:
    """The keys above for one run's Setup."""
    t, ds = s.cfg.training, s.cfg.dataset
    res = ds.resolution
    train = [it for it in s.items if not it.is_reg]
    reg = [it for it in s.items if it.is_reg]
    return {
        "ss_num_train_images": str(sum(it.repeats for it in train)),
        "ss_num_reg_images": str(sum(s.subsets[it.subset].num_repeats for it in reg) if s.subsets else 0),
        "ss_dataset_dirs": json.dumps(dataset_dirs(s.subsets, train, False)),
        "ss_reg_dataset_dirs": json.dumps(dataset_dirs(s.subsets, reg, True)),
        "ss_prior_loss_weight": str(t.prior_loss_weight),
        "ss_bucket_no_upscale": str(ds.bucket_no_upscale),
        "ss_min_bucket_reso": str(ds.bucket_range()[0]),
        "ss_max_bucket_reso": str(ds.bucket_range()[1]),
        "ss_tag_frequency": json.dumps(D.tag_frequency(s.items)),
        "ss_bucket_info": json.dumps(bucket_info(s.items, s.item_buckets)),
        "ss_total_batch_size": str(t.train_batch_size * s.acc.num_processes * t.gradient_accumulation_steps),
        "ss_num_batches_per_epoch": str(s.steps_per_epoch),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
