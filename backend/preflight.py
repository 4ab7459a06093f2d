"""Checks that need the file system, done before a process is started (validation cannot do them:
a preset is valid on any machine, a launch only where its files are)."""

from __future__ import annotations

from pathlib import Path

from backend.config import TrainingConfig


def preflight(cfg: TrainingConfig) -> list[str]:
    """`path: message` lines for everything that would make the launch fail at once."""
    out = []
    model = Path(cfg.model.pretrained_model).expanduser()
    if not model.exists():
        out.append(f"model.pretrained_model: {model} does not exist")
    elif model.is_dir() and not (model / "model_index.json").is_file():
        out.append(f"model.pretrained_model: {model} is a folder without model_index.json (not a diffusers model)")
    data = Path(cfg.dataset.train_data_dir).expanduser()
    if not data.is_dir():
        out.append(f"dataset.train_data_dir: folder {data} does not exist")
    if cfg.dataset.validation_data_dir and not Path(cfg.dataset.validation_data_dir).expanduser().is_dir():
        out.append(f"dataset.validation_data_dir: folder {cfg.dataset.validation_data_dir} does not exist")
    if cfg.launch.accelerate_config_file and not Path(cfg.launch.accelerate_config_file).expanduser().is_file():
        out.append(f"launch.accelerate_config_file: {cfg.launch.accelerate_config_file} does not exist")
    if cfg.resume_from and not Path(cfg.resume_from).expanduser().is_dir():
        out.append(f"resume_from: checkpoint folder {cfg.resume_from} does not exist")
    return out
