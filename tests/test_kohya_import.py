"""kohya_ss config import: real sample files, value coercion, refusals, typos, the CLI-facing report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.kohya import KohyaImport, import_kohya, import_kohya_file, load_kohya_file
from backend.presets import load_config_or_preset, resolve

ROOT = Path(__file__).resolve().parent.parent
# The real kohya_ss configs users bring: ../shared/kohya-presets beside the checkout when present,
# else the frozen copies in tests/fixtures/kohya (the same files), so the suite runs anywhere.
SAMPLES = next(p for p in (ROOT.parent / "shared" / "kohya-presets", ROOT / "tests" / "fixtures" / "kohya")
               if p.is_dir() and any(p.glob("*.json")))
FILES = sorted(SAMPLES.glob("*.json"))
CATEGORIES = ("unsupported feature", "GUI-only setting", "not applicable", "secret", "unknown kohya_ss setting",
              "not imported")

# What each real sample must give: imported, or refused with a reason naming the feature.
EXPECTED = {
    "SDXL - 1 image LoRA v1.0.json": "LoKr",
    "SDXL - LoRA AI_Now ADamW v1.0.json": None,
    "SDXL - LoRA AI_Now prodigy v1.0.json": None,
    "SDXL - LoRA adafactor v1.0.json": None,
    "SDXL-Standard-AdamW.json": "DreamBooth",
    "Standard-AdamW.json": "DreamBooth",
    "dreambooth-Prodigy.json": "DreamBooth",
    "locon-Prodigy.json": "LoCon",
    "loha-sd15.json": "LoHa",
    "sd15 - EDG_LoraOptiSettings.json": None,
}


def sample(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text())


def standard(**changes: object) -> dict:
    """A real standard-LoRA kohya config with some keys changed (None removes a key)."""
    data = sample("SDXL - LoRA AI_Now ADamW v1.0.json")
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    return data


def ok(result: KohyaImport) -> KohyaImport:
    assert result.ok, result.report()
    return result


# ----------------------------------------------------------------------------------- the real files
def test_every_sample_has_an_expectation():
    assert FILES, f"no samples in {SAMPLES}"
    assert {p.name for p in FILES} == set(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_sample_is_imported_or_refused_with_every_key_listed(path: Path):
    data = json.loads(path.read_text())
    result = load_kohya_file(path)
    expected = EXPECTED[path.name]
    if expected is None:
        ok(result)
        assert result.config is not None and resolve(result.preset) == result.config
        assert result.preset["schema_version"] == 1 and result.preset["name"]
    else:
        assert result.refused and expected in result.refused
        assert result.preset == {} and result.config is None
    mapped = {k for k, _ in result.mapped}
    unmapped = {k for k, _ in result.unmapped}
    assert set(data) <= mapped | unmapped, f"silently dropped: {set(data) - mapped - unmapped}"
    assert not (mapped & unmapped & set(data)), "a key both imported and not imported"
    for key, reason in result.unmapped:
        assert reason.startswith(CATEGORIES), (key, reason)
    assert not [k for k, r in result.unmapped if r.startswith("unknown")], "a real kohya key the importer lacks"


def test_standard_adamw_sdxl_keeps_its_values():
    r = ok(load_kohya_file(SAMPLES / "SDXL - LoRA AI_Now ADamW v1.0.json"))
    c = r.config
    assert (c.network.rank, c.network.alpha, c.network.train_unet, c.network.train_text_encoder) == (32, 32, True, True)
    assert (c.optimizer.type, c.optimizer.learning_rate, c.optimizer.unet_lr, c.optimizer.text_encoder_lr) == (
        "AdamW", 1e-4, 1e-4, 1e-4)
    assert (c.training.max_train_steps, c.training.max_train_epochs) == (320, None)  # "320" was a string
    assert (c.training.train_batch_size, c.training.seed, c.training.mixed_precision) == (4, 12345, "bf16")
    assert (c.training.noise_offset, c.training.min_snr_gamma, c.training.gradient_checkpointing) == (0.0375, 5.0, True)
    assert (c.saving.save_every_n_epochs, c.saving.save_precision) == (5, "bf16")
    assert (c.model.family, c.dataset.resolution, c.dataset.caption_extension) == ("sdxl", 1024, ".txt-no")
    assert (c.dataset.max_bucket_reso, c.dataset.cache_latents_to_disk) == (2048, True)
    assert c.scheduler.type == "constant"
    assert "trigger: lxndrn woman" in r.preset["description"]
    # Active kohya features Lathe lacks are warnings, naming the key.
    for key in ("min_timestep", "max_timestep", "adaptive_noise_scale", "bucket_no_upscale"):
        assert any(w.startswith(f"{key}: unsupported feature") for w in r.warnings), key


def test_standard_prodigy_keeps_optimizer_args():
    c = ok(load_kohya_file(SAMPLES / "SDXL - LoRA AI_Now prodigy v1.0.json")).config
    o = c.optimizer
    assert o.type == "Prodigy"
    assert (o.weight_decay, o.decouple, o.d0, o.use_bias_correction, o.d_coef) == (0.01, True, 1e-4, True, 1.0)
    assert (o.learning_rate, o.unet_lr, o.text_encoder_lr) == (1.0, 1.0, 1.0)
    assert (c.training.max_train_epochs, c.training.train_batch_size) == (160, 8)
    assert (c.network.rank, c.network.alpha) == (32, 16)
    assert c.training.seed == 42  # kohya "" = a random seed; Lathe keeps a fixed one


def test_adafactor_gets_kohyas_library_defaults():
    r = ok(load_kohya_file(SAMPLES / "SDXL - LoRA adafactor v1.0.json"))
    o = r.config.optimizer
    assert (o.type, o.relative_step, o.scale_parameter, o.warmup_init) == ("Adafactor", True, True, False)
    assert r.config.scheduler.type == "constant"  # kohya's "adafactor" scheduler
    assert (r.config.training.max_train_epochs, r.config.network.rank, r.config.dataset.keep_tokens) == (30, 128, 1)
    assert r.config.training.gradient_accumulation_steps == 1  # 1.0 in the file
    assert any(w.startswith("additional_parameters: unsupported feature") for w in r.warnings)


def test_strings_are_coerced_in_an_sd15_config():
    r = ok(load_kohya_file(SAMPLES / "sd15 - EDG_LoraOptiSettings.json"))
    c = r.config
    assert (c.model.family, c.optimizer.type) == ("sd15", "AdamW8bit")
    assert (c.optimizer.learning_rate, c.optimizer.unet_lr, c.optimizer.text_encoder_lr) == (1e-4, 1e-4, 5e-5)
    assert (c.training.noise_offset, c.training.seed, c.training.clip_skip) == (0.05, 1234, 2)
    assert (c.dataset.num_workers, c.dataset.bucket_reso_steps, c.dataset.enable_bucket) == (1, 64, False)
    assert (c.network.rank, c.network.alpha, c.training.max_train_epochs) == (64, 64, 1)
    # 512x650 is not square: same area, and said so.
    assert c.dataset.resolution == 576
    assert any("512x650 is not square" in w for w in r.warnings)


@pytest.mark.parametrize("name", [n for n, why in EXPECTED.items() if why], ids=lambda n: n[:-5])
def test_refusals_are_plain_and_still_list_every_key(name: str):
    r = import_kohya(sample(name), name)
    assert not r.ok and r.preset == {}
    report = "\n".join(r.report())
    assert f"Refused: {r.refused}" in report and "Traceback" not in report
    assert "Lathe trains" in r.refused


# ------------------------------------------------------------------------------------ optimizer args
def test_optimizer_args_typo_is_reported_not_ignored():
    r = import_kohya(standard(optimizer="Prodigy", optimizer_args="d_coeff=2 use_bias_correction=True"))
    assert not r.ok and r.preset == {} and r.refused is None
    assert "optimizer_args: unknown argument 'd_coeff' for Prodigy; did you mean d_coef?" in r.errors
    assert "d_coeff" in "\n".join(r.report())


def test_prodigy_args_map_to_typed_fields():
    args = '"d_coef=2" "d0=1e-5" growth_rate=inf betas=0.9,0.99 beta3=None safeguard_warmup=True decouple=False'
    c = ok(import_kohya(standard(optimizer="Prodigy", optimizer_args=args, learning_rate="1",
                                 unet_lr="1", text_encoder_lr="1"))).config.optimizer
    assert (c.d_coef, c.d0, c.growth_rate, c.betas, c.beta3) == (2.0, 1e-5, None, (0.9, 0.99), None)
    assert (c.safeguard_warmup, c.decouple) == (True, False)


def test_optimizer_arg_problems():
    r = import_kohya(standard(optimizer="Prodigy", optimizer_args="d_coef=lots betas=0.9"))
    assert "optimizer_args: d_coef: expected a number; got \"lots\"" in r.errors
    assert any(e.startswith("optimizer_args: betas: expected two numbers") for e in r.errors)
    r = import_kohya(standard(optimizer="Prodigy", optimizer_args="d_coef=200"))
    assert r.errors == ["optimizer_args: must be at most 100; got 200.0 (Lathe's optimizer.d_coef)"]
    r = import_kohya(standard(optimizer="AdamW", optimizer_args="amsgrad=True weight_decay=0.1"))
    assert ok(r).config.optimizer.weight_decay == 0.1
    assert ("optimizer_args amsgrad", "unsupported feature: an optimizer argument Lathe does not expose") in r.unmapped
    r = import_kohya(standard(optimizer_args='"unbalanced'))
    assert r.errors and r.errors[0].startswith("optimizer_args: cannot split")


def test_optimizer_names_and_variants():
    r = ok(import_kohya(standard(optimizer="PagedAdamW8bit")))
    assert r.config.optimizer.type == "AdamW8bit" and any("paged variant" in w for w in r.warnings)
    r = ok(import_kohya(standard(optimizer="Lion", learning_rate="3e-5", unet_lr="3e-5", text_encoder_lr="3e-5")))
    assert (r.config.optimizer.type, r.config.optimizer.weight_decay) == ("Lion", 0.0)  # lion-pytorch's default
    r = ok(import_kohya(standard(optimizer="SGDNesterov", learning_rate="0.01", unet_lr="0.01", text_encoder_lr="0.01")))
    assert (r.config.optimizer.type, r.config.optimizer.nesterov) == ("SGD", True)
    r = import_kohya(standard(optimizer="DAdaptAdam"))
    assert r.refused and "DAdaptAdam" in r.refused and r.preset == {}
    r = ok(import_kohya(standard(optimizer=None, use_8bit_adam=True)))
    assert r.config.optimizer.type == "AdamW8bit"


# ------------------------------------------------------------------------------------ other mappings
def test_save_last_n_steps_window_becomes_a_count():
    c = ok(import_kohya(standard(save_every_n_steps="100", save_last_n_steps="350"))).config
    assert (c.saving.save_every_n_steps, c.saving.save_last_n_steps) == (100, 3)
    c = ok(import_kohya(standard(save_every_n_steps=100, save_last_n_steps=50))).config
    assert c.saving.save_last_n_steps == 1  # at least one
    r = ok(import_kohya(standard(save_every_n_steps=0, save_last_n_steps=500)))
    assert r.config.saving.save_last_n_steps is None
    assert ("save_last_n_steps", "not applicable: there are no step saves (save_every_n_steps is 0)") in r.unmapped


def test_epoch_saves_and_state():
    c = ok(import_kohya(standard(save_every_n_epochs="2", save_last_n_epochs="4", save_state="True",
                                save_precision="float"))).config
    assert (c.saving.save_every_n_epochs, c.saving.save_last_n_epochs, c.saving.save_state) == (2, 4, True)
    assert c.saving.save_precision == "fp32"
    assert ok(import_kohya(standard(save_state=False))).config.saving.save_state is False


def test_training_length_precedence():
    c = ok(import_kohya(standard(max_train_epochs="7", max_train_steps="320", epoch=160))).config
    assert (c.training.max_train_epochs, c.training.max_train_steps) == (7, None)
    c = ok(import_kohya(standard(max_train_steps="", epoch="12"))).config
    assert (c.training.max_train_epochs, c.training.max_train_steps) == (12, None)
    c = ok(import_kohya(standard(max_train_steps=0, epoch=3))).config
    assert c.training.max_train_epochs == 3


def test_warmup_percentage():
    c = ok(import_kohya(standard(lr_warmup="10", lr_scheduler="cosine"))).config  # 10% of 320 steps
    assert (c.scheduler.warmup_steps, c.scheduler.type) == (32, "cosine")
    r = ok(import_kohya(standard(lr_warmup=10, max_train_steps="", lr_scheduler="cosine")))
    assert r.config.scheduler.warmup_steps == 0
    assert any(w.startswith("lr_warmup: unsupported feature: a warmup of 10%") for w in r.warnings)
    c = ok(import_kohya(standard(lr_warmup=10, lr_warmup_steps=25, lr_scheduler="cosine"))).config
    assert c.scheduler.warmup_steps == 25


def test_which_networks_train_follows_the_learning_rates():
    c = ok(import_kohya(standard(text_encoder_lr=0, unet_lr=1e-4))).config
    assert (c.network.train_unet, c.network.train_text_encoder, c.optimizer.text_encoder_lr) == (True, False, None)
    c = ok(import_kohya(standard(text_encoder_lr=5e-5, unet_lr="0"))).config
    assert (c.network.train_unet, c.network.train_text_encoder) == (False, True)
    c = ok(import_kohya(standard(sdxl_cache_text_encoder_outputs=True))).config
    assert c.network.train_text_encoder is False


def test_model_family_and_paths():
    r = ok(import_kohya(standard(sdxl=False, v2=True, v_parameterization=True,
                                 pretrained_model_name_or_path="stabilityai/stable-diffusion-2-1",
                                 train_data_dir="/data/img", output_name="my lora", output_dir="/out")))
    c = r.config
    assert (c.model.family, c.model.v_parameterization, c.model.pretrained_model) == (
        "sd2", True, "stabilityai/stable-diffusion-2-1")
    assert (c.dataset.train_data_dir, c.output_dir, c.run_name) == ("/data/img", "/out", "my_lora")
    assert any("looks like a Hugging Face model id" in w for w in r.warnings)
    r = import_kohya(standard(sdxl=True, v2=True))
    assert "sdxl: both sdxl and v2 are set; a model is either SDXL or SD2" in r.errors
    assert ok(import_kohya(standard(caption_extension=""))).config.dataset.caption_extension == ".caption"


def test_sample_prompts_with_options():
    prompts = "# comment\na cat --n blurry --w 768 --h 512 --s 30 --l 6.5 --d 3\na dog --n blurry --ss euler\n\n"
    r = ok(import_kohya(standard(sample_prompts=prompts, sample_every_n_epochs="2", sample_sampler="euler_a")))
    s = r.config.sampling
    assert s.prompts == ["a cat", "a dog"]
    assert (s.negative_prompt, s.width, s.height, s.steps, s.guidance_scale, s.seed) == (
        "blurry", 768, 512, 30, 6.5, 3)
    assert s.every_n_epochs == 2
    assert any("--ss is not supported" in w for w in r.warnings)


def test_resume_and_launch():
    r = ok(import_kohya(standard(resume="/old/state", gpu_ids="0,1", num_processes="2")))
    assert r.config.resume_from == "/old/state" and any(w.startswith("resume: Lathe resumes only") for w in r.warnings)
    assert (r.config.launch.gpu_ids, r.config.launch.num_processes) == ("0,1", 2)


def test_flux_and_others_are_refused():
    assert "Flux.1" in import_kohya(standard(flux1_checkbox=True)).refused
    assert "SD3" in import_kohya(standard(sd3_checkbox="True")).refused
    assert "DyLoRA" in import_kohya(standard(LoRA_type="Kohya DyLoRA")).refused
    assert "Textual Inversion" in import_kohya({"token_string": "x", "init_word": "y"}).refused
    assert "JSON object" in import_kohya([1, 2]).refused  # type: ignore[arg-type]


def test_bad_values_are_errors_naming_the_kohya_key():
    r = import_kohya(standard(network_dim="lots", gradient_checkpointing="maybe"))
    assert 'network_dim: expected a number; got "lots"' in r.errors
    assert 'gradient_checkpointing: expected true or false; got "maybe"' in r.errors
    assert ("network_dim", "not imported: its value is invalid (see the errors)") in r.unmapped
    r = import_kohya(standard(bucket_reso_steps=1))
    assert r.errors == ["bucket_reso_steps: must be a multiple of 8; got 1 (Lathe's dataset.bucket_reso_steps)"]
    r = import_kohya(standard(lr_scheduler="cosine_with_min_lr"))
    assert r.errors[0].startswith("lr_scheduler: 'cosine_with_min_lr' is not available in Lathe")


def test_secrets_are_not_copied_nor_shown():
    token = "hf_" + "Zx9" * 12
    r = ok(import_kohya(standard(huggingface_token=token, wandb_api_key="0123456789abcdef" * 2,
                                 mystery_setting=token)))
    everything = json.dumps(r.preset) + "\n".join(r.report())
    assert token not in everything and "0123456789abcdef" not in everything
    assert ("huggingface_token", "secret: never copied into a preset") in r.unmapped
    assert "huggingface_token: a secret; it is never copied into a preset" in r.warnings


def test_unknown_keys_are_listed():
    r = ok(import_kohya(standard(brand_new_option=True, another_new_option="")))
    reasons = dict(r.unmapped)
    assert reasons["brand_new_option"].startswith("unknown kohya_ss setting")
    assert any(w.startswith("brand_new_option: unknown kohya_ss setting") for w in r.warnings)
    assert not any(w.startswith("another_new_option") for w in r.warnings)  # empty: nothing lost


# ------------------------------------------------------------------------------------------ the file
def test_import_file_writes_a_loadable_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dst = tmp_path / "out" / "preset.json"
    assert import_kohya_file(SAMPLES / "SDXL - LoRA AI_Now prodigy v1.0.json", dst) == 0
    out = capsys.readouterr().out
    assert "imported" in out.splitlines()[0] and f"Wrote {dst}" in out
    assert "Not imported (" in out and "scale_weight_norms: unsupported feature" in out
    cfg = load_config_or_preset(dst)
    assert cfg.optimizer.type == "Prodigy" and cfg.optimizer.d0 == 1e-4


def test_import_file_refuses_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dst = tmp_path / "preset.json"
    assert import_kohya_file(SAMPLES / "loha-sd15.json", dst) == 1
    captured = capsys.readouterr()
    assert "Refused: LoRA_type 'LyCORIS/LoHa'" in captured.out and "Nothing written" in captured.err
    assert not dst.exists()


def test_import_file_handles_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert import_kohya_file(bad, tmp_path / "x.json") == 1
    assert import_kohya_file(tmp_path / "missing.json", tmp_path / "x.json") == 1
    err = capsys.readouterr().err
    assert "not readable JSON" in err and "file not found" in err and "Traceback" not in err
    shipped = ROOT / "presets" / "kohya-import-test.json"
    assert import_kohya_file(SAMPLES / "SDXL - LoRA AI_Now ADamW v1.0.json", shipped) == 1
    assert not shipped.exists()


# ------------------------------------------------------------------------------------ never a crash
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", "0", "1", "True", "none", "1e-4", "512,512", "d_coef=2", "inf"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([p.name for p in FILES]), st.data())
def test_any_values_give_a_report_not_a_traceback(name: str, data: st.DataObject):
    config = sample(name)
    keys = data.draw(st.lists(st.sampled_from(sorted(config)), min_size=1, max_size=8, unique=True))
    for key in keys:
        config[key] = data.draw(_values)
    result = import_kohya(config, name)
    assert result.ok or result.refused or result.errors
    assert set(config) <= {k for k, _ in result.mapped} | {k for k, _ in result.unmapped}
    assert result.report()


# ------------------------------------------------------------------------------------------ the docs
def test_docs_list_every_imported_kohya_key():
    doc = (ROOT / "docs" / "presets.md").read_text()
    documented = set(re.findall(r"`([A-Za-z0-9_]+)`", doc))
    imported = {k for p in FILES for k, _ in load_kohya_file(p).mapped if not k.startswith("(")}
    assert imported - documented == set()


def test_preset_and_kohya_modules_stay_light():
    """The GUI and the CLI import these: never torch, gradio or the trainer."""
    code = ("import sys, backend.presets, backend.kohya; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'gradio') or m.startswith('backend.trainer')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
