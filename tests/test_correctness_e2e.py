"""End-to-end halves of the correctness review (issue 11): with the text encoder trained under
network, rank and module dropout (a LoCon: the ResNet convolutions too) on 225-token captions (three
chunks), uncached latents, a validation split and
sd-scripts' noise/loss options (multires, adaptive and input-perturbation noise with random
strengths, a timestep range, debiased Huber loss, max-norm) and a dataset of several subsets
(regularization images weighted by prior_loss_weight, a listed subset with its own caption rules,
no-upscale buckets at a step that is not a multiple of 8), every checkpoint verifies and a resume
from the middle of an epoch is bit-identical; SDXL says that it ignores clip_skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from backend import checkpoints as C
from tests.conftest import events, run_cli, step_losses, train

pytestmark = pytest.mark.train

OFF_DEFAULT = dict(
    network={"type": "locon", "conv_rank": 2, "conv_alpha": 1.0, "train_text_encoder": True, "dropout": 0.3,
             "rank_dropout": 0.2, "module_dropout": 0.1, "rank": 4, "alpha": 2},
    dataset={"cache_latents": False, "validation_split": 0.25},
    # sd-scripts' noise, timestep and loss options, all on (docs/training.md; each formula is
    # unit-tested in test_loss_options.py): they ride on this run's verify and exact resume.
    training={"max_train_steps": 9, "max_train_epochs": None, "clip_skip": 2, "noise_offset": 0.05,
              "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01, "multires_noise_iterations": 4,
              "multires_noise_discount": 0.5, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True,
              "min_timestep": 50, "max_timestep": 950, "debiased_estimation_loss": True, "loss_type": "huber",
              "huber_schedule": "snr", "scale_weight_norms": 0.01, "max_token_length": 225},
    # LoRA+ on the up-projections and a warmup given as a percentage of all steps.
    optimizer={"loraplus_lr_ratio": 4.0},
    scheduler={"type": "cosine", "lr_warmup": 20.0},
    sampling={"prompts": ["a red circle"], "every_n_steps": None, "every_n_epochs": None, "steps": 2},
    saving={"save_every_n_steps": 4, "save_every_n_epochs": None, "save_last_n_epochs": None},
)


def subset_folders(demo: Path, root: Path) -> dict:
    """Regularization images (a kohya folder) and one more subset, made of copies of demo images."""
    shapes = sorted((demo / "images" / "5_shape").glob("*.png"))
    (root / "reg" / "1_shape").mkdir(parents=True)
    for p in shapes[:3]:
        shutil.copy(p, root / "reg" / "1_shape" / p.name)
    (root / "extra").mkdir()
    for p in shapes[3:5]:  # no caption files: the class tokens stand in
        shutil.copy(p, root / "extra" / p.name)
    return {"reg_data_dir": str(root / "reg"), "bucket_no_upscale": True, "bucket_reso_steps": 12,
            "subsets": [{"image_dir": str(root / "extra"), "num_repeats": 2, "class_tokens": "sks shape",
                         "shuffle_caption": True, "keep_tokens": 1, "random_flip": True, "caption_dropout_rate": 0.3}]}


@pytest.fixture(scope="module")
def off_default_run(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offdefault")
    sections = {**OFF_DEFAULT, "dataset": {**OFF_DEFAULT["dataset"], **subset_folders(demo, tmp)},
                "training": {**OFF_DEFAULT["training"], "prior_loss_weight": 0.5}}
    proc, v = train(tmp, demo, **sections)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return v


def test_text_encoder_dropout_checkpoints_all_verify(off_default_run):
    started = events(off_default_run, "run_started")[0]
    assert started["trained"] == ["unet", "text_encoder_0"]
    assert (started["images"], started["reg_images"], started["subsets"]) == (12, 3, 4)  # 16 less 4 held out
    names = sorted(p.name for p in (off_default_run / "checkpoints").iterdir())
    assert names == ["best", "final", "step-00000004", "step-00000008"]
    out = run_cli("verify", *(str(off_default_run / "checkpoints" / name) for name in names))  # one process
    assert out.returncode == 0, out.stdout + out.stderr
    reports = out.stdout.split("VALID: ")
    assert [r.splitlines()[0].rsplit("/", 1)[-1] for r in reports[1:]] == names, out.stdout
    assert all("difference 0.00e+00" in r for r in reports[:-1]), out.stdout
    tensors = load_file(off_default_run / "checkpoints" / "final" / "lora.safetensors")
    te = [k for k in tensors if k.startswith("text_encoder_0.")]
    assert te and any(tensors[k].abs().max() > 0 for k in te if "lora_B" in k)  # the text encoder trained


def test_the_export_counts_the_subsets_and_regularization_images_as_sd_scripts(off_default_run):
    with safe_open(off_default_run / "exports" / "demo.safetensors", "pt") as f:
        meta = f.metadata()
    dirs, reg_dirs = json.loads(meta["ss_dataset_dirs"]), json.loads(meta["ss_reg_dataset_dirs"])
    assert set(dirs) == {"2_yellow star", "5_shape", "extra"} and dirs["extra"]["n_repeats"] == 2
    # 2 + 12 + 2 training images, a quarter of them (4) held out for validation; never a reg image
    assert sum(d["img_count"] for d in dirs.values()) == 12
    assert reg_dirs == {"1_shape": {"n_repeats": 1, "img_count": 3}} and meta["ss_num_reg_images"] == "3"
    train_uses = sum(d["n_repeats"] * d["img_count"] for d in dirs.values())
    assert meta["ss_num_train_images"] == str(train_uses)
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 2 * train_uses  # the reg images balance the training ones
    assert (meta["ss_prior_loss_weight"], meta["ss_bucket_no_upscale"]) == ("0.5", "True")
    assert (meta["ss_loraplus_lr_ratio"], meta["ss_lr_warmup_steps"]) == ("4.0", "2")  # 20% of 9 steps


def test_the_export_carries_the_additional_networks_hashes_as_sd_scripts(off_default_run):
    """sd-scripts' precalculate_safetensors_hashes: the file's tensors serialized with only the ss_*
    metadata; model hash = sha256 of all after the header (the tensor data, so of the file's own too),
    legacy = sha256 of the 64 KiB at 1 MiB, first 8 hex digits."""
    import hashlib

    from safetensors.torch import save

    path = off_default_run / "exports" / "demo.safetensors"
    raw = path.read_bytes()
    meta = safe_open(str(path), "pt").metadata()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    again = save(load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]


def test_mid_epoch_resume_with_dropout_and_uncached_latents_is_bit_exact(off_default_run):
    ck = off_default_run / "checkpoints" / "step-00000004"
    manifest = C.read_manifest(ck)
    assert 0 < manifest["batch_in_epoch"] < manifest["steps_per_epoch"]  # the middle of an epoch
    proc = run_cli("resume", str(ck))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    v = sorted(off_default_run.parent.glob("version_*"))[-1]
    a, b = step_losses(off_default_run), step_losses(v)
    assert sorted(b) == list(range(5, 10))
    assert [a[k] for k in b] == [b[k] for k in b]
    fa, fb = (load_file(x / "exports" / "demo.safetensors") for x in (off_default_run, v))
    assert fa.keys() == fb.keys() and all(fa[k].equal(fb[k]) for k in fa)
    assert any(k.startswith("lora_te_text_model_") for k in fa)
    assert any("resnets" in k and fa[k].dim() == 4 and fa[k].shape[-1] == 3 for k in fa)  # LoCon's 3x3 convolutions
    norms = {e["step"]: (e["keys_scaled"], e["average_key_norm"]) for e in events(v, "step")}
    assert norms == {e["step"]: (e["keys_scaled"], e["average_key_norm"]) for e in events(off_default_run, "step")
                     if e["step"] > 4}


def test_the_noise_and_loss_options_are_in_the_step_events_and_the_export(off_default_run):
    from safetensors import safe_open

    steps = events(off_default_run, "step")
    assert all(isinstance(e["keys_scaled"], int) for e in steps)
    # the warmup starts at learning rate 0: step 1 leaves the up-projections at zero, every later step moves them
    assert steps[0]["average_key_norm"] == 0 and all(e["average_key_norm"] > 0 for e in steps[1:])
    assert any(e["keys_scaled"] > 0 for e in steps) and all(e["max_key_norm"] <= 0.01 * (1 + 1e-5) for e in steps)
    meta = safe_open(str(off_default_run / "exports" / "demo.safetensors"), "pt").metadata()
    assert {k: meta[k] for k in ("ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale",
                                 "ss_ip_noise_gamma", "ss_debiased_estimation", "ss_zero_terminal_snr", "ss_loss_type",
                                 "ss_huber_c", "ss_huber_schedule", "ss_scale_weight_norms",
                                 "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength",
                                 "modelspec.timestep_range")} == {
        "ss_multires_noise_iterations": "4", "ss_multires_noise_discount": "0.5", "ss_adaptive_noise_scale": "0.01",
        "ss_ip_noise_gamma": "0.1", "ss_debiased_estimation": "True", "ss_zero_terminal_snr": "False",
        "ss_loss_type": "huber", "ss_huber_c": "0.1", "ss_huber_schedule": "snr", "ss_scale_weight_norms": "0.01",
        "ss_noise_offset_random_strength": "True", "ss_ip_noise_gamma_random_strength": "True",
        "modelspec.timestep_range": "50,950"}


def test_export_metadata_records_kohya_meanings(off_default_run):
    from safetensors import safe_open

    meta = safe_open(str(off_default_run / "exports" / "demo.safetensors"), "pt").metadata()
    assert meta["ss_network_dropout"] == "0.3" and meta["ss_clip_skip"] == "2" and meta["ss_max_token_length"] == "225"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "rank_dropout": "0.2",
                                                   "module_dropout": "0.1"}
    assert meta["ss_v_parameterization"] == "False" and meta["modelspec.prediction_type"] == "epsilon"


def test_sdxl_warns_that_clip_skip_does_nothing(demo, tmp_path):
    proc, v = train(tmp_path, demo, model={"pretrained_model": str(demo / "model-sdxl")},
                    training={"max_train_steps": 2, "max_train_epochs": None, "clip_skip": 2},
                    sampling={"prompts": []}, saving={"save_every_n_epochs": None, "save_last_n_epochs": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [e["message"] for e in events(v, "warning")]
    assert any(w.startswith("training.clip_skip: 2 is ignored for SDXL") for w in warnings), warnings
    assert json.loads((v / "config.json").read_text())["training"]["clip_skip"] == 2
