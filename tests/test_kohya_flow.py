"""kohya_ss import of Flux.1 and SD3/SD3.5 configs: the family, the model files, the flow-matching
settings, and what is not carried (a warning naming the key, or a refusal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.config import validate_config
from backend.kohya import KohyaImport, import_kohya, load_kohya_file
from backend.presets import resolve

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kohya"
FLUX = "flux1-dev - AdamW8bit fp8.json"  # the kohya_ss GUI's saved-config key set, its Flux.1 preset's values
SD3 = "sd3.5-medium - AdamW8bit.json"


def data(name: str, **changes: object) -> dict:
    out = json.loads((FIXTURES / name).read_text())
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def ok(r: KohyaImport) -> KohyaImport:
    assert r.ok, "\n".join(r.report())
    validate_config(r.config.model_dump(mode="json"))
    assert resolve(r.preset) == r.config
    return r


def warned(r: KohyaImport, key: str) -> list[str]:
    return [w for w in r.warnings if w.startswith(f"{key}: ")]


def reason(r: KohyaImport, key: str) -> str:
    return dict(r.unmapped)[key]


@pytest.mark.parametrize("name", [FLUX, SD3])
def test_every_key_is_listed_and_none_is_unknown(name: str):
    r = ok(load_kohya_file(FIXTURES / name))
    keys = set(data(name))
    listed = {k for k, _ in r.mapped} | {k for k, _ in r.unmapped}
    assert keys <= listed and not (keys & {k for k, _ in r.mapped} & {k for k, _ in r.unmapped})
    assert not [k for k, why in r.unmapped if why.startswith("unknown")]


def test_flux_dev_config_imports_with_its_files_and_flow_settings():
    r = ok(load_kohya_file(FIXTURES / FLUX))
    c = r.config
    assert (c.model.family, c.model.pretrained_model) == ("flux", "/models/flux/flux1-dev.safetensors")
    assert (c.model.vae, c.model.clip_l, c.model.t5xxl, c.model.clip_g) == (
        "/models/flux/ae.safetensors", "/models/flux/clip_l.safetensors", "/models/flux/t5xxl_fp16.safetensors", None)
    assert c.model.fp8_base is True and c.model.v_parameterization is None
    t = c.training
    assert (t.timestep_sampling, t.discrete_flow_shift, t.model_prediction_type, t.guidance_scale) == (
        "sigmoid", 3.1582, "raw", 1.0)
    assert (t.t5xxl_max_token_length, t.gradient_checkpointing, t.mixed_precision) == (512, True, "bf16")
    assert (t.max_train_steps, t.max_token_length, t.clip_skip) == (1000, 75, 1)
    assert (c.network.type, c.network.rank, c.network.alpha) == ("lora", 16, 16.0)
    assert (c.network.train_unet, c.network.train_text_encoder) == (True, False)
    assert dict(r.mapped)["LoRA_type"].startswith('network.type = "lora" (sd-scripts\' Flux.1 LoRA')
    assert dict(r.mapped)["ae"] == 'model.vae = "/models/flux/ae.safetensors"'
    # The DDPM-schedule settings of kohya's Flux preset do nothing in sd-scripts' Flux training: not carried, said so.
    assert (t.noise_offset, t.min_snr_gamma) == (0.0, None)
    assert warned(r, "noise_offset")[0].startswith("noise_offset: 0.05 has no effect on Flux.1 in sd-scripts")
    assert warned(r, "min_snr_gamma")[0].startswith("min_snr_gamma: 7 has no effect on Flux.1")
    # On in the file, not in Lathe: a warning naming the key and what Lathe does instead.
    assert warned(r, "apply_t5_attn_mask") == [
        "apply_t5_attn_mask: unsupported feature: masking T5's padding tokens in attention; Lathe encodes captions "
        "without T5's attention mask; the value true is not imported"]
    assert warned(r, "full_bf16")
    # The other families' fields, which kohya_ss saves in every config, are not needed and not warned about.
    assert reason(r, "weighting_scheme") == "not applicable: an SD3 setting (kohya_ss passes it only with sd3_checkbox)"
    assert reason(r, "vae") == "not applicable: Flux.1 reads its autoencoder from ae"
    assert r.config.training.blocks_to_swap == 0  # the fixture's own value
    assert reason(r, "hunyuan_vae").startswith("not applicable: a HunyuanImage-2.1 setting")
    assert not [w for w in r.warnings if w.startswith(("weighting_scheme", "blocks_to_swap", "hunyuan", "sd3_"))]


def test_sd35_config_imports_with_its_files_and_weighting():
    r = ok(load_kohya_file(FIXTURES / SD3))
    c = r.config
    assert (c.model.family, c.model.pretrained_model) == ("sd3", "/models/sd3/sd3.5_medium.safetensors")
    assert (c.model.clip_l, c.model.clip_g, c.model.t5xxl, c.model.vae) == (
        "/models/sd3/clip_l.safetensors", "/models/sd3/clip_g.safetensors", "/models/sd3/t5xxl_fp16.safetensors", None)
    t = c.training
    assert (t.weighting_scheme, t.logit_mean, t.logit_std, t.mode_scale) == ("logit_normal", 0.0, 1.0, 1.29)
    # Flux.1's fields in the same file are not passed by kohya_ss for SD3: Lathe's defaults stay.
    assert (t.timestep_sampling, t.guidance_scale, t.t5xxl_max_token_length) == ("sigma", 3.5, None)
    assert reason(r, "guidance_scale").startswith("not applicable: a Flux.1 setting")
    assert reason(r, "clip_l").startswith("not applicable: a Flux.1 setting")  # the GUI's SD3 field is sd3_clip_l
    assert (c.network.type, c.network.rank, c.network.train_text_encoder) == ("lora", 32, False)
    assert (t.max_train_epochs, c.saving.save_every_n_epochs, c.saving.save_last_n_epochs) == (12, 2, 3)
    assert c.sampling.prompts[0].startswith("a watercolor painting of a lighthouse")
    assert [w for w in r.warnings if not w.startswith("Lathe: ")] == []


@pytest.mark.parametrize(("name", "key", "value", "text"), [
    (FLUX, "double_blocks_to_swap", 10, "block swapping to CPU memory; Lathe swaps whole blocks by training.blocks_to_swap"),
    (FLUX, "split_mode", True, "split mode (training the single blocks only, to save memory)"),
    (FLUX, "cpu_offload_checkpointing", True, "offloading checkpointed activations to CPU memory"),
    (FLUX, "train_double_block_indices", "0-9", "lora_flux's train_double_block_indices"),
    (FLUX, "img_attn_dim", 8, "lora_flux's img_attn_dim (per-layer ranks"),
    (SD3, "sd3_t5_dropout_rate", 0.1, "T5 caption-embedding dropout"),
    (SD3, "sd3_fused_backward_pass", True, "fused backward pass"),
])
def test_unsupported_settings_warn_naming_the_key(name: str, key: str, value: object, text: str):
    r = ok(import_kohya(data(name, **{key: value})))
    assert reason(r, key).startswith(f"unsupported feature: {text}")
    (w,) = warned(r, key)
    assert text in w and w.endswith("is not imported")


def test_clip_text_encoder_training_is_carried_and_t5_training_warned():
    r = ok(import_kohya(data(FLUX, text_encoder_lr=5e-5, flux1_cache_text_encoder_outputs=False)))
    assert r.config.network.train_text_encoder is True and r.config.optimizer.text_encoder_lr == 5e-5
    assert not warned(r, "text_encoder_lr")
    cached = ok(import_kohya(data(FLUX, text_encoder_lr=5e-5, flux1_cache_text_encoder_outputs=True)))
    assert cached.config.network.train_text_encoder is False  # cached outputs: kohya_ss trains no text encoder
    r = ok(import_kohya(data(FLUX, text_encoder_lr=5e-5, train_t5xxl=True, t5xxl_lr=1e-5,
                             flux1_cache_text_encoder_outputs=False)))
    assert warned(r, "train_t5xxl") and "T5-XXL stays frozen" in warned(r, "train_t5xxl")[0] and warned(r, "t5xxl_lr")
    assert ok(import_kohya(data(FLUX, t5xxl_lr=1e-5))).warnings == ok(load_kohya_file(FIXTURES / FLUX)).warnings
    r = import_kohya(data(SD3, unet_lr=0, learning_rate=0, text_encoder_lr=1e-5))
    assert r.refused == ("a text-encoder-only LoRA on SD3/SD3.5: Lathe trains the transformer of SD3/SD3.5, with or "
                         "without its CLIP encoders")


def test_networks_and_models_lathe_does_not_train_are_refused():
    r = import_kohya(data(FLUX, LoRA_type="Flux1 OFT"))
    assert r.refused.startswith("LoRA_type 'Flux1 OFT': OFT (networks.oft_flux) networks are not trained by Lathe")
    r = import_kohya(data(FLUX, LoRA_type="LyCORIS/LoKr"))
    assert r.refused.startswith("LoRA_type 'LyCORIS/LoKr' on Flux.1: Lathe trains plain LoRA networks for Flux.1")
    r = import_kohya(data(SD3, LoRA_type="LyCORIS/LoCon", conv_dim=0))
    assert "not LyCORIS networks" in r.refused
    r = import_kohya(data(FLUX, model_type="chroma"))
    assert r.refused.startswith("model_type 'chroma'") and "Lathe trains Flux.1 dev and schnell" in r.refused
    assert "HunyuanImage-2.1" in import_kohya(data(FLUX, hunyuan_image_checkbox=True)).refused
    for r in (import_kohya(data(FLUX, LoRA_type="Flux1 OFT")), import_kohya(data(FLUX, model_type="chroma"))):
        assert r.preset == {} and set(data(FLUX)) <= {k for k, _ in r.mapped} | {k for k, _ in r.unmapped}


def test_family_conflicts_are_errors():
    assert import_kohya(data(FLUX, sd3_checkbox=True)).errors == [
        "flux1_checkbox: both flux1_checkbox and sd3_checkbox are set; a model is either Flux.1 or SD3"]
    assert import_kohya(data(FLUX, sdxl=True)).errors[0].startswith("sdxl: sdxl and flux1_checkbox are both set")
    assert import_kohya(data(FLUX, flux1_checkbox=False)).errors[0].startswith(
        "LoRA_type: 'Flux1' trains a Flux.1 LoRA, but flux1_checkbox is off")
    r = import_kohya(data(SD3, loss_type="huber", huber_schedule="snr"))
    assert r.errors[0].startswith("huber_schedule: snr reads a DDPM noise schedule, which SD3/SD3.5 does not have")
    r = import_kohya(data(FLUX, timestep_sampling="logit"))  # Lathe's validation, named by the kohya key
    assert r.errors and r.errors[0].startswith("timestep_sampling: ") and "training.timestep_sampling" in r.errors[0]


def test_defaults_empty_paths_and_additional_parameters():
    # Without model_prediction_type (older GUIs) sd-scripts' default sigma_scaled is what kohya_ss trained.
    r = ok(import_kohya(data(FLUX, model_prediction_type=None, ae="", clip_l="", t5xxl="")))
    c = r.config
    assert c.training.model_prediction_type == "sigma_scaled"
    assert (c.model.vae, c.model.clip_l, c.model.t5xxl) == (None, None, None)
    assert dict(r.mapped)["ae"] == "model.vae = unset (empty: from the model file)"
    # sd-scripts settings without a GUI field (a config in sd-scripts' shape) apply to either family.
    r = ok(import_kohya(data(SD3, training_shift=3.0, sigmoid_scale="2")))
    assert (r.config.training.training_shift, r.config.training.sigmoid_scale) == (3.0, 2.0)
    assert dict(r.mapped)["training_shift"] == "training.training_shift = 3.0"
    # fp8 for the transformer only (sd-scripts' fp8_base_unet) is Lathe's fp8_base.
    assert ok(import_kohya(data(FLUX, fp8_base=False, fp8_base_unet=True))).config.model.fp8_base is True
    # clip_skip above 1 does nothing for Flux.1 in sd-scripts: not carried, said so.
    r = ok(import_kohya(data(FLUX, clip_skip=2)))
    assert r.config.training.clip_skip == 1 and warned(r, "clip_skip")


def test_an_sd_config_still_lists_the_flow_fields_as_not_applicable():
    sdxl = json.loads((FIXTURES / "SDXL - LoRA AI_Now ADamW v1.0.json").read_text())
    r = ok(import_kohya({**sdxl, "blocks_to_swap": 10, "guidance_scale": 3.5, "clip_g": "/m/clip_g.safetensors"}))
    assert r.config.model.family == "sdxl" and r.config.model.clip_g is None
    assert reason(r, "blocks_to_swap").startswith("not applicable: a Flux.1/SD3 setting")
    assert not warned(r, "blocks_to_swap") and not warned(r, "clip_g")


def test_flow_arguments_in_additional_parameters_import_and_win():
    r = ok(import_kohya(data(SD3, additional_parameters="--training_shift 3.0 --clip_l /m/x.safetensors")))
    assert r.config.training.training_shift == 3.0 and r.config.model.clip_l == "/m/x.safetensors"


@pytest.mark.parametrize(("name", "value"), [(FLUX, 18), (SD3, "10")])
def test_blocks_to_swap_is_carried(name: str, value: object):
    r = ok(import_kohya(data(name, blocks_to_swap=value)))
    assert r.config.training.blocks_to_swap == int(value) and not warned(r, "blocks_to_swap")
