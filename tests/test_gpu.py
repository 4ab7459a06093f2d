"""The GPU tier (issue 11): the real CLI (`python -m backend train|resume|verify`) on the demo model
with `launch.device="cuda"`.

* fp16 and bf16, each with and without torch.compile: the run finishes, every step loss is finite,
  the sample images are neither black nor flat, the export has no NaN/inf and loads in diffusers.
* fp16 resume from a mid-epoch step checkpoint: the checkpoint holds the loss scaler (scaler.json),
  and the resumed losses continue the straight run's (within a band: GPU kernels are not bit-exact).
* `verify` accepts the final checkpoint of an fp16 run (recomputed in fp32 on the CPU).
* The flow families: the tiny Flux.1 demo (presets/demo-flux.json, its transformer given a few more
  blocks so that blocks_to_swap has some to swap) trains in bf16 with `model.fp8_base` and
  `training.blocks_to_swap` 2, samples, and resumes from a mid-run step checkpoint at exactly the
  next step with the losses continuing the straight run's; the tiny SD3.5 demo
  (presets/demo-sd3.json) trains and samples in bf16.

Every test is marked `gpu` and skipped without CUDA. To check the tests themselves on a machine
without a GPU, `LATHE_GPU_TEST_DEVICE=cpu` runs them on the CPU, where the trainer ignores mixed
precision, so the scaler check is skipped (torch.compile on a CPU takes minutes: deselect it with
`-k "not compiled"`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from backend import checkpoints as C
from tests.conftest import ROOT, events, run_cli, step_losses, train, write_config

DEVICE = os.environ.get("LATHE_GPU_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ON_CUDA and not HAS_CUDA, reason="needs a CUDA GPU")]

TIMEOUT = 900  # torch.compile's first step on a GPU takes a minute or two
STEPS_PER_EPOCH = 16  # the demo set: 12 images x 5 repeats + 2 x 2, batch 4
NO_BF16 = pytest.mark.skipif(ON_CUDA and HAS_CUDA and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")


def sections(precision: str, epochs: int, compiled: bool = False, **extra: dict) -> dict:
    """The demo config's overrides for one GPU run."""
    return {"training": {"max_train_epochs": epochs, "mixed_precision": precision, "torch_compile": compiled},
            "launch": {"device": DEVICE}, **extra}


def check_finished(proc: subprocess.CompletedProcess, v: Path, steps: int) -> dict[int, float]:
    """The run ended `finished` on DEVICE with one finite loss per step; returns the losses."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert events(v)[-1]["event"] == "run_finished" and events(v)[-1]["state"] == "finished", events(v)[-1]
    assert f" on {DEVICE}" in (v / "train.log").read_text(), "the trainer did not run on the requested device"
    losses = step_losses(v)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(x) for x in losses.values()), losses
    return losses


def assert_image_has_content(png: Path) -> None:
    """Not black (NaN latents decode to 0) and not flat (inf decodes to one colour). The demo's samples
    have a mean near 126 and a standard deviation near 37 on the CPU."""
    arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert arr.shape[:2] == (64, 64)
    assert arr.mean() > 20 and arr.std() > 5, f"{png}: mean {arr.mean():.2f}, std {arr.std():.2f}"


def assert_export_is_sound(export: Path, demo: Path) -> None:
    """Finite tensors, at least one trained (LoRA up weights start at zero), and diffusers loads it."""
    from diffusers import StableDiffusionPipeline

    tensors = load_file(export)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    assert not bad, f"non-finite tensors in {export.name}: {bad[:3]}"
    assert any(k.endswith("lora_up.weight") and t.float().abs().max() > 0 for k, t in tensors.items()), \
        "every lora_up weight is still zero: no optimizer step was applied"
    pipe = StableDiffusionPipeline.from_pretrained(demo / "model", safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(export), adapter_name="gpu")
    assert pipe.get_list_adapters() == {"unet": ["gpu"]}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("precision", ["fp16", pytest.param("bf16", marks=NO_BF16)])
def test_demo_trains_under_mixed_precision(demo, tmp_path, precision, compiled):
    proc, v = train(tmp_path, demo, timeout=TIMEOUT, **sections(precision, 1, compiled))
    check_finished(proc, v, STEPS_PER_EPOCH)
    skipped = events(v, "run_finished")[0].get("skipped_steps") or 0
    assert skipped < STEPS_PER_EPOCH // 2, f"the loss scaler skipped {skipped} of {STEPS_PER_EPOCH} steps"

    prompts = json.loads((v / "config.json").read_text())["sampling"]["prompts"]
    pngs = sorted((v / "samples" / "final").glob("*.png"))
    assert prompts and len(pngs) == len(prompts), pngs
    for png in pngs:
        assert_image_has_content(png)
    assert_export_is_sound(v / "exports" / "demo.safetensors", demo)


# ------------------------------------------------------------------------------- fp16: resume, verify
RESUME_AT = 10  # mid-epoch (16 steps an epoch)


@pytest.fixture(scope="module")
def fp16_run(demo, tmp_path_factory) -> Path:
    """Two epochs under fp16 with a step save point every 10 steps, no samples."""
    saving = {"save_every_n_epochs": None, "save_last_n_epochs": None, "save_every_n_steps": RESUME_AT}
    proc, v = train(tmp_path_factory.mktemp("gpu-fp16"), demo, timeout=TIMEOUT,
                    **sections("fp16", 2, saving=saving, sampling={"prompts": []}))
    check_finished(proc, v, 2 * STEPS_PER_EPOCH)
    return v


def resume(checkpoint: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m backend resume CHECKPOINT`; the process and the new version folder."""
    proc = run_cli("resume", str(checkpoint), timeout=TIMEOUT)
    lines = [ln for ln in proc.stdout.splitlines() if "/version_" in ln and not ln.startswith("resume")]
    assert lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, Path(lines[0])


def test_fp16_checkpoint_holds_the_loss_scaler(fp16_run):
    ckpt = fp16_run / "checkpoints" / f"step-{RESUME_AT:08d}"
    assert C.checkpoint_status(ckpt)[0] == "valid"
    if not ON_CUDA:
        pytest.skip("no loss scaler on the CPU (mixed precision is ignored there)")
    scaler = json.loads((ckpt / "scaler.json").read_text())
    assert isinstance(scaler, dict) and isinstance(scaler.get("scale"), float) and scaler["scale"] > 0, scaler
    assert "scaler.json" in C.read_manifest(ckpt)["files"], "scaler.json is not covered by the manifest"


def test_fp16_resume_mid_epoch_continues_the_loss(fp16_run):
    assert events(fp16_run, "epoch_end")[0]["step"] == STEPS_PER_EPOCH  # so RESUME_AT is mid-epoch
    ckpt = fp16_run / "checkpoints" / f"step-{RESUME_AT:08d}"
    proc, v = resume(ckpt)
    total = 2 * STEPS_PER_EPOCH
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert events(v, "run_started")[0]["resumed_from"].endswith(ckpt.name)
    straight, resumed = step_losses(fp16_run), step_losses(v)
    assert sorted(resumed) == list(range(RESUME_AT + 1, total + 1))
    assert all(math.isfinite(x) for x in resumed.values()), resumed
    # Same step -> same noise and timesteps (seeded by step), so the losses agree up to kernel noise.
    far = {k: (straight[k], resumed[k]) for k in resumed if abs(resumed[k] - straight[k]) >= 0.5 * abs(straight[k])}
    assert not far, f"resumed losses far from the straight run's (step: straight, resumed): {far}"


def test_verify_accepts_the_final_fp16_checkpoint(fp16_run):
    out = run_cli("verify", str(fp16_run / "checkpoints" / "final"), timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("VALID: "), out.stdout


# ------------------------------------------------------------------------------------ flow families
FLOW_STEPS, FLOW_RESUME_AT = 6, 3  # an epoch of the demo set is 16 steps: the save point is mid-epoch
SWAP = 2  # blocks_to_swap: 1 double block and 2 single blocks of the 3 + 4 below
FLOW_BF16 = {"max_train_epochs": None, "max_train_steps": FLOW_STEPS, "mixed_precision": "bf16"}


def flow_config(tmp: Path, kind: str, model_dir: Path, demo: Path, **sections: dict) -> Path:
    """presets/demo-<kind>.json pointed at `model_dir`, this session's demo images and `tmp`, with `sections`
    laid over its own (section by section)."""
    data = json.loads((ROOT / "presets" / f"demo-{kind}.json").read_text())
    data["model"]["pretrained_model"] = str(model_dir)
    data["dataset"]["train_data_dir"] = str(demo / "images")
    data["output_dir"] = str(tmp / "runs")
    data["launch"] = {**data["launch"], "device": DEVICE}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return write_config(tmp / f"{kind}-{time.monotonic_ns()}.json", data)


def train_flow(config: Path) -> tuple[subprocess.CompletedProcess, Path]:
    proc = run_cli("train", str(config), timeout=TIMEOUT)
    return proc, Path(proc.stdout.splitlines()[0] if proc.stdout else "")


def assert_flow_export_is_sound(export: Path) -> None:
    """Finite tensors, and at least one up weight trained (they start at zero)."""
    tensors = load_file(export)
    assert tensors, export
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    assert not bad, f"non-finite tensors in {export.name}: {bad[:3]}"
    ups = [t for k, t in tensors.items() if k.endswith(("lora_up.weight", "lora_B.weight"))]
    assert ups and any(t.float().abs().max() > 0 for t in ups), "every up weight is still zero: no step was applied"


@pytest.fixture(scope="module")
def flux_more_blocks(demo, tmp_path_factory) -> Path:
    """The Flux demo model with 3 double and 4 single blocks (the demo's 1 and 2 leave block swap nothing
    to swap: 2 of each kind stay on the GPU, as in sd-scripts), random weights, the rest the demo's."""
    from diffusers import FluxTransformer2DModel

    out = tmp_path_factory.mktemp("flux-blocks") / "model-flux"
    shutil.copytree(demo / "model-flux", out)
    shutil.rmtree(out / "transformer")
    config = FluxTransformer2DModel.load_config(demo / "model-flux" / "transformer", local_files_only=True)
    torch.manual_seed(1111)
    FluxTransformer2DModel.from_config({**config, "num_layers": 3, "num_single_layers": 4}).save_pretrained(out / "transformer")
    return out


@pytest.fixture(scope="module")
def flux_lever_run(demo, flux_more_blocks, tmp_path_factory) -> Path:
    """The Flux demo in bf16 with fp8_base and blocks_to_swap, a step save point every FLOW_RESUME_AT steps."""
    tmp = tmp_path_factory.mktemp("gpu-flux")
    cfg = flow_config(tmp, "flux", flux_more_blocks, demo, model={"fp8_base": True},
                      training={**FLOW_BF16, "blocks_to_swap": SWAP},
                      saving={"save_every_n_epochs": None, "save_last_n_epochs": None, "save_every_n_steps": FLOW_RESUME_AT})
    proc, v = train_flow(cfg)
    check_finished(proc, v, FLOW_STEPS)
    return v


@NO_BF16
def test_flux_demo_trains_in_bf16_with_fp8_base_and_block_swap(flux_lever_run):
    v = flux_lever_run
    log = (v / "train.log").read_text()
    assert "model.fp8_base: " in log and " layer weights of the denoiser stored in fp8" in log, log[-3000:]
    if ON_CUDA:  # the blocks really swap: 1 double + 2 single blocks stay in CPU memory
        assert "training.blocks_to_swap: the frozen weights of 3 blocks" in log, log[-3000:]
    else:
        assert any("blocks_to_swap: ignored on the CPU" in e["message"] for e in events(v, "warning"))
    pngs = sorted((v / "samples" / "final").glob("*.png"))  # sampling under no_grad with the blocks swapping
    assert len(pngs) == 2, pngs
    for png in pngs:
        assert_image_has_content(png)
    assert_flow_export_is_sound(v / "exports" / "demo-flux.safetensors")


@NO_BF16
def test_flux_demo_with_the_levers_resumes_at_the_next_step(flux_lever_run):
    ckpt = flux_lever_run / "checkpoints" / f"step-{FLOW_RESUME_AT:08d}"
    assert C.checkpoint_status(ckpt)[0] == "valid"
    proc, v = resume(ckpt)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert events(v, "run_started")[0]["resumed_from"].endswith(ckpt.name)
    resumed_cfg = json.loads((v / "config.json").read_text())
    assert resumed_cfg["model"]["fp8_base"] is True and resumed_cfg["training"]["blocks_to_swap"] == SWAP
    straight, resumed = step_losses(flux_lever_run), step_losses(v)
    assert sorted(resumed) == list(range(FLOW_RESUME_AT + 1, FLOW_STEPS + 1))
    assert all(math.isfinite(x) for x in resumed.values()), resumed
    # The first resumed step sees the restored network, the same fp8 base, batch and noise: only kernel
    # noise (and the latents' bf16 encode) separates it from the straight run's; later steps drift more.
    first = FLOW_RESUME_AT + 1
    assert abs(resumed[first] - straight[first]) <= 0.05 * abs(straight[first]), (straight, resumed)
    far = {k: (straight[k], resumed[k]) for k in resumed if abs(resumed[k] - straight[k]) >= 0.5 * abs(straight[k])}
    assert not far, f"resumed losses far from the straight run's (step: straight, resumed): {far}"


@NO_BF16
def test_sd3_demo_trains_in_bf16_with_its_clips(demo, tmp_path):
    """CLIP-L and CLIP-G trained: T5's outputs are memoized and on CUDA T5 waits in CPU memory, borrowed
    back for the samples."""
    cfg = flow_config(tmp_path, "sd3", demo / "model-sd3", demo, training=FLOW_BF16, network={"train_text_encoder": True},
                      saving={"save_every_n_epochs": None, "save_last_n_epochs": None})
    proc, v = train_flow(cfg)
    check_finished(proc, v, FLOW_STEPS)
    assert events(v, "run_started")[0]["family"] == "sd3"
    assert [e["frozen_encoders"] for e in events(v, "cache_filled") if e["kind"] == "text"] == [[2]]
    pngs = sorted((v / "samples" / "final").glob("*.png"))
    assert len(pngs) == 2, pngs
    for png in pngs:
        assert_image_has_content(png)
    assert_flow_export_is_sound(v / "exports" / "demo-sd3.safetensors")
