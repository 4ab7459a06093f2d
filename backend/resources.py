"""Resource sampling for the GUI and the trainer's `resources` events: GPUs, RAM, disk, data wait.

Torch-free (the GUI imports it). GPU figures come from NVML through the optional `pynvml` module
(package nvidia-ml-py) when it imports, else from `nvidia-smi` when it is on PATH, else there are
none. Every figure is best effort: a failing probe gives an empty list or None, never an error.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024
DATA_BOUND_SHARE = 0.3  # waiting for data more than this share of the time: loading is the bottleneck
MIN_WINDOW_S = 5.0  # judge the data-wait share only over at least this much training time
SAVE_MARGIN = 1.1  # the next save needs its size plus some room


def _nvml_gpus() -> list[dict[str, Any]] | None:
    """Per-device figures via NVML, or None when NVML is unavailable."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no GPU: not an error for us
        return None
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "util_pct": float(util.gpu),
                "mem_used_mb": round(mem.used / MB, 1),
                "mem_total_mb": round(mem.total / MB, 1),
            })
    except Exception:  # noqa: BLE001
        return gpus
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return gpus


SMI_QUERY = "index,name,utilization.gpu,memory.used,memory.total"


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Parse `nvidia-smi --query-gpu=<SMI_QUERY> --format=csv,noheader,nounits` output."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            gpus.append({"index": int(parts[0]), "name": parts[1], "util_pct": float(parts[2]),
                         "mem_used_mb": float(parts[3]), "mem_total_mb": float(parts[4])})
        except ValueError:
            continue
    return gpus


def _smi_gpus() -> list[dict[str, Any]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def gpus() -> list[dict[str, Any]]:
    """[{index, name, util_pct, mem_used_mb, mem_total_mb}] per visible GPU; [] when none can be read."""
    found = _nvml_gpus()
    return found if found is not None else _smi_gpus()


def disk(path: str | Path) -> dict[str, Any] | None:
    """Free and total space of the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return None
    return {"path": str(p), "free_mb": round(u.free / MB, 1), "total_mb": round(u.total / MB, 1)}


def memory() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {"used_mb": round((vm.total - vm.available) / MB, 1), "total_mb": round(vm.total / MB, 1), "pct": vm.percent}


def sample(output_dir: str | Path) -> dict[str, Any]:
    """A snapshot for the GUI's monitor: {gpus, ram, disk, cpu_pct}."""
    return {"gpus": gpus(), "ram": memory(), "disk": disk(output_dir), "cpu_pct": psutil.cpu_percent(interval=None)}


# ------------------------------------------------------------------------------------- judgements
def data_wait_share(wait_s: float, busy_s: float, min_window_s: float = MIN_WINDOW_S) -> float | None:
    """Share of training time spent waiting for the next batch, or None over too short a window."""
    total = wait_s + busy_s
    if total < min_window_s or total <= 0:
        return None
    return round(wait_s / total, 3)


def warnings_for(snapshot: dict[str, Any], share: float | None, next_save_bytes: int | None) -> list[str]:
    """Plain-language warnings for a resources snapshot: data loading as the bottleneck, and a disk
    too full for the next save (save-then-prune needs the new files before old ones go)."""
    out = []
    if share is not None and share > DATA_BOUND_SHARE:
        out.append(f"data loading is the bottleneck: the trainer waited for data {share:.0%} of the time; "
                   "raise dataset.num_workers or enable dataset.cache_latents")
    d = snapshot.get("disk")
    if d and next_save_bytes:
        need_mb = next_save_bytes * SAVE_MARGIN / MB
        if d["free_mb"] < need_mb:
            out.append(f"free disk space ({d['free_mb']:.0f} MB in {d['path']}) will not hold the next save "
                       f"(about {need_mb:.0f} MB); free space or lower saving.save_last_n_epochs / save_last_n_steps")
    return out
