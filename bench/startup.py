"""Benchmark: from launch to the end of the first training step, Lathe against a bare script.

    .venv/bin/python bench/startup.py [--rounds 4] [--json out.json]

Three commands, each timed from the moment it is spawned to the end of its first optimizer step
(wall clock), interleaved and rotated every round:
(a) bare: bench/train_speed.py's reference loop (diffusers + peft, latents pre-encoded, AdamW) on
    the same tiny model, images, resolution, batch and LoRA rank; its first step's end is the time
    it reports.
(b) fresh: `python -m backend train CONFIG` (the CLI as a user runs it: validation, preflight,
    version folder, the launcher, the trainer); the first step's end is its `step` event.
(c) resume: `python -m backend resume CHECKPOINT` of the same config (verified state load).
Reports medians, the ratios fresh/bare and resume/bare, and where the Lathe commands' time went
(medians over both: the CLI to the trainer's launch, the trainer's start to `run_started`, step 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_speed import ALPHA, LR, RANK, SETTINGS, build_model  # noqa: E402

SETTING = "demo64"


def _config(root: Path, steps: int) -> Path:
    _, res, batch, _, _ = SETTINGS[SETTING]
    base = build_model(root, SETTING)
    cfg = {
        "run_name": "startup", "output_dir": str(root / "runs"), "model": {"pretrained_model": str(base / "model")},
        "dataset": {"train_data_dir": str(base / "images"), "resolution": res, "enable_bucket": False},
        "network": {"rank": RANK, "alpha": ALPHA}, "optimizer": {"type": "AdamW", "learning_rate": LR},
        "training": {"max_train_steps": steps, "train_batch_size": batch},
        "saving": {"save_every_n_steps": 1, "save_every_n_epochs": None}, "sampling": {"prompts": []},
        "logging": {"tensorboard": False}, "launch": {"device": "cpu"},
    }
    path = root / f"startup-{steps}.json"
    path.write_text(json.dumps(cfg))
    return path


def _first_step_event(vdir: Path, t0: float, phases: dict[str, list[float]]) -> float:
    """The first step event's time; adds to `phases` where the command's time went: the CLI (spawn to
    the trainer's launch, status.json launched_at), the trainer's start (its imports, model load, data:
    launch to run_started), step 1."""
    evs = [json.loads(x) for x in (vdir / "events.jsonl").read_text().splitlines()]
    step = next(e["time"] for e in evs if e["event"] == "step")
    started = next(e["time"] for e in evs if e["event"] == "run_started")
    launched = json.loads((vdir / "status.json").read_text())["launched_at"]
    for name, value in (("cli", launched - t0), ("trainer_start", started - launched), ("step_1", step - started)):
        phases.setdefault(name, []).append(value)
    return step


def _cli(*args: str) -> tuple[float, Path]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    vdir = Path(next(ln for ln in out.stdout.splitlines() if "/version_" in ln and not ln.startswith("resume")))
    return t0, vdir


def fresh(root: Path, phases: dict[str, list[float]]) -> float:
    t0, vdir = _cli("train", str(_config(root, 1)))
    return _first_step_event(vdir, t0, phases) - t0


def resume(root: Path, ckpt: Path, phases: dict[str, list[float]]) -> float:
    t0, vdir = _cli("resume", str(ckpt), "--set", "training.max_train_steps=2")
    return _first_step_event(vdir, t0, phases) - t0


def bare(root: Path) -> float:
    t0 = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--worker", "reference", "--setting",
                          SETTING, "--root", str(root)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["first_step_at"] - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, base = _cli("train", str(_config(root, 1)))  # a checkpoint to resume, and warm file caches
        ckpt = base / "checkpoints" / "step-00000001"
        phases: dict[str, list[float]] = {}  # where the Lathe commands' time went (medians in the report)
        kinds = {"bare": lambda: bare(root), "fresh": lambda: fresh(root, phases),
                 "resume": lambda: resume(root, ckpt, phases)}
        times: dict[str, list[float]] = {k: [] for k in kinds}
        names = list(kinds)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[: r % 3]:
                times[name].append(round(kinds[name](), 3))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"setting": SETTING, "rounds": args.rounds, "seconds": times, "median_s": med,
              "fresh_over_bare": round(med["fresh"] / med["bare"], 3), "resume_over_bare": round(med["resume"] / med["bare"], 3),
              "lathe_phases_median_s": {k: round(statistics.median(v), 3) for k, v in phases.items()}}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
