"""Checkpoint rows and their actions for the Checkpoints tab (no Gradio, no torch).

Deep verification runs `python -m backend verify` in a subprocess: it loads tensors with torch,
which the GUI process never imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from backend import checkpoints as C
from backend import launcher, process_tree, runs
from gui.runner import ACTIVE_STATES

HEADERS = ["Checkpoint", "Kind", "Step", "Epoch", "Loss", "Val loss", "Saved", "Size", "Status", "Marks"]
VERIFY_TIMEOUT_S = 900


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("" if v is None else str(v))


def checkpoint_rows(version_dir: str | Path) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Table rows (oldest first) and the checkpoint dicts behind them. Hashes are not checked here
    (sizes are): Verify does the deep check."""
    cks = C.list_checkpoints(version_dir, hashes=False)
    last, top = C.latest(cks), C.best(cks)
    rows = []
    for c in cks:
        marks = " ".join(m for m, on in (("last", c is last), ("best", c is top)) if on)
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created"])) if c["created"] else ""
        size = f"{c['bytes'] / 1e6:.1f} MB" if c["bytes"] else ""
        rows.append([c["name"], c["kind"], _fmt(c["step"]), C.epoch_label(c), _fmt(c["loss"]), _fmt(c["val_loss"]),
                     saved, size, c["status"], marks])
    return rows, cks


def version_is_active(version_dir: str | Path) -> bool:
    status = runs.reconcile(version_dir)
    return status.get("state") in ACTIVE_STATES and bool(process_tree.find_for_status(status))


def delete_checkpoint(checkpoint: str | Path) -> str:
    """Delete a checkpoint folder and its LoRA file; refused while its run is going. Returns a message."""
    ck = Path(checkpoint)
    version_dir = ck.parent.parent
    if version_is_active(version_dir):
        return f"✖ Not deleted: {version_dir.parent.name} / {version_dir.name} is still running. Stop it first."
    try:
        export = C.delete_checkpoint(ck)
    except ValueError:
        return f"✖ {ck} is not a checkpoint folder."
    return f"Deleted checkpoint **{ck.name}**" + (f" and its LoRA file {export.name}." if export else ".")


def verify(checkpoint: str | Path, quick: bool = False) -> tuple[bool, str]:
    """Run `python -m backend verify` on a checkpoint; (valid, its output)."""
    argv = [sys.executable, "-m", "backend", "verify", str(checkpoint)] + (["--quick"] if quick else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(launcher.PROJECT_ROOT)}
    try:
        done = subprocess.run(argv, cwd=launcher.PROJECT_ROOT, env=env, capture_output=True, text=True,
                              timeout=VERIFY_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return False, f"verification took longer than {VERIFY_TIMEOUT_S} s and was stopped"
    text = (done.stdout + ("\n" + done.stderr if done.returncode not in (0, 1) else "")).strip()
    return done.returncode == 0, text
