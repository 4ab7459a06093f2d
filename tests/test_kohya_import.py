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
FIXTURES = ROOT / "tests" / "fixtures" / "kohya"
SAMPLES = next(p for p in (ROOT.parent / "shared" / "kohya-presets", FIXTURES) if p.is_dir() and any(p.glob("*.json")))
# ... plus the fixtures written from the current kohya_ss GUI's saved-config key set (Flux.1, SD3.5),
# which the shared folder does not hold.
FILES = sorted({p.name: p for p in [*FIXTURES.glob("*.json"), *SAMPLES.glob("*.json")]}.values())
CATEGORIES = ("unsupported feature", "GUI-only setting", "not applicable", "secret", "unknown kohya_ss setting",
              "not imported")

# What each real sample must give: imported (None), refused with a reason naming the feature, or an
# error (nothing imported) naming the kohya key.
EXPECTED = {
    "SDXL - 1 image LoRA v1.0.json": "error: network_dim: must be at most 1024; got 100000",  # LoKr's "full" dim
    "SDXL - LoRA AI_Now ADamW v1.0.json": None,
    "SDXL - LoRA AI_Now prodigy v1.0.json": None,
    "SDXL - LoRA adafactor v1.0.json": None,
    "SDXL-Standard-AdamW.json": "refused: DreamBooth",
    "Standard-AdamW.json": "refused: DreamBooth",
    "dreambooth-Prodigy.json": "refused: DreamBooth",
    "locon-Prodigy.json": None,
    "loha-sd15.json": None,
    "sd15 - EDG_LoraOptiSettings.json": None,
    "flux1-dev - AdamW8bit fp8.json": None,  # tests/test_kohya_flow.py checks their values
    "sd3.5-medium - AdamW8bit.json": None,
}
REFUSED = [n for n, why in EXPECTED.items() if why and why.startswith("refused: ")]


def sample(name: str) -> dict:
    return json.loads(next(p for p in FILES if p.name == name).read_text())


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
    elif expected.startswith("refused: "):
        assert result.refused and expected.removeprefix("refused: ") in result.refused
        assert result.preset == {} and result.config is None
    else:
        assert not result.refused and any(e.startswith(expected.removeprefix("error: ")) for e in result.errors)
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
    assert (c.training.adaptive_noise_scale, c.training.min_timestep, c.training.max_timestep) == (0.00375, 100, 900)
    assert c.dataset.bucket_no_upscale is True


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
    # its additional_parameters is --log_prefix=xl-loha: read, and listed as not needed
    assert dict(r.unmapped)["log_prefix"].startswith("not applicable: Lathe writes TensorBoard logs")
    assert dict(r.mapped)["additional_parameters"].startswith("1 sd-scripts argument(s)")


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


@pytest.mark.parametrize("name", REFUSED, ids=lambda n: n[:-5])
def test_refusals_are_plain_and_still_list_every_key(name: str):
    r = import_kohya(sample(name), name)
    assert not r.ok and r.preset == {}
    report = "\n".join(r.report())
    assert f"Refused: {r.refused}" in report and "Traceback" not in report
    assert "Lathe trains" in r.refused


# ------------------------------------------------------------------------------------------ networks
LATHE_TRAINS = "Lathe trains LoRA (Standard, Flux1), LoCon (Kohya LoCon, LyCORIS/LoCon), LoHa"


def gui(base: str = "loha-sd15.json", **changes: object) -> dict:
    """A real kohya_ss GUI config (LoRA tab) with some keys changed (None removes a key)."""
    data = sample(base)
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    return data


def reasons(r: KohyaImport) -> dict[str, str]:
    return dict(r.unmapped)


def warned(r: KohyaImport, key: str) -> list[str]:
    return [w for w in r.warnings if w.startswith(f"{key}: ") or w.startswith(f"{key} ")]


def test_kohya_locon_preset_keeps_every_network_value():
    """kohya_ss's LoCon preset (networks.lora with conv_dim): every network value lands in Lathe's locon."""
    r = ok(load_kohya_file(SAMPLES / "locon-Prodigy.json"))
    n = r.config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.conv_alpha, n.dropout) == ("locon", 16, 8.0, 16, 8.0, 0.1)
    assert (n.train_unet, n.train_text_encoder, n.network_weights) == (True, True, None)  # lora_network_weights ""
    assert resolve(r.preset) == r.config and r.preset["network"]["type"] == "locon"
    imported = dict(r.mapped)
    assert imported["LoRA_type"].startswith('network.type = "locon"')
    assert imported["conv_dim"] == "network.conv_rank = 16" and imported["conv_alpha"] == "network.conv_alpha = 8.0"
    assert imported["network_dropout"] == "network.dropout = 0.1"
    # kohya_ss passes rank_dropout and module_dropout to networks.lora: the same formulas in Lathe.
    assert (n.rank_dropout, n.module_dropout) == (0.1, 0.1)
    assert imported["rank_dropout"] == "network.rank_dropout = 0.1" and not warned(r, "rank_dropout")
    assert imported["module_dropout"] == "network.module_dropout = 0.1" and not warned(r, "module_dropout")
    # LyCORIS fields that kohya_ss does not pass to networks.lora: listed, no warning (nothing is lost).
    for key in ("use_cp", "factor", "decompose_both"):
        assert reasons(r)[key] == "not applicable: kohya_ss does not pass it to this config's LoRA_type"
        assert not warned(r, key)
    # bucket_reso_steps 1 is kept; the trainer uses 8 and the report says so.
    assert r.config.dataset.bucket_reso_steps == 1 and r.config.dataset.bucket_steps() == 8
    assert warned(r, "Lathe: dataset.bucket_reso_steps") == [
        "Lathe: dataset.bucket_reso_steps: 1 is not a multiple of 8; buckets use 8 (the VAE works in 8-pixel units; "
        "current sd-scripts refuses it too, needing a multiple of 64 for SD 1.x/2.x and of 32 for SDXL)"]


def test_lycoris_loha_preset_keeps_every_network_value():
    r = ok(load_kohya_file(SAMPLES / "loha-sd15.json"))
    n = r.config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.conv_alpha, n.use_tucker) == ("loha", 32, 16.0, 8, 4.0, True)
    assert not hasattr(n, "dropout") and n.network_weights is None
    assert resolve(r.preset) == r.config
    imported = dict(r.mapped)
    assert imported["use_cp"].startswith("network.use_tucker = true (use_cp is the older name of use_tucker")
    # Nothing of the network is lost: network_dropout is 0, and train_on_input belongs to (IA)^3 only.
    assert reasons(r)["network_dropout"] == "not applicable: 0, no dropout"
    assert reasons(r)["train_on_input"].startswith("not applicable: an (IA)^3 setting")
    network_keys = ("network_", "conv_", "use_", "LoRA_type", "LyCORIS", "rank_dropout", "module_dropout", "train_on")
    assert not [w for w in r.warnings if w.startswith(network_keys)], r.warnings


def test_values_loha_cannot_hold_are_warnings():
    r = ok(import_kohya(gui(network_dropout=0.2, rank_dropout=0.1, module_dropout="0.05", use_scalar=True,
                            train_norm=True, LyCORIS_preset="attn-mlp")))
    assert r.config.network.type == "loha"
    # LyCORIS never applies network_dropout (sd-scripts hands it over as neuron_dropout, a name LyCORIS does not read)
    assert warned(r, "network_dropout") == [
        "network_dropout: not applicable: LyCORIS trains without it (sd-scripts passes network_dropout as "
        "neuron_dropout, which LyCORIS does not read, and LyCORIS applies dropout= only in bypass mode), so "
        "network.dropout stays 0 to train as kohya_ss does; the value 0.2 is not imported"]
    assert warned(r, "rank_dropout") == [
        "rank_dropout: unsupported feature: rank dropout on loha networks (Lathe's network.rank_dropout is on lora, "
        "locon and dora); the value 0.1 is not imported"]
    # module dropout is the same formula in LyCORIS and sd-scripts: carried for every type
    assert r.config.network.module_dropout == 0.05 and not warned(r, "module_dropout")
    assert warned(r, "use_scalar")[0].startswith("use_scalar: unsupported feature: a trained scalar")
    assert warned(r, "train_norm")[0].startswith("train_norm: unsupported feature: training the normalization layers")
    assert warned(r, "LyCORIS_preset")[0].startswith("LyCORIS_preset: unsupported feature: LyCORIS module presets")


def test_lycoris_lokr_imports(tmp_path: Path):
    """A LoKr config as the kohya_ss GUI saves it, through the file API and the CLI's preset file."""
    src = tmp_path / "lokr.json"
    src.write_text(json.dumps(gui(
        LoRA_type="LyCORIS/LoKr", network_dim=16, network_alpha=8, conv_dim=4, conv_alpha=2, factor=8,
        decompose_both=True, use_tucker=True, use_cp=False, network_dropout=0, LyCORIS_preset="full",
        network_weights="/loras/start.safetensors", lora_network_weights="", train_on_input=False)))
    r = ok(load_kohya_file(src))
    n = r.config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.conv_alpha) == ("lokr", 16, 8.0, 4, 2.0)
    assert (n.lokr_factor, n.decompose_both, n.use_tucker) == (8, True, True)
    assert n.network_weights == "/loras/start.safetensors"
    assert reasons(r)["lora_network_weights"] == "not applicable: empty (network_weights is set)"
    assert dict(r.mapped)["use_cp"].endswith("either one on turns it on)")
    assert warned(r, "LyCORIS_preset")  # LyCORIS's full preset trains modules Lathe does not
    dst = tmp_path / "preset.json"
    assert import_kohya_file(src, dst) == 0
    assert load_config_or_preset(dst).network == n
    # factor -1 is automatic; kohya_ss's native LoKr (networks.lokr) has no decompose_both.
    r = ok(import_kohya(gui(LoRA_type="Kohya LoKr", factor=-1, decompose_both=True, use_tucker=False, sdxl=True)))
    assert (r.config.network.type, r.config.network.lokr_factor, r.config.network.decompose_both) == ("lokr", -1, False)
    assert reasons(r)["decompose_both"].startswith("not applicable")
    # LyCORIS's factor 0 is not a factor Lathe takes: an error naming kohya's key.
    r = import_kohya(gui(LoRA_type="LyCORIS/LoKr", factor=0))
    assert r.errors == ["factor: must be -1 (automatic) or a positive factor; got 0 (Lathe's network.lokr_factor)"]


def test_lokr_full_dimension_is_an_error_with_a_way_out():
    """The real SDXL LoKr sample uses LyCORIS's "full" dimension (100000); Lathe's ranks stop at 1024."""
    r = load_kohya_file(SAMPLES / "SDXL - 1 image LoRA v1.0.json")
    assert not r.ok and r.preset == {}
    assert [e.split(" (")[0] for e in r.errors] == ["network_dim: must be at most 1024; got 100000",
                                                    "conv_dim: must be at most 1024; got 100000"]
    assert "1024 keeps every factor up to 2048 wide whole" in r.errors[0]
    fixed = ok(import_kohya(gui("SDXL - 1 image LoRA v1.0.json", network_dim=1024, conv_dim=1024)))
    n = fixed.config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.lokr_factor, n.use_tucker) == ("lokr", 1024, 1.0, 1024, 6, False)


def test_dora():
    r = ok(import_kohya(gui(LoRA_type="LyCORIS/LoCon", dora_wd=True, conv_dim=0, conv_alpha=1, network_dropout=0.1,
                            rank_dropout=0.2, use_tucker=False)))
    n = r.config.network
    assert (n.type, n.rank, n.alpha, n.conv_rank, n.dropout, n.rank_dropout) == ("dora", 32, 16.0, 0, 0.0, 0.2)
    assert warned(r, "network_dropout")[0].startswith("network_dropout: not applicable: LyCORIS trains without it")
    assert warned(r, "rank_dropout") == ["rank_dropout: LyCORIS's rank dropout is another formula than sd-scripts' "
                                         "networks.lora's, which Lathe's network.rank_dropout is: LyCORIS (in its "
                                         "default, non-bypass mode) zeroes rows of the whole update weight with one mask "
                                         "per forward call, rescaled only with rank_dropout_scale; Lathe zeroes ranks of "
                                         "the down projection's output with a mask per image and rescales by 1/(1-p): "
                                         "the regularization is not the same"]
    assert dict(r.mapped)["dora_wd"] == 'network.type = "dora"'
    assert reasons(r)["conv_alpha"] == "not applicable: conv_dim is 0 (no convolution layers)"
    axis = warned(r, "dora_wd")
    assert len(axis) == 1 and "wd_on_output is absent, so true" in axis[0] and "Lathe's dora normalizes on the input axis" in axis[0]
    # With convolution layers; "LoCon" is the older GUI's name of LyCORIS/LoCon.
    n = ok(import_kohya(gui(LoRA_type="LoCon", dora_wd="True", conv_dim=8, conv_alpha=4))).config.network
    assert (n.type, n.conv_rank, n.conv_alpha) == ("dora", 8, 4.0)
    # sd-scripts style: network_module and network_args; wd_on_output=False is Lathe's axis: no warning.
    r = ok(import_kohya(standard(LoRA_type=None, network_module="lycoris.kohya",
                                 network_args='"algo=lora" "dora_wd=True" "wd_on_output=False" conv_dim=4 conv_alpha=1')))
    assert (r.config.network.type, r.config.network.conv_rank) == ("dora", 4)
    assert not warned(r, "dora_wd")
    r = import_kohya(standard(LoRA_type=None, network_module="lycoris.kohya", network_args=["dora_wd=True", "wd_on_output=True"]))
    assert ok(r).config.network.type == "dora" and warned(r, "dora_wd") and "wd_on_output true" in warned(r, "dora_wd")[0]
    # kohya_ss passes dora_wd only to LyCORIS: on Standard/Kohya LoCon it never trained a DoRA.
    r = ok(import_kohya(standard(dora_wd=True)))
    assert r.config.network.type == "lora" and reasons(r)["dora_wd"].startswith("not applicable")
    # LyCORIS can decompose LoHa and LoKr too; Lathe's DoRA is a LoRA/LoCon.
    r = import_kohya(gui(dora_wd=True))
    assert r.refused and r.refused.startswith("LoRA_type 'LyCORIS/LoHa' with dora_wd: a weight-decomposed (DoRA) LoHa")
    assert LATHE_TRAINS in r.refused and r.preset == {}


@pytest.mark.parametrize("lora_type, name", [
    ("LyCORIS/iA3", "(IA)^3"), ("LyCORIS/GLoRA", "GLoRA"), ("LyCORIS/BOFT", "BOFT"), ("LyCORIS/Diag-OFT", "Diag-OFT"),
    ("Kohya DyLoRA", "DyLoRA"), ("LyCORIS/DyLoRA", "DyLoRA"), ("LoRA-FA", "LoRA-FA"),
    ("LyCORIS/Native Fine-Tuning", "LyCORIS native fine-tuning"), ("Something New", "Something New"),
])
def test_networks_lathe_does_not_train_are_refused(lora_type: str, name: str):
    r = import_kohya(gui(LoRA_type=lora_type))
    assert r.refused == f"LoRA_type {lora_type!r}: {name} networks are not trained by Lathe; {LATHE_TRAINS} " \
        "(LyCORIS/LoHa, Kohya LoHa), LoKr (LyCORIS/LoKr, Kohya LoKr) and DoRA (dora_wd on LyCORIS/LoCon)"
    assert r.preset == {} and r.config is None
    assert reasons(r)["LoRA_type"] == f"unsupported feature: {name} networks"
    assert set(gui()) <= {k for k, _ in r.mapped} | set(reasons(r))
    assert reasons(r)["conv_dim"] == "not imported: the config is refused"
    # The same through sd-scripts' network_args
    r = import_kohya(standard(LoRA_type=None, network_module="lycoris.kohya", network_args="algo=ia3 conv_dim=4"))
    assert r.refused and r.refused.startswith("network_module 'lycoris.kohya' with network_args algo=ia3: (IA)^3")


def test_which_lora_type_becomes_which_network():
    n = ok(import_kohya(gui(LoRA_type="LyCORIS/LoCon", conv_dim=8, conv_alpha=0, use_tucker=False))).config.network
    assert (n.type, n.conv_rank, n.conv_alpha) == ("locon", 8, 8.0)  # conv_alpha 0 = conv_dim, as in kohya_ss
    r = ok(import_kohya(gui(LoRA_type="LyCORIS/LoCon", conv_dim=8, use_tucker=True)))
    assert r.config.network.type == "locon" and warned(r, "use_tucker")[0].startswith(
        "use_tucker: unsupported feature: Tucker decomposition on locon networks")
    r = ok(import_kohya(gui("locon-Prodigy.json", conv_dim=0)))  # Kohya LoCon without convolutions is a LoRA
    assert (r.config.network.type, r.config.network.dropout) == ("lora", 0.1)
    assert reasons(r)["conv_dim"] == "not applicable: 0, no convolution layers"
    n = ok(import_kohya(gui(LoRA_type="Kohya LoHa", conv_dim=0, use_tucker=True, sdxl=True))).config.network
    assert (n.type, n.conv_rank, n.use_tucker) == ("loha", 0, False)  # Tucker needs 3x3 convolutions
    n = ok(import_kohya(gui(network_alpha=0))).config.network
    assert n.alpha == 32.0  # kohya_ss: alpha 0 means alpha = network_dim
    # Standard: kohya_ss never passes conv_dim; with conv_dim in network_args it is kohya's LoCon.
    r = ok(import_kohya(standard(conv_dim=8)))
    assert r.config.network.type == "lora" and reasons(r)["conv_dim"].startswith("not applicable: kohya_ss passes conv_dim")
    r = ok(import_kohya(standard(network_args='conv_dim="4" conv_alpha="2" rank_dropout=0.1 brand_new=1')))
    n = r.config.network
    assert (n.type, n.conv_rank, n.conv_alpha) == ("locon", 4, 2.0)
    assert n.rank_dropout == 0.1 and not warned(r, "network_args rank_dropout")
    assert ("network_args", "network.rank_dropout = 0.1") in r.mapped
    assert reasons(r)["network_args brand_new"].startswith("unknown kohya_ss setting") and warned(r, "network_args brand_new")
    r = ok(import_kohya(standard(LoRA_type=None, network_module="networks.lokr", network_args=["factor=4", "conv_dim=2"])))
    assert (r.config.network.type, r.config.network.lokr_factor, r.config.network.conv_rank) == ("lokr", 4, 2)
    assert "network_module 'networks.oft'" in import_kohya(standard(LoRA_type=None, network_module="networks.oft")).refused
    r = import_kohya(standard(network_args="conv_dim"))
    assert r.errors == ["network_args: 'conv_dim' is not NAME=VALUE"]


def test_network_weights():
    r = ok(import_kohya(standard(lora_network_weights="/loras/old.safetensors", dim_from_weights=True)))
    assert r.config.network.network_weights == "/loras/old.safetensors"
    assert warned(r, "dim_from_weights")[0].startswith("dim_from_weights: unsupported feature: reading network_dim")
    r = ok(import_kohya(standard(network_weights="", lora_network_weights=None)))
    assert r.config.network.network_weights is None and dict(r.mapped)["network_weights"].startswith(
        "network.network_weights = unset")


def test_bucket_reso_steps_not_a_multiple_of_8_is_used_rounded_up_with_a_warning():
    r = ok(import_kohya(standard(bucket_reso_steps="12")))
    assert (r.config.dataset.bucket_reso_steps, r.config.dataset.bucket_steps()) == (12, 16)
    assert warned(r, "Lathe: dataset.bucket_reso_steps")[0].startswith(
        "Lathe: dataset.bucket_reso_steps: 12 is not a multiple of 8; buckets use 16")
    r = ok(import_kohya(standard(bucket_reso_steps=32)))
    assert r.config.dataset.bucket_steps() == 32 and not warned(r, "Lathe: dataset.bucket_reso_steps")


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
    r = ok(import_kohya(standard(optimizer="DAdaptAdam", learning_rate="1", unet_lr="1", text_encoder_lr="1",
                                 optimizer_args="decouple=True weight_decay=0.01 use_bias_correction=True")))
    o = r.config.optimizer
    assert (o.type, o.decouple, o.weight_decay, o.use_bias_correction, o.learning_rate) == (
        "DAdaptAdam", True, 0.01, True, 1.0)
    r = ok(import_kohya(standard(optimizer="DAdaptLion", learning_rate="1", unet_lr="1", text_encoder_lr="1")))
    assert r.config.optimizer.type == "DAdaptLion"
    r = import_kohya(standard(optimizer="CAME"))
    assert r.refused and "CAME" in r.refused and r.preset == {}
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


def test_warmup_percentage_stays_a_percentage():
    c = ok(import_kohya(standard(lr_warmup="10", lr_scheduler="cosine"))).config
    assert (c.scheduler.lr_warmup, c.scheduler.warmup_steps, c.scheduler.type) == (10.0, 0, "cosine")
    assert c.scheduler.warmup_for(320) == 32  # 10% of the run's 320 steps, however many that turns out to be
    r = ok(import_kohya(standard(lr_warmup=10, max_train_steps="", lr_scheduler="cosine")))
    assert r.config.scheduler.lr_warmup == 10.0 and not any(w.startswith("lr_warmup") for w in r.warnings)
    c = ok(import_kohya(standard(lr_warmup=10, lr_warmup_steps=25, lr_scheduler="cosine"))).config
    assert (c.scheduler.warmup_steps, c.scheduler.lr_warmup) == (25, None)
    r = import_kohya(standard(lr_warmup=150, lr_scheduler="cosine"))
    assert r.errors == ["lr_warmup: a percentage of all steps, above 0 and below 100; got 150"]


def test_loraplus_ratios_import_and_split_the_learning_rates():
    import torch

    from backend.trainer.optim import param_groups

    c = ok(import_kohya(standard(loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio=4, loraplus_unet_lr_ratio=0))).config
    o = c.optimizer
    assert (o.loraplus_lr_ratio, o.loraplus_unet_lr_ratio, o.loraplus_text_encoder_lr_ratio) == (16.0, None, 4.0)
    down, up, te_down, te_up = (torch.nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = param_groups(c, [down, up], [te_down, te_up], up={id(up), id(te_up)})
    lr_u, lr_t = o.unet_lr or o.learning_rate, o.text_encoder_lr or o.learning_rate
    assert [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in groups] == [
        ("unet", lr_u, [id(down)]), ("unet_plus", lr_u * 16, [id(up)]),
        ("text_encoder", lr_t, [id(te_down)]), ("text_encoder_plus", lr_t * 4, [id(te_up)])]


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
    # each prompt keeps its own options, as sd-scripts reads them per line
    assert s.prompts == ["a cat --n blurry --w 768 --h 512 --s 30 --l 6.5 --d 3", "a dog --n blurry --ss euler"]
    assert (s.sample_sampler, s.every_n_epochs, s.negative_prompt, s.width) == ("euler_a", 2, "", 512)
    r = import_kohya(standard(sample_prompts="a cat --g 3.5 --w 512\na dog --w wide"))
    assert r.errors == ["sample_prompts: line 2: --w (width) must be a number; got 'wide'"]
    assert "sample_prompts: line 1: option --g 3.5 is not supported and is left out" in r.warnings
    assert import_kohya(standard(sample_sampler="plms")).errors[0].startswith(
        "sample_sampler: 'plms' is not a sampler Lathe has")


def test_resume_and_launch():
    r = ok(import_kohya(standard(resume="/old/state", gpu_ids="0,1", num_processes="2")))
    assert r.config.resume_from == "/old/state" and any(w.startswith("resume: Lathe resumes only") for w in r.warnings)
    assert (r.config.launch.gpu_ids, r.config.launch.num_processes) == ("0,1", 2)


def test_other_models_are_refused():
    """Flux.1 and SD3 import (tests/test_kohya_flow.py); the models Lathe does not train are refused."""
    assert ok(import_kohya(standard(sdxl=False, flux1_checkbox=True))).config.model.family == "flux"
    assert ok(import_kohya(standard(sdxl=False, sd3_checkbox="True"))).config.model.family == "sd3"
    assert "Lumina Image 2.0" in import_kohya(standard(lumina_checkbox=True)).refused
    assert "Lathe trains LoRAs for Stable Diffusion 1.x, 2.x, SDXL, SD3/SD3.5 and Flux.1 only" in import_kohya(
        standard(LoRA_type="Anima")).refused
    assert "DyLoRA" in import_kohya(standard(LoRA_type="Kohya DyLoRA")).refused
    assert "Textual Inversion" in import_kohya({"token_string": "x", "init_word": "y"}).refused
    assert "JSON object" in import_kohya([1, 2]).refused  # type: ignore[arg-type]


def test_bad_values_are_errors_naming_the_kohya_key():
    r = import_kohya(standard(network_dim="lots", gradient_checkpointing="maybe"))
    assert 'network_dim: expected a number; got "lots"' in r.errors
    assert 'gradient_checkpointing: expected true or false; got "maybe"' in r.errors
    assert ("network_dim", "not imported: its value is invalid (see the errors)") in r.unmapped
    r = import_kohya(standard(bucket_reso_steps=1024))
    assert r.errors == ["bucket_reso_steps: must be at most 512; got 1024 (Lathe's dataset.bucket_reso_steps)"]
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
    assert "Not supported (" in out and "Not needed (" in out and "Applied (" in out and "scale_weight_norms -> training.scale_weight_norms = 5.0" in out
    cfg = load_config_or_preset(dst)
    assert cfg.optimizer.type == "Prodigy" and cfg.optimizer.d0 == 1e-4


def test_import_file_refuses_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src, dst = tmp_path / "ia3.json", tmp_path / "preset.json"
    src.write_text(json.dumps({**sample("loha-sd15.json"), "LoRA_type": "LyCORIS/iA3"}))
    assert import_kohya_file(src, dst) == 1
    captured = capsys.readouterr()
    assert "Refused: LoRA_type 'LyCORIS/iA3': (IA)^3 networks" in captured.out and "Nothing written" in captured.err
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


def test_the_generated_kohya_tables_in_the_docs_match_the_importer():
    from backend import kohya_docs

    text = kohya_docs.DOC.read_text(encoding="utf-8")
    assert kohya_docs.BEGIN in text and kohya_docs.updated(text) == text, "run python -m backend.kohya_docs"
    assert "| `flip_aug` | `dataset.random_flip` |" in text  # one row per SIMPLE key
    assert "`xformers`" in text.split(kohya_docs.BEGIN)[1]  # and every not-imported key with its reason


def test_the_mapping_tables_name_every_key_the_rules_import():
    """docs/presets.md's rule rows come from backend.kohya_mapping: every key a rule imports from the
    kohya_ss configs (beyond SIMPLE's one-to-one keys) has a row, and every key a row names is one the
    importer's code reads."""
    from backend import kohya_docs
    from backend.kohya_keys import SIMPLE
    from backend.kohya_mapping import documented_keys

    text = kohya_docs.DOC.read_text(encoding="utf-8")
    assert not kohya_docs.missing(text) and kohya_docs.updated(text) == text, "run python -m backend.kohya_docs"
    imported = set()
    for path in FILES:
        r = load_kohya_file(path)
        imported |= {key for key, _ in r.mapped if " " not in key and key not in SIMPLE}
    assert imported, "no sample imported anything"
    assert imported - documented_keys() == set()
    source = "".join((ROOT / "backend" / name).read_text(encoding="utf-8") for name in (
        "kohya.py", "kohya_rules.py", "kohya_network.py", "kohya_noise.py", "kohya_dataset.py", "kohya_args.py",
        "kohya_keys.py", "kohya_flow.py"))
    unread = {key for key in documented_keys() if f'"{key}"' not in source and f"'{key}'" not in source}
    assert unread == set(), f"documented but never read by the importer: {sorted(unread)}"
