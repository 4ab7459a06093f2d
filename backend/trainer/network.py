"""The trained network: inject it into a model, and name its trainable tensors.

Every network type is built from peft's implementation, with Lathe's choices on top:
- lora: peft's LoRA on the transformer blocks' layers (`network.target_modules`).
- locon: LoRA plus the ResNet, downsample and upsample blocks, as kohya's LoCon (networks.lora with
  conv_dim): their 3x3 convolutions get `conv_rank`/`conv_alpha`, their Linear and 1x1 layers
  `rank`/`alpha`. loha, lokr and dora reach the same layers when `conv_rank` > 0.
- loha, lokr: peft's LoHa and LoKr, which are copies of LyCORIS's formulas (LoHa
  `(w1a@w1b)*(w2a@w2b)*alpha/rank`, LoKr `kron(w1, w2a@w2b)*alpha/rank`); LoKr starts as LyCORIS
  does (w2's up factor zero). One difference from LyCORIS is mapped in backend.trainer.export: a LoKr
  module whose two factors are both kept whole is scaled by alpha/rank in peft but by 1 in LyCORIS and
  ComfyUI, so the export folds the scale into lokr_w1.
- dora: LoRA with a trained magnitude per input channel, `dora_scale`, applied as A1111's and
  ComfyUI's loaders apply a `dora_scale` of shape (1, in): W' = (W0 + dW) * dora_scale / ||W0 + dW||,
  the norm taken over each input column (LyCORIS `wd_on_output=False`). peft's `use_dora` normalises
  each output row instead, a file that the loaders read differently, so Lathe does not use it. Scaling
  the columns of W is scaling the input features, so the module scales its input (a forward pre-hook)
  and then runs the LoRA layer unchanged. The norm is detached from the gradient, as the DoRA paper
  (section 4.3) and peft do.

Dropout as sd-scripts' networks.lora (LoRAModule.forward) has it, in its order, only while the module
trains:
- `network.module_dropout`: with probability p (torch.rand(1) < p) the module is skipped for this call
  and the layer returns its base output alone (for DoRA: the unscaled base layer too).
- `network.dropout` (kohya's network_dropout): F.dropout on the output of the down projection (the
  rank-sized activation), not on the layer input as peft's `lora_dropout` would do.
- `network.rank_dropout`: a mask over (batch, rank), `rand > p`, on the same activation, and the update
  scaled by 1/(1-p) (kohya: "treat as if the rank is changed"); lora, locon and dora.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

ADAPTER = "default"
# The parameter names of every network type (peft's, and Lathe's dora_scale): the trainable tensors.
PARAM_MARKERS = ("lora_A", "lora_B", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale")
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
DORA_EPS = torch.finfo(torch.float32).eps  # added to the norm, as ComfyUI's loader does


class NoTargetsError(Exception):
    pass


def is_network_param(name: str) -> bool:
    return any(part in PARAM_MARKERS for part in name.split("."))


def network_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every layer that carries the network, in model order."""
    out = []
    for name, m in model.named_modules():
        if any(ADAPTER in getattr(m, attr, {}) for attr in ("lora_A", "hada_w1_a", "lokr_w1", "lokr_w1_a")):
            out.append((name, m))
    return out


def conv_block_layers(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(3x3 convolutions, Linear and 1x1 layers) inside the ResNet/down/up blocks, by full name."""
    convs, others = [], []
    for block_name, block in model.named_modules():
        if type(block).__name__ not in CONV_BLOCKS:
            continue
        for child_name, child in block.named_modules():
            full = f"{block_name}.{child_name}"
            if isinstance(child, torch.nn.Conv2d):
                (others if child.kernel_size == (1, 1) else convs).append(full)
            elif isinstance(child, torch.nn.Linear):
                others.append(full)
    return convs, others


def _peft_config(net: Any, targets: list[str], patterns: dict[str, tuple[int, float]]) -> Any:
    rank_pattern = {re.escape(k): r for k, (r, _) in patterns.items()}
    alpha_pattern = {re.escape(k): a for k, (_, a) in patterns.items()}
    common = {"r": net.rank, "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if net.type == "loha":
        from peft import LoHaConfig

        return LoHaConfig(alpha=net.alpha, use_effective_conv2d=net.use_tucker, **common)
    if net.type == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(alpha=net.alpha, use_effective_conv2d=net.use_tucker, decompose_both=net.decompose_both,
                          decompose_factor=net.lokr_factor, init_weights="lycoris", **common)
    from peft import LoraConfig

    return LoraConfig(lora_alpha=net.alpha, lora_dropout=0.0, bias="none", **common)


def inject(model: torch.nn.Module, net: Any, targets: list[str], what: str, with_conv: bool = False) -> None:
    """Add the network to `model` in place. It starts as the base model (one factor zero; dora_scale
    the base weight's norms). `with_conv`: also the ResNet/down/up blocks when the type has conv_rank."""
    from peft import inject_adapter_in_model

    targets = list(targets)
    patterns: dict[str, tuple[int, float]] = {}
    conv_rank = getattr(net, "conv_rank", 0)
    if with_conv and conv_rank > 0:
        convs, others = conv_block_layers(model)
        targets += convs + others
        patterns = {name: (conv_rank, net.conv_alpha) for name in convs}
    try:
        inject_adapter_in_model(_peft_config(net, targets, patterns), model, adapter_name=ADAPTER)
    except ValueError as e:
        raise NoTargetsError(
            f"network.{'target_modules' if what == 'unet' else 'text_encoder_target_modules'}: "
            f"none of {targets[:8]} matches a layer of the {what} ({e})"
        ) from None
    if net.type == "dora":
        for _, m in network_modules(model):
            add_dora(m)
    for n, p in model.named_parameters():
        p.requires_grad_(is_network_param(n))
    for _, m in network_modules(model):
        if getattr(net, "dropout", 0.0) > 0:
            add_down_dropout(m.lora_A[ADAPTER], net.dropout)
        if getattr(net, "rank_dropout", 0.0) > 0:
            add_rank_dropout(m.lora_A[ADAPTER], net.rank_dropout)
        if net.module_dropout > 0:
            add_module_dropout(m, net.module_dropout)


def add_down_dropout(down: torch.nn.Module, p: float) -> None:
    """kohya's network_dropout: drop entries of lora_down's output while the module trains."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=p, training=module.training)

    down.register_forward_hook(hook)


def add_rank_dropout(down: torch.nn.Module, p: float) -> None:
    """kohya's rank_dropout: zero whole ranks of lora_down's output, a mask per image, and scale the
    rest by 1/(1-p). lora_up is linear without a bias, so scaling its input is scaling the update."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        keep = torch.rand((output.size(0), output.size(1) if output.dim() == 4 else output.size(-1)),
                          device=output.device) > p
        if output.dim() == 3:  # (batch, tokens, rank): the text encoder's and the transformer blocks' layers
            keep = keep.unsqueeze(1)
        elif output.dim() == 4:  # (batch, rank, h, w): convolutions
            keep = keep.unsqueeze(-1).unsqueeze(-1)
        return output * keep.to(output.dtype) * (1.0 / (1.0 - p))

    down.register_forward_hook(hook)


def add_module_dropout(m: torch.nn.Module, p: float) -> None:
    """kohya's module_dropout: a training call skips the whole module with probability p. The draw is
    made first (a pre-hook ahead of DoRA's) so that a skipped DoRA layer does not scale its input."""
    inner = m.forward

    def draw(module: torch.nn.Module, args: tuple) -> None:
        module.lathe_skipped = bool(module.training and torch.rand(1) < p)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if m.lathe_skipped:
            return m.get_base_layer()(x, *args, **kwargs)
        return inner(x, *args, **kwargs)

    m.lathe_skipped = False
    m.register_forward_pre_hook(draw, prepend=True)
    m.forward = forward


# ------------------------------------------------------------------------------------------ DoRA
def lora_delta(m: torch.nn.Module) -> torch.Tensor:
    """The LoRA update of one peft LoRA layer as a weight: scale * up @ down, shaped like the weight."""
    base = m.get_base_layer().weight
    down, up = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
    delta = up.flatten(1).float() @ down.flatten(1).float()
    return (delta * m.scaling[ADAPTER]).reshape(base.shape)


def column_norms(w: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a weight (out, in, ...): shape (in,)."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def add_dora(m: torch.nn.Module) -> None:
    """Give one LoRA layer a trained magnitude per input channel (see the module docstring)."""
    base = m.get_base_layer()
    w0 = base.weight.detach().float()
    shape = (1, w0.shape[1], *([1] * (w0.dim() - 2)))
    m.dora_scale = torch.nn.Parameter(column_norms(w0).reshape(shape).to(w0.device))

    def scale_input(module: torch.nn.Module, args: tuple) -> tuple | None:
        if getattr(module, "lathe_skipped", False):  # module dropout: this call is the base layer alone
            return None
        x, *rest = args
        with torch.no_grad():  # the norm is a constant for the gradient: no graph for it
            norm = column_norms(module.get_base_layer().weight.float() + lora_delta(module))
        factor = module.dora_scale.flatten() / (norm + DORA_EPS)
        if x.dim() == 4 and module.get_base_layer().weight.dim() == 4:
            factor = factor.view(1, -1, 1, 1)
        return (x * factor.to(x.dtype), *rest)

    m.register_forward_pre_hook(scale_input)


# ------------------------------------------------------------------------------------- the tensors
def network_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_network_param(n)]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors by their module names (detached fp32 CPU copies)."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if is_network_param(n)}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in params if is_network_param(n) and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise ValueError(f"network tensors do not match the network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{n}: shape {tuple(t.shape)} in checkpoint, {tuple(params[n].shape)} in the network")
            params[n].copy_(t.to(params[n].device, params[n].dtype))
