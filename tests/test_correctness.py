"""Regression tests for the review "correct in every combination users run" (issue 11), at the
level where each fault lived: v-prediction decided once, samples conditioned like training, kohya's
dropout, the fp16 step, collision-free seeds, the constant schedule, state files that never run
code, and the distributed types Lathe refuses. The end-to-end halves are in test_correctness_e2e.py
and test_ddp.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.config import TrainingConfig, validate_config
from tests.conftest import ROOT, demo_config, run_cli, write_config


def _cfg(demo: Path, tmp: Path, **sections) -> TrainingConfig:
    from backend.presets import resolve

    return resolve(demo_config(demo, tmp / "runs", **sections))


# --------------------------------------------------------------------------- v-prediction, one decision
def test_v_parameterization_reaches_the_training_target_and_the_sampler(demo, tmp_path):
    from backend.trainer import models, sampling

    comps = models.load_components(_cfg(demo, tmp_path, model={"v_parameterization": True}))
    assert comps.v_prediction and comps.noise_scheduler.config.prediction_type == "v_prediction"
    assert sampling._pipeline(comps, comps.unet).scheduler.config.prediction_type == "v_prediction"
    plain = models.load_components(_cfg(demo, tmp_path))
    assert not plain.v_prediction and sampling._pipeline(plain, plain.unet).scheduler.config.prediction_type == "epsilon"


def test_a_single_files_v_pred_key_counts_with_an_explicit_family(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    from backend.trainer import models
    from backend.trainer.single_file import read_checkpoint

    _, meta = read_checkpoint(demo / "model.safetensors")
    marked = tmp_path / "vpred.safetensors"
    save_file({**load_file(demo / "model.safetensors"), "v_pred": torch.tensor([])}, str(marked), metadata=meta)
    for family in ("auto", "sd15"):
        comps = models.load_components(_cfg(demo, tmp_path, model={"pretrained_model": str(marked), "family": family}))
        assert comps.v_prediction, family
    forced = models.load_components(_cfg(demo, tmp_path, model={"pretrained_model": str(marked), "v_parameterization": False}))
    assert not forced.v_prediction  # the user's setting wins over the marker


def test_sd2_768_v_config_is_chosen_by_the_setting_or_the_marker():
    from backend.trainer.single_file import _resolve_family

    assert _resolve_family(None, "sd2", "m.safetensors", {}, True) == "sd2-v"  # auto + v_parameterization
    assert _resolve_family("sd2", "sd2", "m.safetensors", {}, True) == "sd2-v"  # explicit family + marker
    assert _resolve_family(None, "sd2", "m.safetensors", {"lathe.family": "sd2-v"}, False) == "sd2"
    assert _resolve_family(None, "sd2", "m.safetensors", {"lathe.family": "sd2-v"}, None) == "sd2-v"
    assert _resolve_family(None, "sd15", "m.safetensors", {}, True) == "sd15"


def test_tiny_sd2_folders_are_detected_as_sd2():
    from backend.trainer.models import family_from_unet_config

    assert family_from_unet_config({"use_linear_projection": True, "cross_attention_dim": 32}) == "sd2"
    assert family_from_unet_config({"cross_attention_dim": 768}) == "sd15"
    assert family_from_unet_config({"use_linear_projection": True, "addition_embed_type": "text_time"}) == "sdxl"


# --------------------------------------------------------------------------- samples as training conditions
def test_samples_are_encoded_like_training_with_clip_skip(demo, tmp_path):
    from backend.trainer import models, sampling
    from backend.trainer.caching import TextEncoder

    comps = models.load_components(_cfg(demo, tmp_path))
    train_text = TextEncoder(comps, clip_skip=2, cache=False)
    embeds = sampling.prompt_embeddings(comps, train_text, "a red circle", "")
    ctx, _ = train_text(["a red circle"], torch.device("cpu"))
    assert torch.equal(embeds["prompt_embeds"], ctx)
    images = {}
    for skip in (1, 2):
        sc = _cfg(demo, tmp_path).sampling.model_copy(update={"prompts": ["a red circle"], "steps": 2})
        out = sampling.generate(comps, comps.unet, TextEncoder(comps, skip, cache=False), sc, range(1),
                                torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
        images[skip] = out[0][2]
    assert images[1] != images[2]  # clip_skip reaches the sampler


def test_the_vae_decodes_outside_the_training_autocast(demo, tmp_path):
    from backend.trainer import models, sampling
    from backend.trainer.caching import TextEncoder

    comps = models.load_components(_cfg(demo, tmp_path))
    seen = []
    comps.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    sc = _cfg(demo, tmp_path).sampling.model_copy(update={"prompts": ["a yellow star"], "steps": 2})
    sampling.generate(comps, comps.unet, TextEncoder(comps, 1, cache=False), sc, range(1), torch.device("cpu"),
                      lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [torch.float32]


def test_sdxl_ignores_clip_skip_as_sd_scripts_does(demo, tmp_path):
    from backend.trainer import models
    from backend.trainer.caching import TextEncoder

    comps = models.load_components(_cfg(demo, tmp_path, model={"pretrained_model": str(demo / "model-sdxl")}))
    one, two = (TextEncoder(comps, k, cache=False).encode(["a red circle"]) for k in (1, 2))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    cfg = validate_config({"model": {"family": "sdxl"}, "training": {"clip_skip": 2}})
    from backend.config import config_warnings

    assert any(w.startswith("training.clip_skip: ignored for SDXL") for w in config_warnings(cfg))


# --------------------------------------------------------------------------- kohya's network_dropout
def test_network_dropout_drops_the_down_projections_output_not_the_input():
    from backend.config import LoRANetwork
    from backend.trainer import network

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    network.inject(model, LoRANetwork(rank=8, alpha=8, dropout=0.5), ["0"], "unet")
    layer = model[0]
    seen: dict[str, torch.Tensor] = {}
    layer.lora_A[network.ADAPTER].register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    x = torch.randn(64, 16) + 5.0  # no zeros in the input
    model.train()
    model(x)
    assert (seen["x"] != 0).all()  # the input reaches lora_down untouched (peft would drop here)
    assert (seen["out"] == 0).float().mean() > 0.3  # the rank-sized activation is dropped
    model.eval()
    model(x)
    assert (seen["out"] != 0).all()


# --------------------------------------------------------------------------- fp16: the scaler's step
def _scaled_optimizer(param: torch.nn.Parameter):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # the optimizer wrapper needs the process state; CPU has no fp16 scaler of its own
    opt = torch.optim.SGD([param], lr=0.1)
    return AcceleratedOptimizer(opt, device_placement=False, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))


def test_the_schedule_does_not_step_on_a_step_the_scaler_skipped():
    from backend.trainer.loop import optimizer_step

    p = torch.nn.Parameter(torch.ones(3))
    opt = _scaled_optimizer(p)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (n + 1))
    opt.scaler.scale((p * torch.tensor([float("inf"), 1.0, 1.0])).sum()).backward()  # an overflowing backward
    assert optimizer_step(opt, sched) is False
    assert sched.last_epoch == 0 and torch.equal(p.detach(), torch.ones(3))  # nothing moved
    assert opt.scaler.get_scale() == 512.0  # the scaler backed off
    opt.scaler.scale(p.sum()).backward()
    assert optimizer_step(opt, sched) is True and sched.last_epoch == 1 and not torch.equal(p.detach(), torch.ones(3))


def test_overflow_is_absorbed_under_fp16_and_fatal_otherwise():
    from backend.trainer.steplog import MAX_SKIPPED_IN_A_ROW, Overflows

    assert Overflows(False).check(3, float("nan"), True).startswith("loss became nan at step 3")
    fp16 = Overflows(True)
    assert fp16.check(1, float("inf"), False) is None and fp16.check(2, 0.1, True) is None
    reasons = [fp16.check(n, float("inf"), False) for n in range(MAX_SKIPPED_IN_A_ROW)]
    assert reasons[:-1] == [None] * (MAX_SKIPPED_IN_A_ROW - 1) and "fp16 overflow in 20 steps in a row" in reasons[-1]


# --------------------------------------------------------------------------- seeds, schedules
def test_step_seeds_never_collide_across_ranks_and_micro_steps():
    from backend.trainer.loss import mix_seed

    seeds = {mix_seed(42, 0, step, micro, rank) for step in range(40) for micro in range(40) for rank in range(40)}
    assert len(seeds) == 40**3
    assert mix_seed(42, 0, 0, 1, 0) != mix_seed(42, 0, 0, 0, 31)  # collided in the old linear formula


def test_constant_schedule_with_warmup_is_refused_plainly():
    from backend.config import ConfigError

    with pytest.raises(ConfigError, match="scheduler.warmup_steps: the constant schedule has no warmup"):
        validate_config({"scheduler": {"type": "constant", "warmup_steps": 10}})
    validate_config({"scheduler": {"type": "constant_with_warmup", "warmup_steps": 10}})


def test_kohya_import_reports_what_sd_scripts_refuses_or_ignores():
    from backend.kohya import import_kohya

    res = import_kohya({"LoRA_type": "Standard", "network_dim": 8, "lr_scheduler": "constant", "lr_warmup_steps": 20,
                        "sdxl": True, "clip_skip": 2, "max_train_steps": 100})
    assert res.ok, res.errors
    assert res.config.scheduler.warmup_steps == 0
    assert any("constant schedule has no warmup" in w for w in res.warnings)
    assert any(w.startswith("clip_skip: 2 has no effect on SDXL") for w in res.warnings)


# --------------------------------------------------------------------------- state files never run code
EVIL = """
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save([Evil()], {path!r})
"""


def test_a_checkpoint_whose_state_file_carries_code_is_refused_unrun(tmp_path, demo_run):
    from backend import checkpoints as C
    from backend.trainer.state import load_pickle

    marker = tmp_path / "ran"
    bad = tmp_path / "rng.pt"
    subprocess.run([sys.executable, "-c", EVIL.format(marker=marker, path=str(bad))], check=True)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_pickle(bad)
    assert not marker.exists()
    # A real checkpoint with its rng.pt swapped and the manifest re-hashed, as an attacker would.
    v = tmp_path / "copy" / "demo" / "version_0"
    shutil.copytree(demo_run, v)
    ck = v / "checkpoints" / "final"
    (ck / "rng.pt").write_bytes(bad.read_bytes())
    manifest = C.read_manifest(ck)
    manifest["files"]["rng.pt"] = {"bytes": bad.stat().st_size, "sha256": C.sha256_file(ck / "rng.pt")}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert C.checkpoint_status(ck)[0] == "valid"
    from backend.trainer.verify import verify_checkpoint

    ok, lines = verify_checkpoint(ck, recompute=False)
    assert not ok and any(line.startswith("load:") for line in lines) and not marker.exists()
    out = run_cli("resume", str(ck), "--set", "training.max_train_steps=66")  # two steps past its end
    assert out.returncode == 1 and "Weights only load failed" in out.stdout + out.stderr and not marker.exists()


# --------------------------------------------------------------------------- distributed types
@pytest.mark.parametrize("kind, ok", [("DEEPSPEED", False), ("FSDP", False), ("MULTI_GPU", True), ("NO", True)])
def test_accelerate_configs_lathe_cannot_save_are_refused_at_validate(tmp_path, demo, kind, ok):
    acc = tmp_path / "accelerate.yaml"
    acc.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {kind}\nnum_processes: 2\n")
    cfg = write_config(tmp_path / "c.json", demo_config(demo, tmp_path / "runs", launch={"accelerate_config_file": str(acc)}))
    out = run_cli("validate", str(cfg))
    assert (out.returncode == 0) == ok, out.stderr
    if not ok:
        assert f"launch.accelerate_config_file: distributed_type {kind} is not supported" in out.stderr
        assert "MULTI_GPU" in out.stderr


def test_every_shipped_preset_still_validates():
    from concurrent.futures import ThreadPoolExecutor

    presets = sorted((ROOT / "presets").glob("*.json"))
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:  # one CLI process per preset, a few at a time
        outs = list(pool.map(lambda p: run_cli("validate", str(p)), presets))
    for p, out in zip(presets, outs, strict=True):
        assert out.returncode == 0, (p.name, out.stderr)
        json.loads(p.read_text())


def test_rng_files_of_earlier_versions_still_load_with_weights_only(tmp_path):
    """Checkpoints written before this change stored numpy's RNG state as an ndarray."""
    import random

    import numpy as np

    from backend.trainer.state import _set_rng, load_pickle, rng_state

    np.random.seed(7)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": []}
    torch.save([old], tmp_path / "rng.pt")
    expected = np.random.random()
    _set_rng(load_pickle(tmp_path / "rng.pt")[0])
    assert np.random.random() == expected
    torch.save([rng_state()], tmp_path / "new.pt")  # today's format holds no numpy objects at all
    assert torch.load(tmp_path / "new.pt", weights_only=True)[0]["numpy"][0] == "MT19937"


def test_the_production_trainer_has_no_test_hooks():
    """Disturbances for tests live in tests/trainer_probe.py, wrapped around the trainer."""
    hooks = [p for p in (ROOT / "backend").rglob("*.py") if "LATHE_TEST" in p.read_text(encoding="utf-8")]
    assert hooks == []
