"""kohya datasets on import: regularization images, no-upscale buckets and sd-scripts' dataset TOML
(`dataset_config`), with every TOML key accounted for in the report."""

from __future__ import annotations

import json

from backend.kohya import import_kohya, load_kohya_file
from tests.test_kohya_import import (
    SAMPLES,  # ../shared/kohya-presets, else the frozen copies in tests/fixtures
)


def standard(**changes: object) -> dict:
    data = json.loads((SAMPLES / "SDXL - LoRA AI_Now ADamW v1.0.json").read_text())
    data.update(changes)
    return data


TOML = '''
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 768
batch_size = 2
enable_bucket = true
bucket_no_upscale = true
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "/data/dog"
  num_repeats = 10
  class_tokens = "sks dog"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "/data/reg_dog"
  is_reg = true
  num_repeats = 1
  shuffle_caption = false
  cache_info = true
  color_aug = true
'''


def test_a_dataset_toml_becomes_subsets_with_sd_scripts_lookup(tmp_path):
    (tmp_path / "dataset.toml").write_text(TOML)
    cfg_file = tmp_path / "kohya.json"
    cfg_file.write_text(json.dumps(standard(dataset_config="dataset.toml", train_data_dir="/ignored",
                                            reg_data_dir="/ignored/reg", prior_loss_weight=0.7)))
    r = load_kohya_file(cfg_file)  # the TOML path is relative to the kohya file
    assert r.ok, r.errors
    ds = r.config.dataset
    assert (ds.train_data_dir, ds.reg_data_dir) == (None, None)  # sd-scripts ignores them with a TOML
    assert [s.model_dump(exclude_defaults=True) for s in ds.subsets] == [
        {"image_dir": "/data/dog", "num_repeats": 10, "class_tokens": "sks dog", "caption_extension": ".txt",
         "shuffle_caption": True, "keep_tokens": 1, "random_flip": True},
        {"image_dir": "/data/reg_dog", "is_reg": True, "caption_extension": ".txt", "shuffle_caption": False,
         "keep_tokens": 1}]
    assert (ds.resolution, ds.bucket_no_upscale, ds.bucket_reso_steps, r.config.training.train_batch_size) == (
        768, True, 32, 2)
    assert r.config.training.prior_loss_weight == 0.7
    reasons = dict(r.unmapped)
    assert reasons["train_data_dir"].startswith("not applicable: dataset_config lists the image folders")
    assert reasons["reg_data_dir"].startswith("not applicable: dataset_config lists the image folders")
    imported = dict(r.mapped)["dataset_config"]
    assert imported.startswith("dataset.subsets = 2 subset(s) from dataset.toml (1 of regularization images)")
    assert "datasets[0].subsets[1].cache_info: not needed" in imported
    assert ("dataset_config: datasets[0].subsets[1].color_aug: unsupported feature: color augmentation; the value "
            "true is not imported") in r.warnings


def test_toml_datasets_that_disagree_are_refused_naming_the_setting(tmp_path):
    (tmp_path / "d.toml").write_text('''
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "/a"
[[datasets]]
resolution = 1024
  [[datasets.subsets]]
  image_dir = "/b"
''')
    r = import_kohya(standard(dataset_config=str(tmp_path / "d.toml")))
    assert not r.ok
    assert r.errors == ["dataset_config: datasets[1].resolution is 1024 but datasets[0].resolution is 512; Lathe "
                        "trains one dataset with one value of it: make them equal, or import the datasets as "
                        "separate presets"]


def test_toml_datasets_that_agree_merge_and_fine_tuning_subsets_are_errors(tmp_path):
    (tmp_path / "d.toml").write_text('''
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = "/a"
  num_repeats = 3
[[datasets]]
  [[datasets.subsets]]
  image_dir = "/b"
  metadata_file = "/b/meta.json"
''')
    r = import_kohya(standard(dataset_config=str(tmp_path / "d.toml")))
    assert r.errors == ["dataset_config: datasets[1].subsets[0]: unsupported feature: fine-tuning subsets (captions "
                        "from a metadata JSON): give the images with caption files"]
    (tmp_path / "d.toml").write_text((tmp_path / "d.toml").read_text().replace('metadata_file = "/b/meta.json"', ""))
    r = import_kohya(standard(dataset_config=str(tmp_path / "d.toml")))
    assert r.ok, r.errors
    assert [(s.image_dir, s.num_repeats) for s in r.config.dataset.subsets] == [("/a", 3), ("/b", 1)]
    assert r.config.dataset.resolution == 512


def test_a_missing_or_broken_toml_is_an_error_that_says_what_to_do(tmp_path):
    r = import_kohya(standard(dataset_config=str(tmp_path / "none.toml")))
    assert r.errors == [f"dataset_config: the dataset TOML {tmp_path / 'none.toml'} is not there; the import reads its "
                        "subsets from it (put the file there, or clear dataset_config and set train_data_dir)"]
    (tmp_path / "bad.toml").write_text("[[datasets]\n")
    r = import_kohya(standard(dataset_config=str(tmp_path / "bad.toml")))
    assert len(r.errors) == 1 and r.errors[0].startswith(f"dataset_config: {tmp_path / 'bad.toml'} is not a readable "
                                                         "TOML file (")


def test_regularization_images_and_their_weight_import():
    r = import_kohya(standard(reg_data_dir="/data/reg", prior_loss_weight="0.5", bucket_no_upscale=True))
    assert r.ok, r.errors
    c = r.config
    assert (c.dataset.reg_data_dir, c.training.prior_loss_weight, c.dataset.bucket_no_upscale) == ("/data/reg", 0.5, True)
    r = import_kohya(standard(reg_data_dir="", prior_loss_weight=1))
    assert r.config.dataset.reg_data_dir is None
    assert dict(r.unmapped)["reg_data_dir"].startswith("not applicable: empty")


def test_additional_parameters_are_imported_argument_by_argument():
    """The three losses the review found: --network_train_unet_only (else both text encoders train),
    --max_grad_norm=0 (else clipping at 1.0) and Prodigy's args in --optimizer_args."""
    data = json.loads((SAMPLES / "SDXL - LoRA AI_Now prodigy v1.0.json").read_text())
    data["additional_parameters"] = ('--network_train_unet_only --max_grad_norm=0 --optimizer_args "weight_decay=0.05" '
                                     '"use_bias_correction=True" "betas=0.9,0.99" --lr_scheduler_type CosineAnnealingLR')
    r = import_kohya(data)
    assert r.ok, r.errors
    c = r.config
    assert (c.network.train_text_encoder, c.optimizer.max_grad_norm) == (False, None)
    assert (c.optimizer.weight_decay, c.optimizer.use_bias_correction, c.optimizer.betas) == (0.05, True, (0.9, 0.99))
    mapped = dict(r.mapped)
    assert mapped["additional_parameters"].startswith("4 sd-scripts argument(s)")
    assert mapped["max_grad_norm"] == "optimizer.max_grad_norm = unset (from additional_parameters)"
    assert dict(r.unmapped)["lr_scheduler_type"] == "unsupported feature: a custom scheduler class (from additional_parameters)"
    assert any(w.startswith('lr_scheduler_type: unsupported feature: a custom scheduler class; the value '
                            '"CosineAnnealingLR"') for w in r.warnings)


def test_an_unknown_argument_in_additional_parameters_says_did_you_mean():
    r = import_kohya(standard(additional_parameters="--netwrok_dim 8 --seed=7"))
    assert r.errors == ["additional_parameters: --netwrok_dim is not an sd-scripts argument; did you mean --network_dim?"]
    r = import_kohya(standard(additional_parameters="--seed=7 --log_prefix=xl-loha"))
    assert r.ok and r.config.training.seed == 7
    assert dict(r.unmapped)["log_prefix"].startswith("not applicable")


def test_lr_scheduler_args_map_to_the_schedule_settings():
    r = import_kohya(standard(lr_scheduler="cosine_with_restarts", lr_scheduler_args="num_cycles=3 power=2"))
    assert r.ok, r.errors
    assert (r.config.scheduler.num_cycles, r.config.scheduler.power) == (3, 2.0)
    r = import_kohya(standard(lr_scheduler="cosine_with_restarts", lr_scheduler_args="num_cycle=3"))
    assert r.errors == ["lr_scheduler_args: unknown argument 'num_cycle'; did you mean num_cycles?"]
    r = import_kohya(standard(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args="T_max=1000"))
    assert r.ok and dict(r.unmapped)["lr_scheduler_args"].startswith("not applicable: arguments of the custom")


def test_loraplus_in_network_args_as_sd_scripts_reads_it():
    r = import_kohya(standard(network_args="loraplus_lr_ratio=16 loraplus_text_encoder_lr_ratio=4"))
    assert r.ok, r.errors
    o = r.config.optimizer
    assert (o.loraplus_lr_ratio, o.loraplus_text_encoder_lr_ratio) == (16.0, 4.0)
    assert ("network_args", "optimizer.loraplus_lr_ratio = 16.0") in r.mapped
