"""The model family picks the Setup fields (gui/family_fields.py): the table held against the config and
the trainer (what each family reads, refuses, ignores), the visibility of loaded presets and of auto
detection, hidden values that still validate, and a real browser switching families."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backend.config import FLOW_FIELDS, TrainingConfig
from backend.presets import load_preset
from gui.family_fields import (
    DDPM,
    FAMILIES,
    FLOW,
    FLOW_ACCEPTS,
    READ_BY,
    family_problems,
    family_specs,
    reads,
    shown,
    training_family,
    visibility,
)
from gui.form import config_to_form, field_error, form_to_config
from gui.schema import field_specs, specs_by_key

# A valid value other than the default for every family-dependent setting, and what it needs to mean
# anything (sigmoid_scale is read only by the sigmoid draws, logit_mean only by logit_normal...).
PROBES: dict[str, Any] = {
    "model.clip_l": "clip_l.safetensors", "model.t5xxl": "t5xxl.safetensors", "model.vae": "ae.safetensors",
    "model.clip_g": "clip_g.safetensors", "model.v_parameterization": True,
    "training.clip_skip": 2, "training.max_token_length": 150, "training.t5xxl_max_token_length": 128,
    "training.noise_offset": 0.05, "training.noise_offset_random_strength": True,
    "training.adaptive_noise_scale": 0.01, "training.multires_noise_iterations": 6,
    "training.multires_noise_discount": 0.5, "training.min_snr_gamma": 5.0, "training.zero_terminal_snr": True,
    "training.debiased_estimation_loss": True, "training.scale_v_pred_loss_like_noise_pred": True,
    "training.v_pred_like_loss": 0.5, "training.min_timestep": 300, "training.max_timestep": 700,
    "training.timestep_sampling": "uniform", "training.sigmoid_scale": 3.0, "training.discrete_flow_shift": 1.5,
    "training.training_shift": 3.0, "training.weighting_scheme": "logit_normal", "training.logit_mean": 1.0,
    "training.logit_std": 0.5, "training.mode_scale": 0.5, "training.model_prediction_type": "additive",
    "training.guidance_scale": 1.0, "network.network_weights": "start.safetensors",
    "sampling.sample_sampler": "euler", "training.blocks_to_swap": 4,
}
CONTEXT: dict[str, dict[str, Any]] = {
    "training.adaptive_noise_scale": {"training.noise_offset": 0.05},
    "training.noise_offset_random_strength": {"training.noise_offset": 0.05},
    "training.multires_noise_discount": {"training.multires_noise_iterations": 6},
    "training.sigmoid_scale": {"training.timestep_sampling": "sigmoid"},
    "training.discrete_flow_shift": {"training.timestep_sampling": "shift"},
    "training.logit_mean": {"training.weighting_scheme": "logit_normal"},
    "training.logit_std": {"training.weighting_scheme": "logit_normal"},
    "training.mode_scale": {"training.weighting_scheme": "mode"},
}


def probe_config(path: str, family: str = "auto", **more: Any) -> TrainingConfig:
    data: dict[str, Any] = {"model": {"family": family}, "optimizer": {"type": "AdamW"}}
    for p, v in {**CONTEXT.get(path, {}), path: PROBES[path], **more}.items():
        section, leaf = p.split(".")
        data.setdefault(section, {})[leaf] = v
    return TrainingConfig.model_validate(data)


def paths_of(lines: list[str] | str) -> set[str]:
    text = "; ".join(lines) if isinstance(lines, list) else lines
    return set(re.findall(r"(?:^|; )([a-z_]+\.[a-z_0-9]+): ", text))


def trainer_refusals(cfg: TrainingConfig, family: str) -> set[str]:
    """The config paths the family's trainer refuses at setup (its check(), before any weights are read)."""
    from backend.trainer.families import FAMILIES as TRAINER_FAMILIES
    from backend.trainer.loss import LossSettingError

    try:
        TRAINER_FAMILIES[family].check(cfg, SimpleNamespace(vae_scale_factor=8))
    except LossSettingError as e:
        return paths_of(str(e))
    return set()


# ------------------------------------------------------------------------------------ the table
def test_the_table_names_real_settings_and_families():
    paths = {s.path for s in field_specs()}
    assert set(READ_BY) <= paths and set(FLOW_ACCEPTS) <= set(READ_BY)
    assert all(set(fams) <= set(FAMILIES) and fams for fams in READ_BY.values())
    assert set(PROBES) == set(READ_BY)  # every family-dependent setting is probed below
    assert all(s.kind != "table" for s in family_specs())  # a table's help line cannot be hidden with it
    assert {"model.family", "model.pretrained_model", "network.type"}.isdisjoint(READ_BY)


def test_a_setting_whose_help_names_its_families_is_in_the_table():
    """A new setting described as for some families ('Flow models: ...', 'SD3/Flux.1 ...') needs its row."""
    for spec in field_specs():
        if re.match(r"(Flow models|SD3|Flux\.1|v-prediction models|Noise-prediction models)\b", spec.help):
            assert spec.path in READ_BY, spec.path


def test_flow_settings_are_hidden_for_the_ddpm_families_and_ddpm_ones_for_flow():
    for path in (*(f"training.{f}" for f in FLOW_FIELDS), "model.clip_l", "model.t5xxl", "model.vae", "model.clip_g"):
        assert not any(reads(f, path) for f in DDPM), path
        assert any(reads(f, path) for f in FLOW), path
    assert reads("flux", "training.guidance_scale") and not reads("sd3", "training.guidance_scale")
    assert reads("sd3", "model.clip_g") and not reads("flux", "model.clip_g")
    for path in ("model.v_parameterization", "training.max_token_length", "training.min_snr_gamma",
                 "training.noise_offset", "network.network_weights"):
        assert all(reads(f, path) for f in DDPM) and not any(reads(f, path) for f in FLOW), path
    assert reads(None, "training.timestep_sampling") and reads(None, "training.clip_skip")  # unknown: all


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hidden_setting_is_one_the_trainer_refuses_or_ignores(family):
    """A hidden setting the trainer refuses is exactly one with FLOW_ACCEPTS (kept shown while refused,
    named by family_problems); every other hidden one is refused nowhere (ignored: it cannot stop a run)."""
    for path in READ_BY:
        cfg = probe_config(path, family)
        refused = trainer_refusals(cfg, family)
        assert paths_of(family_problems(cfg)) == refused, path
        if not reads(family, path):
            assert (path in refused) == (path in FLOW_ACCEPTS and family in FLOW), path
        else:
            assert path not in refused, path


def test_the_ddpm_options_the_flow_trainer_refuses_are_the_tables():
    from backend.trainer.families.sd3 import DDPM_ONLY

    for name, off in DDPM_ONLY.items():
        assert FLOW_ACCEPTS[f"training.{name}"] == (off,)
    cfg = TrainingConfig.model_validate({"network": {"type": "loha"}, "model": {"family": "flux"},
                                         "training": {"loss_type": "huber", "huber_schedule": "snr"}})
    assert paths_of(family_problems(cfg)) == trainer_refusals(cfg, "flux") == {"network.type", "training.huber_schedule"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_text_settings_a_family_hides_are_the_ones_its_trainer_says_it_ignores(family):
    from backend.config import TrainingSection
    from backend.trainer.families import FAMILIES as TRAINER_FAMILIES

    for path in ("training.clip_skip", "training.max_token_length"):
        leaf = path.split(".")[1]
        warned = TRAINER_FAMILIES[family].text_warnings(TrainingSection(**{leaf: PROBES[path]}))
        assert any(w.startswith(path) for w in warned) == (not reads(family, path)), (family, path)


@pytest.mark.parametrize("family", FLOW)
def test_the_flow_settings_a_family_shows_are_the_ones_its_draw_and_loss_read(family):
    """Each timestep/loss setting changes what the family's timestep draw or its prediction/target
    compute exactly when the table says the family reads it (guidance and the T5 length are read by the
    model call and the loader, held by test_flux/test_sd3)."""
    import torch

    from backend.trainer import flow
    from backend.trainer.families import FAMILIES as TRAINER_FAMILIES

    def signature(cfg: TrainingConfig) -> torch.Tensor:
        fam, ts = TRAINER_FAMILIES[family], cfg.training
        gen = torch.Generator().manual_seed(0)
        t = torch.cat([fam.draw_timestep(gen, ts, (8, 8)) for _ in range(8)])
        x = torch.randn(8, 4, 2, 2, generator=gen)
        pred, target, weight = flow.prediction_and_target(family, x, x + 1, x - 1, x * 2, t / 1000, ts)
        return torch.cat([t, pred.flatten(), target.flatten(), torch.ones(1) if weight is None else weight])

    training = [p for p in READ_BY if p.startswith("training.") and p.split(".")[1] in FLOW_FIELDS
                and p not in ("training.guidance_scale", "training.t5xxl_max_token_length")]
    for path in [*training, "training.min_timestep", "training.max_timestep"]:
        base = TrainingConfig.model_validate({"training": {k.split(".")[1]: v for k, v in CONTEXT.get(path, {}).items()}})
        changed = not torch.equal(signature(base), signature(probe_config(path)))
        assert changed == reads(family, path), path


# ------------------------------------------------------------------------------------ the form
def hidden(values: dict[str, Any]) -> set[str]:
    return {k for k, v in visibility(values).items() if not v}


def preset_form(name: str) -> dict[str, Any]:
    return config_to_form(load_preset(name).config)


def fake_models(root: Path) -> Path:
    """demo/model (an SD 1.x diffusers folder) and demo/model-flux (a Flux.1 one), configs only."""
    (root / "demo" / "model" / "unet").mkdir(parents=True)
    (root / "demo" / "model" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "demo" / "model" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    (root / "demo" / "model-flux").mkdir(parents=True)
    (root / "demo" / "model-flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


@pytest.mark.parametrize(("family", "shows", "hides"), [
    ("sd15", {"training.clip_skip", "model.v_parameterization", "network.lora.network_weights",
              "training.min_snr_gamma", "sampling.sample_sampler"},
     {"training.timestep_sampling", "model.t5xxl", "training.guidance_scale"}),
    ("flux", {"training.timestep_sampling", "training.guidance_scale", "model.t5xxl", "model.fp8_base"},
     {"training.clip_skip", "model.v_parameterization", "network.lora.network_weights", "model.clip_g",
      "training.min_snr_gamma", "training.min_timestep", "sampling.sample_sampler"}),
    ("sd3", {"training.training_shift", "model.clip_g", "training.clip_skip", "training.min_timestep"},
     {"training.timestep_sampling", "training.guidance_scale", "training.max_token_length"}),
])
def test_a_chosen_family_shows_only_its_fields(family, shows, hides):
    values = {**preset_form("demo"), "model.family": family}
    assert not (shows & hidden(values)) and hides <= hidden(values)


def test_auto_detects_the_family_from_the_base_model_and_shows_all_when_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(fake_models(tmp_path))  # the presets' relative paths, as the GUI reads them
    assert training_family("auto", "demo/model") == "sd15" and training_family("auto", "demo/model-flux") == "flux"
    assert "training.timestep_sampling" in hidden(preset_form("demo"))
    assert "training.clip_skip" in hidden(preset_form("demo-flux"))
    assert "training.timestep_sampling" not in hidden(preset_form("demo-flux"))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for path in ("demo/model-sd3", str(bad), "model.ckpt", ""):  # missing, unreadable, a pickle, empty: all shown
        assert training_family("auto", path) is None
        assert hidden({**preset_form("demo"), "model.pretrained_model": path}) == set()
    assert training_family("sdxl", "demo/model-flux") == "sdxl"  # a chosen family is what shows


def test_hidden_fields_keep_their_values_and_a_flow_config_with_sd_defaults_is_valid():
    values = {**preset_form("demo-flux"), "model.family": "flux"}
    cfg = form_to_config(values)  # the hidden SD fields go in at their defaults...
    assert cfg.training.clip_skip == 1 and cfg.model.v_parameterization is None and family_problems(cfg) == []
    sd = form_to_config({**values, "model.family": "sd15"})  # ...and hidden flow values stay in for SD 1.x
    assert sd.training.discrete_flow_shift == 3.1582 and family_problems(sd) == []


def test_a_refused_value_keeps_its_field_shown_and_validate_names_it():
    values = {**preset_form("demo"), "model.family": "flux", "training.min_snr_gamma": "5",
              "model.v_parameterization": "yes"}
    assert not hidden(values) & {"training.min_snr_gamma", "model.v_parameterization"}
    errors = [field_error(line) for line in family_problems(form_to_config(values))]
    assert [str(e) for e in errors] == [
        "Schedule › Min-SNR gamma: a DDPM-schedule option; Flux.1 trains by flow matching, where it has no "
        "meaning: clear it",
        "Model › v-prediction: Flux.1 is trained by flow matching: leave it empty"]
    cleared = {**values, "training.min_snr_gamma": "", "model.v_parameterization": "auto"}
    assert {"training.min_snr_gamma", "model.v_parameterization"} <= hidden(cleared)
    spec = specs_by_key()["training.min_snr_gamma"]
    assert shown(spec, "flux", "not a number")  # what does not parse stays shown: its error is next to it


def test_validate_reports_the_family_problems(tmp_path, monkeypatch):
    from gui.tabs.setup import check_form

    monkeypatch.chdir(fake_models(tmp_path))
    checked = check_form({**preset_form("demo-flux"), "training.min_snr_gamma": "5"})
    assert any(e.key == "training.min_snr_gamma" and e.section == "Schedule" for e in checked.errors)


# ------------------------------------------------------------------------------------ a real browser
@pytest.mark.browser
def test_picking_a_family_or_loading_its_preset_shows_its_fields_in_a_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.gui_helpers import BROWSER_ARGS, AppServer, choose, chromium_or_skip, field

    chromium = chromium_or_skip()
    app = AppServer(fake_models(tmp_path), tmp_path / "runs", tmp_path / "app.log")
    try:
        app.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(30_000)
            pg.goto(app.url)
            field(pg, "run_name").locator("input").wait_for()
            pg.locator("#sec-Schedule .lathe-advanced").get_by_text("Advanced").first.click()
            flow_field, sd_field = field(pg, "training.timestep_sampling"), field(pg, "training.clip_skip")
            tokens = field(pg, "training.max_token_length")

            def showing(flow: bool) -> None:
                (flow_field if flow else sd_field).wait_for(state="visible")
                for gone in (sd_field, tokens) if flow else (flow_field,):
                    gone.wait_for(state="hidden")
                assert (sd_field.is_visible(), tokens.is_visible(), flow_field.is_visible()) == (not flow, not flow, flow)

            showing(flow=False)  # the demo preset: auto, demo/model is SD 1.x
            choose(pg, "preset-choice", "demo-flux (shipped)")
            pg.click("#btn-preset-load")
            showing(flow=True)  # auto again, demo/model-flux is Flux.1
            choose(pg, "f-model-family", "sd15")
            showing(flow=False)
            pg.click("#btn-show-command")  # the hidden flow settings still go into the config
            command = pg.locator("#command-preview textarea")
            command.wait_for()
            assert '"discrete_flow_shift": 3.1582' in command.input_value()
            choose(pg, "f-model-family", "flux")
            showing(flow=True)
            assert field(pg, "training.discrete_flow_shift").locator("input").input_value() == "3.1582"
            browser.close()
    finally:
        app.stop()
