"""The trainer's deferred package inits (backend/trainer/lazy_packages.py): loading the SD UNet and
VAE no longer imports diffusers' other model files or scipy.stats, and every name in those
packages is still there, the same object, the first time something asks for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, threading
from backend.trainer.lazy_packages import DEFERRED, defer_package_inits

out = {"deferred": defer_package_inits(), "again": defer_package_inits()}
from diffusers import AutoencoderKL, UNet2DConditionModel  # what the SD families load first
out["after_unet"] = sorted(m for m in ("diffusers.models.transformers.transformer_flux",
    "diffusers.models.transformers.transformer_sd3", "diffusers.models.unets.unet_motion_model",
    "diffusers.models.autoencoders.autoencoder_kl_wan", "scipy.stats._stats_py") if m in sys.modules)
out["unet_module"] = UNet2DConditionModel.__module__

got = []
def read():
    from diffusers.models.transformers import FluxTransformer2DModel  # runs the package's __init__
    got.append(FluxTransformer2DModel)
threads = [threading.Thread(target=read) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
import diffusers
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
out["same_flux"] = all(c is diffusers.FluxTransformer2DModel for c in got) and len(got) == 4
out["same_sd3"] = diffusers.models.transformers.SD3Transformer2DModel is SD3Transformer2DModel
out["unets_names"] = hasattr(diffusers.models.unets, "UNet2DConditionModel")
try:
    diffusers.models.transformers.NoSuchModel
    out["missing"] = "no error"
except AttributeError as e:
    out["missing"] = str(e)

import scipy.stats  # what diffusers' DPM-Solver does for its beta sigmas
out["beta"] = float(scipy.stats.beta.ppf(0.5, 2.0, 2.0))
out["loaded_after"] = "scipy.stats._stats_py" in sys.modules
print(json.dumps(out))
"""


def test_deferred_inits_skip_the_model_zoo_until_a_name_is_read_and_then_give_the_same_objects():
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["deferred"] == ["diffusers.models.transformers", "diffusers.models.unets",
                               "diffusers.models.autoencoders", "scipy.stats"]
    assert out["again"] == []  # already in sys.modules: left as they are
    assert out["after_unet"] == []  # the UNet and VAE came without the other model files
    assert out["unet_module"] == "diffusers.models.unets.unet_2d_condition"
    assert out["same_flux"] and out["same_sd3"] and out["unets_names"]
    assert "NoSuchModel" in out["missing"]
    assert abs(out["beta"] - 0.5) < 1e-9 and out["loaded_after"]
