"""Checkpoint and export naming (contract), pure and torch-free.

State checkpoints live in <version>/checkpoints/<name>/, exports in <version>/exports/<file>:
  state:  epoch-000003, step-00000900, stop-00000950, final, best
  export: <run>-000003.safetensors, <run>-step00000900.safetensors, <run>.safetensors, <run>-best.safetensors
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.hashed_io import (  # noqa: F401 (re-exported: callers use backend.checkpoints)
    _WRITTEN,
    DIGESTS,
    IO_THREADS,
    CorruptFile,
    VerifiedReader,
    digest_file,
    file_digests,
    fsync_dir,
    known_digests,
    mismatch,
    read_hashed,
    run_parallel,
    sha256_file,
    verify_digest,
    write_file,
)

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


# ------------------------------------------------------------------------------------------ manifest

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
STATUSES = ("valid", "incomplete", "corrupt", "config-mismatch")


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `folder` and write manifest.json last (fsynced). Returns the manifest.
    Files written with `write_file` are not read back: their hash was taken while writing."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            digests = known_digests(p) or file_digests(p)
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, **digests}
    manifest = {**info, "created": time.time(), "files": files}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def check_files(folder: Path, manifest: dict[str, Any], hashes: bool = True) -> list[str]:
    """Problems with the files a manifest lists: missing, wrong size, wrong hash. Empty means intact.
    The hashes are computed on IO_THREADS threads."""
    problems, to_hash = [], []
    for rel, meta in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta.get("bytes"):
            problems.append(f"{rel}: size {p.stat().st_size} != {meta.get('bytes')} in the manifest")
        elif hashes:
            to_hash.append(rel)
    to_hash.sort(key=lambda r: -(manifest["files"][r].get("bytes") or 0))
    algos = [verify_digest(manifest["files"][rel]) for rel in to_hash]
    digests = run_parallel([lambda p=folder / rel, a=a: digest_file(p, a) for rel, a in zip(to_hash, algos, strict=True)])
    problems += [mismatch(rel, a) for rel, a, d in zip(to_hash, algos, digests, strict=True)
                 if d != manifest["files"][rel].get(a)]
    return problems


def epoch_label(manifest: dict[str, Any]) -> str:
    """A save's epoch as the Run tab and the step events count it: a save at an epoch's end says that
    epoch ("3"); a save inside an epoch says the epoch in progress and how far ("4 (2/16)"), not the
    epochs completed (the manifest's `epoch`)."""
    epoch, batch, per = manifest.get("epoch"), manifest.get("batch_in_epoch"), manifest.get("steps_per_epoch")
    if epoch is None:
        return ""
    if batch and per:
        return f"{epoch + 1} ({batch}/{per})"
    return str(epoch)


def checkpoint_status(folder: Path, config_hash: str | None = None, hashes: bool = True) -> tuple[str, list[str]]:
    """(status, problems): incomplete (no valid manifest), corrupt (files differ), config-mismatch, valid."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "incomplete", ["no valid manifest.json (the save did not finish)"]
    problems = check_files(folder, manifest, hashes)
    if problems:
        return "corrupt", problems
    if config_hash is not None and manifest.get("config_hash") != config_hash:
        return "config-mismatch", ["saved with a different config than this run's config.json"]
    return "valid", []


# ------------------------------------------------------------------------------------ atomic writes
class AtomicDir:
    """Write a checkpoint folder atomically: fill `<name>.tmp/`, fsync, manifest last, rename into place.

    Replacing an existing folder (final, best) moves the old one to `<name>.old` first and removes it
    after the rename; `recover()` at the next start puts a `.old` back if the new one never arrived.
    """

    def __init__(self, parent: Path, name: str):
        self.parent, self.name = parent, name
        self.final = parent / name
        self.tmp = parent / (name + TMP_SUFFIX)

    def __enter__(self) -> Path:
        self.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        for p in self.tmp.rglob("*"):
            if p.is_file() and str(p) not in _WRITTEN:  # write_file fsynced its own
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        manifest = write_manifest(self.tmp, info)
        fsync_dir(self.tmp)
        old = self.parent / (self.name + OLD_SUFFIX)
        if self.final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.final, old)
        os.rename(self.tmp, self.final)
        fsync_dir(self.parent)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            inside = str(self.tmp) + os.sep
            for key in [k for k in _WRITTEN if k.startswith(inside)]:
                del _WRITTEN[key]


def recover(checkpoints_dir: Path) -> list[str]:
    """At start: remove stale `*.tmp` folders, restore a `.old` whose replacement never landed."""
    actions = []
    if not checkpoints_dir.is_dir():
        return actions
    for p in sorted(checkpoints_dir.iterdir()):
        if p.name.endswith(TMP_SUFFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed unfinished save {p.name}")
        elif p.name.endswith(OLD_SUFFIX) and p.is_dir():
            target = checkpoints_dir / p.name[: -len(OLD_SUFFIX)]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, target)
                actions.append(f"restored {target.name} from an interrupted replacement")
    return actions


# ------------------------------------------------------------------------------------------ rotation
@dataclass(frozen=True)
class SavePoint:
    kind: str  # epoch | step | stop | final | best
    number: int | None
    name: str  # the state folder name (also identifies the export)


ROTATED = {"epoch": "save_last_n_epochs", "step": "save_last_n_steps"}


def plan_rotation(points: list[SavePoint], keep_epochs: int | None, keep_steps: int | None,
                  protected: frozenset[str] = frozenset()) -> list[SavePoint]:
    """Which save points to delete: beyond the newest N epoch (or step) saves. Pure.

    Never returns final, best or stop saves, nor anything named in `protected` (e.g. the checkpoint
    this run resumed from). `None` keeps everything of that kind.
    """
    doomed = []
    for kind, keep in (("epoch", keep_epochs), ("step", keep_steps)):
        if keep is None:
            continue
        mine = sorted((p for p in points if p.kind == kind and p.number is not None), key=lambda p: p.number, reverse=True)
        doomed += [p for p in mine[keep:] if p.name not in protected]
    return doomed


# ------------------------------------------------------------------------------------------- listing
def _version_dirs(path: Path) -> list[Path]:
    """A version folder itself, or every version_N folder of a run folder."""
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        return [path]
    found = [(int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := re.match(r"^version_(\d+)$", p.name))] \
        if path.is_dir() else []
    return [p for _, p in sorted(found)]


def _config_hash_of(version_dir: Path) -> str | None:
    try:
        from backend.config import TrainingConfig

        data = json.loads((version_dir / "config.json").read_text(encoding="utf-8"))
        return TrainingConfig.model_validate(data).config_hash()
    except Exception:  # noqa: BLE001 - an unreadable config just means no comparison
        return None


def list_checkpoints(path: str | Path, hashes: bool = True) -> list[dict[str, Any]]:
    """Every state checkpoint of a run or version folder, oldest first, with its status."""
    out = []
    for vdir in _version_dirs(Path(path)):
        cdir = vdir / "checkpoints"
        if not cdir.is_dir():
            continue
        cfg_hash = _config_hash_of(vdir)
        for folder in sorted(cdir.iterdir()):
            parsed = parse_state_name(folder.name)
            if parsed is None or not folder.is_dir():
                continue  # .tmp/.old leftovers and foreign folders are not checkpoints
            status, problems = checkpoint_status(folder, cfg_hash, hashes)
            m = read_manifest(folder) or {}
            out.append({
                "name": folder.name, "kind": parsed[0], "path": str(folder), "version": vdir.name,
                "step": m.get("step"), "epoch": m.get("epoch"), "batch_in_epoch": m.get("batch_in_epoch"),
                "steps_per_epoch": m.get("steps_per_epoch"), "loss": m.get("loss"), "val_loss": m.get("val_loss"),
                "bytes": sum(f.get("bytes", 0) for f in m.get("files", {}).values()) if m else None,
                "created": m.get("created"), "status": status, "problems": problems,
            })
    out.sort(key=lambda c: (c["created"] or 0.0, c["step"] or 0))
    return out


def latest(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`last`: the newest valid checkpoint (by step, then time). A function, never a copy."""
    valid = [c for c in checkpoints if c["status"] == "valid"]
    return max(valid, key=lambda c: (c["step"] or 0, c["created"] or 0.0)) if valid else None


def best(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The valid checkpoint with the lowest validation loss, if any has one."""
    scored = [c for c in checkpoints if c["status"] == "valid" and c["val_loss"] is not None]
    return min(scored, key=lambda c: c["val_loss"]) if scored else None


# ------------------------------------------------------------------------------------------ removal
def remove_state_folder(folder: Path) -> None:
    """Delete a checkpoint folder so that it is never seen half-deleted: rename it to `<name>.tmp`
    first (never listed, and removed by `recover` if a crash interrupts the rmtree)."""
    trash = folder.with_name(folder.name + TMP_SUFFIX)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def export_path(checkpoint: str | Path) -> Path | None:
    """The LoRA file saved together with a checkpoint (<version>/exports/<kohya name>), if it exists."""
    ck = Path(checkpoint)
    parsed = parse_state_name(ck.name)
    if parsed is None:
        return None
    run_name = (read_manifest(ck) or {}).get("run_name") or ck.parent.parent.parent.name
    path = ck.parent.parent / "exports" / export_name(run_name, parsed[0], parsed[1])
    return path if path.is_file() else None


def delete_checkpoint(checkpoint: str | Path) -> Path | None:
    """Delete a checkpoint folder and its export; returns the export removed (or None).
    Raises ValueError for anything that is not a Lathe checkpoint folder. The caller makes sure the
    run is not going (backend.runs / the GUI refuse that)."""
    ck = Path(checkpoint)
    if parse_state_name(ck.name) is None or ck.parent.name != "checkpoints" or not ck.is_dir():
        raise ValueError(f"{ck} is not a checkpoint folder")
    export = export_path(ck)
    remove_state_folder(ck)
    if export is not None:
        export.unlink(missing_ok=True)
    return export
