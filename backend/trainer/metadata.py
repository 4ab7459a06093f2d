"""The dataset figures sd-scripts writes into a LoRA's metadata, which AUTOMATIC1111's LoRA panel
shows (tag frequencies, buckets): computed as sd-scripts computes them (library/train_util.py
`BaseDataset.set_tag_frequency` and `make_buckets`/`bucket_info`, train_network.py's metadata).

- `ss_tag_frequency`: {image folder name: {tag: number of captions holding it}}; a caption's tags are
  its comma-separated parts, stripped and lower-cased, empty ones skipped; each image counts once
  (not times its repeats), with the caption it trains with (class words when it has no caption file).
- `ss_bucket_info`: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error":
  mean |image aspect ratio - bucket aspect ratio|}; a bucket's count includes the repeats, as the
  sd-scripts bucket lists hold each image once per repeat.
- `ss_total_batch_size` (batch per device x processes x accumulation), `ss_num_batches_per_epoch`,
  `modelspec.resolution` ("512x512"), `modelspec.date` (ISO 8601, local time, as sd-scripts).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any


def tag_frequency(items: list[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for it in items:
        counts = out.setdefault(Path(it.path).parent.name, {})
        for tag in it.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return out


def bucket_info(items: list[Any], item_buckets: list[tuple[int, int]]) -> dict[str, Any]:
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for it, (w, h) in zip(items, item_buckets, strict=True):
        counts[(w, h)] = counts.get((w, h), 0) + it.repeats
        errors.append(abs(it.size[0] / it.size[1] - w / h))
    buckets = {str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(sorted(counts.items()))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def dataset_metadata(s: Any) -> dict[str, str]:
    """The keys above for one run's Setup."""
    t, res = s.cfg.training, s.cfg.dataset.resolution
    return {
        "ss_tag_frequency": json.dumps(tag_frequency(s.items)),
        "ss_bucket_info": json.dumps(bucket_info(s.items, s.item_buckets)),
        "ss_total_batch_size": str(t.train_batch_size * s.acc.num_processes * t.gradient_accumulation_steps),
        "ss_num_batches_per_epoch": str(s.steps_per_epoch),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
