"""Reusing a run (gui/reuse.py): the settings a version ran with, loaded for a new run, and how
"train further" makes a run longer. The whole path (a finished run trained further in the browser,
through the resume preflight) is tests/test_gui_browser.py's
test_load_a_runs_settings_and_train_a_finished_run_further."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.config import validate_config
from gui.reuse import ReuseError, last_checkpoint, longer, run_settings


def version(tmp_path: Path, **sections) -> Path:
    v = tmp_path / "out" / "demo" / "version_0"
    v.mkdir(parents=True)
    cfg = validate_config({**sections, "resume_from": str(tmp_path / "elsewhere")})
    (v / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    return v


def test_run_settings_are_the_versions_own_for_a_fresh_run(tmp_path: Path):
    v = version(tmp_path, training={"max_train_epochs": 7, "seed": 5}, optimizer={"type": "Prodigy", "d_coef": 0.5})
    cfg = run_settings(v)
    assert (cfg.training.max_train_epochs, cfg.training.seed, cfg.optimizer.type, cfg.optimizer.d_coef) == (7, 5, "Prodigy", 0.5)
    assert cfg.resume_from is None  # a new run; resuming is the Checkpoints tab's own action


def test_a_broken_config_or_no_checkpoint_is_a_plain_refusal(tmp_path: Path):
    v = tmp_path / "v"
    v.mkdir()
    (v / "config.json").write_text("{not json")
    with pytest.raises(ReuseError, match="config.json"):
        run_settings(v)
    with pytest.raises(ReuseError, match="no valid checkpoint to continue from"):
        last_checkpoint(v)


@pytest.mark.parametrize("length, more, unit, want", [
    ({"max_train_epochs": 3}, 2, "epochs", {"max_train_epochs": 5, "max_train_steps": None}),
    ({"max_train_epochs": 3}, 10, "steps", {"max_train_epochs": None, "max_train_steps": 3 * 16 + 10}),
    ({"max_train_epochs": None, "max_train_steps": 40}, 2, "epochs", {"max_train_epochs": None, "max_train_steps": 72}),
    ({"max_train_epochs": None, "max_train_steps": 40}, 5, "steps", {"max_train_epochs": None, "max_train_steps": 45}),
])
def test_train_further_adds_epochs_or_steps_to_the_runs_length(length: dict, more: int, unit: str, want: dict):
    cfg = validate_config({"training": length})
    t = longer(cfg, 16, more, unit).training
    assert {"max_train_epochs": t.max_train_epochs, "max_train_steps": t.max_train_steps} == want


def test_train_further_by_nothing_is_refused():
    with pytest.raises(ReuseError, match="more: must be a whole number from 1"):
        longer(validate_config({}), 16, 0, "epochs")
