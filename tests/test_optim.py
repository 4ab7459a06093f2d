"""Optimizers and schedules as the trainer builds them from the config."""

from __future__ import annotations

import pytest
import torch

from backend.presets import resolve
from backend.trainer.optim import (
    Lion,
    OptimizerUnavailable,
    build_optimizer,
    build_scheduler,
    param_groups,
    prodigy_d,
)


def quadratic_descent(opt_cfg: dict, steps: int = 60) -> float:
    cfg = resolve({"optimizer": opt_cfg})
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16))
    opt = build_optimizer(cfg, param_groups(cfg, [w], []), "cpu")
    start = float((w**2).sum().detach())
    for _ in range(steps):
        (w**2).sum().backward()
        opt.step()
        opt.zero_grad()
    return float((w**2).sum().detach()) / start


@pytest.mark.parametrize("opt", [
    {"type": "AdamW", "learning_rate": 0.05},
    {"type": "Prodigy", "d_coef": 1.0},
    {"type": "Lion", "learning_rate": 0.01},
    {"type": "DAdaptAdam", "d0": 1e-3},
    {"type": "DAdaptLion", "d0": 1e-3},
    {"type": "Adafactor", "learning_rate": 0.05},
    {"type": "SGD", "learning_rate": 0.05},
])
def test_every_optimizer_descends(opt):
    assert quadratic_descent(opt) < 0.9


def test_prodigy_receives_every_typed_argument():
    cfg = resolve({"optimizer": {"type": "Prodigy", "d_coef": 2.5, "d0": 1e-5, "growth_rate": 1.02, "use_bias_correction": True,
                                 "safeguard_warmup": True, "decouple": False, "weight_decay": 0.1, "betas": [0.9, 0.99]}})
    opt = build_optimizer(cfg, param_groups(cfg, [torch.nn.Parameter(torch.zeros(2))], []), "cpu")
    g = opt.param_groups[0]
    assert (g["d_coef"], g["d"], g["growth_rate"], g["use_bias_correction"], g["safeguard_warmup"], g["decouple"],
            g["weight_decay"], g["betas"]) == (2.5, 1e-5, 1.02, True, True, False, 0.1, (0.9, 0.99))
    assert prodigy_d(opt) == 1e-5


def test_unet_and_text_encoder_learning_rates_go_to_their_groups():
    cfg = resolve({"optimizer": {"type": "AdamW", "learning_rate": 1e-4, "text_encoder_lr": 5e-5}})
    groups = param_groups(cfg, [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))])
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder", 5e-5)]


def test_adamw8bit_without_bitsandbytes_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    cfg = resolve({"optimizer": {"type": "AdamW8bit"}})
    with pytest.raises(OptimizerUnavailable, match="AdamW8bit needs the bitsandbytes package"):
        build_optimizer(cfg, param_groups(cfg, [torch.nn.Parameter(torch.zeros(1))], []), "cpu")


def test_lion_update_is_the_sign_of_the_interpolated_momentum():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    w.grad = torch.tensor([0.3, -0.2, 0.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.9, -0.9, 0.5]))
    assert torch.allclose(opt.state[w]["exp_avg"], torch.tensor([0.003, -0.002, 0.0]))


@pytest.mark.parametrize("kind, expect_mid", [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)])
def test_schedules(kind, expect_mid):
    cfg = resolve({"scheduler": {"type": kind, "warmup_steps": 0}, "optimizer": {"type": "SGD", "learning_rate": 1.0}})
    opt = build_optimizer(cfg, param_groups(cfg, [torch.nn.Parameter(torch.zeros(1))], []), "cpu")
    sched = build_scheduler(cfg, opt, total_steps=100)
    for _ in range(50):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(expect_mid, abs=1e-6)


def test_warmup_starts_from_zero():
    cfg = resolve({"scheduler": {"type": "constant_with_warmup", "warmup_steps": 10},
                   "optimizer": {"type": "SGD", "learning_rate": 1.0}})
    opt = build_optimizer(cfg, param_groups(cfg, [torch.nn.Parameter(torch.zeros(1))], []), "cpu")
    sched = build_scheduler(cfg, opt, total_steps=100)
    assert sched.get_last_lr()[0] == 0.0
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5)


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    """The saved optimizer state (state.save_optimizer) loads back equal for AdamW and Prodigy,
    a tensor object used twice is stored once, tuples stay tuples and integer keys stay integers."""
    import json

    import torch
    from prodigyopt import Prodigy

    from backend import checkpoints as C
    from backend.trainer import state as ST

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    for opt in (torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99)), Prodigy(params, lr=1.0)):
        for _ in range(2):
            opt.zero_grad()
            (params[0].square().sum() + params[1].sum()).backward()
            opt.step()
        sd = opt.state_dict()
        shared = torch.arange(4.0)
        sd["state"][0]["qmap"], sd["state"][1]["qmap"] = shared, shared  # as bitsandbytes shares its maps
        folder = tmp_path / type(opt).__name__
        folder.mkdir()
        ST.save_optimizer(folder, sd)
        assert sorted(p.name for p in folder.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
        files = {name: None for name in ("optimizer.json", "optimizer.safetensors")}
        back = ST.load_optimizer(lambda name, folder=folder: (folder / name).read_bytes(), files)
        assert back["param_groups"][0]["betas"] == sd["param_groups"][0]["betas"]
        assert isinstance(back["param_groups"][0]["betas"], tuple) and set(back["state"]) == {0, 1}
        for i in (0, 1):
            for k, v in sd["state"][i].items():
                assert torch.equal(back["state"][i][k], v) if isinstance(v, torch.Tensor) else back["state"][i][k] == v
        assert back["state"][0]["qmap"] is back["state"][1]["qmap"]
        assert len(json.loads((folder / "optimizer.json").read_text())) == 1
        C._WRITTEN.clear()
