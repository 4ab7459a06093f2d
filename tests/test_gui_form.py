"""The GUI's pure parts: form <-> config (every field), validation messages, the saving preview, the
resume diff, the run view folded from a run folder, and that the GUI never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from backend.checkpoints import write_manifest
from backend.config import TrainingConfig
from backend.presets import list_presets, read_preset, resolve
from gui.form import (
    GENERAL,
    FormError,
    by_section,
    config_to_form,
    default_form,
    field_error,
    form_changes,
    form_to_config,
)
from gui.preview import resume_command, resume_preview, saving_preview, train_command
from gui.runner import plan_for
from gui.schema import SECTIONS, FieldSpec, field_specs, spec_for_path, specs_by_key
from tests.conftest import ENV, ROOT, demo_config

# A valid value different from the default, for fields where "default + something" would not do.
ALTERNATIVES: dict[str, Any] = {
    "training.adaptive_noise_scale": "0.01", "training.ip_noise_gamma": "0.1",
    "optimizer.growth_rate": "1.02", "optimizer.beta3": "0.5", "optimizer.betas": "0.8, 0.95",
    "dataset.caption_extension": ".caption", "launch.gpu_ids": "0,1", "launch.main_process_ip": "10.0.0.1",
    "launch.machine_rank": 1, "launch.num_machines": 2, "training.max_train_steps": "500", "network.train_unet": False,
    "dataset.validation_split": 0.25, "dataset.max_bucket_reso": 1032, "training.t5xxl_max_token_length": "128",
}
# Other fields a value needs to be valid (cross-field rules), by config path.
NEEDS: dict[str, dict[str, Any]] = {
    "training.adaptive_noise_scale": {"training.noise_offset": 0.05},
    "launch.machine_rank": {"launch.num_machines": 2, "launch.num_processes": 2, "launch.main_process_ip": "10.0.0.1"},
    "launch.num_machines": {"launch.main_process_ip": "10.0.0.1", "launch.num_processes": 2},
    "saving.save_last_n_epochs": {"saving.save_every_n_epochs": "1"},
    "saving.save_last_n_steps": {"saving.save_every_n_steps": "100"},
    "training.max_train_steps": {"training.max_train_epochs": ""},
    "network.train_unet": {"network.train_text_encoder": True},
    "scheduler.warmup_steps": {"scheduler.type": "constant_with_warmup"},  # constant has no warmup
    "scheduler.lr_warmup": {"scheduler.type": "constant_with_warmup"},
    "network.use_tucker": {"network.conv_rank": 4},  # Tucker decomposes the convolutions
}
TYPE_KEYS = {"network.type", "optimizer.type"}  # the type selectors of the discriminated sections


def form_key(spec: FieldSpec, path: str) -> str:
    """The form key of config `path` next to `spec`: `network.loha.conv_rank` beside a loha field."""
    section, _, rest = path.partition(".")
    return f"{section}.{spec.variant}.{rest}" if spec.union == section else path


def alternative(spec: FieldSpec) -> Any:
    if spec.path in ALTERNATIVES:
        return ALTERNATIVES[spec.path]
    d = spec.default
    if spec.kind == "bool":
        return not d
    if spec.kind in ("choice", "tristate"):
        return next(c for c in reversed(spec.choices) if c != d)
    if spec.kind == "lines":
        return "alpha\nbeta"
    if spec.kind == "table":  # two rows, the second with every cell filled, the first with blanks
        return [["extra/a", "3", "", "sks dog"] + [""] * (len(spec.columns) - 4),
                ["extra/b", "2", "true", "", ".caption", "true", "1", "false", "0.1"]]
    if spec.kind == "text":
        return "other/value" if spec.optional or "/" in d else f"x{d.strip('.')}x" if d else "x"
    if spec.as_text:
        return "3" if d == "" else str(float(d) / 2 if spec.kind == "float" else int(d) + 8)
    return d / 2 if spec.kind == "float" and d else (0.25 if spec.kind == "float" else d + 8)


def dump_at(cfg: TrainingConfig, path: str) -> Any:
    node: Any = cfg.model_dump(mode="json")
    for part in path.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("spec", field_specs(), ids=lambda s: s.key)
def test_every_field_round_trips_config_form_config(spec: FieldSpec):
    """Set one field to a non-default value on the form: it reaches the config, and config -> form ->
    config gives the same config back with the same value in that field."""
    form = default_form()
    if spec.union:
        form[f"{spec.union}.type"] = spec.variant
    if spec.key not in TYPE_KEYS:
        form.update({form_key(spec, p): v for p, v in NEEDS.get(spec.path, {}).items()})
    form[spec.key] = alternative(spec)
    cfg = form_to_config(form)
    default_cfg = TrainingConfig() if not spec.union else form_to_config({f"{spec.union}.type": spec.variant})
    assert dump_at(cfg, spec.path) != dump_at(default_cfg, spec.path), "the form value did not reach the config"
    again = config_to_form(cfg)
    assert form_to_config(again) == cfg
    assert form_to_config(config_to_form(form_to_config(again))) == cfg


@pytest.mark.parametrize("info", list_presets(), ids=lambda p: p.name)
def test_shipped_presets_round_trip(info):
    cfg = read_preset(info.path).config
    assert form_to_config(config_to_form(cfg)) == cfg


def test_every_setting_has_a_field_and_a_section():
    from backend.config_keys import setting_paths

    paths = {s.path for s in field_specs()}
    assert set(setting_paths()) - {"schema_version"} <= paths
    assert {s.section for s in field_specs()} == set(SECTIONS)
    prodigy = {s.key.rsplit(".", 1)[1] for s in field_specs() if s.variant == "Prodigy"}
    assert {"d_coef", "d0", "growth_rate", "use_bias_correction", "safeguard_warmup", "decouple"} <= prodigy
    assert not any(s.variant == "AdamW" and s.key.endswith("d_coef") for s in field_specs())
    d_coef = specs_by_key()["optimizer.Prodigy.d_coef"]
    assert d_coef.default == 1.0 and "more than 0, at most 100" in d_coef.help and not d_coef.advanced
    assert (d_coef.union, d_coef.variant, d_coef.path) == ("optimizer", "Prodigy", "optimizer.d_coef")


def test_each_network_type_has_its_own_fields_and_defaults():
    from backend.config import NETWORK_TYPES, OPTIMIZER_TYPES

    by_key = specs_by_key()
    network = [s for s in field_specs() if s.section == "Network"]
    assert network[0].key == "network.type" and network[0].label == "Network type"
    assert list(network[0].choices) == NETWORK_TYPES and network[0].default == "lora"
    assert list(by_key["optimizer.type"].choices) == OPTIMIZER_TYPES and by_key["optimizer.type"].label == "Optimizer"
    fields = {t: {s.key.rsplit(".", 1)[1] for s in network if s.variant == t} for t in NETWORK_TYPES}
    assert "dropout" in fields["lora"] and "conv_rank" not in fields["lora"]
    assert {"conv_rank", "use_tucker"} <= fields["loha"] and "dropout" not in fields["loha"]
    assert {"lokr_factor", "decompose_both"} <= fields["lokr"] and "lokr_factor" not in fields["loha"]
    assert (by_key["network.lora.rank"].default, by_key["network.loha.rank"].default) == (16, 8)
    assert by_key["network.loha.rank"].path == "network.rank" and by_key["network.loha.rank"].union == "network"


def test_the_form_holds_only_the_chosen_network_types_fields():
    """A loha form gives a loha network from its loha fields; the lora fields' values are ignored,
    and the form of that config shows the other types at their defaults."""
    form = {**default_form(), "network.type": "loha", "network.loha.rank": 4, "network.loha.conv_rank": 2,
            "network.lora.rank": 0, "network.lora.dropout": 0.5}
    cfg = form_to_config(form)
    assert (cfg.network.type, cfg.network.rank, cfg.network.conv_rank) == ("loha", 4, 2)
    assert not hasattr(cfg.network, "dropout")
    again = config_to_form(cfg)
    assert (again["network.type"], again["network.loha.rank"], again["network.loha.conv_rank"]) == ("loha", 4, 2)
    assert (again["network.lora.rank"], again["network.locon.conv_rank"]) == (16, 8)  # their own defaults
    assert form_to_config(again) == cfg
    changes = form_changes(default_form(), again)
    assert "Network › Network type: lora → loha" in changes and "Network › Rank (network_dim): 16 → 4" in changes
    assert not any("Dropout" in c for c in changes)  # lora's field is not part of a loha network


# ------------------------------------------------------------------------------------ messages
def errors_of(**changes: Any) -> list[str]:
    form = {**default_form(), **{k.replace("__", "."): v for k, v in changes.items()}}
    with pytest.raises(FormError) as info:
        form_to_config(form)
    return [str(e) for e in info.value.errors]


def test_validation_messages_name_section_and_label():
    assert errors_of(network__lora__rank=0) == ["Network › Rank (network_dim): must be at least 1; got 0"]
    assert errors_of(training__seed=1.5) == ["Schedule › Seed: must be a whole number; got 1.5"]
    assert errors_of(training__train_batch_size=None) == ["Schedule › Batch size: required: enter a number"]
    assert errors_of(saving__save_last_n_epochs="2") == [
        "Saving › Keep newest N epoch saves: needs save_every_n_epochs (how often to save an epoch checkpoint)"]
    assert errors_of(training__max_train_steps="100") == [
        "Schedule › Epochs: set exactly one of max_train_epochs or max_train_steps (both are set; clear one)"]
    assert errors_of(training__max_train_steps="ten") == ["Schedule › Steps (instead of epochs): must be a number; got 'ten'"]
    assert errors_of(run_name="my run") == [
        "Saving › Run name: use 1-80 letters, digits, '.', '_' or '-', not starting with '.' (it names a folder)"]


def test_optimizer_errors_go_to_the_chosen_optimizers_field():
    lines = errors_of(optimizer__type="Prodigy", **{"optimizer__Prodigy__d_coef": -1, "optimizer__Prodigy__betas": "0.9"})
    assert lines == ["Optimizer › Betas: must be two numbers separated by a comma, e.g. 0.9, 0.999; got '0.9'",
                     "Optimizer › d_coef: must be greater than 0; got -1.0"]
    # AdamW's d_coef-like typo field does not exist: another optimizer's values are ignored, not errors.
    assert form_to_config({**default_form(), "optimizer.Prodigy.d_coef": -1}).optimizer.type == "AdamW"


def test_every_error_is_reported_at_once_and_grouped_by_section():
    form = {**default_form(), "network.lora.rank": 0, "dataset.resolution": 500, "sampling.steps": 0, "training.seed": "x"}
    with pytest.raises(FormError) as info:
        form_to_config(form)
    grouped = by_section(info.value.errors)
    assert [e.label for e in grouped["Network"]] == ["Rank (network_dim)"]
    assert [e.message for e in grouped["Dataset"]] == ["must be a multiple of 8; got 500"]
    assert len(grouped["Sampling"]) == 1 and len(grouped["Schedule"]) == 1
    assert not grouped[GENERAL]


def test_launch_problems_are_placed_like_validation_errors():
    e = field_error("model.pretrained_model: /nowhere does not exist")
    assert (e.section, e.label, e.message) == ("Model", "Base model", "/nowhere does not exist")
    e = field_error("another run is active in this output folder on the CPU: runs/x (running)", {"optimizer": "AdamW"})
    assert e.section == GENERAL and e.message.startswith("another run is active")
    assert field_error("optimizer.text_encoder_lr: x", {"optimizer": "Prodigy"}).key == "optimizer.Prodigy.text_encoder_lr"
    assert field_error("optimizer.text_encoder_lr: x").key == "optimizer.AdamW.text_encoder_lr"  # the default type


def test_validate_makes_the_start_checks_and_start_refuses_what_it_shows(demo, tmp_path):
    """Validate runs the very checks Start makes (gui.runner.start_problems) and places each next to
    its field; Start refuses on the same lines and creates nothing."""
    from gui.runner import Runner, StartRefused, start_problems
    from gui.tabs.setup import check_form

    good = config_to_form(resolve(demo_config(demo, tmp_path / "runs")))
    assert check_form(good).errors == []
    checked = check_form({**good, "dataset.train_data_dir": str(tmp_path / "none"), "model.family": "sdxl"})
    assert checked.cfg is not None  # a valid config: only the launch checks fail
    assert [(e.section, e.label, e.key) for e in checked.errors] == [
        ("Model", "Model family", "model.family"), ("Dataset", "Image folder", "dataset.train_data_dir")]
    assert "is an SD 1.x model" in checked.errors[0].message and "does not exist" in checked.errors[1].message
    with pytest.raises(StartRefused) as refused:
        Runner(tmp_path / "runs").start(checked.cfg)
    assert refused.value.lines == start_problems(checked.cfg)
    assert [field_error(line) for line in refused.value.lines] == checked.errors
    assert not (tmp_path / "runs").exists()


def test_network_errors_go_to_the_chosen_network_types_field():
    lines = errors_of(network__type="loha", network__loha__conv_rank=-1)
    assert lines == ["Network › Conv rank (conv_dim): must be at least 0; got -1"]
    with pytest.raises(FormError) as info:
        form_to_config({**default_form(), "network.type": "loha", "network.loha.conv_rank": -1})
    assert [e.key for e in info.value.errors] == ["network.loha.conv_rank"]
    # A validation line names the config path; the chosen type decides which field it lands next to.
    assert field_error("network.conv_rank: must be at least 0", {"network": "loha"}).key == "network.loha.conv_rank"
    assert field_error("network.conv_rank: x", {"network": "locon"}).key == "network.locon.conv_rank"
    assert spec_for_path("network.rank", {"network": "lokr", "optimizer": "SGD"}).key == "network.lokr.rank"
    assert field_error("network: unknown network type 'x'", {"network": "x"}).key == "network.type"
    # A cross-field rule of the type (Tucker needs convolutions) names its field.
    lines = errors_of(network__type="lokr", network__lokr__use_tucker=True)
    assert len(lines) == 1 and lines[0].startswith("Network › Tucker decomposition: Tucker decomposition applies")


def test_form_changes_say_what_a_load_changed():
    old = default_form()
    new = config_to_form(form_to_config({**old, "optimizer.type": "Prodigy", "optimizer.Prodigy.d_coef": 0.8,
                                         "network.lora.rank": 8}))
    changes = form_changes(old, new)
    assert "Optimizer › Optimizer: AdamW → Prodigy" in changes
    assert "Network › Rank (network_dim): 16 → 8" in changes
    assert "Optimizer › d_coef: 1 → 0.8" in changes
    assert "Optimizer › Learning rate: 0.0001 → 1" in changes  # AdamW's rate before, Prodigy's now
    assert form_changes(new, new) == []


# ------------------------------------------------------------------------------------ saving preview
def cfg_with(**sections: dict) -> TrainingConfig:
    data = TrainingConfig().model_dump(mode="json")
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return TrainingConfig.model_validate(data)


@pytest.mark.parametrize(("training", "saving", "expected"), [
    ({"max_train_epochs": 10}, {"save_every_n_epochs": 1, "save_last_n_epochs": 2}, "epochs 9 and 10, plus final."),
    ({"max_train_epochs": 4}, {"save_every_n_epochs": 1, "save_last_n_epochs": 1}, "epoch 4, plus final."),
    ({"max_train_epochs": 10}, {"save_every_n_epochs": 2, "save_last_n_epochs": 3}, "epochs 6, 8 and 10, plus final."),
    ({"max_train_epochs": 3}, {"save_every_n_epochs": 1}, "epochs 1, 2 and 3, plus final."),
    ({"max_train_epochs": 20}, {"save_every_n_epochs": 1}, "epochs 1, 2, 3, … 20 (20 saves), plus final."),
    ({"max_train_epochs": None, "max_train_steps": 1000}, {"save_every_n_steps": 100, "save_last_n_steps": 3},
     "steps 800, 900 and 1000, plus final."),
    ({"max_train_epochs": 5}, {"save_every_n_steps": 50, "save_last_n_steps": 2},
     "the newest 2 step saves (one every 50 steps), plus final."),
    ({"max_train_epochs": 5}, {"save_every_n_epochs": 1, "save_last_n_epochs": 2, "save_every_n_steps": 50},
     "epochs 4 and 5 and every step save (one every 50 steps, none deleted), plus final."),
])
def test_saving_preview_says_which_checkpoints_survive(training, saving, expected):
    text = saving_preview(cfg_with(training=training, saving=saving))
    assert text.startswith(f"Kept at the end: {expected}"), text
    assert "resumable state checkpoint plus a LoRA file" in text and "stop checkpoint" in text


def test_saving_preview_warns_about_no_saves_best_and_state():
    text = saving_preview(cfg_with(dataset={"validation_split": 0.2}))
    assert text.startswith("Kept at the end: only final and best (lowest validation loss). Nothing is saved")
    text = saving_preview(cfg_with(saving={"save_state": False, "save_every_n_epochs": 5}))
    assert "plus final." in text and "none of them can be resumed" in text and "Stop saves nothing" in text


def test_train_command_reproduces_the_config(tmp_path):
    cfg = cfg_with(network={"rank": 8}, saving={"save_every_n_epochs": 1, "save_last_n_epochs": 2})
    script = train_command(cfg)
    assert script.endswith("python -m backend train lora.json")
    body = script.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0]
    from backend.presets import resolve

    assert resolve(json.loads(body)) == cfg


# ------------------------------------------------------------------------------------ resume diff
def fake_checkpoint(tmp: Path, **training: Any) -> tuple[Path, TrainingConfig]:
    """A valid (manifest-checked) checkpoint folder of a 4-epoch run with 16 steps per epoch."""
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "model_index.json").write_text("{}")
    (tmp / "images").mkdir(exist_ok=True)
    (tmp / "images" / "a.png").write_bytes(b"")  # the preflight wants an image; nothing here decodes it
    cfg = cfg_with(model={"pretrained_model": str(tmp / "model")}, dataset={"train_data_dir": str(tmp / "images")},
                   training={"max_train_epochs": 4, **training})
    cfg = TrainingConfig.model_validate({**cfg.model_dump(mode="json"), "output_dir": str(tmp / "runs")})
    ck = tmp / "runs" / "lora" / "version_0" / "checkpoints" / "stop-00000020"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    write_manifest(ck, {"run_name": "lora", "kind": "stop", "step": 20, "epoch": 1, "steps_per_epoch": 16,
                        "batch_in_epoch": 4, "config_hash": cfg.config_hash()})
    return ck, cfg


def test_resume_with_the_checkpoints_settings_changes_nothing(tmp_path):
    ck, _ = fake_checkpoint(tmp_path)
    cfg, plan, problems = plan_for(ck)
    assert problems == [] and plan.changed == [] and cfg.resume_from == str(ck)
    text = resume_preview(plan)
    assert "Resume from `lora/version_0/stop-00000020`** (step 20, epoch 2 (4/16))" in text  # as the Run tab counts
    assert "No setting differs" in text
    assert resume_command(ck, plan.changed) == f"python -m backend resume {ck}"


def test_resume_diff_shows_allowed_changes_and_the_cli_equivalent(tmp_path):
    ck, cfg = fake_checkpoint(tmp_path)
    base = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_train_epochs": 8})})
    _, plan, problems = plan_for(ck, base)
    assert problems == [] and plan.changed == [("training.max_train_epochs", 4, 8)]
    assert "- `training.max_train_epochs`: 4 → 8" in resume_preview(plan)
    assert resume_command(ck, plan.changed).endswith("--set training.max_train_epochs=8")


def test_resume_refuses_frozen_changes_and_finished_training_with_reasons(tmp_path):
    ck, cfg = fake_checkpoint(tmp_path)
    base = cfg.model_copy(update={"network": cfg.network.model_copy(update={"rank": 8})})
    _, plan, problems = plan_for(ck, base)
    assert not plan.ok and problems == plan.refused
    assert problems[0].startswith("network.rank cannot change on resume (16 -> 8): the network's type, shape")
    assert "**Cannot resume:**" in resume_preview(plan)
    short = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_train_epochs": 1})})
    _, plan, problems = plan_for(ck, short)
    assert any("training is already complete at this checkpoint (step 20 of 16" in p for p in problems)
    _, plan, problems = plan_for(tmp_path / "nothing")
    assert plan is None and "not a checkpoint folder" in problems[0]


# ------------------------------------------------------------------------------------ run view
def write_run(v: Path, events: list[dict], status: dict, log: str) -> None:
    v.mkdir(parents=True, exist_ok=True)
    (v / "events.jsonl").write_text("".join(json.dumps({"time": time.time(), **e}) + "\n" for e in events))
    (v / "status.json").write_text(json.dumps(status))
    (v / "train.log").write_text(log)


def test_run_view_folds_the_run_folder_and_reads_only_what_is_new(tmp_path):
    from backend.follow import Follower
    from gui.display import progress_text, state_banner
    from gui.live import RunView

    v = tmp_path / "runs" / "demo" / "version_0"
    steps = [{"event": "step", "step": i, "epoch": 1, "loss": 1.0 / i, "lr": 1e-3, "d": 2e-6 * i, "eta_s": 10 - i}
             for i in range(1, 5)]
    write_run(v, [{"event": "run_started", "total_steps": 8, "total_epochs": 2}, *steps,
                  {"event": "checkpoint_saved", "name": "epoch-000001", "step": 4, "bytes": 2_000_000, "seconds": 0.5},
                  {"event": "checkpoint_removed", "name": "epoch-000000", "reason": "save_last_n_epochs=1: ..."},
                  {"event": "sample_saved", "path": str(v / "samples/epoch-000001/0.png"), "prompt": "a star"}],
              {"state": "running", "step": 4, "total_steps": 8, "pid": None, "started_at": time.time()},
              "loading\ntrain: 10%\rtrain: 50%\n")  # no pid yet and just started: "being launched", not dead
    view = RunView(v, Follower(v))
    view.poll(force=True)
    assert [p[1] for p in view.curves["loss"]] == [1.0, 0.5, 1.0 / 3, 0.25] and len(view.curves["Prodigy d"]) == 4
    assert view.log_text() == "loading\ntrain: 50%"
    assert "saved checkpoint epoch-000001 (step 4, 2.0 MB" in view.activity[0]
    assert "removed checkpoint epoch-000000: save_last_n_epochs=1" in view.activity[1]
    assert progress_text(view).startswith("step 4/8 · epoch 1/2") and "ETA 0:06" in progress_text(view)
    assert 'data-state="running"' in state_banner(view)
    revs = dict(view.revs)
    with open(v / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "step", "time": time.time(), "step": 5, "epoch": 2, "loss": 0.2, "lr": 1e-3}) + "\n")
    view.poll(force=True)
    assert len(view.curves["loss"]) == 5 and view.revs["curves"] == revs["curves"] + 1
    assert view.revs["samples"] == revs["samples"] and view.revs["activity"] == revs["activity"]
    (v / "status.json").write_text(json.dumps({"state": "failed", "step": 5, "error": "CUDA out of memory (...)"}))
    view.poll(force=True)
    assert "Failed" in state_banner(view) and "CUDA out of memory" in state_banner(view)


def test_samples_are_grouped_by_save_point_with_prompts(tmp_path):
    from gui.samples import grid_html, save_points

    v = tmp_path / "demo" / "version_0"
    for label in ("final", "epoch-000002", "epoch-000004"):
        (v / "samples" / label).mkdir(parents=True)
        for i in range(2):
            (v / "samples" / label / f"{i}.png").write_bytes(b"png")
    (v / "config.json").write_text(json.dumps({"sampling": {"prompts": ["a red circle", "a <star>"]}}))
    events = [{"event": "sample_saved", "path": str(v / "samples" / lab / "0.png"), "prompt": "a red circle", "step": s}
              for lab, s in (("epoch-000002", 32), ("epoch-000004", 64), ("final", 64))]
    write_run(v, events, {"state": "finished"}, "")
    points = save_points(v)
    assert [p.title for p in points] == ["epoch 2", "epoch 4", "final"]
    assert points[0].images[1][1] == "a <star>" and points[0].step == 32
    html = grid_html(points)
    assert html.count('class="lathe-sp"') == 3 and "a &lt;star&gt;" in html and "/gradio_api/file=" in html


def test_delete_removes_a_checkpoint_and_its_lora_file_and_knows_its_export(tmp_path):
    from backend.checkpoints import export_path
    from gui.checkpoint_actions import checkpoint_rows, delete_checkpoint

    v = tmp_path / "demo" / "version_0"
    (v / "exports").mkdir(parents=True)
    saves = (("epoch-000002", "demo-000002.safetensors", 32, 2, 0), ("step-00000034", "demo-step00000034.safetensors", 34, 2, 2),
             ("final", "demo.safetensors", 34, 2, 2))
    for name, export, step, epoch, batch in saves:
        (v / "checkpoints" / name).mkdir(parents=True)
        (v / "checkpoints" / name / "lora.safetensors").write_bytes(b"x" * 10)
        write_manifest(v / "checkpoints" / name, {"run_name": "demo", "step": step, "epoch": epoch, "loss": 0.5,
                                                  "batch_in_epoch": batch, "steps_per_epoch": 16, "created": step})
        (v / "exports" / export).write_bytes(b"lora")
    (v / "status.json").write_text(json.dumps({"state": "finished"}))
    rows, _ = checkpoint_rows(v)
    assert [r[0] for r in rows] == ["epoch-000002", "step-00000034", "final"] and rows[0][8] == "valid"
    assert rows[0][4] == "0.5000"
    # The epoch as the Run tab counts it: the end of epoch 2, then 2 of epoch 3's 16 steps (not "2").
    assert [r[3] for r in rows] == ["2", "3 (2/16)", "3 (2/16)"]
    assert export_path(v / "checkpoints" / "final") == v / "exports" / "demo.safetensors"
    assert delete_checkpoint(v / "checkpoints" / "epoch-000002").startswith("Deleted checkpoint **epoch-000002**")
    assert not (v / "checkpoints" / "epoch-000002").exists() and not (v / "exports" / "demo-000002.safetensors").exists()
    assert (v / "exports" / "demo.safetensors").exists()
    assert "not a checkpoint folder" in delete_checkpoint(v / "exports")


# ------------------------------------------------------------------------------------ app.py, imports
def test_app_refuses_to_listen_beyond_loopback_without_a_login(tmp_path, capsys):
    import app

    assert app.check_exposure("127.0.0.1", None, False) is None and app.check_exposure("::1", None, False) is None
    assert app.check_exposure("localhost", None, False) is None
    assert "refusing to listen on 0.0.0.0" in app.check_exposure("0.0.0.0", None, False)
    assert app.check_exposure("0.0.0.0", [("u", "p")], False) is None
    assert app.check_exposure("0.0.0.0", None, True) is None
    assert app.main(["--host", "0.0.0.0", "--output-dir", str(tmp_path)]) == 2
    assert "--auth" in capsys.readouterr().err
    creds = tmp_path / "users"
    creds.write_text("# team\nann:secret\n\nbob:pa:ss\n")
    assert app.parse_credentials(creds.read_text(), "f") == [("ann", "secret"), ("bob", "pa:ss")]
    with pytest.raises(ValueError, match="line 1"):
        app.parse_credentials("nopassword", "--auth")


def test_the_gui_never_imports_torch():
    code = ("import sys, app, gui.ui\nfrom gui.ui import build_ui\nbuild_ui(sys.argv[1])\n"
            "bad = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'backend.trainer') if m in sys.modules]\n"
            "print('BAD', bad)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "runs-never-created")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "BAD []"
