"""Run folders: <output_dir>/<run_name>/version_<N>/ and their status.json.

The run folder is the only interface between the GUI/CLI and the trainer (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from backend.config import TrainingConfig

VERSION_RE = re.compile(r"^version_(\d+)$")
STATES = ("starting", "running", "stopping", "finished", "stopped", "failed")
FINAL_STATES = ("finished", "stopped", "failed")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def version_dirs(run_dir: str | Path) -> list[Path]:
    """The version_N folders of one run, by N."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := VERSION_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def create_version_dir(output_dir: str | Path, run_name: str) -> Path:
    """Make the next version_N folder. mkdir is atomic, so two launches never share a folder."""
    run_dir = Path(output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = version_dirs(run_dir)
    n = int(VERSION_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
    while True:
        path = run_dir / f"version_{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def write_run_files(version_dir: Path, cfg: TrainingConfig, command: list[str]) -> None:
    """config.json (frozen), hparams.yaml (complete, human-readable) and command.txt."""
    data = cfg.model_dump(mode="json")
    atomic_write_text(version_dir / "config.json", json.dumps(data, indent=2) + "\n")
    header = f"# Lathe run {cfg.run_name} / {version_dir.name}: every setting, defaults included.\n"
    atomic_write_text(version_dir / "hparams.yaml", header + yaml.safe_dump(data, sort_keys=False))
    atomic_write_text(version_dir / "command.txt", command_text(command) + "\n")


def command_text(argv: list[str]) -> str:
    """A copy-pasteable POSIX rendering of an argv (for display only; nothing runs it via a shell)."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def read_status(version_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(version_dir) / "status.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def update_status(version_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into status.json atomically and return the new status."""
    status = read_status(version_dir)
    status.update(fields)
    atomic_write_text(Path(version_dir) / "status.json", json.dumps(status, indent=1) + "\n")
    return status


def new_status(version_dir: Path, total_steps: int | None = None) -> dict[str, Any]:
    now = time.time()
    return update_status(
        version_dir,
        state="starting",
        pid=None,
        pgid=None,
        started_at=now,
        heartbeat_at=now,
        step=0,
        total_steps=total_steps,
        exit_code=None,
        error=None,
    )
