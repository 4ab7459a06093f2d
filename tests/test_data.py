"""Dataset discovery, captions, buckets and the deterministic batch plan (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from backend import dataset as D


def img(path: Path, size=(64, 64), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_kohya_layout_repeats_captions_and_class_word_fallback(tmp_path):
    img(tmp_path / "10_sks dog" / "a.png")
    (tmp_path / "10_sks dog" / "a.txt").write_text("sks dog,  sitting \n")
    img(tmp_path / "10_sks dog" / "b.jpg")  # no caption: class words
    img(tmp_path / "3_style" / "c.png")
    (tmp_path / "3_style" / "c.caption").write_text("painting")
    (tmp_path / "notes").mkdir()  # not a <repeats>_ folder: ignored
    found = D.discover(tmp_path, ".txt")
    by_name = {Path(i.path).name: i for i in found.items}
    assert by_name["a.png"].caption == "sks dog, sitting" and by_name["a.png"].repeats == 10
    assert by_name["b.jpg"].caption == "sks dog"
    assert by_name["c.png"].caption == "style" and by_name["c.png"].repeats == 3  # .caption is not the extension
    assert D.discover(tmp_path, ".caption").items[2].caption == "painting"


def test_flat_folder_with_metadata_jsonl(tmp_path):
    img(tmp_path / "x.png")
    img(tmp_path / "y.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "an x"}) + "\nnot json\n")
    found = D.discover(tmp_path)
    assert [(Path(i.path).name, i.caption, i.repeats) for i in found.items] == [("x.png", "an x", 1), ("y.png", "", 1)]
    assert any("metadata.jsonl line 2" in w for w in found.warnings)


def test_corrupt_images_are_skipped_with_a_warning_naming_the_file(tmp_path):
    img(tmp_path / "1_a" / "good.png")
    (tmp_path / "1_a" / "bad.png").write_bytes(b"\x89PNG not really")
    truncated = tmp_path / "1_a" / "cut.png"
    img(tmp_path / "tmp.png", size=(256, 256)).rename(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    found = D.discover(tmp_path)
    assert [Path(i.path).name for i in found.items] == ["good.png"]
    assert len(found.warnings) == 2 and any("bad.png" in w for w in found.warnings) and any("cut.png" in w for w in found.warnings)


def test_no_images_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.discover(tmp_path / "nope")
    (tmp_path / "1_a").mkdir()
    (tmp_path / "1_a" / "bad.png").write_bytes(b"junk")
    with pytest.raises(D.DatasetError, match="no usable images"):
        D.discover(tmp_path)


def test_buckets_respect_area_and_steps():
    buckets = D.make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 for w, h in buckets)
    assert D.assign_bucket((1920, 1080), buckets) == (640, 384)
    assert D.assign_bucket((1000, 1000), buckets) == (512, 512)
    (rw, rh), (left, top) = D.crop_box((1920, 1080), (640, 384))
    assert rh == 384 and rw >= 640 and top == 0 and left == (rw - 640) // 2


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    items = [D.ImageItem(f"{i}.png", f"tag{i}, b, c, d", 2, (64, 64) if i % 2 else (96, 64)) for i in range(7)]
    buckets = D.bucket_of_items(items, D.Bucketing(64, tuple(D.make_buckets(64, 32, 128, 32))))
    s = D.PlanSettings(seed=3, global_batch=2, random_flip=True, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2)
    a, b = D.epoch_plan(items, buckets, s, 0), D.epoch_plan(items, buckets, s, 0)
    assert a == b
    assert D.epoch_plan(items, buckets, s, 1) != a
    # every image appears `repeats` times, each batch holds one bucket
    used = sorted(smp.item for bt in a for smp in bt.samples)
    assert used == sorted(list(range(7)) * 2)
    assert all(len({buckets[smp.item] for smp in bt.samples}) == 1 for bt in a)
    # keep_tokens keeps the first tag first (unless the caption was dropped)
    assert all(smp.caption == "" or smp.caption.startswith(f"tag{smp.item}") for bt in a for smp in bt.samples)


def _layouts(global_batch: int) -> list[tuple[int, int]]:
    return [(w, a) for w in (1, 2, 4) for a in (1, 2, 4) if global_batch % (w * a) == 0]


def test_any_layout_of_a_global_batch_splits_it_into_disjoint_weighted_micro_batches():
    """Every sample of a global batch lands in exactly one micro-batch of one rank, every micro-batch
    holds at most train_batch_size, and the weights make the DDP mean a mean over the global batch."""
    for n in (1, 3, 7, 8):  # a full global batch of 8 and short tails
        step = D.Batch((64, 64), tuple(D.Sample(i, False, "", i) for i in range(n)))
        for world, accum in _layouts(8):
            per_device = 8 // (world * accum)
            ranks = [D.micro_batches_of(step, r, world, accum) for r in range(world)]
            real = [smp.index for mbs in ranks for mb in mbs if mb.share for smp in mb.samples]
            assert sorted(real) == list(range(n)), (n, world, accum)
            assert all(1 <= len(mb.samples) <= per_device for mbs in ranks for mb in mbs)
            assert all(mbs for mbs in ranks)  # every rank takes part in the step's all-reduce
            # sum over ranks of (share x samples) / world == 1: DDP's mean is the mean over the n samples
            weight = sum(mb.share * len(mb.samples) for mbs in ranks for mb in mbs) / world
            assert abs(weight - 1.0) < 1e-12, (n, world, accum)


def test_the_plan_and_each_samples_draws_depend_on_the_global_batch_only():
    items = [D.ImageItem(f"{i}.png", f"t{i}, b, c", 3, (64, 64) if i % 3 else (96, 64)) for i in range(9)]
    buckets = D.bucket_of_items(items, D.Bucketing(64, tuple(D.make_buckets(64, 32, 128, 32))))
    s = D.PlanSettings(seed=5, global_batch=4, random_flip=True, shuffle_caption=True, keep_tokens=0,
                       caption_dropout_rate=0.1)
    plan = D.epoch_plan(items, buckets, s, 2)
    assert all(len(b.samples) <= 4 for b in plan) and D.steps_per_epoch(items, buckets, s) == len(plan)
    assert len({smp.index for b in plan for smp in b.samples}) == 27  # every sample has its own key


def test_validation_split_is_deterministic_and_never_empties_training():
    items = [D.ImageItem(f"{i}.png", "", 1, (64, 64)) for i in range(10)]
    tr, va = D.split_validation(items, 0.2, seed=1)
    assert len(va) == 2 and len(tr) == 8 and D.split_validation(items, 0.2, seed=1) == (tr, va)
    tr, va = D.split_validation(items[:2], 0.9, seed=1)
    assert len(tr) == 1 and len(va) == 1
