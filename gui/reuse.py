"""Reuse a run (no Gradio here): its settings loaded into Setup, or a finished run trained further.

"Train further" is a resume from the version's newest valid checkpoint with the run made longer:
`training.max_train_epochs` raised by N epochs (a run counted in epochs), or `training.max_train_steps`
raised by N steps (a run counted in steps, or when steps are asked for). The resume preflight
(plan_resume + preflight, through gui.runner.plan_for) decides whether it may start, exactly as for
a Resume click, and the plan shows the change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from backend import checkpoints as C
from backend.config import ConfigError, TrainingConfig, validate_config
from backend.presets import read_json_object

Unit = Literal["epochs", "steps"]
MOST_MORE = 100_000


class ReuseError(Exception):
    """The run cannot be reused this way; the message says why."""


def run_settings(version_dir: str | Path) -> TrainingConfig:
    """The settings a version ran with, as a new run would take them: resume_from cleared (a new run
    starts fresh; Resume is the Checkpoints tab's own action)."""
    path = Path(version_dir) / "config.json"
    try:
        data = read_json_object(path)
    except ConfigError as e:
        raise ReuseError(f"{path}: {'; '.join(e.lines)}") from None
    data["resume_from"] = None
    try:
        return validate_config(data)
    except ConfigError as e:
        raise ReuseError(f"{path} no longer validates: {'; '.join(e.lines)}") from None


def last_checkpoint(version_dir: str | Path) -> Path:
    ck = C.latest(C.list_checkpoints(Path(version_dir)))
    if ck is None:
        raise ReuseError(f"{Path(version_dir).name} has no valid checkpoint to continue from (a run keeps one with "
                         "saving.save_state on)")
    return Path(ck["path"])


def longer(cfg: TrainingConfig, steps_per_epoch: int, more: int, unit: Unit) -> TrainingConfig:
    """`cfg` with `more` epochs or steps added to its length."""
    if not 1 <= more <= MOST_MORE:
        raise ReuseError(f"more: must be a whole number from 1 to {MOST_MORE}; got {more}")
    t = cfg.training
    data = cfg.model_dump(mode="json")
    if unit == "epochs" and t.max_train_steps is None:
        data["training"]["max_train_epochs"] = t.max_train_epochs + more
    else:
        total = t.max_train_steps if t.max_train_steps is not None else t.max_train_epochs * steps_per_epoch
        added = more * steps_per_epoch if unit == "epochs" else more
        data["training"].update(max_train_steps=total + added, max_train_epochs=None)
    try:
        return validate_config(data)
    except ConfigError as e:
        raise ReuseError("; ".join(e.lines)) from None


def further(version_dir: str | Path, more: int, unit: Unit) -> tuple[Path, TrainingConfig]:
    """(checkpoint to resume from, the longer config) for training `version_dir` further."""
    ckpt = last_checkpoint(version_dir)
    manifest = C.read_manifest(ckpt) or {}
    spe = int(manifest.get("steps_per_epoch") or 0)
    if spe <= 0:
        raise ReuseError(f"{ckpt.name}: its manifest has no steps_per_epoch; it cannot be trained further")
    try:
        base = validate_config({**read_json_object(ckpt / "config.json"), "resume_from": None})
    except ConfigError as e:
        raise ReuseError(f"{ckpt / 'config.json'}: {'; '.join(e.lines)}") from None
    return ckpt, longer(base, spe, more, unit)
