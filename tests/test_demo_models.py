"""The SD2.x-768-v demo model (demo/model-sd2v): shaped like SD2-v where it matters, deterministic,
and loaded as family sd2 with v-prediction without being told."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from backend.presets import resolve
from backend.trainer.demo import build_sd2v
from tests.conftest import demo_config


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sd2v_has_the_sd2_v_features(demo: Path):
    root = demo / "model-sd2v"
    unet = json.loads((root / "unet" / "config.json").read_text())
    assert unet["use_linear_projection"] and unet["upcast_attention"] and unet.get("addition_embed_type") is None
    assert json.loads((root / "text_encoder" / "config.json").read_text())["hidden_act"] == "gelu"
    assert json.loads((root / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert json.loads((demo / ".complete").read_text())["version"] >= 2


def test_sd2v_is_built_byte_for_byte_the_same(demo: Path, tmp_path: Path):
    assert _digest(build_sd2v(tmp_path / "again")) == _digest(demo / "model-sd2v")


def test_sd2v_loads_as_sd2_with_v_prediction(demo: Path, tmp_path: Path):
    from backend.trainer.models import load_components

    data = demo_config(demo, tmp_path, model={"pretrained_model": str(demo / "model-sd2v"), "family": "auto"})
    comps = load_components(resolve(data))
    assert (comps.family, comps.v_prediction) == ("sd2", True)
