"""SD3/SD3.5 (backend/trainer/families/sd3.py, backend/trainer/flow.py): the flow-matching formulas
against sd-scripts' definitions (library/sd3_train_utils.py, library/flux_train_utils.py, written out
again here), and a real run of the tiny SD3.5-shaped demo (presets/demo-sd3.json): it learns, samples,
and its export loads in diffusers and changes the image. Exact mid-epoch resume, verify and
2-process DDP on SD3 are tests/test_combos.py's sd3-ddp-flow case."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from backend.config import validate_config
from backend.trainer import flow
from backend.trainer.families.sd3 import flow_refusals
from tests.conftest import ROOT, events, run_cli, write_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ts(**training):
    return validate_config({"training": training}).training


# ------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift, low, high", [(1.0, None, None), (3.0, 100, 900)])
def test_sd3_timesteps_are_sd_scripts_density_shift_and_range(scheme: str, shift: float, low, high):
    t = ts(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29, training_shift=shift,
           min_timestep=low, max_timestep=high)
    for seed in range(20):
        g = gen(seed)
        if scheme == "logit_normal":  # torch.normal(mean, std) = mean + std * randn
            u = torch.sigmoid(torch.randn(1, generator=g) * 0.8 + 0.3)
        elif scheme == "mode":
            u = torch.rand(1, generator=g)
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand(1, generator=g)
        u = (u * shift) / (1 + (shift - 1) * u)
        t_min, t_max = low or 0, high or 1000
        want = (u * (t_max - t_min) + t_min).long().float()
        assert torch.equal(flow.sd3_timestep(gen(seed), t), want)
        assert t_min <= want.item() < t_max


def test_flux_timestep_sampling_schemes():
    t = ts(timestep_sampling="shift", sigmoid_scale=1.5, discrete_flow_shift=3.0)
    g = gen(1)
    s = torch.sigmoid(torch.randn(1, generator=g) * 1.5)
    assert torch.allclose(flow.flux_timestep(gen(1), t, (64, 64)), (s * 3 / (1 + 2 * s)) * 1000)
    t = ts(timestep_sampling="flux_shift")
    s = torch.sigmoid(torch.randn(1, generator=gen(2)))
    mu = (1.15 - 0.5) / (4096 - 256) * (32 * 32) + 0.5 - (1.15 - 0.5) / (4096 - 256) * 256  # 64x64 latent: 1024 tokens
    assert torch.allclose(flow.flux_timestep(gen(2), t, (64, 64)), math.exp(mu) / (math.exp(mu) + (1 / s - 1)) * 1000)
    assert torch.allclose(flow.flux_timestep(gen(3), ts(timestep_sampling="uniform"), (8, 8)),
                          torch.rand(1, generator=gen(3)) * 1000)


def test_flow_loss_weightings_and_targets():
    sig = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.loss_weighting(ts(weighting_scheme="sigma_sqrt"), sig), sig**-2.0)
    assert torch.allclose(flow.loss_weighting(ts(weighting_scheme="cosmap"), sig), 2 / (math.pi * (1 - 2 * sig + 2 * sig**2)))
    assert flow.loss_weighting(ts(weighting_scheme="logit_normal"), sig) is None
    lat, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    noisy = flow.noisy_input(lat, noise, sig)
    assert torch.allclose(noisy, (1 - sig.view(-1, 1, 1, 1)) * lat + sig.view(-1, 1, 1, 1) * noise)
    velocity = noise - lat  # what a perfect model predicts: the loss of both readings is then zero
    pred, target, _ = flow.prediction_and_target("sd3", velocity, lat, noise, noisy, sig, ts())
    assert torch.allclose(pred, target, atol=1e-5) and torch.equal(target, lat)  # SD3 preconditions to the latents
    pred, target, weight = flow.prediction_and_target("flux", velocity, lat, noise, noisy, sig, ts())
    assert torch.equal(pred, target) and torch.equal(target, noise - lat) and weight is None  # Flux raw


def test_ddpm_options_are_refused_for_sd3_not_ignored():
    cfg = validate_config({"model": {"pretrained_model": "demo/model-sd3"}, "network": {"train_text_encoder": True},
                           "training": {"min_snr_gamma": 5, "noise_offset": 0.05, "loss_type": "huber"}})
    problems = flow_refusals(cfg, "SD3/SD3.5")
    assert [p.split(":")[0] for p in problems] == ["training.min_snr_gamma", "training.noise_offset",
                                                   "training.huber_schedule"]  # CLIP-L/G LoRA trains


# ------------------------------------------------------------------------------------------ a real run
@pytest.mark.train
def test_the_sd3_demo_learns_samples_and_exports_a_lora_diffusers_loads(demo: Path, tmp_path: Path):
    data = json.loads((ROOT / "presets" / "demo-sd3.json").read_text())
    data["model"]["pretrained_model"] = str(demo / "model-sd3")
    data["dataset"]["train_data_dir"] = str(demo / "images")
    data.update(output_dir=str(tmp_path / "runs"))
    data["saving"].update(save_last_n_epochs=None, save_every_n_steps=2, save_last_n_steps=2)  # step saves rotate
    data["network"]["train_text_encoder"] = True  # CLIP-L and CLIP-G; T5 stays frozen
    proc = run_cli("train", str(write_config(tmp_path / "sd3.json", data)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    v = Path(proc.stdout.splitlines()[0])
    assert events(v, "run_started")[0]["family"] == "sd3"
    text = [e for e in events(v, "cache_filled") if e["kind"] == "text"]
    assert len(text) == 1 and text[0]["frozen_encoders"] == [2]  # T5 run once per caption, the CLIPs every step
    ref = [json.loads((v / "checkpoints" / f"epoch-{e:06d}" / "manifest.json").read_text())["ref_loss"] for e in (1, 4)]
    assert ref[1] < ref[0], ref  # the fixed-noise reference loss went down
    saved = [e["step"] for e in events(v, "checkpoint_saved") if e["kind"] == "step"]
    assert len(saved) >= 3 and saved == list(range(2, saved[-1] + 1, 2))
    assert sorted(p.name for p in (v / "checkpoints").glob("step-*")) == [f"step-{k:08d}" for k in saved[-2:]]
    assert sorted(p.name for p in (v / "exports").glob("*-step*")) == [f"demo-sd3-step{k:08d}.safetensors"
                                                                       for k in saved[-2:]]
    verified = run_cli("verify", str(v / "checkpoints" / f"step-{saved[-2]:08d}"), timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for png in (v / "samples" / "final").glob("*.png"):
        with Image.open(png) as im:
            assert im.size == (64, 64) and "Steps: 4" in im.info["parameters"]
    export = v / "exports" / "demo-sd3.safetensors"
    with safe_open(str(export), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("transformer.", "text_encoder.text_model.", "text_encoder_2.text_model."))
                        and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}
    assert meta["ss_base_model_version"] == "sd3" and meta["modelspec.architecture"] == "stable-diffusion-3/lora"

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(demo / "model-sd3"), local_files_only=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
              output_type="np")
    before = pipe(generator=gen(0), **kw).images
    pipe.load_lora_weights(str(export))
    assert pipe.get_list_adapters() == {"transformer": ["default_0"], "text_encoder": ["default_0"],
                                        "text_encoder_2": ["default_0"]}
    after = pipe(generator=gen(0), **kw).images
    assert abs(after - before).max() > 1e-3  # the LoRA changes the image
