"""`model.fp8_base`: the frozen weights of the denoiser (UNet or transformer) stored in fp8
(torch.float8_e4m3fn), each layer upcasting its weight as it runs: sd-scripts' `--fp8_base`.

What sd-scripts does (train_network.py, flux_train_network.py): `unet.to(torch.float8_e4m3fn)`, on the
CPU before the move to the GPU, after the network is created (its LoRA modules are separate modules and
stay in fp32), with mixed precision required so that autocast upcasts each op's fp8 operands. Lathe
matches the storage and the cast (round to nearest, the same bytes), with these choices:

- Which tensors: the weight of every frozen Linear and Conv2d outside the network, the layers that
  hold nearly all of the bytes. Biases, norms and embeddings stay in the weight dtype (sd-scripts casts
  them too; they are well under 1% of the model and numerically the most sensitive).
- The forward computes exactly what the layer computed before with its weight rounded to fp8 and back
  to its own dtype (the run's weight dtype), so it needs no autocast: on a CPU it runs in fp32.
- The backward keeps the fp8 weight, not the upcast copy. Autograd (and so sd-scripts' autocast) would
  keep every layer's upcast copy from the forward to the backward, the whole model in the weight dtype
  again unless gradient checkpointing bounds it; here the extra memory is one layer at a time. The base
  weight has no gradient; the input's is grad @ W (Linear) or the transposed convolution (Conv2d).
- When: after the network is injected (peft gives each new adapter its base layer's dtype, which would
  make the LoRA fp8) and before the move to the device, as sd-scripts does, so the full-precision model
  never sits on the GPU. DoRA's magnitude starts from the norms of the fp8 weight, so the network still
  starts as the (fp8) base model. DDP skips the fp8 weights in its first broadcast (frozen, and every
  rank loads the same file; gloo has no fp8).

The cast is deterministic, so a resumed run and `verify` rebuild the same base from the model file:
the training state holds only the network, never these weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from backend.trainer import network

FP8 = getattr(torch, "float8_e4m3fn", None)


class Fp8Unavailable(Exception):
    pass


@dataclass(frozen=True)
class Fp8Report:
    layers: int  # Linear and Conv2d layers whose weight is now fp8
    bytes_before: int  # their weights' bytes in the weight dtype
    bytes_after: int  # and in fp8

    def line(self) -> str:
        mb = 2**20
        return (f"model.fp8_base: {self.layers} layer weights of the denoiser stored in fp8 "
                f"({self.bytes_after / mb:.1f} MB, {self.bytes_before / mb:.1f} MB in the weight dtype)")


class _Upcast(torch.autograd.Function):
    """op(x, w8 upcast to `dtype`, bias) with a backward that upcasts w8 again (see the module docstring).
    `conv` is (stride, padding, dilation, groups) for a Conv2d, None for a Linear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w8: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                conv: tuple | None) -> torch.Tensor:
        ctx.save_for_backward(w8)
        ctx.conv, ctx.x_shape, ctx.x_dtype = conv, x.shape, x.dtype
        w = w8.to(dtype)
        return F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (w8,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w = w8.to(grad.dtype)  # the forward's compute dtype (autocast's, when it ran under autocast)
        if ctx.conv is None:
            grad_x = grad.matmul(w)
        else:
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, *ctx.conv)
        return grad_x.to(ctx.x_dtype), None, None, None, None


def _convertible(name: str, m: torch.nn.Module) -> bool:
    """A frozen base Linear/Conv2d (not a layer of the network itself, e.g. peft's lora_A)."""
    if type(m) not in (torch.nn.Linear, torch.nn.Conv2d) or network.is_network_param(name):
        return False
    if isinstance(m, torch.nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
        return False  # the input-gradient formula below takes numeric zero padding (the denoisers' convolutions)
    frozen = [p for p in (m.weight, m.bias) if p is not None]
    return all(not p.requires_grad for p in frozen) and m.weight.is_floating_point()


def _make_fp8(m: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store one layer's weight in fp8; its forward upcasts it to `dtype` (the run's weight dtype)."""
    m.weight.data = m.weight.data.to(FP8)
    conv = (m.stride, m.padding, m.dilation, m.groups) if isinstance(m, torch.nn.Conv2d) else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _Upcast.apply(x, m.weight, m.bias, dtype, conv)

    m.forward = forward


def store_base_in_fp8(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Fp8Report:
    """Cast the frozen Linear/Conv2d weights of `model` (the network already injected) to fp8 where
    they are (the CPU), then move the model to `device`: fp8 weights and the network's (fp32) tensors
    as they are, everything else cast to `dtype`, as build._place would."""
    if FP8 is None:
        raise Fp8Unavailable(f"model.fp8_base: this torch ({torch.__version__}) has no float8_e4m3fn dtype "
                             "(torch 2.1 or newer has it); turn model.fp8_base off")
    layers, before, after, names = 0, 0, 0, []
    for name, m in model.named_modules():
        if not _convertible(name, m):
            continue
        before += m.weight.numel() * dtype.itemsize
        _make_fp8(m, dtype)
        layers += 1
        after += m.weight.numel() * m.weight.element_size()
        names.append(f"{name}.weight")
    _restart_dora(model)
    _move(model, device, dtype)
    model._ddp_params_and_buffers_to_ignore = [*getattr(model, "_ddp_params_and_buffers_to_ignore", []), *names]
    return Fp8Report(layers, before, after)


def _restart_dora(model: torch.nn.Module) -> None:
    """A fresh DoRA magnitude is the norms of the base weight the layer now computes with (fp8)."""
    with torch.no_grad():
        for _, m in network.network_modules(model):
            if hasattr(m, "dora_scale"):
                w = m.get_base_layer().weight.float()
                m.dora_scale.copy_(network.column_norms(w).reshape(m.dora_scale.shape))


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    for name, p in model.named_parameters():
        keep = p.dtype == FP8 or network.is_network_param(name) or not p.is_floating_point()
        p.data = p.data.to(device) if keep else p.data.to(device, dtype)
    for mod in model.modules():
        for name, b in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, b.to(device, dtype) if b.is_floating_point() else b.to(device))


def fp8_weights(model: torch.nn.Module) -> list[str]:
    """The names of the parameters stored in fp8 (for reports and tests)."""
    return [n for n, p in model.named_parameters() if p.dtype == FP8]
