"""Network types (lora, locon, loha, lokr, dora): the exported file applies the update the trained
module applies, computed here from the file format alone (the formulas LyCORIS, ComfyUI's weight
adapters and AUTOMATIC1111's network loader use), and every network tensor trains.

The formulas below are written from the format, not from Lathe's code:
  lora/locon  dW = up.flat(1) @ down.flat(1) * alpha / rank            (rank = down.shape[0])
  dora        W' = (W0 + dW) * dora_scale / ||W0 + dW||_col   (norm over each input column, + fp32 eps)
  loha        dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank   (Tucker: einsum('ijkl,jr,ip->prkl', t, wb, wa))
  lokr        dW = kron(w1, w2) * alpha / dim, dim = the rank of a decomposed factor, scale 1 if none is
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from backend.config import validate_config
from backend.trainer import export, network
from backend.trainer.families import family
from backend.trainer.models import load_components
from backend.trainer.trained import Trained

FAMILIES = {"sd15": "model", "sdxl": "model-sdxl"}
NETWORKS = {
    "lora": {"type": "lora", "rank": 4, "alpha": 2.0},
    "locon": {"type": "locon", "rank": 4, "alpha": 2.0, "conv_rank": 3, "conv_alpha": 1.5},
    "loha": {"type": "loha", "rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0},
    "loha-tucker": {"type": "loha", "rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0, "use_tucker": True},
    "lokr": {"type": "lokr", "rank": 2, "alpha": 4.0, "conv_rank": 2, "conv_alpha": 1.0},
    "lokr-both-tucker": {"type": "lokr", "rank": 2, "alpha": 4.0, "conv_rank": 2, "conv_alpha": 1.0,
                         "decompose_both": True, "use_tucker": True, "lokr_factor": 4},
    "lokr-whole": {"type": "lokr", "rank": 64, "alpha": 4.0},  # rank too big to decompose: both factors whole
    "dora": {"type": "dora", "rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0},
}


_LOADED: dict[str, object] = {}


def _built(demo: Path, family: str, net: dict, text_encoder: bool = True):
    """The family's components (loaded once, a fresh copy each time) with the network attached."""
    cfg = validate_config({"model": {"pretrained_model": str(demo / FAMILIES[family])},
                           "network": {**net, "train_text_encoder": text_encoder}})
    key = f"{demo}:{family}"
    if key not in _LOADED:
        _LOADED[key] = load_components(cfg)
    comps = copy.deepcopy(_LOADED[key])
    return cfg, comps, Trained.attach(cfg, comps.unet, comps.text_encoders)


def _randomize(trained: Trained, seed: int = 0) -> None:
    """Move every network tensor away from its start, so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in trained.entries:
            for name, p in e.module.named_parameters():
                if network.is_network_param(name):
                    noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
                    p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else 0.2 * noise)


def _export(path: Path, cfg, comps, trained: Trained) -> None:
    """Write the network's file as the trainer's save points do (fp32)."""
    export.save_export(str(path), export.state_dict(trained.export_groups(comps.spec), torch.float32),
                       export.network_metadata(cfg.network))


# ------------------------------------------------------------------------ the formulas, from the format
def _rank_of(t: dict[str, torch.Tensor], *names: str) -> int | None:
    for n in names:
        if n in t:
            return t[n].shape[0]
    return None


def file_weight(t: dict[str, torch.Tensor], w0: torch.Tensor) -> torch.Tensor:
    """The weight a loader applies for one module's tensors `t` (keys without the stem)."""
    alpha = float(t["alpha"])
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        dw = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * alpha / down.shape[0]
        if "dora_scale" not in t:
            return w0 + dw
        w = w0 + dw
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
        return w * (t["dora_scale"] / (norm + torch.finfo(torch.float32).eps))
    if "hada_w1_a" in t:
        def factor(i: int) -> torch.Tensor:
            wa, wb = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            if f"hada_t{i}" in t:
                return torch.einsum("i j k l, j r, i p -> p r k l", t[f"hada_t{i}"], wb, wa)
            return wa @ wb
        dw = (factor(1) * factor(2)).reshape(w0.shape) * alpha / t["hada_w1_b"].shape[0]
        return w0 + dw
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = _rank_of(t, "lokr_w2_b") or _rank_of(t, "lokr_w1_b")
    scale = alpha / dim if dim else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return w0 + torch.kron(w1.contiguous(), w2.contiguous()).reshape(w0.shape) * scale


def _apply(layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def _modules_by_stem(trained: Trained, spec: Any) -> dict[str, torch.nn.Module]:
    out = {}
    for prefix, model, is_te, rename in trained.export_groups(spec):
        for name, m in network.network_modules(model):
            out[export.kohya_stem(prefix, rename(name), is_te)] = m
    return out


def _by_stem(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, _, rest = key.partition(".")
        out.setdefault(stem, {})[rest] = t.double()
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", list(NETWORKS))
def test_the_exported_file_applies_the_update_the_module_applies(demo: Path, tmp_path: Path, family: str, kind: str):
    cfg, comps, trained = _built(demo, family, NETWORKS[kind])
    _randomize(trained)
    path = tmp_path / "net.safetensors"
    _export(path, cfg, comps, trained)
    stems = _by_stem(load_file(str(path)))
    modules = _modules_by_stem(trained, comps.spec)
    assert set(stems) == set(modules) and stems
    convs = [s for s, m in modules.items() if isinstance(m.get_base_layer(), torch.nn.Conv2d)
             and m.get_base_layer().kernel_size == (3, 3)]
    if NETWORKS[kind].get("conv_rank"):
        assert convs, "the ResNet blocks' 3x3 convolutions carry the network"
    else:
        assert not convs
    g = torch.Generator().manual_seed(1)
    with trained.evaluating(), torch.no_grad():
        for stem, m in modules.items():
            m.double()
            base = m.get_base_layer()
            shape = (2, base.in_channels, 6, 6) if isinstance(base, torch.nn.Conv2d) else (3, base.in_features)
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            applied = m(x) - base(x)
            w0 = base.weight.detach()
            from_file = _apply(base, x, file_weight(stems[stem], w0)) - _apply(base, x, w0)
            assert applied.abs().max() > 1e-4, f"{stem}: the module applies no update"
            torch.testing.assert_close(from_file, applied, atol=1e-6, rtol=1e-5, msg=f"{kind} {stem}")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_every_network_tensor_trains_and_the_loss_goes_down(demo: Path, family: str, kind: str):
    """A fixed batch, 12 optimizer steps: every network tensor is reached by a gradient and the loss falls."""
    net = {k: v for k, v in NETWORKS[kind].items() if k != "rank"} | {"rank": 4}
    cfg, comps, trained = _built(demo, family, net, text_encoder=False)
    unet = comps.unet
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    hidden = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if comps.is_sdxl:  # pooled text embedding and size/crop conditioning
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}}
    t = torch.tensor([100, 600])
    noisy = comps.noise_scheduler.add_noise(latents, noise, t)
    params = trained.parameters()
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    named = [(n, p) for e in trained.entries for n, p in e.module.named_parameters() if network.is_network_param(n)]
    reached: set[str] = set()
    losses = []
    for _ in range(12):
        loss = F.mse_loss(unet(noisy, t, hidden, **extra).sample, noise)
        opt.zero_grad()
        loss.backward()
        reached |= {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        losses.append(loss.item())
    silent = [n for n, _ in named if n not in reached]  # (one factor starts at zero: the other's gradient comes later)
    assert not silent, f"{kind}: no gradient ever reaches {silent[:3]}"
    assert losses[-1] < losses[0] * 0.98, f"{kind}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("kind, module, args", [
    ("lora", "networks.lora", None),
    ("locon", "networks.lora", {"conv_dim": "3", "conv_alpha": "1.5"}),
    ("loha", "lycoris.kohya", {"algo": "loha", "conv_dim": "2", "conv_alpha": "1.0", "use_tucker": "False"}),
    ("lokr-both-tucker", "lycoris.kohya", {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1.0", "use_tucker": "True",
                                           "factor": "4", "decompose_both": "True"}),
    ("dora", "lycoris.kohya", {"algo": "lora", "conv_dim": "2", "conv_alpha": "1.0", "dora_wd": "True",
                               "wd_on_output": "False"}),
])
def test_the_file_says_which_network_it_holds_as_lycoris_and_sd_scripts_write_it(
        demo: Path, tmp_path: Path, kind: str, module: str, args: dict | None):
    cfg, comps, trained = _built(demo, "sd15", NETWORKS[kind], text_encoder=False)
    path = tmp_path / "net.safetensors"
    export.save_export(str(path), export.state_dict(trained.export_groups(family('sd15')), torch.float16),
                       export.network_metadata(cfg.network))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert meta["ss_network_module"] == module
    assert meta["ss_network_dim"] == str(NETWORKS[kind]["rank"])
    assert (json.loads(meta["ss_network_args"]) if "ss_network_args" in meta else None) == args


# ------------------------------------------------------------------------ network.network_weights
def _file_weights(path: Path, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    stems = _by_stem(load_file(str(path)))
    return {s: file_weight(t, modules[s].get_base_layer().weight.detach().double()) for s, t in stems.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr-whole", "lokr-both-tucker", "dora"])
def test_a_network_started_from_a_file_applies_that_files_update(demo: Path, tmp_path: Path, family: str, kind: str):
    """Written by one network, read by another of the same shape but another alpha (so every update
    is rescaled on the way in): the second network's export applies what the file applies."""
    cfg, comps, trained = _built(demo, family, NETWORKS[kind])
    _randomize(trained)
    first = tmp_path / "first.safetensors"
    export.save_export(str(first), export.state_dict(trained.export_groups(comps.spec), torch.float32), {})
    other = {**NETWORKS[kind], "alpha": NETWORKS[kind]["alpha"] * 3}
    cfg2, comps2, trained2 = _built(demo, family, other)
    assert trained2.start_from(str(first), comps2.spec) == []
    second = tmp_path / "second.safetensors"
    export.save_export(str(second), export.state_dict(trained2.export_groups(comps2.spec), torch.float32), {})
    modules = _modules_by_stem(trained2, comps2.spec)
    want, got = _file_weights(first, modules), _file_weights(second, modules)
    for stem in want:
        torch.testing.assert_close(got[stem], want[stem], atol=1e-6, rtol=1e-5, msg=stem)


def test_an_sd_scripts_lora_file_starts_the_network_and_a_mismatch_names_the_module(demo: Path, tmp_path: Path):
    """A LoRA written with sd-scripts' key names (SD1: lora_unet_<diffusers path>, lora_te_text_model_...),
    no alpha for one module (sd-scripts then takes alpha = rank)."""
    from safetensors.torch import save_file

    cfg, comps, trained = _built(demo, "sd15", {"type": "lora", "rank": 4, "alpha": 1.0})
    g = torch.Generator().manual_seed(3)
    q = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    te_q = comps.text_encoders[0].get_submodule("encoder.layers.0.self_attn.q_proj")  # transformers 5: no text_model.
    unet_stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    file = {
        f"{unet_stem}.lora_down.weight": torch.randn(4, q.in_features, generator=g),
        f"{unet_stem}.lora_up.weight": torch.randn(q.out_features, 4, generator=g),
        f"{unet_stem}.alpha": torch.tensor(2.0),
        f"{te_stem}.lora_down.weight": torch.randn(4, te_q.in_features, generator=g),
        f"{te_stem}.lora_up.weight": torch.randn(te_q.out_features, 4, generator=g),
    }
    path = tmp_path / "sd_scripts.safetensors"
    save_file(file, str(path))
    fresh = trained.start_from(str(path), family('sd15'))
    assert unet_stem not in fresh and te_stem not in fresh and len(fresh) > 10
    x = torch.randn(3, q.in_features, generator=g)
    with trained.evaluating(), torch.no_grad():
        want = file[f"{unet_stem}.lora_up.weight"] @ file[f"{unet_stem}.lora_down.weight"] * (2.0 / 4)
        torch.testing.assert_close(q(x) - q.get_base_layer()(x), F.linear(x, want), atol=1e-5, rtol=1e-5)
        xt = torch.randn(3, te_q.in_features, generator=g)
        want_te = file[f"{te_stem}.lora_up.weight"] @ file[f"{te_stem}.lora_down.weight"]  # alpha = rank: scale 1
        torch.testing.assert_close(te_q(xt) - te_q.get_base_layer()(xt), F.linear(xt, want_te), atol=1e-5, rtol=1e-5)

    save_file({**file, f"{unet_stem}.lora_down.weight": torch.randn(8, q.in_features)}, str(path))
    with pytest.raises(export.NetworkFileError, match=rf"{unet_stem}.lora_down.weight is \(8, .*\) in the file and \(4, "):
        trained.start_from(str(path), family('sd15'))
    save_file({f"{unet_stem}.hada_w1_a": torch.randn(4, 4), f"{unet_stem}.hada_w1_b": torch.randn(4, 4)}, str(path))
    with pytest.raises(export.NetworkFileError, match=rf"{unet_stem} holds hada_w1_a, hada_w1_b in the file"):
        trained.start_from(str(path), family('sd15'))
    save_file({"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.randn(4, 4)}, str(path))
    with pytest.raises(export.NetworkFileError, match="lora_unet_mid_block_resnets_0_conv1, a module this network"):
        trained.start_from(str(path), family('sd15'))
    path.write_bytes(b"not a tensor file")
    with pytest.raises(export.NetworkFileError, match="not a readable .safetensors file"):
        trained.start_from(str(path), family('sd15'))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_loads_a_locon_export_with_its_convolutions(demo: Path, tmp_path: Path, family: str):
    """diffusers' load_lora_weights reads the kohya LoCon file (3x3 convolutions included) and, fused,
    gives the weights the format says. (Its loader drops dora_scale, and refuses LoHa/LoKr files for
    these models: docs/networks.md.)"""
    from diffusers import DiffusionPipeline

    cfg, comps, trained = _built(demo, family, NETWORKS["locon"], text_encoder=False)
    _randomize(trained)
    path = tmp_path / "locon.safetensors"
    _export(path, cfg, comps, trained)
    stems = _by_stem(load_file(str(path)))
    modules = _stem_names(trained, comps.spec)
    pipe = DiffusionPipeline.from_pretrained(demo / FAMILIES[family], local_files_only=True)
    before = {name: pipe.unet.get_submodule(name).weight.detach().clone() for name in modules.values()}
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(lora_scale=1.0)
    convs = 0
    for stem, name in modules.items():
        layer = pipe.unet.get_submodule(name)
        after = (layer.base_layer if hasattr(layer, "base_layer") else layer).weight.detach()
        convs += after.dim() == 4 and after.shape[-1] == 3
        torch.testing.assert_close(after.double(), file_weight(stems[stem], before[name].double()), atol=1e-6, rtol=1e-5,
                                   msg=stem)
    assert convs > 0


def _stem_names(trained: Trained, spec: Any) -> dict[str, str]:
    """kohya stem -> diffusers module path, for the UNet's network modules."""
    prefix, model, is_te, rename = trained.export_groups(spec)[0]
    return {export.kohya_stem(prefix, rename(name), is_te): name for name, _ in network.network_modules(model)}
