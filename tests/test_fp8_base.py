"""model.fp8_base (backend/trainer/fp8.py, sd-scripts' --fp8_base): an fp8 layer computes exactly what
the layer computed with its weight rounded through fp8, the network on top trains in fp32 and the base
gets no gradient; the SD and Flux.1 demo denoisers hold every base Linear/Conv2d weight in fp8 (norms
not) with unchanged export keys; real runs train (Flux.1 on 2 processes), resume bit-exactly mid-epoch
and pass verify."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backend.config import validate_config
from backend.presets import resolve
from backend.trainer import fp8, models, network
from backend.trainer.trained import Trained
from tests.conftest import ROOT, events, run_cli, step_losses, train, write_config
from tests.test_resume_e2e import assert_continues, resume

CPU = torch.device("cpu")
REPORT = re.compile(r"model\.fp8_base: (\d+) layer weights of the denoiser stored in fp8")


def rounded(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float8_e4m3fn).to(w.dtype)


# ------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("layer", [torch.nn.Linear(16, 12), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)],
                         ids=["linear", "conv2d"])
def test_an_fp8_layer_computes_as_its_weight_rounded_through_fp8(layer: torch.nn.Module):
    torch.manual_seed(0)
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.weight.copy_(rounded(reference.weight))
    for m in (layer, reference):
        m.requires_grad_(False)
    report = fp8.store_base_in_fp8(torch.nn.Sequential(layer), CPU, torch.float32)
    assert report.layers == 1 and report.bytes_after * 4 == report.bytes_before
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    assert layer.bias.dtype == torch.float32  # biases stay in the weight dtype
    x = torch.randn(3, 5, 16) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 4, 9, 9)
    x.requires_grad_(True)
    y, want = layer(x), reference(x)
    assert torch.equal(y, want)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0])
    assert layer.weight.grad is None


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.to_q = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.to_q(self.norm(x)))


def tiny_with(net_type: str) -> tuple[Tiny, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    model = Tiny()
    net = validate_config({"network": {"type": net_type, "rank": 2, "alpha": 2, "target_modules": ["to_q"]}}).network
    model.requires_grad_(False)
    network.inject(model, net, ["to_q"], "unet")
    return model, network.trainable_state(model)


def test_the_network_on_an_fp8_base_trains_in_fp32_and_the_base_gets_no_gradient():
    model, before = tiny_with("lora")
    fp8.store_base_in_fp8(model, CPU, torch.bfloat16)
    assert fp8.fp8_weights(model) == ["to_q.base_layer.weight", "proj.weight"]
    assert set(model._ddp_params_and_buffers_to_ignore) == {"to_q.base_layer.weight", "proj.weight"}
    assert model.norm.weight.dtype == model.to_q.base_layer.bias.dtype == torch.bfloat16  # the rest: weight dtype
    after = network.trainable_state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # init not rounded
    params = dict(model.named_parameters())
    assert all(params[k].dtype == torch.float32 for k in before)
    with torch.no_grad():
        model.to_q.lora_B["default"].weight.fill_(0.1)  # lora_A's gradient is zero while lora_B is
    model(torch.randn(2, 3, 8, dtype=torch.bfloat16)).float().square().mean().backward()
    for name in before:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in params.items() if n not in before)


def test_dora_starts_as_its_fp8_base():
    model, _ = tiny_with("dora")
    fp8.store_base_in_fp8(model, CPU, torch.float32)
    base = model.to_q.get_base_layer()
    w = base.weight.float()
    assert torch.equal(model.to_q.dora_scale.flatten(), network.column_norms(w))
    x = torch.randn(2, 8)
    torch.testing.assert_close(model.to_q(x), torch.nn.functional.linear(x, w, base.bias), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ the demo denoisers
def _preset(name: str, demo: Path, model_dir: str, out: Path, **changes: dict) -> dict:
    data = json.loads((ROOT / "presets" / name).read_text())
    data["model"] = {**data["model"], "pretrained_model": str(demo / model_dir), "fp8_base": True}
    data["dataset"]["train_data_dir"] = str(demo / "images")
    data["output_dir"] = str(out)
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    return data


@pytest.mark.parametrize("preset, model_dir", [("demo.json", "model"), ("demo-flux.json", "model-flux")])
def test_the_demo_denoisers_hold_every_base_layer_weight_in_fp8(demo: Path, tmp_path: Path, preset: str,
                                                                 model_dir: str):
    """The same three calls as build_setup: load, inject the network, store the base in fp8."""
    cfg = resolve(_preset(preset, demo, model_dir, tmp_path))
    comps = models.load_components(cfg)
    trained = Trained.for_components(cfg, comps)
    keys = set(comps.spec.export_tensors(trained.export_groups(comps.spec), torch.float16))
    report = fp8.store_base_in_fp8(comps.unet, CPU, torch.float32)
    base_layers = [(n, m) for n, m in comps.unet.named_modules()
                   if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and not network.is_network_param(n)]
    assert report.layers == len(base_layers) > 10
    assert all(m.weight.dtype == torch.float8_e4m3fn for _, m in base_layers)
    norms = [m for m in comps.unet.modules() if "Norm" in type(m).__name__]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters(recurse=False))
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert set(comps.spec.export_tensors(trained.export_groups(comps.spec), torch.float16)) == keys


# ------------------------------------------------------------------------------------------ real runs
RUN = dict(model={"fp8_base": True}, training={"max_train_epochs": None, "max_train_steps": 4},
           sampling={"prompts": []}, saving={"save_every_n_epochs": None, "save_last_n_epochs": None,
                                            "save_every_n_steps": 2})


@pytest.fixture(scope="module")
def straight(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    proc, v = train(tmp_path_factory.mktemp("fp8"), demo, **RUN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert REPORT.search(proc.stdout), proc.stdout[-2000:]
    return v


@pytest.mark.train
def test_the_sd_demo_resumes_bit_exactly_mid_epoch_on_an_fp8_base(straight: Path):
    losses = step_losses(straight)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(x) for x in losses.values())
    assert events(straight, "run_started")[0]["total_epochs"] == 1  # step 2 is mid-epoch
    proc, v = resume(straight / "checkpoints" / "step-00000002")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert REPORT.search(proc.stdout)  # the base is rebuilt in fp8 from the model file
    assert_continues(straight, v, 2)
    a, b = (load_file(str(x / "checkpoints" / "final" / "lora.safetensors")) for x in (straight, v))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("base_layer" in k for k in a)  # the state holds the network only


@pytest.mark.train
def test_verify_recomputes_the_loss_through_the_fp8_base(straight: Path):
    proc = run_cli("verify", str(straight / "checkpoints" / "step-00000002"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "difference 0.00e+00" in proc.stdout


@pytest.mark.train
def test_the_flux_demo_trains_and_samples_on_an_fp8_base_in_two_processes(demo: Path, tmp_path: Path):
    data = _preset("demo-flux.json", demo, "model-flux", tmp_path / "runs",
                   training={"max_train_epochs": None, "max_train_steps": 2},
                   saving={"save_every_n_epochs": None, "save_last_n_epochs": None},
                   sampling={"prompts": ["a yellow star"], "every_n_epochs": None, "steps": 2},
                   launch={"num_processes": 2})
    proc = run_cli("train", str(write_config(tmp_path / "flux.json", data)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert REPORT.search(proc.stdout)
    v = Path(proc.stdout.splitlines()[0])
    assert events(v, "run_started")[0]["world_size"] == 2
    losses = step_losses(v)
    assert sorted(losses) == [1, 2] and all(math.isfinite(x) for x in losses.values())
    assert (v / "samples" / "final" / "0.png").exists()
    assert load_file(str(v / "exports" / "demo-flux.safetensors"))
