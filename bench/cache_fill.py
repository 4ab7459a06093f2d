"""Benchmark: time to fill the latent cache with 1 process and with 2 processes (each rank encodes
its share, then the shares are exchanged), side by side in interleaved rounds, through the real
launcher and trainer. The figure is the trainer's own `cache_filled` event (seconds from the first
encode to every rank holding every latent); one training step follows so the run is a real one.

    .venv/bin/python bench/cache_fill.py [--images 96] [--size 256] [--reps 3] [--device cpu] [--json out.json]

On a CPU the two processes share the machine's cores (each gets half the threads), so the ratio
there measures the split's overhead more than a speed-up; on GPUs each rank has its own device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import launcher, runs  # noqa: E402
from backend.presets import resolve  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    sub = folder / "1_thing"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (size, size) if i % 3 else (size, size * 3 // 4)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(sub / f"{i:04d}.png")
        (sub / f"{i:04d}.txt").write_text(f"thing {i}")


def one_run(demo: Path, data: Path, out: Path, procs: int, size: int, device: str) -> float:
    cfg = resolve({
        "run_name": "bench", "output_dir": str(out), "model": {"pretrained_model": str(demo / "model")},
        "dataset": {"train_data_dir": str(data), "resolution": size, "min_bucket_reso": size // 2,
                    "max_bucket_reso": size * 2, "bucket_reso_steps": 64, "random_flip": True},
        "training": {"max_train_steps": 1, "train_batch_size": 2 // procs if procs <= 2 else 1},
        "saving": {"save_every_n_epochs": None, "save_state": False},
        "sampling": {"prompts": []}, "logging": {"tensorboard": False},
        "launch": {"device": device, "num_processes": procs},
    })
    launched = launcher.launch(cfg, exclusive=False)
    launched.proc.wait(timeout=1800)
    status = runs.finalize(launched.version_dir, launched.proc.returncode)
    if status["state"] != "finished":
        raise SystemExit((launched.version_dir / "train.log").read_text()[-3000:])
    evs = [json.loads(x) for x in (launched.version_dir / "events.jsonl").read_text().splitlines()]
    return next(e["seconds"] for e in evs if e["event"] == "cache_filled" and e["kind"] == "latents")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from backend.trainer.demo import build_demo_assets

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = build_demo_assets(tmp / "demo")
        make_images(tmp / "data", args.images, args.size)
        times: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(args.reps):
            for procs in (1, 2) if rep % 2 == 0 else (2, 1):  # interleaved, alternating order
                times[procs].append(one_run(demo, tmp / "data", tmp / f"runs{procs}-{rep}", procs, args.size, args.device))
        med = {p: statistics.median(t) for p, t in times.items()}
        result = {"images": args.images, "variants": 2, "size": args.size, "device": args.device, "reps": args.reps,
                  "seconds": times, "median_s": med, "ratio_2_over_1": round(med[2] / med[1], 3)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
