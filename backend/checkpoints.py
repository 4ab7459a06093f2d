"""Checkpoint and export naming (contract), pure and torch-free.

State checkpoints live in <version>/checkpoints/<name>/, exports in <version>/exports/<file>:
  state:  epoch-000003, step-00000900, stop-00000950, final, best
  export: <run>-000003.safetensors, <run>-step00000900.safetensors, <run>.safetensors, <run>-best.safetensors
"""

from __future__ import annotations

import re

KINDS = ("epoch", "step", "stop", "final", "best")


def state_name(kind: str, number: int | None = None) -> str:
    if kind == "epoch":
        return f"epoch-{number:06d}"
    if kind in ("step", "stop"):
        return f"{kind}-{number:08d}"
    if kind in ("final", "best"):
        return kind
    raise ValueError(f"unknown checkpoint kind {kind!r}")


def export_name(run_name: str, kind: str, number: int | None = None) -> str:
    if kind == "epoch":
        return f"{run_name}-{number:06d}.safetensors"
    if kind == "step":
        return f"{run_name}-step{number:08d}.safetensors"
    if kind == "stop":
        return f"{run_name}-stop{number:08d}.safetensors"
    if kind == "final":
        return f"{run_name}.safetensors"
    if kind == "best":
        return f"{run_name}-best.safetensors"
    raise ValueError(f"unknown export kind {kind!r}")


STATE_RE = re.compile(r"^(?:(epoch)-(\d{6})|(step|stop)-(\d{8})|(final|best))$")


def parse_state_name(name: str) -> tuple[str, int | None] | None:
    """('epoch', 3) for 'epoch-000003'; None for a name Lathe did not create."""
    m = STATE_RE.match(name)
    if not m:
        return None
    if m.group(1):
        return "epoch", int(m.group(2))
    if m.group(3):
        return m.group(3), int(m.group(4))
    return m.group(5), None
