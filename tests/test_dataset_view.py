"""The Dataset view (backend.dataset_view, backend.captions): counts as training resolves them,
paging, thumbnails, the caption editor and its confinement, and the `dataset` CLI handler. Every test
works on real files made here or on the demo image set."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from backend import dataset as D
from backend.captions import BACKUP_DIR, PathRefused, resolve_image, save_caption
from backend.dataset_cli import add_dataset_parser
from backend.dataset_view import UnreadableImage, page, summarize, thumbnail
from backend.presets import resolve
from tests.conftest import ROOT, demo_config, events

BUCKETS = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_reso_steps": 64}


def config(dataset: dict, **sections: dict):
    return resolve({"dataset": {**BUCKETS, **dataset}, **sections})


def image(path: Path, size: tuple[int, int], caption: str | None = None, color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


@pytest.fixture
def kohya(tmp_path: Path) -> Path:
    """data/10_cat (a square, a wide and a tall image; two captioned) and data/4_dog (two wide)."""
    root = tmp_path / "data"
    image(root / "10_cat" / "a_square.png", (128, 128), "cat, sitting")
    image(root / "10_cat" / "b_wide.jpg", (256, 128), "cat, lying, Sofa ")
    image(root / "10_cat" / "c_tall.png", (128, 256))
    image(root / "4_dog" / "d1.png", (256, 128), "dog, brown")
    image(root / "4_dog" / "d2.png", (256, 128), "dog, sofa")
    return root


def run_cli(*argv: str) -> tuple[int, str]:
    ap = argparse.ArgumentParser()
    add_dataset_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["dataset", *argv])
    buf = io.StringIO()
    real, sys.stdout = sys.stdout, buf
    try:
        code = args.func(args)
    finally:
        sys.stdout = real
    return code, buf.getvalue()


# ----------------------------------------------------------------------------------------- counts
def test_the_demo_counts_match_its_folders_and_the_trainers_plan(demo, tmp_path):
    cfg = resolve(demo_config(demo, tmp_path / "runs"))
    s = summarize(cfg)
    shape, star = demo / "images" / "5_shape", demo / "images" / "2_yellow star"
    n_shape, n_star = len(list(shape.glob("*.png"))), len(list(star.glob("*.png")))
    assert (n_shape, n_star) == (12, 2) and len(list(shape.glob("*.txt"))) == 12 and not list(star.glob("*.txt"))
    assert [(x.folder, x.repeats, x.images, x.captioned, x.uncaptioned) for x in s.subsets] == [
        (str(star), 2, n_star, 0, n_star), (str(shape), 5, n_shape, n_shape, 0)]
    assert s.errors == [] and s.images == 14 and s.reg_images == 0
    assert s.samples_per_epoch == 5 * n_shape + 2 * n_star == 64
    assert s.global_batch == 4 and s.steps_per_epoch == 16  # one bucket: ceil(64 / 4)
    assert (s.total_steps, s.total_epochs) == (64, 4)  # what the demo run logs (tests/test_train_e2e.py)
    assert s.buckets == [{"bucket": [64, 64], "images": 14, "samples": 64}]
    assert s.tag_frequency["2_yellow star"] == {"yellow star": 2}
    assert sum(s.tag_frequency["5_shape"].values()) == 24  # two tags per caption
    assert any("2 of 2 image(s)" in w and "star_0.png, star_1.png" in w and "'yellow star'" in w for w in s.warnings)
    # the trainer's own count of the same plan
    loaded = D.load(cfg.dataset, cfg.training.seed)
    buckets = D.bucket_of_items(loaded.items, D.buckets_for(cfg.dataset))
    plan = D.PlanSettings(cfg.training.seed, 4, False, False, 0, 0.0, tuple(loaded.subsets))
    assert D.steps_per_epoch(loaded.items, buckets, plan) == s.steps_per_epoch


@pytest.mark.train
def test_the_summary_matches_what_the_demo_run_logged(demo_run):
    from backend.config import validate_config

    cfg = validate_config(json.loads((demo_run / "config.json").read_text()))
    s = summarize(cfg)
    started = events(demo_run, "run_started")[0]
    assert (s.images, s.reg_images, s.total_steps, s.total_epochs) == (
        started["images"], started["reg_images"], started["total_steps"], started["total_epochs"])
    manifests = sorted((demo_run / "checkpoints").glob("*/manifest.json"))
    assert manifests and all(json.loads(m.read_text())["steps_per_epoch"] == s.steps_per_epoch for m in manifests)


def test_two_repeats_folders_counts_steps_and_buckets(kohya):
    s = summarize(config({"train_data_dir": str(kohya)}, training={"train_batch_size": 2}))
    assert s.errors == []
    assert [(Path(x.folder).name, x.repeats, x.images, x.captioned, x.uncaptioned, x.samples) for x in s.subsets] == [
        ("10_cat", 10, 3, 2, 1, 30), ("4_dog", 4, 2, 2, 0, 8)]
    assert s.samples_per_epoch == 3 * 10 + 2 * 4 == 38
    # uses per bucket: square 10, wide 10 + 2 x 4 = 18, tall 10; at batch 2: 5 + 9 + 5 steps
    assert s.buckets == [{"bucket": [64, 192], "images": 1, "samples": 10},
                         {"bucket": [128, 128], "images": 1, "samples": 10},
                         {"bucket": [192, 64], "images": 3, "samples": 18}]
    assert s.global_batch == 2 and s.steps_per_epoch == 19 and s.total_steps == 19 * 10
    # the caption each image trains with: c_tall.png's is the class words "cat"
    assert s.tag_frequency == {"10_cat": {"cat": 3, "sitting": 1, "lying": 1, "sofa": 1},
                               "4_dog": {"dog": 2, "brown": 1, "sofa": 1}}
    assert s.top_tags[:3] == [("cat", 3), ("dog", 2), ("sofa", 2)]
    assert any("c_tall.png" in w and "'cat'" in w for w in s.warnings)
    # batch x accumulation x processes, as the trainer's global batch: 4 -> 3 + 5 + 3
    s4 = summarize(config({"train_data_dir": str(kohya)}, training={"train_batch_size": 2,
                                                                     "gradient_accumulation_steps": 2}))
    assert (s4.global_batch, s4.steps_per_epoch) == (4, 11)
    json.dumps(s.to_json())  # plain JSON


def test_plan_steps_counts_what_the_trainers_plan_draws(kohya):
    ds = config({"train_data_dir": str(kohya)}).dataset
    loaded = D.load(ds, 0, decode=False)
    buckets = D.bucket_of_items(loaded.items, D.buckets_for(ds))
    for g in (1, 2, 3, 4, 7, 64):
        plan = D.PlanSettings(0, g, False, False, 0, 0.0, tuple(loaded.subsets))
        assert D.plan_steps(loaded.items, buckets, g) == D.steps_per_epoch(loaded.items, buckets, plan)


def test_regularization_and_validation_are_counted_as_training_uses_them(kohya, tmp_path):
    for i in range(3):
        image(tmp_path / "reg" / "1_cat" / f"r{i}.png", (128, 128), "cat")
    s = summarize(config({"train_data_dir": str(kohya), "reg_data_dir": str(tmp_path / "reg"),
                          "validation_split": 0.2}))
    assert (s.images, s.validation_images, s.reg_images) == (5, 1, 3)
    train_uses = sum(x.samples for x in s.subsets if not x.is_reg)
    assert sum(x.samples for x in s.subsets if x.is_reg) == train_uses  # balanced, as in sd-scripts
    assert s.samples_per_epoch == 2 * train_uses and s.unused_reg_images == 0


def test_a_repeats_folder_given_directly_is_warned_about(kohya):
    s = summarize(config({"train_data_dir": str(kohya / "10_cat")}))
    assert [(x.repeats, x.images) for x in s.subsets] == [(1, 3)]
    assert f"dataset.train_data_dir: {kohya / '10_cat'} looks like a repeats folder; did you mean its parent " \
           f"{kohya}? As given, it trains with repeats 1" in s.warnings
    assert not any("looks like a repeats folder" in w for w in summarize(config({"train_data_dir": str(kohya)})).warnings)


def test_a_corrupt_image_is_listed_not_fatal_and_small_images_are_warned(kohya):
    (kohya / "10_cat" / "broken.png").write_bytes(b"this is not a png")
    image(kohya / "4_dog" / "tiny.png", (32, 32), "dog")
    cfg = config({"train_data_dir": str(kohya)})
    s = summarize(cfg)
    assert s.errors == [] and s.subsets[0].unreadable == ["broken.png"] and s.subsets[0].images == 3
    assert any("broken.png" in w and "cannot be read" in w for w in s.warnings)
    assert any("tiny.png" in w and "upscaled" in w and "1 image(s)" in w for w in s.warnings)
    broken = next(e for e in s.entries if e.path == "broken.png")
    assert broken.size is None and broken.bucket is None and "UnidentifiedImageError" in broken.error
    assert [e.to_json() for e in page(cfg, 0, 10)] == [e.to_json() for e in page(s, 0, 10)]
    with pytest.raises(UnreadableImage, match="cannot be read"):
        thumbnail(cfg, "0:broken.png")
    no_upscale = summarize(config({"train_data_dir": str(kohya), "bucket_no_upscale": True}))
    assert not any("upscaled" in w for w in no_upscale.warnings)


def test_unusable_datasets_are_errors_not_exceptions(tmp_path, kohya):
    missing = summarize(config({"train_data_dir": str(tmp_path / "nope")}))
    assert missing.subsets == [] and len(missing.errors) == 1 and "does not exist" in missing.errors[0]
    (tmp_path / "empty" / "3_x").mkdir(parents=True)
    empty = summarize(config({"train_data_dir": str(tmp_path / "empty")}))
    assert empty.steps_per_epoch == 0 and "no usable images" in empty.errors[0]
    # one listed subset missing: the error names it, and the folders that exist are still shown
    s = summarize(config({"train_data_dir": str(kohya), "subsets": [{"image_dir": str(tmp_path / "gone")}]}))
    assert any("dataset.subsets.0.image_dir" in e for e in s.errors) and [x.images for x in s.subsets] == [3, 2]
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"schema_version": 1, "dataset": {"train_data_dir": str(tmp_path / "nope")}}))
    code, out = run_cli(str(preset), "--json")
    assert code == 2 and "does not exist" in json.loads(out)["errors"][0]
    assert run_cli(str(tmp_path / "nope"))[0] == 2  # neither a folder nor a file: said on stderr


# ---------------------------------------------------------------------------------- paging, thumbs
def test_pages_are_stable_and_the_same_from_a_config_or_a_summary(kohya):
    cfg = config({"train_data_dir": str(kohya)})
    s = summarize(cfg)
    every = [e.to_json() for e in page(cfg, 0, 100)]
    assert [e["id"] for e in every] == ["0:a_square.png", "0:b_wide.jpg", "0:c_tall.png", "1:d1.png", "1:d2.png"]
    assert every == [e.to_json() for e in page(s, 0, 100)]
    assert [e.to_json() for e in page(cfg, 2, 2)] == every[2:4]  # across the subset boundary
    assert page(cfg, 5, 10) == []
    wide = every[1]
    assert wide == {"id": "0:b_wide.jpg", "subset": 0, "path": "b_wide.jpg", "caption": "cat, lying, Sofa",
                    "caption_file": True, "size": [256, 128], "bucket": [192, 64], "error": None}
    assert every[2]["caption"] == "cat" and every[2]["caption_file"] is False  # the class words
    with pytest.raises(ValueError):
        page(cfg, -1, 10)


def test_thumbnails_are_small_jpegs_of_the_image(kohya):
    cfg = config({"train_data_dir": str(kohya)})
    data = thumbnail(cfg, "0:b_wide.jpg", max_side=64)
    assert data[:2] == b"\xff\xd8"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 32) and im.mode == "RGB"
        r, g, b = im.getpixel((32, 16))
        assert r > 150 and g < 90 and b < 90
    assert thumbnail(cfg, str(kohya / "4_dog" / "d1.png"))[:2] == b"\xff\xd8"  # by path


# ------------------------------------------------------------------------------------ caption editor
def test_a_caption_edit_is_saved_with_a_backup_of_each_replaced_text(kohya):
    cfg = config({"train_data_dir": str(kohya)})
    cap = kohya / "10_cat" / "a_square.txt"
    assert save_caption(cfg, "0:a_square.png", "cat, sitting, window") == cap.resolve()
    assert cap.read_text(encoding="utf-8") == "cat, sitting, window"
    backups = sorted((kohya / "10_cat" / BACKUP_DIR).iterdir())
    assert [b.read_text(encoding="utf-8") for b in backups] == ["cat, sitting"]
    assert backups[0].name.startswith("a_square.txt.") and backups[0].suffix == ".bak"
    save_caption(cfg, str(kohya / "10_cat" / "a_square.png"), "cat, window")  # by path, a second edit
    assert cap.read_text(encoding="utf-8") == "cat, window"
    backups = sorted((kohya / "10_cat" / BACKUP_DIR).iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert len(backups) == 2 and {b.read_text(encoding="utf-8") for b in backups} == {"cat, sitting",
                                                                                       "cat, sitting, window"}
    save_caption(cfg, "0:a_square.png", "cat, window")  # unchanged: no write, no backup
    assert len(list((kohya / "10_cat" / BACKUP_DIR).iterdir())) == 2
    # an image without a caption gets its first caption file, nothing to back up
    assert save_caption(cfg, "10_cat/c_tall.png", "cat, standing").read_text(encoding="utf-8") == "cat, standing"
    assert not list((kohya / "10_cat").glob(".*.tmp"))
    assert next(e for e in page(cfg, 0, 10) if e.path == "c_tall.png").caption == "cat, standing"
    assert summarize(cfg).subsets[0].uncaptioned == 0


def test_captions_from_metadata_or_an_image_extension_are_refused(tmp_path):
    flat = tmp_path / "flat"
    image(flat / "m.png", (128, 128))
    (flat / "metadata.jsonl").write_text(json.dumps({"file_name": "m.png", "text": "from metadata"}) + "\n")
    with pytest.raises(PathRefused, match="metadata.jsonl"):
        save_caption(config({"train_data_dir": str(flat)}), "0:m.png", "new")
    before = (flat / "m.png").read_bytes()
    cfg = config({"train_data_dir": None, "subsets": [{"image_dir": str(flat), "caption_extension": ".jpg"}]})
    image(flat / "n.png", (128, 128))
    with pytest.raises(PathRefused, match="caption_extension"):
        save_caption(cfg, "0:n.png", "x")
    assert (flat / "m.png").read_bytes() == before and not (flat / "n.jpg").exists()


# ------------------------------------------------------------------------------------------ hostile
@pytest.fixture
def hostile(kohya, tmp_path):
    """The kohya dataset plus: a secret image and text outside it, a link to them inside, a .py file."""
    outside = tmp_path / "outside"
    image(outside / "secret.png", (128, 128), "secret caption")
    (kohya / "10_cat" / "evil.png").symlink_to(outside / "secret.png")
    (kohya / "10_cat" / "notes.py").write_text("print('hi')\n")
    image(kohya / "10_cat" / ".hidden.png", (128, 128))
    return kohya, outside


HOSTILE = ["../../etc/passwd", "/etc/passwd", "10_cat/../../outside/secret.png", "0:evil.png", "10_cat/evil.png",
           "%2e%2e/%2e%2e/etc/passwd.png", "10_cat/%2e%2e/a_square.png", "10_cat\\a_square.png",
           "10_cat/a_square.png\0.png", "10_cat/notes.py", "0:notes.py", "", "0:.hidden.png", "10_cat/.hidden.png"]


@pytest.mark.parametrize("request_", HOSTILE)
def test_hostile_paths_are_refused_for_reading_and_writing(hostile, request_):
    kohya, outside = hostile
    cfg = config({"train_data_dir": str(kohya)})
    with pytest.raises(PathRefused):
        resolve_image(cfg, request_)
    with pytest.raises(PathRefused):
        save_caption(cfg, request_, "owned")
    with pytest.raises(PathRefused):
        thumbnail(cfg, request_)
    assert (outside / "secret.txt").read_text() == "secret caption" and not (kohya / "10_cat" / "evil.txt").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png", "secret.txt"]


def test_absolute_paths_are_accepted_only_inside_the_dataset(hostile):
    kohya, outside = hostile
    cfg = config({"train_data_dir": str(kohya)})
    assert resolve_image(cfg, str(kohya / "10_cat" / "a_square.png")) == (kohya / "10_cat" / "a_square.png").resolve()
    assert resolve_image(cfg, "1:d1.png") == (kohya / "4_dog" / "d1.png").resolve()
    with pytest.raises(PathRefused, match="not in one of the dataset's image folders"):
        resolve_image(cfg, str(outside / "secret.png"))
    with pytest.raises(PathRefused, match="points outside"):
        resolve_image(cfg, str(kohya / "10_cat" / "evil.png"))


def test_a_caption_file_or_backup_folder_that_is_a_link_is_never_written_through(hostile):
    kohya, outside = hostile
    cfg = config({"train_data_dir": str(kohya)})
    (kohya / "4_dog" / "d1.txt").unlink()
    (kohya / "4_dog" / "d1.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(PathRefused, match="symbolic link"):
        save_caption(cfg, "1:d1.png", "owned")
    (kohya / "4_dog" / BACKUP_DIR).symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused, match="not a plain folder"):
        save_caption(cfg, "1:d2.png", "owned")
    assert (kohya / "4_dog" / "d2.txt").read_text() == "dog, sofa"
    assert (outside / "secret.txt").read_text() == "secret caption"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png", "secret.txt"]


def test_a_name_in_two_subsets_must_be_asked_for_by_id(kohya):
    image(kohya / "4_dog" / "a_square.png", (128, 128), "dog")
    cfg = config({"train_data_dir": str(kohya)})
    with pytest.raises(PathRefused, match="more than one dataset folder"):
        resolve_image(cfg, "a_square.png")
    assert resolve_image(cfg, "1:a_square.png") == (kohya / "4_dog" / "a_square.png").resolve()


# ---------------------------------------------------------------------------------------------- CLI
def test_the_cli_prints_the_summary_for_a_folder_or_a_preset(kohya, tmp_path):
    code, out = run_cli(str(kohya), "--json", "--set", "training.train_batch_size=2",
                        *[f"--set=dataset.{k}={v}" for k, v in BUCKETS.items()])
    data = json.loads(out)
    assert code == 0 and data["steps_per_epoch"] == 19 and data["samples_per_epoch"] == 38 and "entries" not in data
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"schema_version": 1, "dataset": {**BUCKETS, "train_data_dir": str(kohya)},
                                  "training": {"train_batch_size": 2}}))
    code, out = run_cli(str(preset))
    assert code == 0
    assert "steps per epoch 19 at global batch 2" in out and "38 samples per epoch" in out and "10_cat" in out
    assert "top tags: cat (3), dog (2), sofa (2)" in out and "warning:" in out
    code, _ = run_cli(str(tmp_path / "missing.json"))
    assert code == 2


def test_the_module_never_imports_torch_or_gradio():
    code = ("import sys, backend.dataset_view, backend.captions; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'gradio', 'torchvision', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"
