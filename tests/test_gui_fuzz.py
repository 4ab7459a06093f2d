"""Fuzzing the GUI's handlers: random values, of every type and none, through the pure form->config
step, the Setup validation, the preset save / load / delete / upload / download handlers, the kohya_ss
import handler and the resume diff. Every input ends in a clear message (a field error, a ✖ status)
or a valid config, never an unhandled exception.

FUZZ_EXAMPLES scales the number of cases per property (default 100: a few seconds); the number of
handler calls made is printed at the end (`pytest -s`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.config import TrainingConfig
from gui.form import FieldError, FormError, form_to_config
from gui.schema import field_specs

N = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=N, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
CALLS: Counter[str] = Counter()
KEYS = [s.key for s in field_specs()]

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.text(min_size=3000, max_size=3500),
    st.sampled_from(["", " ", "auto", "yes", "no", "0", "-1", "1e309", "nan", "0.9, 0.999", "1,2,3", "(1 2)", "AdamW",
                     "Prodigy", "cosine", "fp16", "cpu", "cuda", "../../etc/passwd", "/etc/passwd", "demo/model",
                     "a\nb\n", "$(rm -rf /)", "名前", "\u202e", "\x00", "hf_" + "x" * 24]),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
forms = st.dictionaries(st.sampled_from(KEYS), junk, max_size=10)
names = st.one_of(st.text(max_size=90), st.sampled_from(["../x", "/etc/passwd", "demo", "ok name", ".x", "a/b", "CON",
                                                         "x.json", "", " "]), st.none(), st.integers())


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from gui.ui import build_ui

    base = tmp_path_factory.mktemp("fuzz-ui")
    os.environ["LATHE_PRESETS_DIR"] = str(base / "presets")
    try:
        _, page = build_ui(base / "runs")
        yield page
    finally:
        os.environ.pop("LATHE_PRESETS_DIR", None)
        print(f"\nGUI handler fuzzing: {sum(CALLS.values())} handler calls ({dict(CALLS)}), FUZZ_EXAMPLES={N}")


def data_for(page, values: dict[str, Any]) -> dict[Any, Any]:
    """A handler's {component: value} mapping: the first form with `values` laid over it."""
    first, _ = page.first_form()
    return {page.form.components[k]: v for k, v in {**first, **values}.items()}


def check_reply(out: Any, what: str) -> None:
    CALLS[what] += 1
    assert isinstance(out, dict) and out, f"{what} returned {out!r}"


def check_status(out: dict, status: Any, what: str) -> None:
    check_reply(out, what)
    text = str(out[status])
    assert text.strip() and ("Traceback" not in text), text


@FUZZ
@given(values=forms)
def test_form_to_config_gives_a_config_or_field_errors(values):
    CALLS["form_to_config"] += 1
    try:
        cfg = form_to_config(values)
    except FormError as e:
        assert e.errors and all(isinstance(x, FieldError) and x.message.strip() for x in e.errors)
        return
    assert isinstance(cfg, TrainingConfig)


@FUZZ
@given(values=forms)
def test_setup_validation_puts_every_problem_in_a_message(ui, values):
    from gui.tabs.setup import validate_values

    cfg, messages = validate_values(ui, values)
    check_reply(messages, "validate")
    summary = messages[ui.component("setup_summary")]
    assert (cfg is None) == ("problem" in str(summary.get("value", ""))), summary


@FUZZ
@given(values=forms, name=names, overwrite=st.booleans())
def test_preset_save_load_delete_handlers(ui, values, name, overwrite):
    panel, p = ui.tabs["presets"], ui.tabs["presets"].p
    data = data_for(ui, values)
    saved = panel.on_save({**data, p["name"]: name, p["overwrite"]: overwrite})
    check_status(saved, p["status"], "preset save")
    check_status(panel.on_load({**data, p["choice"]: name}), p["status"], "preset load")
    check_status(panel.on_download(data), p["status"], "preset download")
    check_status(panel.on_delete({p["choice"]: name}), p["status"], "preset delete")
    for f in ui.presets_dir.glob("*"):
        assert f.parent == ui.presets_dir and f.suffix == ".json"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
KOHYA_KEYS = ["LoRA_type", "network_dim", "network_alpha", "optimizer", "optimizer_args", "learning_rate", "epoch",
              "max_train_steps", "train_batch_size", "save_every_n_epochs", "save_last_n_epochs", "lr_scheduler",
              "mixed_precision", "seed", "resolution", "pretrained_model_name_or_path", "train_data_dir", "sample_prompts",
              "huggingface_token", "max_resolution", "text_encoder_lr", "unet_lr", "save_last_n_steps"]


@FUZZ
@given(body=st.one_of(st.dictionaries(st.sampled_from(KOHYA_KEYS) | st.text(max_size=8), json_values, max_size=8),
                      json_values, st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_preset_upload_and_kohya_import_handlers(ui, tmp_path_factory, body):
    panel, p = ui.tabs["presets"], ui.tabs["presets"].p
    folder = tmp_path_factory.mktemp("up")
    path = Path(folder) / "in.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body), encoding="utf-8")
    data = data_for(ui, {})
    check_status(panel.on_upload({**data, p["upload"]: str(path)}), p["status"], "preset upload")
    check_status(panel.on_kohya({**data, p["kohya"]: str(path)}), p["status"], "kohya import")


@pytest.fixture(scope="module")
def checkpoint(ui):
    """A valid-looking checkpoint folder inside the GUI's output folder, for the resume diff."""
    from backend.checkpoints import write_manifest

    root = ui.output_dir.parent
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "model_index.json").write_text("{}")
    (root / "images").mkdir(exist_ok=True)
    (root / "images" / "a.png").write_bytes(b"")  # the preflight wants an image; nothing here decodes it
    cfg = TrainingConfig.model_validate({"output_dir": str(ui.output_dir), "model": {"pretrained_model": str(root / "model")},
                                         "dataset": {"train_data_dir": str(root / "images")},
                                         "training": {"max_train_epochs": 4}})
    ck = ui.output_dir / "lora" / "version_0" / "checkpoints" / "stop-00000020"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    write_manifest(ck, {"run_name": "lora", "kind": "stop", "step": 20, "epoch": 1, "steps_per_epoch": 16,
                        "config_hash": cfg.config_hash()})
    return ck


@FUZZ
@given(values=forms, source=st.sampled_from(["setup", "checkpoint", None, "x"]),
       which=st.sampled_from(["real", "none", "outside", "junk"]))
def test_resume_diff_handler(ui, checkpoint, values, source, which):
    tab, c = ui.tabs["checkpoints"], ui.tabs["checkpoints"].c
    choice = {"real": str(checkpoint), "none": None, "outside": "/etc", "junk": "\x00../"}[which]
    out = tab.on_plan({**data_for(ui, values), c["choice"]: choice, c["source"]: source})
    check_reply(out, "resume diff")
    assert str(out[c["plan"]]).strip()
    if which != "real":
        assert out[c["resume"]]["interactive"] is False
