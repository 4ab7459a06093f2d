"""Peak memory of a demo run's whole process tree: the CLI, the supervisor and the trainer.

    .venv/bin/python bench/memory.py [--rounds 3] [--preset presets/demo.json] [--set key=value ...]

Starts `python -m backend train` on the preset (CPU; samples and checkpoints as the preset has
them) and samples every process of its tree every 20 ms with psutil until the run ends. Reports,
per round: the peak of the tree's summed RSS (what the machine had to hold at once), and each
process's own high-water mark (VmHWM from /proc, which also catches peaks between samples).
The issue's target for the 64 px demo: tree peak <= 700 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def high_water_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(cmd)
    for key, name in (("backend.supervise", "supervisor"), ("backend.trainer", "trainer"), ("backend train", "cli"),
                      ("accelerate", "accelerate")):
        if key in text:
            return name
    return Path(cmd[0]).name if cmd else "?"


def one_run(preset: Path, sets: list[str], tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "backend", "train", str(preset), "--set", f"output_dir={json.dumps(str(tmp))}"]
    for s in sets:
        cmd += ["--set", s]
    root = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    top = psutil.Process(root.pid)
    peak_tree, hwm, names = 0.0, {}, {}
    while root.poll() is None:
        try:
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            break
        total = 0.0
        for p in procs:
            try:
                total += p.memory_info().rss / MB
            except psutil.Error:
                continue
            h = high_water_mb(p.pid)
            if h is not None:
                hwm[p.pid] = max(hwm.get(p.pid, 0.0), h)
                names.setdefault(p.pid, label(p))
        peak_tree = max(peak_tree, total)
        time.sleep(0.02)
    if root.returncode != 0:
        raise RuntimeError(f"the run failed ({root.returncode}): {' '.join(cmd)}")
    per = {}
    for pid, h in hwm.items():
        per[names[pid]] = max(per.get(names[pid], 0.0), h)
    return {"tree_peak_rss_mb": round(peak_tree, 1), "high_water_mb": {k: round(v, 1) for k, v in per.items()},
            "sum_high_water_mb": round(sum(hwm.values()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", type=Path, default=ROOT / "presets/demo.json")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as t:
        for r in range(args.rounds):
            res = one_run(args.preset, args.sets, Path(t) / f"r{r}")
            rounds.append(res)
            print(f"round {r + 1}: tree peak {res['tree_peak_rss_mb']:.0f} MB; per process (VmHWM) "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in res["high_water_mb"].items()), flush=True)
    med = statistics.median(r["tree_peak_rss_mb"] for r in rounds)
    print(f"process-tree peak RSS: {med:.0f} MB median over {len(rounds)} rounds")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "tree_peak_rss_mb_median": med}, indent=1))


if __name__ == "__main__":
    main()
