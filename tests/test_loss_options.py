"""Noise, timesteps and loss as sd-scripts has them (issue 14, item 3). Each option is checked against
its formula written here from sd-scripts' definition (library/custom_train_functions.py,
library/train_util.py, networks/lora.py; LyCORIS lycoris/modules/*.py for apply_max_norm), not by
calling Lathe's function twice; then one real run with most of them on resumes bit-exactly."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from backend.config import (
    DATASET_HASH_NEUTRAL,
    HASH_NEUTRAL_DEFAULTS,
    NOISE_AND_LOSS_FIELDS,
    ConfigError,
    DoRANetwork,
    LoHaNetwork,
    LoKrNetwork,
    LoRANetwork,
    TrainingConfig,
    TrainingSection,
    config_warnings,
    validate_config,
)
from backend.trainer import loss as L
from backend.trainer import max_norm as M
from backend.trainer import network
from backend.trainer import noise as N
from backend.trainer.evaluation import eval_timesteps
from backend.trainer.models import zero_terminal_snr_scheduler


def ts(**kw) -> TrainingSection:
    return TrainingSection(**kw)


def gen(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + i)


def sd_scheduler(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, **kw)


LATENTS = torch.randn(3, 4, 16, 12, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------- config
def errors(**training) -> list[str]:
    try:
        validate_config({"training": training})
    except ConfigError as e:
        return e.lines
    return []


# config_hash() of TrainingConfig() as written by Lathe before the networks, noise/loss, dataset,
# LoRA+, warmup and sampler fields existed: the checkpoints of those runs hold it.
DEFAULT_HASH_OF_SCHEMA_1 = "0bf2f7cee08ec64ca78a27266b8a4bf21ec2b171e9543b1e2fc73f0c029cb8e6"


def test_defaults_change_nothing_and_leave_the_config_hash_alone():
    t = TrainingSection()
    assert (t.multires_noise_iterations, t.multires_noise_discount, t.adaptive_noise_scale, t.ip_noise_gamma) == (0, 0.3, None, None)
    assert (t.min_timestep, t.max_timestep, t.loss_type, t.huber_c, t.huber_schedule) == (None, None, "l2", 0.1, "snr")
    assert not (t.debiased_estimation_loss or t.zero_terminal_snr or t.scale_v_pred_loss_like_noise_pred)
    assert t.scale_weight_norms is None and t.v_pred_like_loss is None
    cfg = TrainingConfig()
    data = cfg.model_dump(mode="json")
    for section, fields in HASH_NEUTRAL_DEFAULTS.items():  # the hash of a config written before they existed
        assert set(fields) <= set(data[section]), section
        for name in fields:
            del data[section][name]
    assert set(NOISE_AND_LOSS_FIELDS) <= set(HASH_NEUTRAL_DEFAULTS["training"])
    assert set(DATASET_HASH_NEUTRAL) <= set(HASH_NEUTRAL_DEFAULTS["dataset"])
    old = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert old == DEFAULT_HASH_OF_SCHEMA_1  # what runs started before any of these fields store
    assert cfg.config_hash() == old
    assert TrainingConfig(training={"loss_type": "huber"}).config_hash() != old


def test_bad_values_name_the_field():
    assert errors(adaptive_noise_scale=0.01) == [
        "training.adaptive_noise_scale: needs noise_offset above 0 (it is added to the noise offset, as in sd-scripts); "
        "set noise_offset or clear adaptive_noise_scale"]
    assert errors(min_timestep=500, max_timestep=400) == ["training.min_timestep: must be below max_timestep (500 >= 400)"]
    assert errors(min_timestep=300, max_timestep=300)[0].startswith("training.min_timestep: must be below")
    assert errors(min_timestep=999) == [] and errors(max_timestep=1) == []
    assert errors(max_timestep=1001)[0].startswith("training.max_timestep:")
    assert errors(min_timestep=-1)[0].startswith("training.min_timestep:")
    assert errors(loss_type="l3")[0].startswith("training.loss_type:")
    assert errors(huber_schedule="linear")[0].startswith("training.huber_schedule:")
    assert errors(huber_c=0)[0].startswith("training.huber_c:")
    assert errors(multires_noise_iterations=-1)[0].startswith("training.multires_noise_iterations:")
    assert errors(scale_weight_norms=0)[0].startswith("training.scale_weight_norms:")
    with pytest.raises(ConfigError, match="training.scale_v_pred_loss_like_noise_pred: only for v-prediction"):
        validate_config({"model": {"v_parameterization": False}, "training": {"scale_v_pred_loss_like_noise_pred": True}})
    with pytest.raises(ConfigError, match="training.v_pred_like_loss: only for noise-prediction"):
        validate_config({"model": {"v_parameterization": True}, "training": {"v_pred_like_loss": 0.1}})
    with pytest.raises(L.LossSettingError, match="training.scale_v_pred_loss_like_noise_pred"):
        L.check_loss_settings(ts(scale_v_pred_loss_like_noise_pred=True), v_prediction=False)
    with pytest.raises(L.LossSettingError, match="training.max_timestep: 1000 is beyond"):
        N.timestep_range(ts(max_timestep=1000), 500)


def test_settings_that_do_nothing_are_warnings():
    def warnings(**training) -> list[str]:
        return [w for w in config_warnings(validate_config({"training": training})) if w.startswith("training.")]

    assert warnings(huber_c=0.2, huber_schedule="constant") == [
        "training.huber_c: only used with loss_type huber or smooth_l1 (loss_type is l2)",
        "training.huber_schedule: only used with loss_type huber or smooth_l1 (loss_type is l2)"]
    assert warnings(loss_type="huber", huber_c=0.2) == []
    assert warnings(noise_offset_random_strength=True)[0].startswith("training.noise_offset_random_strength: has no effect")
    assert warnings(ip_noise_gamma_random_strength=True)[0].startswith("training.ip_noise_gamma_random_strength: has no")
    assert warnings(multires_noise_discount=0.5)[0].startswith("training.multires_noise_discount: has no effect")
    assert warnings(multires_noise_iterations=6, multires_noise_discount=0.5) == []


# -------------------------------------------------------------------------------------------- noise
def test_at_the_defaults_the_draws_are_the_old_ones():
    """randn then randint(0, T) from each sample's generator (and the old noise offset), bit for bit."""
    for options in ({}, {"noise_offset": 0.05}):
        noise, t, inputs = N.draw_noise(LATENTS, [gen(i) for i in range(3)], ts(**options), 1000)
        assert inputs is None
        for i in range(3):
            g = gen(i)
            n = torch.randn((4, 16, 12), generator=g)
            if options:
                n = n + 0.05 * torch.randn((4, 1, 1), generator=g)
            assert torch.equal(noise[i], n) and torch.equal(t[i:i + 1], torch.randint(0, 1000, (1,), generator=g))


def test_noise_offset_with_random_strength_and_adaptive_scale():
    """apply_noise_offset: noise + clamp(offset + scale * |channel mean|, 0) * randn(C, 1, 1), the offset
    drawn as rand(1) * noise_offset with noise_offset_random_strength."""
    latents = LATENTS + torch.tensor([0.5, -0.3, 0.02, 0.0]).view(1, 4, 1, 1)  # channel means large and small
    for scale in (0.5, -1.0):  # a negative scale is clamped at 0 where it would go below
        t = ts(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=scale)
        noise, _, _ = N.draw_noise(latents, [gen(i) for i in range(3)], t, 1000)
        for i in range(3):
            g = gen(i)
            n = torch.randn((4, 16, 12), generator=g)
            offset = torch.rand(1, generator=g) * 0.1
            mean = torch.abs(latents[i : i + 1].mean(dim=(2, 3), keepdim=True))[0]
            offset = torch.clamp(offset + scale * mean, 0.0, None)
            torch.testing.assert_close(noise[i], n + offset * torch.randn((4, 1, 1), generator=g), rtol=0, atol=1e-7)


def sd_pyramid_noise_like(noise, rs, randn, iterations=6, discount=0.4):
    """sd-scripts' pyramid_noise_like, verbatim but for its random sources: `rs` stands for
    random.random() at each iteration, `randn` for torch.randn."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = rs[i] * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations, discount", [(3, 0.3), (10, 0.8)])
def test_multires_noise_is_pyramid_noise_like(iterations, discount):
    """Per sample (batch 1 of sd-scripts' function): the same levels from the same generator, and each
    sample scaled to unit standard deviation."""
    t = ts(multires_noise_iterations=iterations, multires_noise_discount=discount)
    noise, steps, _ = N.draw_noise(LATENTS, [gen(i) for i in range(3)], t, 1000)
    for i in range(3):
        g = gen(i)
        base = torch.randn((1, 4, 16, 12), generator=g)
        rs = torch.rand(iterations, generator=g).tolist()
        want = sd_pyramid_noise_like(base, rs, lambda *s, g=g: torch.randn(s, generator=g), iterations, discount)
        torch.testing.assert_close(noise[i], want[0], rtol=0, atol=1e-6)
        assert abs(float(noise[i].std()) - 1.0) < 1e-5
        assert torch.equal(steps[i : i + 1], torch.randint(0, 1000, (1,), generator=g))  # drawn after the levels


def test_input_perturbation_noises_the_input_not_the_target():
    """get_noise_noisy_latents_and_timesteps: noisy latents from noise + strength * randn; the target
    is the plain noise; strength = rand(1) * ip_noise_gamma with the random strength."""
    for random in (False, True):
        noise, t, inputs = N.draw_noise(LATENTS, [gen(i) for i in range(3)], ts(ip_noise_gamma=0.1,
                                        ip_noise_gamma_random_strength=random), 1000)
        for i in range(3):
            g = gen(i)
            n = torch.randn((4, 16, 12), generator=g)
            step = torch.randint(0, 1000, (1,), generator=g)
            strength = torch.rand(1, generator=g) * 0.1 if random else 0.1
            assert torch.equal(noise[i], n) and torch.equal(t[i : i + 1], step)
            assert torch.equal(inputs[i], n + strength * torch.randn((4, 16, 12), generator=g))
    # diffusion_loss makes the noisy latents from the input noise and the target from the noise.
    seen = {}

    def unet(noisy, timesteps, **kw):
        seen["noisy"] = noisy
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    sched = sd_scheduler()
    loss = L.diffusion_loss(unet, sched, LATENTS, torch.zeros(3, 1, 1), None, noise, t, False, ts(ip_noise_gamma=0.1),
                            torch.float32, inputs)
    assert torch.equal(seen["noisy"], sched.add_noise(LATENTS, inputs, t))
    assert torch.equal(loss, (noise**2).mean(dim=(1, 2, 3)))  # pred 0 against the plain noise


def test_timesteps_stay_in_the_range_and_evaluation_follows_it():
    t = ts(min_timestep=200, max_timestep=260)
    _, steps, _ = N.draw_noise(LATENTS[:1].expand(1500, -1, -1, -1), [gen(i) for i in range(1500)], t, 1000)
    assert int(steps.min()) == 200 and int(steps.max()) == 259  # max_timestep is exclusive, as randint's high
    assert set(steps.tolist()) == set(range(200, 260))
    assert eval_timesteps(ts(), 1000) == [100, 350, 600, 850]
    assert eval_timesteps(t, 1000) == [206, 221, 236, 251]
    assert eval_timesteps(ts(max_timestep=500), 1000) == [50, 175, 300, 425]


def test_each_samples_draws_do_not_depend_on_the_batch():
    t = ts(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.3, multires_noise_iterations=5,
           ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True, min_timestep=10, max_timestep=990)
    whole = N.draw_noise(LATENTS, [gen(i) for i in range(3)], t, 1000)
    parts = [N.draw_noise(LATENTS[i : i + 1], [gen(i)], t, 1000) for i in range(3)]
    for k in range(3):
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))


# --------------------------------------------------------------------------------------------- loss
PRED, TARGET = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(3, 4, 8, 8)


@pytest.mark.parametrize("kind", ["l2", "l1", "huber", "smooth_l1"])
def test_loss_types_are_conditional_loss(kind):
    c = torch.tensor([0.1, 0.5, 1.0])
    got = L.element_loss(PRED, TARGET, ts(loss_type=kind), c if kind in ("huber", "smooth_l1") else None)
    cc = c.view(-1, 1, 1, 1)
    want = {"l2": (PRED - TARGET) ** 2, "l1": (PRED - TARGET).abs(),
            "huber": 2 * cc * (torch.sqrt((PRED - TARGET) ** 2 + cc**2) - cc),
            "smooth_l1": 2 * (torch.sqrt((PRED - TARGET) ** 2 + cc**2) - cc)}[kind]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_huber_c_schedules():
    """get_huber_threshold_if_needed: exponential c**(t/T) * scale, snr (1 - c) / (1 + sigma)**2 + c,
    constant c * scale."""
    sched, t = sd_scheduler(), torch.tensor([0, 250, 999])
    ac = sched.alphas_cumprod[t]
    sigma = torch.sqrt((1 - ac) / ac)
    c, scale = 0.2, 1.5
    want = {"exponential": torch.tensor([c ** (x / 1000) * scale for x in t.tolist()]),
            "snr": (1 - c) / (1 + sigma) ** 2 + c, "constant": torch.full((3,), c * scale)}
    for name, w in want.items():
        got = L.huber_threshold(ts(loss_type="huber", huber_c=c, huber_scale=scale, huber_schedule=name), t, sched)
        torch.testing.assert_close(got, w.float(), rtol=1e-6, atol=0)
    assert math.isclose(float(want["snr"][0]), 1.0, rel_tol=0.05)  # little noise: c near 1, close to l2 * 2c
    assert math.isclose(float(want["snr"][-1]), c, rel_tol=0.05)  # much noise: c near huber_c


def weights(v_prediction: bool, timesteps: torch.Tensor, sched, **options) -> torch.Tensor:
    return L.timestep_weights(torch.ones(len(timesteps)), ts(**options), sched, timesteps, v_prediction)


def test_debiased_estimation_and_the_v_prediction_scalings():
    """apply_debiased_estimation 1/sqrt(snr) (v-prediction 1/(snr+1)), get_snr_scale snr/(snr+1),
    add_v_prediction_like_loss 1 + v/scale, with snr = a/(1-a) capped at 1000."""
    sched, t = sd_scheduler(), torch.tensor([0, 10, 400, 999])
    ac = sched.alphas_cumprod[t].double()
    snr = torch.clamp(ac / (1 - ac), max=1000)
    assert float(ac[0] / (1 - ac[0])) > 1000  # the cap matters at t = 0
    check = {
        (False, "debiased_estimation_loss", True): 1 / torch.sqrt(snr),
        (True, "debiased_estimation_loss", True): 1 / (snr + 1),
        (True, "scale_v_pred_loss_like_noise_pred", True): snr / (snr + 1),
        (False, "v_pred_like_loss", 0.3): 1 + 0.3 * (snr + 1) / snr,
    }
    for (v, name, value), want in check.items():
        torch.testing.assert_close(weights(v, t, sched, **{name: value}).double(), want, rtol=2e-6, atol=0)
    # In sd-scripts' order: Min-SNR (min(snr, gamma)/snr), then debiased.
    raw = ac / (1 - ac)
    both = weights(False, t, sched, min_snr_gamma=5.0, debiased_estimation_loss=True).double()
    torch.testing.assert_close(both, torch.clamp(raw, max=5.0) / raw / torch.sqrt(snr), rtol=2e-6, atol=0)


def test_at_the_defaults_the_loss_is_the_old_one():
    sched, t = sd_scheduler(), torch.tensor([5, 500, 995])
    noise = torch.randn(LATENTS.shape, generator=gen(0))

    def unet(noisy, timesteps, **kw):
        return type("Out", (), {"sample": noisy * 0.5})()

    for options in ({}, {"min_snr_gamma": 5.0}):
        got = L.diffusion_loss(unet, sched, LATENTS, torch.zeros(3, 1, 1), None, noise, t, False, ts(**options), torch.float32)
        want = F.mse_loss(sched.add_noise(LATENTS, noise, t) * 0.5, noise, reduction="none").mean(dim=(1, 2, 3))
        if options:
            ac = sched.alphas_cumprod[t]
            want = want * torch.clamp(ac / (1 - ac), max=5.0) / (ac / (1 - ac))
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------ zero terminal SNR
def sd_enforce_zero_terminal_snr(betas):
    """sd-scripts' fix_noise_scheduler_betas_for_zero_terminal_snr.enforce_zero_terminal_snr."""
    alphas = 1 - betas
    alphas_bar = alphas.cumprod(0)
    alphas_bar_sqrt = alphas_bar.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


def test_zero_terminal_snr_rescales_the_betas_as_sd_scripts_does():
    from diffusers import DDIMScheduler

    plain = sd_scheduler()
    fixed = zero_terminal_snr_scheduler(plain)
    betas = sd_enforce_zero_terminal_snr(plain.betas.clone())
    assert torch.equal(fixed.betas, betas)
    assert torch.equal(fixed.alphas_cumprod, torch.cumprod(1.0 - betas, dim=0))
    ac = fixed.alphas_cumprod
    assert float(ac[-1]) == 0.0 and float(fixed.betas[-1]) == 1.0  # pure noise at the last timestep
    assert math.isclose(float(ac[0]), float(plain.alphas_cumprod[0]), rel_tol=1e-6)  # the first is kept
    assert bool((ac[1:] < ac[:-1]).all()) and bool(((fixed.betas > 0) & (fixed.betas <= 1)).all())
    assert torch.equal(DDIMScheduler.from_config(fixed.config).alphas_cumprod, ac)  # the sampler agrees
    # The SNR weights read the schedule before the rescale (sd-scripts computes all_snr first): finite at T.
    assert torch.equal(L.snr_alphas_cumprod(fixed), plain.alphas_cumprod)
    w = weights(False, torch.tensor([999]), fixed, min_snr_gamma=5.0, debiased_estimation_loss=True)
    assert torch.isfinite(w).all()
    huber = L.huber_threshold(ts(loss_type="huber", huber_c=0.1), torch.tensor([999]), fixed)
    assert torch.allclose(huber, torch.tensor([0.1]))  # sigma is infinite at T: c is huber_c


def test_zero_terminal_snr_reaches_training_evaluation_and_sampling(demo, tmp_path):
    from backend.presets import resolve
    from backend.trainer.models import load_components
    from backend.trainer.sampling import _pipeline

    cfg = resolve({"model": {"pretrained_model": str(demo / "model-sd2v")}, "training": {"zero_terminal_snr": True}})
    comps = load_components(cfg)
    assert float(comps.noise_scheduler.alphas_cumprod[-1]) == 0.0
    assert comps.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(_pipeline(comps, comps.unet).scheduler.alphas_cumprod[-1]) == 0.0
    plain = load_components(resolve({"model": {"pretrained_model": str(demo / "model-sd2v")}}))
    assert float(plain.noise_scheduler.alphas_cumprod[-1]) > 0.0


# ---------------------------------------------------------------------------------------- max norm
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = torch.nn.Linear(16, 12), torch.nn.Linear(16, 12)


def tiny(net) -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    network.inject(model, net, ["to_q", "to_k"], "unet")
    with torch.no_grad():
        for p in network.network_parameters(model):
            p.copy_(torch.randn(p.shape) * 0.5)
    return model


def layers(model):
    return dict(network.network_modules(model))


def sd_apply_max_norm_regularization(state: dict, max_norm_value: float):
    """sd-scripts' LoRANetwork.apply_max_norm_regularization (networks/lora.py), for Linear layers."""
    norms, keys_scaled = [], 0
    for key in [k for k in state if "lora_down" in k and "weight" in k]:
        up_key, alpha_key = key.replace("lora_down", "lora_up"), key.replace("lora_down.weight", "alpha")
        down, up, alpha = state[key], state[up_key], state[alpha_key]
        updown = (up @ down) * (alpha / down.shape[0])
        norm = updown.norm().clamp(min=max_norm_value / 2)
        desired = torch.clamp(norm, max=max_norm_value)
        ratio = desired.cpu() / norm.cpu()
        if ratio != 1:
            keys_scaled += 1
            state[up_key] *= ratio**0.5
            state[key] *= ratio**0.5
        norms.append((updown.norm() * ratio).item())
    return keys_scaled, sum(norms) / len(norms), max(norms)


def test_max_norm_on_lora_is_sd_scripts():
    model = tiny(LoRANetwork(rank=4, alpha=2))
    m = layers(model)
    with torch.no_grad():  # to_q: an update of norm 3 exactly; to_k: one below the limit
        m["to_q"].lora_B["default"].weight.mul_(3 / float(network.lora_delta(m["to_q"]).norm()))
        m["to_k"].lora_B["default"].weight.mul_(0.4 / float(network.lora_delta(m["to_k"]).norm()))
    state = {}
    for name, layer in m.items():
        state[f"{name}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
        state[f"{name}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
        state[f"{name}.alpha"] = torch.tensor(2.0)
    below = {n: p.detach().clone() for n, p in model.to_k.named_parameters()}
    want = sd_apply_max_norm_regularization(state, 1.0)
    got = M.apply_max_norm([model], 1.0, "lora").tolist()
    assert want[0] == got[0] == 1
    assert got[1:] == pytest.approx(list(want[1:]), rel=1e-6) and got[1:] == pytest.approx([(1.0 + 0.4) / 2, 1.0], rel=1e-6)
    for name, layer in m.items():
        torch.testing.assert_close(layer.lora_A["default"].weight, state[f"{name}.lora_down.weight"], rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, state[f"{name}.lora_up.weight"], rtol=1e-6, atol=0)
    assert float(network.lora_delta(m["to_q"]).detach().norm()) == pytest.approx(1.0, rel=1e-6)
    assert all(torch.equal(p, below[n]) for n, p in model.to_k.named_parameters())  # below the limit: untouched


@pytest.mark.parametrize("net, scaled", [
    (LoHaNetwork(rank=4, alpha=2), {"hada_w1_a"}),  # LyCORIS's scalar, folded where its files put it
    (LoKrNetwork(rank=4, alpha=2, lokr_factor=4), {"lokr_w1", "lokr_w2"}),  # each factor: ratio**(1/their count)
    (LoKrNetwork(rank=1, alpha=1, lokr_factor=4, decompose_both=True), {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    (DoRANetwork(rank=4, alpha=2), {"lora_B"}),  # LyCORIS's scalar again; dora_scale (the magnitude) is left alone
], ids=["loha", "lokr", "lokr-both", "dora"])
def test_max_norm_on_lycoris_types_is_apply_max_norm(net, scaled):
    """LyCORIS apply_max_norm: ratio = min(max(|dW|, limit/2), limit) / max(|dW|, limit/2), put into
    the factors as LyCORIS does; the update then has the limit as its norm."""
    model = tiny(net)
    m, other = layers(model)["to_q"], layers(model)["to_k"]
    before = {n: p.detach().clone() for n, p in m.named_parameters() if network.is_network_param(n)}
    orig, orig_k = (float(M.update_weight(x, net.type).detach().norm()) for x in (m, other))
    limit = orig / 4
    got = M.apply_max_norm([model], limit, net.type).tolist()
    assert got[0] == 1 + (orig_k > limit)
    assert got[1] == pytest.approx((limit + min(orig_k, limit)) / 2, rel=1e-5) and got[2] == pytest.approx(limit, rel=1e-5)
    assert float(M.update_weight(m, net.type).detach().norm()) == pytest.approx(limit, rel=1e-5)
    factors = [n for n in before if n.split(".")[0] in scaled]
    assert len(factors) == len(scaled), sorted(before)
    for n, p in m.named_parameters():
        if n in before:
            power = 1 / len(factors) if n in factors else 0.0
            torch.testing.assert_close(p, before[n] * 0.25**power, rtol=1e-5, atol=0, msg=n)


# ------------------------------------------------------------------------------------------- kohya
def test_kohya_keys_become_the_options():
    from backend.kohya import import_kohya
    from tests.test_kohya_import import ok, standard

    r = ok(import_kohya(standard(noise_offset_type="Multires", multires_noise_iterations="8", multires_noise_discount=0.2,
                                 ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, min_timestep=0, max_timestep=1000,
                                 loss_type="smooth_l1", huber_c=0.2, huber_schedule="exponential", huber_scale=1.5,
                                 debiased_estimation_loss=True, scale_weight_norms="1", zero_terminal_snr=True)))
    t = r.config.training
    assert (t.multires_noise_iterations, t.multires_noise_discount, t.noise_offset, t.adaptive_noise_scale) == (8, 0.2, 0.0, None)
    assert (t.ip_noise_gamma, t.ip_noise_gamma_random_strength, t.min_timestep, t.max_timestep) == (0.1, True, None, None)
    assert (t.loss_type, t.huber_c, t.huber_schedule, t.huber_scale) == ("smooth_l1", 0.2, "exponential", 1.5)
    assert (t.debiased_estimation_loss, t.scale_weight_norms, t.zero_terminal_snr) == (True, 1.0, True)
    reasons = dict(r.unmapped)
    assert reasons["noise_offset"].startswith("not applicable: kohya_ss passes it only when noise_offset_type is Original")
    r = ok(import_kohya(standard(loss_type="l2", huber_c=0.3, ip_noise_gamma=0, ip_noise_gamma_random_strength=True)))
    assert r.config.training.huber_c == 0.1 and r.config.training.ip_noise_gamma_random_strength is False
    reasons = dict(r.unmapped)
    assert reasons["huber_c"] == "not applicable: only used with loss_type huber or smooth_l1"
    assert reasons["ip_noise_gamma_random_strength"] == "not applicable: only used with ip_noise_gamma"
    bad = import_kohya(standard(noise_offset=0, adaptive_noise_scale=0.01))
    assert any(e.startswith("adaptive_noise_scale: needs noise_offset above 0") for e in bad.errors), bad.errors


# A real run with these options on (verify, a mid-epoch resume bit-exact, the step events' max-norm
# figures, the export's ss_ keys): test_correctness_e2e.py's off-default run.
