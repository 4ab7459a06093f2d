"""Rank and module dropout (network.rank_dropout, network.module_dropout) against sd-scripts'
networks.lora LoRAModule.forward, written from it:

    org = org_forward(x)
    if module_dropout and training and torch.rand(1) < module_dropout: return org
    lx = lora_down(x)
    if dropout and training: lx = F.dropout(lx, p=dropout)
    if rank_dropout and training:
        mask = torch.rand((lx.size(0), lora_dim)) > rank_dropout      # (batch, rank)
        mask = mask.unsqueeze(1) for (batch, tokens, rank), .unsqueeze(-1).unsqueeze(-1) for convolutions
        lx = lx * mask; scale = scale / (1 - rank_dropout)
    return org + lora_up(lx) * multiplier * scale

The draws use the global generator, so seeding it before the call reproduces them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.config import validate_config
from backend.trainer import network

RANK, ALPHA = 4, 2.0


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.to_q = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)


def built(kind: str = "lora", **drops: float) -> tuple[Block, torch.nn.Module, torch.nn.Module]:
    net = validate_config({"network": {"type": kind, "rank": RANK, "alpha": ALPHA, **drops}}).network
    model = Block()
    network.inject(model, net, ["to_q", "conv"], "unet")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero update (each type starts with one factor zero)
        for name, p in model.named_parameters():
            if network.is_network_param(name) and "dora_scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model, model.to_q, model.conv


def parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, object, torch.nn.Module, float]:
    """The base layer, the down projection without its hooks (its own forward), the up projection, the scale."""
    return layer.get_base_layer(), layer.lora_A["default"].forward, layer.lora_B["default"], ALPHA / RANK


@pytest.mark.parametrize("shape", [(2, 8), (2, 7, 8)], ids=["batch", "batch-tokens"])
def test_rank_dropout_is_sd_scripts_per_image_rank_mask_rescaled(shape: tuple[int, ...]):
    p = 0.5
    model, q, _ = built(rank_dropout=p)
    base, down, up, scale = parts(q)
    x = torch.randn(shape)
    torch.manual_seed(7)
    got = q(x)
    torch.manual_seed(7)
    mask = torch.rand((shape[0], RANK)) > p
    if len(shape) == 3:
        mask = mask.unsqueeze(1)
    want = base(x) + up(down(x) * mask) * scale * (1.0 / (1.0 - p))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, base(x) + up(down(x)) * scale)  # some ranks were dropped
    model.eval()  # no dropout outside training
    assert torch.allclose(q(x), base(x) + up(down(x)) * scale, atol=1e-6)


def test_rank_dropout_on_a_convolution_masks_channels():
    p = 0.3
    _, _, conv = built("locon", rank_dropout=p, conv_rank=RANK, conv_alpha=ALPHA)
    base, down, up, scale = parts(conv)
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(3)
    got = conv(x)
    torch.manual_seed(3)
    mask = (torch.rand((2, RANK)) > p).unsqueeze(-1).unsqueeze(-1)
    assert torch.allclose(got, base(x) + up(down(x) * mask) * scale / (1 - p), atol=1e-6)


def test_network_dropout_then_rank_dropout_in_sd_scripts_order():
    model, q, _ = built(dropout=0.25, rank_dropout=0.5)
    base, down, up, scale = parts(q)
    x = torch.randn(3, 8)
    torch.manual_seed(11)
    got = q(x)
    torch.manual_seed(11)
    lx = F.dropout(down(x), p=0.25)
    lx = lx * (torch.rand((3, RANK)) > 0.5)
    assert torch.allclose(got, base(x) + up(lx) * scale / 0.5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_module_dropout_skips_the_whole_module_with_its_probability(kind: str):
    p = 0.5
    _, q, _ = built(kind, module_dropout=p)
    base = q.get_base_layer()
    x = torch.randn(2, 8, requires_grad=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        skipped = bool(torch.rand(1) < p)
        q.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = q(x)
        out.sum().backward()
        seen.add(skipped)
        assert torch.equal(out, base(x)) == skipped, (seed, skipped)
        # a skipped module gets no gradient, so the optimizer leaves it alone this step (as in sd-scripts)
        grads = [t.grad for n, t in q.named_parameters() if network.is_network_param(n)]
        assert all(g is None for g in grads) == skipped
    assert seen == {True, False}
    q.eval()
    assert not torch.equal(q(x), base(x))  # in eval mode the module always applies


def test_rank_dropout_is_refused_where_the_network_has_no_down_projection():
    with pytest.raises(Exception, match="rank_dropout"):
        validate_config({"network": {"type": "loha", "rank_dropout": 0.1}})
    with pytest.raises(Exception, match="module_dropout"):
        validate_config({"network": {"type": "lora", "module_dropout": 1.0}})
