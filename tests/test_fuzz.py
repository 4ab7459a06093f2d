"""Fuzzing the edges: random configs, presets, --set items, preset names, kohya files and dataset
bytes. Every input ends in a valid config or `path: message` errors, never an unhandled exception.

FUZZ_EXAMPLES scales the number of cases (default 150 per property; the count tried is printed with
`pytest -s`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.config import ConfigError, TrainingConfig
from backend.config_keys import setting_paths
from backend.kohya import import_kohya
from backend.presets import load_config_or_preset, resolve, sanitize_preset_name

N = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ERROR_LINE = re.compile(r"^(?![:\s])[^\n]*?\S: \S.*", re.S)  # "path: message", the path never empty

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.text(min_size=5000, max_size=6000),  # huge strings
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".hidden", "a/b", "C:\\x", "名前", "\u202e", "$(rm -rf /)",
                     "AdamW", "Prodigy", "cosine", "fp16", "bf16", "auto", "cpu", "0,1", "1e-4", "True", "512,512"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=8)
paths = st.sampled_from(list(setting_paths()) + ["optimizer.d_coeff", "saving.save_last_n_epoch", "bogus", "model.x.y"])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def nest(path: str, value: object) -> dict:
    out: object = value
    for key in reversed(path.split(".")):
        out = {key: out}
    return out  # type: ignore[return-value]


def check_outcome(fn, *args) -> TrainingConfig | None:
    try:
        cfg = fn(*args)
    except ConfigError as e:
        assert e.lines, "an error without a message"
        for line in e.lines:
            assert ERROR_LINE.match(line), line
        return None
    assert isinstance(cfg, TrainingConfig)
    return cfg


@FUZZ
@given(st.lists(st.tuples(paths, values), max_size=6))
def test_random_settings_validate_or_name_the_field(items):
    data: dict = {}
    from backend.presets import deep_merge

    for path, value in items:
        data = deep_merge(data, nest(path, value))
    cfg = check_outcome(resolve, data)
    if cfg is not None:  # a valid config round-trips through JSON unchanged
        assert resolve(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg


@FUZZ
@given(st.lists(st.tuples(paths, st.text(max_size=30)), max_size=4))
def test_random_set_items(items):
    check_outcome(resolve, {}, [f"{p}={v}" for p, v in items])


@FUZZ
@given(st.one_of(values, st.binary(max_size=200)))
def test_random_preset_files(scratch, content):
    path = scratch / "preset.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content, allow_nan=True))
    check_outcome(load_config_or_preset, path)


@FUZZ
@given(st.text(max_size=100))
def test_preset_names_never_escape(name):
    try:
        clean = sanitize_preset_name(name)
    except (ValueError, ConfigError):
        return
    assert clean and "/" not in clean and "\\" not in clean and ".." not in clean and not clean.startswith(".")
    assert Path(clean).name == clean


KOHYA_KEYS = ["pretrained_model_name_or_path", "train_data_dir", "output_name", "network_dim", "network_alpha", "optimizer",
              "optimizer_args", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler", "epoch", "max_train_steps",
              "train_batch_size", "save_every_n_epochs", "save_last_n_epochs", "save_every_n_steps", "save_last_n_steps",
              "resolution", "LoRA_type", "mixed_precision", "seed", "sample_prompts", "unknown_key"]


@FUZZ
@given(st.dictionaries(st.sampled_from(KOHYA_KEYS), values, max_size=10))
def test_random_kohya_configs_import_or_refuse(data):
    result = import_kohya(data, "fuzz.json")
    assert all(isinstance(line, str) for line in result.report())
    if result.ok:
        resolve(result.preset)  # what it produces validates
    else:
        assert result.refused or result.errors


@settings(max_examples=max(20, N // 10), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.lists(st.binary(max_size=100), min_size=1, max_size=4))
def test_random_bytes_as_images_and_captions_are_skipped_with_warnings(tmp_path_factory, blobs, captions):
    from PIL import Image

    from backend import dataset as D

    root = tmp_path_factory.mktemp("d")
    folder = root / "3_thing"
    folder.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "good.png")
    for i, b in enumerate(blobs):
        (folder / f"junk{i}.png").write_bytes(b)
    for i, c in enumerate(captions):
        (folder / f"junk{i}.txt").write_bytes(c)
    (folder / "good.txt").write_bytes(captions[0])
    found = D.discover(root)
    assert [Path(i.path).name for i in found.items] == ["good.png"]
    assert len(found.warnings) == len(blobs)
    assert isinstance(found.items[0].caption, str)
