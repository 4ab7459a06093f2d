"""Benchmark: the trainer's image reading before step 1 on one thread against several (image_pool).

    .venv/bin/python bench/image_threads.py [--images 200] [--size 1024] [--resolution 512] [--rounds 3] [--json out.json]

Two stages the trainer runs before its first step, each with the trainer's own function, on one
thread and on `image_threads()` threads, interleaved and rotated every round:
- scan: `dataset.load` (every image decoded once, so a truncated file fails before step 1);
- cache: `LatentCache.fill` with the demo VAE (pixels read, resized and cropped while the VAE encodes
  the batch before; the demo VAE is tiny, so this is the regime of a fast GPU VAE, where the pixels
  are what limits). Both flips are cached, as with random_flip.
The images are JPEGs with photo-like content (smooth shapes, texture and noise) of --size px.
Reports medians (min-max) and the ratios one thread / several.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import dataset as D  # noqa: E402
from backend.config import DatasetConfig  # noqa: E402
from backend.image_pool import image_threads  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        a, b, c = rng.random(3) * 6
        base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1) * 80 + 128
        grain = rng.normal(0, 12, (size, size, 3))
        w, h = (size, size) if i % 3 else (size, size * 3 // 4)
        arr = np.clip(base + grain, 0, 255).astype(np.uint8)[:h, :w]
        Image.fromarray(arr).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"a photo {i}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from backend.trainer.caching import LatentCache
    from backend.trainer.demo import build_demo_assets

    many = image_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        demo = build_demo_assets(root / "demo")
        vae = AutoencoderKL.from_pretrained(demo / "model" / "vae").eval()
        make_images(root / "images", args.images, args.size)
        ds = DatasetConfig(train_data_dir=str(root / "images"), resolution=args.resolution)
        bucketing = D.buckets_for(ds)
        items = D.load(ds, 0).items
        buckets = D.bucket_of_items(items, bucketing)

        def scan(threads: int) -> float:
            t0 = time.perf_counter()
            assert len(D.load(ds, 0, threads=threads).items) == args.images
            return time.perf_counter() - t0

        def cache(threads: int) -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                LatentCache(vae, items, buckets, None, model_id="bench", threads=threads).fill((False, True))
            return time.perf_counter() - t0

        kinds = {f"{stage}_{n}": (fn, n) for stage, fn in (("scan", scan), ("cache", cache)) for n in (1, many)}
        times: dict[str, list[float]] = {k: [] for k in kinds}
        names = list(kinds)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn, n = kinds[name]
                times[name].append(round(fn(n), 3))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"images": args.images, "size": args.size, "resolution": args.resolution, "threads": many,
              "torch_threads": torch.get_num_threads(), "seconds": times, "median_s": med,
              "scan_speedup": round(med["scan_1"] / med[f"scan_{many}"], 3),
              "cache_speedup": round(med["cache_1"] / med[f"cache_{many}"], 3)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
