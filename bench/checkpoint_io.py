"""Benchmark: state-checkpoint save/load against plain safetensors, and resume-to-first-step against
fresh-start-to-first-step. Interleaved repetitions; medians with min/max; a JSON result.

    .venv/bin/python bench/checkpoint_io.py [--reps 5] [--rank 16] [--model sd15|sdxl] [--no-resume] [--json out.json]

The state is shaped like a real LoRA: the LoRA tensors of the published SD1.5 (or SDXL) UNet
architecture (built on the meta device, no weights needed) plus AdamW's two moments per tensor.
The save and load are the trainer's own (state.save_tensors / optimizer_writes on C.run_parallel
in an AtomicDir; the prefetching VerifiedReader that state.load_state uses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import checkpoints as C  # noqa: E402
from backend.trainer import export, tensorfile  # noqa: E402
from backend.trainer import state as ST  # noqa: E402


def lora_state(rank: int, family: str = "sd15") -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from backend.config import UNET_TARGETS_DEFAULT

    cfg = json.loads((ROOT / f"backend/trainer/model_configs/{family}/unet/config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS_DEFAULT), unet)
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(p.shape, generator=g) for n, p in unet.named_parameters() if "lora_" in n}


def lathe_save(folder: Path, lora: dict, optim: dict) -> None:
    """What a save point does with the big files (state.write_state: the LoRA and the optimizer's
    files written on several threads at once, in an AtomicDir)."""
    atomic = C.AtomicDir(folder.parent, folder.name)
    with atomic as tmp:
        C.run_parallel([lambda: ST.save_tensors(tmp / "lora.safetensors", lora), *ST.optimizer_writes(tmp, optim)])
        atomic.commit({"run_name": "bench", "step": 1})


def lathe_load(folder: Path) -> None:
    """What state.load_state does: manifest and sizes, then each file read once (the big ones on
    several threads at once), verified, deserialized."""
    status, _ = C.checkpoint_status(folder, hashes=False)
    assert status == "valid"
    reader = C.VerifiedReader(folder, C.read_manifest(folder))
    reader.prefetch()
    tensorfile.load(reader.read("lora.safetensors"))
    ST.load_optimizer(reader.read, reader.manifest["files"], reader.read_each)
    reader.finish()


def plain_save(path: Path, flat: dict) -> None:
    save_file(flat, str(path))


def plain_durable_save(path: Path, flat: dict) -> None:
    """The plain write made durable as Lathe's is (the file fsynced; no hashes, no folder): what
    the disk itself costs on top of `plain_save`."""
    save_file(flat, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lathe_export(path: Path, tensors: dict, meta: dict) -> None:
    """What a save point does with the export (savepoints.write_export, after the dtype conversion)."""
    export.save_export(path, tensors, meta)


def plain_export(path: Path, tensors: dict, meta: dict) -> None:
    save_file(tensors, str(path), metadata=meta)


def timed(fn, *a) -> float:
    os.sync()  # untimed: the writeback of what the last one left dirty (plain writes) stays out of this one's time
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def io_bench(reps: int, rank: int, tmp: Path, family: str = "sd15") -> dict:
    lora = lora_state(rank, family)
    optim = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": t.clone(), "exp_avg_sq": t.clone()}
                       for i, t in enumerate(lora.values())}, "param_groups": [{"lr": 1e-4, "params": list(range(len(lora)))}]}
    flat = {**lora, **{f"m{i}": s["exp_avg"] for i, s in optim["state"].items()},
            **{f"v{i}": s["exp_avg_sq"] for i, s in optim["state"].items()}}
    nbytes = sum(t.numel() * t.element_size() for t in flat.values())
    half = {k: t.half() for k, t in lora.items()}  # the export, in the default save_precision
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank), "ss_output_name": "bench"}
    res = {"lathe_save": [], "plain_save": [], "plain_durable_save": [], "lathe_load": [], "plain_load": [],
           "lathe_export": [], "plain_export": []}
    for r in range(reps):
        folder, plain, durable = tmp / f"ck{r}", tmp / f"plain{r}.safetensors", tmp / f"durable{r}.safetensors"
        res["lathe_save"].append(timed(lathe_save, folder, lora, optim))
        res["plain_save"].append(timed(plain_save, plain, flat))
        res["plain_durable_save"].append(timed(plain_durable_save, durable, flat))
        res["lathe_load"].append(timed(lathe_load, folder))
        res["plain_load"].append(timed(load_file, str(plain)))
        res["lathe_export"].append(timed(lathe_export, tmp / f"export{r}.safetensors", half, meta))
        res["plain_export"].append(timed(plain_export, tmp / f"plainexport{r}.safetensors", half, meta))
        (tmp / f"export{r}.safetensors").unlink()
        (tmp / f"plainexport{r}.safetensors").unlink()
        shutil.rmtree(folder)
        plain.unlink()
        durable.unlink()
    out = {"bytes": nbytes, "export_bytes": sum(t.numel() * 2 for t in half.values()), "tensors": len(lora), "rank": rank}
    for k, v in res.items():
        out[k] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
    out["save_ratio"] = out["lathe_save"]["median_s"] / out["plain_save"]["median_s"]
    out["export_ratio"] = out["lathe_export"]["median_s"] / out["plain_export"]["median_s"]
    out["durable_ratio"] = out["plain_durable_save"]["median_s"] / out["plain_save"]["median_s"]
    out["save_over_durable"] = out["lathe_save"]["median_s"] / out["plain_durable_save"]["median_s"]
    out["load_ratio"] = out["lathe_load"]["median_s"] / out["plain_load"]["median_s"]
    return out


def first_step_latency(version_dir: Path) -> float:
    evs = [json.loads(x) for x in (version_dir / "events.jsonl").read_text().splitlines()]
    first = next(e for e in evs if e["event"] == "step")
    started = json.loads((version_dir / "status.json").read_text())["started_at"]
    return first["time"] - started


def cli(*args: str) -> Path:
    out = subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(next(ln for ln in out.stdout.splitlines() if "/version_" in ln and not ln.startswith("resume")))


def resume_bench(reps: int, tmp: Path) -> dict:
    demo = json.loads((ROOT / "presets/demo.json").read_text())
    demo.update(output_dir=str(tmp / "runs"), sampling={"prompts": []})
    demo["training"] = {"max_train_epochs": 2, "train_batch_size": 4}
    cfg = tmp / "bench.json"
    cfg.write_text(json.dumps(demo))
    base = cli("train", str(cfg))
    ckpt = base / "checkpoints" / "epoch-000001"
    fresh, resumed = [], []
    for _ in range(reps):
        fresh.append(first_step_latency(cli("train", str(cfg))))
        resumed.append(first_step_latency(cli("resume", str(ckpt))))
    return {"fresh_first_step_s": {"median": statistics.median(fresh), "min": min(fresh), "max": max(fresh)},
            "resume_first_step_s": {"median": statistics.median(resumed), "min": min(resumed), "max": max(resumed)},
            "resume_over_fresh": statistics.median(resumed) / statistics.median(fresh)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--model", default="sd15", choices=("sd15", "sdxl"), help="whose UNet shapes the state")
    ap.add_argument("--no-resume", action="store_true", help="only the I/O figures")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        result = {"io": io_bench(args.reps, args.rank, tmp, args.model)}
        if not args.no_resume:
            result["resume"] = resume_bench(max(2, args.reps // 2), tmp)
    io_ = result["io"]
    print(f"state of {io_['tensors']} LoRA tensors (rank {io_['rank']}) + AdamW moments: {io_['bytes'] / 1e6:.1f} MB")
    for k in ("lathe_save", "plain_save", "plain_durable_save", "lathe_load", "plain_load", "lathe_export", "plain_export"):
        v = io_[k]
        print(f"  {k:<18} median {v['median_s'] * 1000:8.1f} ms  (min {v['min_s'] * 1000:.1f}, max {v['max_s'] * 1000:.1f})")
    print(f"  save: Lathe / plain safetensors = {io_['save_ratio']:.2f}x; load (verified) = {io_['load_ratio']:.2f}x")
    print(f"  export ({io_['export_bytes'] / 1e6:.1f} MB fp16, with the sshs hashes, fsynced) / plain save_file = "
          f"{io_['export_ratio']:.2f}x")
    print(f"  the disk's share: plain + fsync / plain = {io_['durable_ratio']:.2f}x; "
          f"Lathe / (plain + fsync) = {io_['save_over_durable']:.2f}x")
    r = result.get("resume")
    if r:
        print(f"first step after start: fresh {r['fresh_first_step_s']['median']:.2f} s, resume "
              f"{r['resume_first_step_s']['median']:.2f} s, resume/fresh = {r['resume_over_fresh']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
