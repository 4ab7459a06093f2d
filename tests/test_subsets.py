"""Datasets of several subsets and regularization images, counted as sd-scripts counts them
(library/train_util.py DreamBoothDataset), and their loss weighted by prior_loss_weight."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from backend import dataset as D
from backend.config import DatasetConfig, TrainingConfig
from backend.trainer.build import plan_settings


def img(path: Path, size=(64, 64), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 40, 200)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def images(folder: Path, n: int, **kw) -> Path:
    for i in range(n):
        img(folder / f"{i:03d}.png", **kw)
    return folder


def kohya_steps(counts: list[tuple[int, int]], batch: int) -> int:
    """sd-scripts' steps per epoch with one bucket: ceil(images x repeats, summed over subsets / batch)."""
    return -(-sum(n * r for n, r in counts) // batch)


def test_two_subsets_with_their_own_repeats_give_kohyas_counts(tmp_path):
    a = images(tmp_path / "a", 3, caption="a thing")
    b = images(tmp_path / "b", 5)
    ds = DatasetConfig(train_data_dir=None, subsets=[{"image_dir": str(a), "num_repeats": 4},
                                                     {"image_dir": str(b), "num_repeats": 2, "class_tokens": "sks b"}],
                       enable_bucket=False, resolution=64)
    loaded = D.load(ds, seed=1)
    assert [(s.name, s.num_repeats) for s in loaded.subsets] == [("a", 4), ("b", 2)]
    assert sum(it.repeats for it in loaded.items) == 3 * 4 + 5 * 2  # ss_num_train_images
    assert {it.caption for it in loaded.items if it.subset == 1} == {"sks b"}  # class tokens stand in for captions
    cfg = TrainingConfig(dataset=ds, training={"train_batch_size": 4})
    plan = plan_settings(cfg, 1, loaded.subsets)
    buckets = D.bucket_of_items(loaded.items, D.buckets_for(ds))
    assert D.steps_per_epoch(loaded.items, buckets, plan) == kohya_steps([(3, 4), (5, 2)], 4) == 6
    uses = [loaded.items[s.item].subset for b in D.epoch_plan(loaded.items, buckets, plan, 0) for s in b.samples]
    assert (uses.count(0), uses.count(1)) == (12, 10)


def test_train_data_dir_reg_data_dir_and_subsets_together(tmp_path):
    images(tmp_path / "train" / "10_sks dog", 2)
    images(tmp_path / "train" / "3_style", 1)
    images(tmp_path / "reg" / "1_dog", 4)
    extra = images(tmp_path / "extra", 2, caption="more")
    ds = DatasetConfig(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                       subsets=[{"image_dir": str(extra), "num_repeats": 3}])
    loaded = D.load(ds, seed=1)
    assert [(s.name, s.num_repeats, s.is_reg, s.label) for s in loaded.subsets] == [
        ("10_sks dog", 10, False, "dataset.train_data_dir"), ("3_style", 3, False, "dataset.train_data_dir"),
        ("1_dog", 1, True, "dataset.reg_data_dir"), ("extra", 3, False, "dataset.subsets.0.image_dir")]
    train = [it for it in loaded.items if not it.is_reg]
    reg = [it for it in loaded.items if it.is_reg]
    assert sum(it.repeats for it in train) == 2 * 10 + 1 * 3 + 2 * 3 == 29
    # sd-scripts: 4 reg images x 1, then one more each round until they match the 29 training uses
    assert [it.repeats for it in reg] == [8, 7, 7, 7] and sum(it.repeats for it in reg) == 29


@pytest.mark.parametrize(("train_uses", "reg", "expected"), [
    (30, [1, 1, 1, 1], [8, 8, 7, 7]),  # too few: raised round-robin
    (2, [1, 1, 1, 1, 1], [1, 1]),  # too many: the first that balance, the rest unused
    (10, [3, 3, 3, 3], [3, 3, 3, 3]),  # the first round overshoots by 2: kept, as sd-scripts does
    (7, [5, 5], [5, 5]),
    (12, [5], [12]),
])
def test_balance_reg_follows_sd_scripts(train_uses, reg, expected):
    train = [D.ImageItem("t.png", "", train_uses, (64, 64))]
    regs = [D.ImageItem(f"r{i}.png", "", r, (64, 64), 1, True) for i, r in enumerate(reg)]
    assert [it.repeats for it in D.balance_reg(train, regs)] == expected


def test_regularization_images_are_never_held_out_for_validation(tmp_path):
    images(tmp_path / "train" / "1_a", 8)
    images(tmp_path / "reg" / "1_b", 8)
    loaded = D.load(DatasetConfig(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                                  validation_split=0.25), seed=3)
    assert len(loaded.val_items) == 2 and not any(it.is_reg for it in loaded.val_items)
    assert sum(it.repeats for it in loaded.items if it.is_reg) == 6  # balanced against the 6 left to train


def test_each_subset_keeps_its_own_caption_rules(tmp_path):
    a = images(tmp_path / "a", 4, caption="first, b, c, d, e")
    b = images(tmp_path / "b", 4, caption="first, b, c, d, e")
    ds = DatasetConfig(train_data_dir=None, shuffle_caption=True, keep_tokens=1, random_flip=True, subsets=[
        {"image_dir": str(a), "num_repeats": 20},
        {"image_dir": str(b), "num_repeats": 20, "shuffle_caption": False, "flip_aug": False}])
    loaded = D.load(ds, seed=1)
    cfg = TrainingConfig(dataset=ds, training={"train_batch_size": 8})
    plan = plan_settings(cfg, 1, loaded.subsets)
    buckets = D.bucket_of_items(loaded.items, D.buckets_for(ds))
    by_subset: dict[int, list[D.Sample]] = {0: [], 1: []}
    for batch in D.epoch_plan(loaded.items, buckets, plan, 0):
        for smp in batch.samples:
            by_subset[loaded.items[smp.item].subset].append(smp)
    assert {s.caption for s in by_subset[1]} == {"first, b, c, d, e"} and not any(s.flip for s in by_subset[1])
    shuffled = {s.caption for s in by_subset[0]}
    assert len(shuffled) > 1 and all(c.startswith("first, ") for c in shuffled)  # keep_tokens=1 from the dataset
    assert any(s.flip for s in by_subset[0])


def test_a_listed_subset_must_hold_images_and_says_so(tmp_path):
    images(tmp_path / "kohya" / "5_x", 1)
    ds = DatasetConfig(train_data_dir=None, subsets=[{"image_dir": str(tmp_path / "kohya")}])
    with pytest.raises(D.DatasetError, match=r"dataset.subsets.0.image_dir: no usable images in .*kohya "
                       r"\(its sub-folders look like kohya '<repeats>_<name>' folders"):
        D.load(ds, seed=1)
    with pytest.raises(D.DatasetError, match="dataset.subsets.0.image_dir: folder .* does not exist"):
        D.load(DatasetConfig(train_data_dir=None, subsets=[{"image_dir": str(tmp_path / "none")}]), seed=1)


def test_config_rules_for_subsets():
    with pytest.raises(ValueError, match="train_data_dir: set an image folder, or list at least one subset"):
        DatasetConfig(train_data_dir=None, subsets=[{"image_dir": "r", "is_reg": True}])
    with pytest.raises(ValueError, match=r"subsets.1.image_dir: x is listed twice"):
        DatasetConfig(subsets=[{"image_dir": "x"}, {"image_dir": "x"}])
    with pytest.raises(ValueError, match="num_repeats"):
        DatasetConfig(subsets=[{"image_dir": "x", "num_repeats": 0}])
    assert DatasetConfig(subsets=[{"image_dir": "x", "flip_aug": True}]).subsets[0].random_flip is True  # kohya's name


def test_no_upscale_buckets_follow_sd_scripts():
    area = 512 * 512
    # 1920x1080 is shrunk to the area (683x384, the height rounded to the step keeps the ratio best), bucket 640x384
    assert D.no_upscale_bucket((1920, 1080), area, 64) == (640, 384)
    assert D.no_upscale_bucket((300, 200), area, 64) == (256, 192)  # small: never enlarged, rounded down
    assert D.no_upscale_bucket((300, 200), area, 8) == (296, 200)
    ds = DatasetConfig(bucket_no_upscale=True, bucket_reso_steps=1, resolution=512)
    b = D.buckets_for(ds)
    assert (b.no_upscale, b.step) == (True, 8) and b.assign((301, 203)) == (296, 200)


def test_bucket_steps_not_a_multiple_of_8_are_rounded_up_with_a_warning():
    from backend.config import config_warnings

    cfg = TrainingConfig(dataset={"bucket_reso_steps": 12, "min_bucket_reso": 248, "max_bucket_reso": 1000})
    ds = cfg.dataset
    assert (ds.bucket_steps(), ds.bucket_range()) == (16, (240, 1008))
    warned = [w for w in config_warnings(cfg) if w.startswith("dataset.")]
    assert warned == [
        "dataset.bucket_reso_steps: 12 is not a multiple of 8; buckets use 16 (the VAE works in 8-pixel units; current "
        "sd-scripts refuses it too, needing a multiple of 64 for SD 1.x/2.x and of 32 for SDXL)",
        "dataset.min_bucket_reso: 248 is not a multiple of the bucket step 16; buckets start at 240 (as sd-scripts "
        "rounds it)",
        "dataset.max_bucket_reso: 1000 is not a multiple of the bucket step 16; buckets go up to 1008 (as sd-scripts "
        "rounds it)"]
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in D.buckets_for(ds).buckets)


def test_prior_loss_weight_weights_exactly_the_regularization_samples(demo, tmp_path):
    """The real trainer's first step, in this process: its loss is the training samples' losses plus
    prior_loss_weight times the regularization samples' (each computed here from the same noise and
    timesteps), over the batch, as sd-scripts weights them (loss * loss_weights, then the mean)."""
    import torch
    from accelerate import Accelerator

    from backend.presets import resolve
    from backend.trainer import loop as L
    from backend.trainer.build import build_setup
    from backend.trainer.loss import diffusion_loss, sample_generator, seed_micro_step
    from backend.trainer.noise import draw_noise
    from backend.trainer.run_io import RunIO
    from tests.conftest import demo_config

    images(tmp_path / "reg" / "1_shape", 6)
    weight = 0.25
    cfg = resolve(demo_config(demo, tmp_path / "runs", dataset={"reg_data_dir": str(tmp_path / "reg"),
                                                                "enable_bucket": False},
                              training={"prior_loss_weight": weight, "train_batch_size": 8}))
    (tmp_path / "v").mkdir()
    io = RunIO(tmp_path / "v", True, False)
    try:
        s = build_setup(cfg, Accelerator(cpu=True), io)
        reg_uses = sum(it.repeats for it in s.items if it.is_reg)
        assert reg_uses == sum(it.repeats for it in s.items if not it.is_reg) > 0  # balanced
        batch = next(b for b in D.epoch_plan(s.items, s.item_buckets, s.plan, 0)
                     if {s.items[x.item].is_reg for x in b.samples} == {True, False})
        (micro,) = D.micro_batches_of(batch, 0, 1, 1)
        ts, n_t = cfg.training, s.comps.noise_scheduler.config.num_train_timesteps
        seed_micro_step(ts.seed, 0, 0, 0)
        lat, ctx, added = L.batch_tensors(s, micro, None)
        gens = [sample_generator(ts.seed, 0, x.index, s.acc.device) for x in micro.samples]
        noise, t, input_noise = draw_noise(lat, gens, ts, n_t)
        with torch.no_grad():
            losses = diffusion_loss(s.trained.unet_runner(), s.comps.noise_scheduler, lat, ctx, added, noise, t,
                                    s.comps.v_prediction, ts, s.weight_dtype, input_noise)
        is_reg = torch.tensor([s.items[x.item].is_reg for x in micro.samples])
        expected = (losses[~is_reg].sum() + weight * losses[is_reg].sum()) / len(micro.samples)
        unweighted = losses.sum() / len(micro.samples)
        loss, stepped, _ = L.train_step(s, [(micro, None)], 0, 0)
    finally:
        io.close()
    assert stepped
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0), (float(loss), float(expected))
    assert not torch.allclose(loss, unweighted, rtol=1e-3)  # the weight changed it


def test_the_launcher_makes_every_subset_folder_absolute(tmp_path):
    from backend import launcher

    cfg = TrainingConfig(dataset={"train_data_dir": None, "reg_data_dir": "reg",
                                  "subsets": [{"image_dir": "data/a"}, {"image_dir": str(tmp_path / "b")}]})
    ds = launcher.absolutize(cfg, base=tmp_path).dataset
    assert (ds.reg_data_dir, [s.image_dir for s in ds.subsets]) == (
        str(tmp_path / "reg"), [str(tmp_path / "data" / "a"), str(tmp_path / "b")])
