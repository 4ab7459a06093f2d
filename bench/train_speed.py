"""Benchmark: Lathe's trainer against a bare reference loop and an uncached loop, interleaved.

    .venv/bin/python bench/train_speed.py [--rounds 3] [--json out.json] [--settings demo64,wide256]
    .venv/bin/python bench/train_speed.py --networks lora,locon,loha,lokr,dora [--settings wide256]

(a) reference: pre-encoded latents and text embeddings; UNet forward+backward; AdamW step. The upper
    bound for a given model, batch and resolution.
(b) uncached: the same loop re-encoding every image with the VAE and every caption with the text
    encoder at every step (what a trainer without caching pays).
(c) Lathe: the real CLI (`python -m backend train`), steady-state seconds per step read from its own
    `step` events.

With --networks: Lathe alone, once per network type at the same rank (the conv types with
conv_rank = rank), interleaved; reports each type's s/step over lora's.

Each measurement is its own process; the kinds rotate order every round to cancel machine drift.
Reports medians (min/max) of per-step times after warm-up, the ratios (a)/(c) and (b)/(c), peak
memory and time to first step, and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    # name: (UNet block_out_channels, resolution, batch, steps, warmup)
    "demo64": ((32, 64), 64, 4, 80, 15),
    "wide256": ((64, 128, 256), 256, 2, 30, 6),
}
RANK, ALPHA, LR = 4, 4.0, 1e-3
NETWORKS = {
    "lora": {"type": "lora"},
    "locon": {"type": "locon", "conv_rank": RANK, "conv_alpha": ALPHA},
    "loha": {"type": "loha", "conv_rank": RANK, "conv_alpha": ALPHA},
    "lokr": {"type": "lokr", "conv_rank": RANK, "conv_alpha": ALPHA},
    "dora": {"type": "dora", "conv_rank": RANK, "conv_alpha": ALPHA},
}


def build_model(root: Path, name: str) -> Path:
    from backend.trainer.demo import build_images, build_sd15

    out = root / name
    if not out.exists():
        build_sd15(out / "model", SETTINGS[name][0])
        build_images(out / "images")
    return out


# ------------------------------------------------------------------------------ reference loops (a, b)
def load_images(images: Path, res: int):
    import numpy as np
    from PIL import Image

    paths = sorted(p for p in images.rglob("*.png"))
    pix, caps = [], []
    for p in paths:
        im = Image.open(p).convert("RGB")
        s = res / min(im.size)
        im = im.resize((max(res, round(im.width * s)), max(res, round(im.height * s))), Image.Resampling.LANCZOS)
        left, top = (im.width - res) // 2, (im.height - res) // 2
        arr = np.asarray(im.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1
        pix.append(arr.transpose(2, 0, 1))
        cap = p.with_suffix(".txt")
        caps.append(cap.read_text().strip() if cap.exists() else "yellow star")
    return np.stack(pix), caps


def worker(kind: str, setting: str, root: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTokenizer

    from backend.config import UNET_TARGETS_DEFAULT

    _, res, batch, steps, warmup = SETTINGS[setting]
    base = build_model(root, setting)
    m = base / "model"
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae").requires_grad_(False)
    te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder").requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(m, subfolder="scheduler")
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS_DEFAULT), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR)
    pixels, caps = load_images(base / "images", res)
    pixels = torch.from_numpy(pixels)

    def encode(px, cs):
        with torch.no_grad():
            lat = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
            ids = tok(cs, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return lat, te(ids).last_hidden_state

    t_start = time.perf_counter()
    if kind == "reference":
        all_lat, all_ctx = encode(pixels, caps)
    g = torch.Generator().manual_seed(0)
    times, first = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(caps), (batch,), generator=g)
        if kind == "reference":
            lat, ctx = all_lat[idx], all_ctx[idx]
        else:
            lat, ctx = encode(pixels[idx], [caps[i] for i in idx])
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        now = time.perf_counter()
        if first is None:
            first_at = time.time()
        first = first if first is not None else now - t_start
        if step >= warmup:
            times.append(now - t0)
    return {"step_s": times, "first_step_s": first, "first_step_at": first_at,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------- Lathe (c)
def run_lathe(setting: str, root: Path, network: dict | None = None) -> dict:
    _, res, batch, steps, warmup = SETTINGS[setting]
    base = build_model(root, setting)
    cfg = {
        "run_name": f"bench-{setting}", "output_dir": str(root / "runs"),
        "model": {"pretrained_model": str(base / "model")},
        "dataset": {"train_data_dir": str(base / "images"), "resolution": res, "enable_bucket": False},
        "network": {**(network or {}), "rank": RANK, "alpha": ALPHA},
        "optimizer": {"type": "AdamW", "learning_rate": LR, "weight_decay": 0.0},
        "training": {"max_train_steps": steps, "train_batch_size": batch},
        "saving": {"save_state": False}, "logging": {"tensorboard": False}, "launch": {"device": "cpu"},
    }
    path = root / f"{setting}-{(network or {}).get('type', 'lora')}.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "backend", "train", str(path)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    vdir = Path(out.stdout.splitlines()[0])
    evs = [json.loads(x) for x in (vdir / "events.jsonl").read_text().splitlines()]
    stamps = [e["time"] for e in evs if e["event"] == "step"]
    status = json.loads((vdir / "status.json").read_text())
    fin = next(e for e in evs if e["event"] == "run_finished")
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:]
    return {"step_s": diffs, "first_step_s": stamps[0] - status["started_at"], "peak_rss_mb": fin.get("peak_ram_mb")}


# ------------------------------------------------------------------------------------------ driver
def measure(kind: str, setting: str, root: Path) -> dict:
    if kind == "lathe":
        return run_lathe(setting, root)
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--setting", setting, "--root", str(root)],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "n": len(samples)}


def bench(setting: str, rounds: int, root: Path) -> dict:
    kinds = ["reference", "uncached", "lathe"]
    raw: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % 3:] + kinds[: r % 3]:
            raw[kind].append(measure(kind, setting, root))
    res = {}
    for kind, runs in raw.items():
        res[kind] = summarize([t for run in runs for t in run["step_s"]])
        res[kind]["first_step_s"] = statistics.median(run["first_step_s"] for run in runs)
        peaks = [run["peak_rss_mb"] for run in runs if run["peak_rss_mb"]]
        res[kind]["peak_rss_mb"] = max(peaks) if peaks else None
    res["ref_over_lathe"] = res["reference"]["median_s"] / res["lathe"]["median_s"]
    res["uncached_over_lathe"] = res["uncached"]["median_s"] / res["lathe"]["median_s"]
    return res


def bench_networks(setting: str, rounds: int, root: Path, kinds: list[str]) -> dict:
    raw: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            raw[kind] += run_lathe(setting, root, NETWORKS[kind])["step_s"]
    res = {k: summarize(v) for k, v in raw.items()}
    for k in kinds:
        res[k]["over_lora"] = res[k]["median_s"] / res["lora"]["median_s"] if "lora" in res else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settings", default="demo64,wide256")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--networks", help="compare these network types (comma-separated) instead")
    ap.add_argument("--worker")
    ap.add_argument("--setting")
    ap.add_argument("--root", type=Path)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.setting, args.root)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as t:
        for setting in args.settings.split(",") if args.networks else []:
            kinds = args.networks.split(",")
            results[setting] = r = bench_networks(setting, args.rounds, Path(t), kinds)
            print(f"{setting}: network types at rank {RANK}, {SETTINGS[setting][3]} steps x {args.rounds} rounds")
            for kind in kinds:
                v = r[kind]
                ratio = f"{v['over_lora']:.3f}x lora" if v["over_lora"] else ""
                print(f"  {kind:<6} {v['median_s'] * 1000:8.1f} ms/step (min {v['min_s'] * 1000:.1f}, "
                      f"max {v['max_s'] * 1000:.1f})  {ratio}")
        for setting in [] if args.networks else args.settings.split(","):
            results[setting] = r = bench(setting, args.rounds, Path(t))
            _, res, batch, steps, _ = SETTINGS[setting]
            print(f"{setting}: {res}px, batch {batch}, {steps} steps x {args.rounds} rounds")
            for kind in ("reference", "uncached", "lathe"):
                v = r[kind]
                print(f"  {kind:<9} {v['median_s'] * 1000:8.1f} ms/step (min {v['min_s'] * 1000:.1f}, max {v['max_s'] * 1000:.1f}),"
                      f" first step {v['first_step_s']:.2f} s, peak RSS {v['peak_rss_mb'] or 0:.0f} MB")
            print(f"  (a)/(c) reference/Lathe = {r['ref_over_lathe']:.3f}   (b)/(c) uncached/Lathe = {r['uncached_over_lathe']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
