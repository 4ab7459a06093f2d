"""The launch checks (backend/preflight.py) on real folders and files made here: what Validate shows
and Start refuses. No trainer runs; the GPU probe is replaced where a test needs a GPU or none."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from backend import preflight as P
from backend.model_family import detect_family
from backend.presets import resolve
from tests.conftest import demo_config

PNG = bytes.fromhex("89504e470d0a1a0a")  # only the name and the extension count here


def config(demo: Path, tmp: Path, **sections: dict | str):
    """The demo preset on this session's demo assets, output in tmp/runs, with `sections` laid over it."""
    return resolve(demo_config(demo, tmp / "runs", **sections))


def lines_for(demo: Path, tmp: Path, field: str, **sections: dict | str) -> list[str]:
    return [line for line in P.preflight(config(demo, tmp, **sections)) if line.startswith(field + ":")]


def safetensors_file(path: Path, keys: list[str]) -> Path:
    """A valid .safetensors file holding one 1-element float32 tensor per key."""
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(keys))
    return path


@pytest.fixture(autouse=True)
def no_gpu_probe(monkeypatch):
    """Tests that do not set a device never reach the GPU probe; the ones that do say what it finds."""
    monkeypatch.setattr(P.resources, "gpus", lambda: pytest.fail("the GPU probe ran for a CPU config"))


def test_the_demo_config_passes(demo, tmp_path):
    assert P.preflight(config(demo, tmp_path)) == []


# ------------------------------------------------------------------------------------ image folders
def test_a_missing_image_folder(demo, tmp_path):
    missing = tmp_path / "nowhere"
    assert lines_for(demo, tmp_path, "dataset.train_data_dir", dataset={"train_data_dir": str(missing)}) == [
        f"dataset.train_data_dir: folder {missing} does not exist"]


def test_a_file_given_as_the_image_folder(demo, tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(PNG)
    assert lines_for(demo, tmp_path, "dataset.train_data_dir", dataset={"train_data_dir": str(f)}) == [
        f"dataset.train_data_dir: folder {f} is a file, not a folder"]


@pytest.mark.parametrize("layout", [[], ["a.txt"], ["5_thing/"], ["5_thing/a.txt", "loose.png"], ["0_off/a.png"],
                                    [".hidden.png"]])
def test_an_image_folder_without_images(demo, tmp_path, layout):
    """Empty, captions only, an empty repeats folder (loose images beside repeats folders are not read),
    a repeats-0 folder, a hidden file: the trainer would find nothing."""
    root = tmp_path / "data"
    root.mkdir()
    for rel in layout:
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(PNG)
    found = lines_for(demo, tmp_path, "dataset.train_data_dir", dataset={"train_data_dir": str(root)})
    assert len(found) == 1 and found[0].startswith(f"dataset.train_data_dir: no images in {root} ("), found


@pytest.mark.parametrize("layout", [["a.png"], ["3_cat/b.JPG"], ["1_x/c.webp", "0_y/d.png"]])
def test_an_image_folder_with_images(demo, tmp_path, layout):
    root = tmp_path / "data"
    for rel in layout:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(PNG)
    assert lines_for(demo, tmp_path, "dataset.train_data_dir", dataset={"train_data_dir": str(root)}) == []


def test_the_validation_folder_is_checked_too(demo, tmp_path):
    empty = tmp_path / "val"
    empty.mkdir()
    found = lines_for(demo, tmp_path, "dataset.validation_data_dir", dataset={"validation_data_dir": str(empty)})
    assert len(found) == 1 and "no images in" in found[0]
    assert lines_for(demo, tmp_path, "dataset.validation_data_dir",
                     dataset={"validation_data_dir": str(demo / "images")}) == []


# ------------------------------------------------------------------------------------ the model
def test_the_demo_models_families_are_detected(demo):
    assert detect_family(demo / "model") == "sd15"
    assert detect_family(demo / "model-sdxl") == "sdxl"
    assert detect_family(demo / "model-sd2v") == "sd2"
    assert detect_family(demo / "model.safetensors") == "sd15"


@pytest.mark.parametrize("model, family, found", [("model-sdxl", "sd15", "an SDXL model"),
                                                  ("model", "sdxl", "an SD 1.x model"),
                                                  ("model.safetensors", "sdxl", "an SD 1.x model"),
                                                  ("model-sd2v", "sd15", "an SD 2.x model")])
def test_a_family_mismatch_names_model_family(demo, tmp_path, model, family, found):
    path = demo / model
    assert lines_for(demo, tmp_path, "model.family", model={"pretrained_model": str(path), "family": family}) == [
        f"model.family: set to {family}, but {path} is {found}; set the family to auto or choose an "
        f"{P.FAMILY_NAMES[family]} model"]


@pytest.mark.parametrize("model, family", [("model-sdxl", "sdxl"), ("model-sdxl", "auto"), ("model.safetensors", "sd15"),
                                           ("model.safetensors", "auto"), ("model", "sd15")])
def test_a_matching_family_passes(demo, tmp_path, model, family):
    assert P.model_problems(config(demo, tmp_path, model={"pretrained_model": str(demo / model),
                                                          "family": family}).model) == []


def test_single_file_families_from_the_header_alone(tmp_path):
    sdxl = safetensors_file(tmp_path / "xl.safetensors", ["conditioner.embedders.0.transformer.a",
                                                         "conditioner.embedders.1.model.b", "model.diffusion_model.c"])
    sd2 = safetensors_file(tmp_path / "v2.safetensors", ["cond_stage_model.model.a", "model.diffusion_model.c"])
    lora = safetensors_file(tmp_path / "lora.safetensors", ["lora_unet_down.lora_up.weight"])
    assert [detect_family(p) for p in (sdxl, sd2, lora)] == ["sdxl", "sd2", None]
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"not read")
    assert detect_family(ckpt) is None  # pickles are not opened without torch: the trainer checks them


def test_model_files_that_cannot_be_used(demo, tmp_path):
    def problems(path: Path) -> list[str]:
        return P.model_problems(config(demo, tmp_path, model={"pretrained_model": str(path), "family": "sd15"}).model)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    assert problems(broken) == [f"model.pretrained_model: {broken} is not a .safetensors file "
                                "(its header length is 18446744073709551615 bytes)"]
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x02\0\0\0\0\0\0\0{]")
    assert problems(short) == [f"model.pretrained_model: {short} is not a .safetensors file (its header is not JSON)"]
    text = tmp_path / "model.txt"
    text.write_text("hi")
    assert problems(text) == [f"model.pretrained_model: {text} is neither a diffusers folder nor a .safetensors/.ckpt file"]
    assert problems(tmp_path) == [f"model.pretrained_model: {tmp_path} is a folder without model_index.json "
                                  "(not a diffusers model)"]
    assert problems(tmp_path / "gone") == [f"model.pretrained_model: {tmp_path / 'gone'} does not exist"]


# ------------------------------------------------------------------------------------ output and disk
def test_an_output_folder_that_cannot_be_created_or_written(demo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    under = blocker / "runs"
    assert lines_for(demo, tmp_path, "output_dir", output_dir=str(under)) == [
        f"output_dir: {under} cannot be created: {blocker} is a file, not a folder"]
    assert lines_for(demo, tmp_path, "output_dir", output_dir=str(blocker)) == [
        f"output_dir: {blocker} is a file, not a folder"]
    assert lines_for(demo, tmp_path, "output_dir", output_dir=str(tmp_path / "new" / "deeper")) == []


def test_too_little_disk_for_the_planned_saves(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(P.resources, "disk", lambda path: {"path": "/x", "free_mb": 10.0, "total_mb": 100.0})
    found = lines_for(demo, tmp_path, "output_dir")
    assert found == ["output_dir: only 10 MB free in /x; the planned saves need about 256 MB; free some space or "
                     "choose another output folder"]


def test_the_disk_estimate_counts_a_latent_cache_on_disk(demo, tmp_path):
    in_memory = config(demo, tmp_path)
    on_disk = config(demo, tmp_path, dataset={"cache_latents": True, "cache_latents_to_disk": True, "random_flip": True})
    assert P.planned_disk_bytes(in_memory, 16) == P.DISK_FLOOR_BYTES
    # 16 images x 2 flips x 4 channels x (64 / 8)^2 latents x 4 bytes
    assert P.planned_disk_bytes(on_disk, 16) == P.DISK_FLOOR_BYTES + 16 * 2 * 4 * 8 * 8 * 4


# ------------------------------------------------------------------------------------ devices
def gpu(i: int) -> dict:
    return {"index": i, "name": "GPU", "util_pct": 0.0, "mem_used_mb": 0.0, "mem_total_mb": 1000.0}


@pytest.mark.parametrize("launch, gpus, expected", [
    ({"device": "cuda"}, [], ["launch.device: cuda is chosen but no NVIDIA GPU was found on this machine "
                              "(nvidia-smi and NVML see none); choose cpu or auto"]),
    ({"device": "cuda"}, [gpu(0)], []),
    ({"device": "cuda", "gpu_ids": "0,2"}, [gpu(0), gpu(1)], ["launch.gpu_ids: GPU 2 not found; this machine has GPU 0, 1"]),
    ({"device": "cuda", "num_processes": 2}, [gpu(0)],
     ["launch.num_processes: 2 process(es) on this machine but only 1 GPU(s) to run them on; one process per GPU"]),
    ({"device": "cuda", "num_processes": 2, "gpu_ids": "1,0"}, [gpu(0), gpu(1)], []),
])
def test_cuda_needs_a_gpu(demo, tmp_path, monkeypatch, launch, gpus, expected):
    monkeypatch.setattr(P.resources, "gpus", lambda: gpus)
    assert [x for x in P.preflight(config(demo, tmp_path, launch=launch)) if x.startswith("launch.")] == expected


def test_an_unsupported_accelerate_config(demo, tmp_path):
    acc = tmp_path / "ds.yaml"
    acc.write_text("distributed_type: DEEPSPEED\n")
    found = lines_for(demo, tmp_path, "launch.accelerate_config_file", launch={"device": "cpu",
                                                                               "accelerate_config_file": str(acc)})
    assert len(found) == 1 and "distributed_type DEEPSPEED is not supported" in found[0]


def test_every_problem_is_reported_at_once(demo, tmp_path):
    shutil.copytree(demo / "model-sdxl", tmp_path / "xl")
    cfg = config(demo, tmp_path, model={"pretrained_model": str(tmp_path / "xl"), "family": "sd15"},
                 dataset={"train_data_dir": str(tmp_path / "none")})
    assert [line.split(":")[0] for line in P.preflight(cfg)] == ["model.family", "dataset.train_data_dir"]
