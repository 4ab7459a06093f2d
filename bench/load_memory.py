"""Benchmark: peak RAM and time of loading a Flux.1-width transformer in fp32 against the run's bf16.

    .venv/bin/python bench/load_memory.py [--double 2] [--single 4] [--rounds 2] [--json out.json]

The demo's Flux.1 folder with its transformer replaced by one at Flux.1-dev's real width (hidden 3072,
24 heads, the shipped flux-dev config) but only --double / --single blocks (the full model's 19 + 38
need 24 GB in bf16), random bf16 weights, as Black Forest Labs ship them. Each load is
`models.load_components` in a fresh process, as the trainer calls it for a CPU run (fp32) and for a
bf16 GPU run (the weights arrive in bf16 and nothing is cast twice), then every weight read once (as
the move to the GPU reads it); reported: the process's peak RSS over its RSS after the imports, the
seconds of load and read, and the ratios bf16 / fp32. The two kinds are
interleaved and rotated every round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(root: Path, double: int, single: int) -> Path:
    import torch
    from diffusers import FluxTransformer2DModel

    from backend.trainer.demo import build_demo_assets

    demo = build_demo_assets(root / "demo")
    out = root / "model-flux"
    shutil.copytree(demo / "model-flux", out)
    shutil.rmtree(out / "transformer")
    config = json.loads((ROOT / "backend/trainer/model_configs/flux-dev/transformer/config.json").read_text())
    config.update(num_layers=double, num_single_layers=single)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out / "transformer", max_shard_size="2GB")
    return out


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: its own, where getrusage's maxrss also counts the parent it forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(folder: Path, dtype: str) -> dict:
    import torch

    from backend.config import validate_config
    from backend.trainer import models

    cfg = validate_config({"model": {"pretrained_model": str(folder)}})
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    comps = models.load_components(cfg, getattr(torch, dtype))
    with torch.no_grad():  # every weight read once, as the move to the device reads it (a mapped file's pages
        for p in comps.unet.parameters():  # count once they are read)
            p.sum()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    params = sum(p.numel() for p in comps.unet.parameters())
    return {"seconds": seconds, "peak_over_imports_mb": peak - base, "transformer_params": params,
            "transformer_dtype": str(next(comps.unet.parameters()).dtype)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import diffusers  # noqa: F401 - the imports before the baseline RSS, as in the trainer
        import transformers  # noqa: F401

        print(json.dumps(worker(Path(args.worker[0]), args.worker[1])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp), args.double, args.single)
        runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
        names = list(runs)
        for r in range(args.rounds):
            for name in names[r % 2:] + names[: r % 2]:
                out = subprocess.run([sys.executable, __file__, "--worker", str(folder), name], capture_output=True,
                                     text=True, cwd=ROOT)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-3000:])
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_over_imports_mb")} for k, v in runs.items()}
    result = {"double": args.double, "single": args.single, "rounds": args.rounds,
              "transformer_params": runs["float32"][0]["transformer_params"], "runs": runs, "median": med,
              "peak_ratio_bf16_over_fp32": round(med["bfloat16"]["peak_over_imports_mb"] / med["float32"]["peak_over_imports_mb"], 3),
              "time_ratio_bf16_over_fp32": round(med["bfloat16"]["seconds"] / med["float32"]["seconds"], 3)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
