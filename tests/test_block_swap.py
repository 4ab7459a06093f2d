"""training.blocks_to_swap (backend/trainer/block_swap.py, sd-scripts' --blocks_to_swap), its mechanics
forced on the CPU: a step with swapping gives bit-identical loss and network gradients to one without
(with and without gradient checkpointing), the swapped blocks are out between steps, sampling under
no_grad/inference_mode computes the same, and a setting that does not fit the model is refused by name.

The demo transformers have too few blocks for sd-scripts' limits (2 of each kind stay on the GPU), so
the swapping tests build the demo's configuration with more blocks."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from backend.config import validate_config
from backend.trainer import block_swap, fp8, network
from backend.trainer.families import family
from backend.trainer.trained import Trained
from tests.conftest import ROOT

CPU = torch.device("cpu")
DEMO = {"flux": (FluxTransformer2DModel, ROOT / "demo/model-flux/transformer"),
        "sd3": (SD3Transformer2DModel, ROOT / "demo/model-sd3/transformer")}
MORE_BLOCKS = {"flux": {"num_layers": 3, "num_single_layers": 4}, "sd3": {"num_layers": 4}}
SWAP = {"flux": (2, ["transformer_blocks.2", "single_transformer_blocks.2", "single_transformer_blocks.3"]),
        "sd3": (2, ["transformer_blocks.2", "transformer_blocks.3"])}


def build(kind: str, checkpointing: bool, net_type: str = "lora", fp8_base: bool = False) -> torch.nn.Module:
    """The demo transformer with more blocks and the network injected as the trainer injects it (random
    up matrices, so that the network gradients are non-zero), its base in fp8 if asked."""
    cls, path = DEMO[kind]
    torch.manual_seed(0)
    model = cls.from_config({**cls.load_config(path, local_files_only=True), **MORE_BLOCKS[kind]})
    cfg = validate_config({"model": {"family": kind}, "network": {"type": net_type, "rank": 2, "alpha": 2},
                           "training": {"gradient_checkpointing": checkpointing}})
    Trained.attach(cfg, model, [], family(kind).default_targets(model))
    if fp8_base:
        fp8.store_base_in_fp8(model, CPU, torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if network.is_network_param(n):
                p.normal_(0, 0.1)
    return model


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "flux":
        return {"hidden_states": torch.randn(2, 16, 64, generator=g), "encoder_hidden_states": torch.randn(2, 5, 64, generator=g),
                "pooled_projections": torch.randn(2, 32, generator=g), "timestep": torch.tensor([0.3, 0.7]),
                "img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.zeros(5, 3), "guidance": torch.tensor([3.5, 3.5])}
    return {"hidden_states": torch.randn(2, 16, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 5, 96, generator=g),
            "pooled_projections": torch.randn(2, 80, generator=g), "timestep": torch.tensor([300.0, 700.0])}


def step(model: torch.nn.Module, kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward: (loss, every network gradient)."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs(kind), return_dict=False)[0].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if network.is_network_param(n)}


def assert_only_swapped_out(model: torch.nn.Module, swapped: list[str]) -> None:
    for name, p in model.named_parameters():
        out = any(name.startswith(b + ".") for b in swapped) and not network.is_network_param(name)
        assert (p.numel() == 0) == out, name
        assert p.device == CPU and not p.is_inference(), name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_step_with_swapping_is_bit_identical_and_leaves_the_blocks_out(kind: str, checkpointing: bool):
    model = build(kind, checkpointing)
    assert model.gradient_checkpointing is checkpointing
    want_loss, want_grads = step(model, kind)
    n, names = SWAP[kind]
    swapper = block_swap.attach(model, n, CPU, force=True)
    assert swapper is not None and swapper.names == names and names[-1] in swapper.line()
    assert_only_swapped_out(model, names)
    for _ in range(2):  # the second step starts from the state the first left
        loss, grads = step(model, kind)
        assert torch.equal(loss, want_loss)
        assert grads.keys() == want_grads.keys() and all(torch.equal(grads[k], want_grads[k]) for k in grads)
        assert all(any(k.startswith(b + ".") and g.abs().sum() > 0 for k, g in grads.items()) for b in names)
        assert_only_swapped_out(model, names)
    # without checkpointing the weights' views are saved as references; with it the checkpoint keeps its own
    assert (swapper.packed > 0) is not checkpointing
    swapper.detach()
    assert all(p.numel() > 0 for p in model.parameters())
    assert torch.equal(step(model, kind)[0], want_loss)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_dora_on_an_fp8_base_swaps_bit_identically(checkpointing: bool):
    model = build("flux", checkpointing, net_type="dora", fp8_base=True)
    want_loss, want_grads = step(model, "flux")
    n, names = SWAP["flux"]
    block_swap.attach(model, n, CPU, force=True)
    loss, grads = step(model, "flux")
    assert torch.equal(loss, want_loss) and all(torch.equal(grads[k], want_grads[k]) for k in grads)
    assert_only_swapped_out(model, names)
    assert dict(model.named_parameters())[names[0] + ".attn.to_q.base_layer.weight"].dtype == fp8.FP8  # out, fp8


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_sampling_under_no_grad_computes_the_unswapped_output(kind: str):
    model = build(kind, checkpointing=True).eval()
    with torch.no_grad():
        want = model(**inputs(kind), return_dict=False)[0]
    n, names = SWAP[kind]
    block_swap.attach(model, n, CPU, force=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs(kind), return_dict=False)[0], want)
    assert_only_swapped_out(model, names)
    with torch.inference_mode():
        assert torch.equal(model(**inputs(kind), return_dict=False)[0], want)
    assert_only_swapped_out(model, names)  # and the weights are no inference tensors after it


def test_an_out_block_fails_loudly_in_forward_and_in_backward():
    model = build("sd3", checkpointing=False)
    swapper = block_swap.attach(model, 2, CPU, force=True)
    loss = model(**inputs("sd3"), return_dict=False)[0].square().mean()
    swapper.bring_in = lambda i, why: None  # nothing brings a block in any more
    with pytest.raises(RuntimeError):
        loss.backward()  # the saved weights are references to the (out) parameters, not stale copies
    with pytest.raises(RuntimeError):
        model(**inputs("sd3"))


def test_settings_that_do_not_fit_are_refused_by_name():
    flux = FluxTransformer2DModel.from_pretrained(DEMO["flux"][1], local_files_only=True)
    sd3 = SD3Transformer2DModel.from_pretrained(DEMO["sd3"][1], local_files_only=True)
    errors, _ = block_swap.check(flux, 1, torch.device("cuda"))
    assert errors == ["training.blocks_to_swap: 1 is more than this Flux.1 transformer allows, at most 0 (it has 1 "
                      "double and 2 single blocks; N swaps N // 2 double and 2 * (N - N // 2) single blocks, and at "
                      "least 2 of each stay on the GPU, as in sd-scripts)"]
    assert "at most 0 (it has 2 blocks" in block_swap.check(sd3, 1, CPU)[0][0]
    with pytest.raises(ValueError, match="training.blocks_to_swap: 3 is more than this SD3"):
        block_swap.attach(build("sd3", False), 3, CPU, force=True)
    bigger = build("flux", False)
    assert block_swap.check(bigger, 2, CPU) == ([], [block_swap.CPU_WARNING])
    assert block_swap.CPU_WARNING.startswith("training.blocks_to_swap: ignored on the CPU")
    assert block_swap.attach(bigger, 2, CPU) is None and all(p.numel() > 0 for p in bigger.parameters())
    assert "training.torch_compile" in block_swap.check(bigger, 2, CPU, torch_compile=True)[0][0]
    unet = torch.nn.Module()
    assert block_swap.check(unet, 4, CPU)[0] == ["training.blocks_to_swap: applies to SD3 and Flux.1 transformers, "
                                                 "not to this model (Module); set it to 0"]
    assert block_swap.check(unet, 0, CPU) == ([], []) and block_swap.attach(unet, 0, CPU) is None
