"""Benchmark: the Dataset view on a large folder of small images.

    .venv/bin/python bench/dataset_view.py [--images 10000] [--dir FOLDER] [--json out.json]

Makes N small images (64x48 and 48x64, PNG and JPEG alternating, each with a caption) in two kohya
repeats folders (10_alpha: 60 %, 3_beta: 40 %) under a temp folder (or --dir, reused when it holds
them already), then times in this process, in this order:
- page_cold: `page(cfg, 0, 100)` before anything else has read the folder in this process
  (the operating system's file cache is warm when the images were just written);
- summarize_cold / summarize_warm: `summarize(cfg)` twice (every header read, counts, steps);
- page_warm: `page(cfg, 0, 100)` again, and page_from_summary: `page(summary, 0, 100)`;
- page_last: `page(cfg, N - 100, 100)` (the listing of every folder, then 100 headers);
- thumbnails_100: 100 thumbnails of 256 px.
Prints the figures as JSON (seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.dataset_view import page, summarize, thumbnail  # noqa: E402
from backend.presets import resolve  # noqa: E402

FOLDERS = (("10_alpha", 0.6), ("3_beta", 0.4))


def make_images(root: Path, n: int) -> None:
    for name, share in FOLDERS:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(round(n * share)):
            size = (64, 48) if i % 3 else (48, 64)
            ext = ".png" if i % 2 else ".jpg"
            Image.new("RGB", size, ((i * 7) % 256, (i * 13) % 256, 90)).save(folder / f"img_{i:05d}{ext}")
            (folder / f"img_{i:05d}.txt").write_text(f"tag{i % 50}, shape, color {i % 7}\n", encoding="utf-8")


def timed(fn):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--dir", type=Path, help="where to make the images (kept); default: a temp folder (removed)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="lathe-dataset-view-")
    root = args.dir or Path(tmp.name)
    made = 0.0
    if not (root / FOLDERS[0][0]).is_dir():
        _, made = timed(lambda: make_images(root, args.images))
    cfg = resolve({"dataset": {"train_data_dir": str(root), "resolution": 64, "min_bucket_reso": 32,
                               "max_bucket_reso": 128, "bucket_reso_steps": 32},
                   "training": {"train_batch_size": 4}})
    first, page_cold = timed(lambda: page(cfg, 0, 100))
    summary, summarize_cold = timed(lambda: summarize(cfg))
    _, summarize_warm = timed(lambda: summarize(cfg))
    _, page_warm = timed(lambda: page(cfg, 0, 100))
    from_summary, page_from_summary = timed(lambda: page(summary, 0, 100))
    n = sum(s.images + len(s.unreadable) for s in summary.subsets)
    _, page_last = timed(lambda: page(cfg, n - 100, 100))
    _, thumbs = timed(lambda: [thumbnail(cfg, e.id) for e in first])
    assert [e.to_json() for e in first] == [e.to_json() for e in from_summary]
    figures = {
        "images": n, "make_images_s": round(made, 2), "page_cold_s": page_cold, "summarize_cold_s": summarize_cold,
        "summarize_warm_s": summarize_warm, "page_warm_s": page_warm, "page_from_summary_s": page_from_summary,
        "page_last_s": page_last, "thumbnails_100_s": thumbs, "steps_per_epoch": summary.steps_per_epoch,
        "samples_per_epoch": summary.samples_per_epoch, "summary_json_bytes": len(json.dumps(summary.to_json())),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
