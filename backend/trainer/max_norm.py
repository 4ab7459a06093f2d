"""Max-norm regularization (training.scale_weight_norms), applied after each optimizer step.

Each adapted layer's update dW (the weight the network adds, scale included) is measured; where its
norm is above the limit, the layer's factors are scaled so that it is exactly at the limit:

  norm = max(||dW||, limit / 2); ratio = min(norm, limit) / norm   (1 unless ||dW|| > limit)

as sd-scripts' LoRANetwork.apply_max_norm_regularization (networks/lora.py) and LyCORIS's
apply_max_norm (lycoris/modules/*.py) compute it. How the ratio is put into the factors follows the
implementation each network type comes from:

- lora, locon (sd-scripts' networks.lora): up and down each times sqrt(ratio).
- dora (LyCORIS LoCon with weight decomposition): LyCORIS multiplies a scalar in front of up@down,
  and writes up * scalar into its files; Lathe has no scalar and multiplies lora_B (up) by the
  ratio: the same update. The magnitude (dora_scale) is not touched, as in LyCORIS.
- loha (LyCORIS LoHa): the scalar again, which LyCORIS's files fold into hada_w1_a: hada_w1_a times
  the ratio.
- lokr (LyCORIS LoKr): each of its k factor tensors (w1 or w1_a/w1_b, w2 or w2_a/w2_b, t2) times
  ratio**(1/k).

The returned figures are sd-scripts' "Keys Scaled" (layers whose ratio was below 1) and "Average
key norm" (the mean over all layers of ||dW|| * ratio), and the largest such norm. They stay on the
device (no host sync per step); the step log reads them with the loss.
"""

from __future__ import annotations

import torch

from backend.trainer.network import ADAPTER, lora_delta, network_modules

LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def update_weight(m: torch.nn.Module, net_type: str) -> torch.Tensor:
    """The update one adapted layer adds to its base weight (fp32, the base weight's shape)."""
    if net_type in ("loha", "lokr"):
        return m.get_delta_weight(ADAPTER).float()
    return lora_delta(m)  # lora, locon, dora: scale * up @ down (dora's magnitude is applied on top)


def factors(m: torch.nn.Module, net_type: str) -> list[tuple[torch.Tensor, float]]:
    """(tensor, power of the ratio it is multiplied by) for one layer: see the module docstring."""
    if net_type in ("lora", "locon"):
        return [(m.lora_A[ADAPTER].weight, 0.5), (m.lora_B[ADAPTER].weight, 0.5)]
    if net_type == "dora":
        return [(m.lora_B[ADAPTER].weight, 1.0)]
    if net_type == "loha":
        return [(m.hada_w1_a[ADAPTER], 1.0)]
    present = [getattr(m, name)[ADAPTER] for name in LOKR_FACTORS if ADAPTER in getattr(m, name)]
    return [(t, 1.0 / len(present)) for t in present]


@torch.no_grad()
def apply_max_norm(modules: list[torch.nn.Module], limit: float, net_type: str) -> torch.Tensor:
    """Scale every adapted layer of `modules` whose update's norm is above `limit` down to it.
    Returns [keys scaled, mean norm, max norm] (after scaling) as one fp32 tensor on the device."""
    norms, ratios = [], []
    for model in modules:
        for _, m in network_modules(model):
            orig = update_weight(m, net_type).norm()
            norm = orig.clamp(min=limit / 2)
            ratio = norm.clamp(max=limit) / norm
            for tensor, power in factors(m, net_type):
                tensor.mul_((ratio**power).to(tensor.dtype))  # exactly 1 (no change) unless the norm was above
            norms.append(orig * ratio)
            ratios.append(ratio)
    if not norms:
        return torch.zeros(3)
    norms_t, ratios_t = torch.stack(norms), torch.stack(ratios)
    return torch.stack([(ratios_t != 1).sum().float(), norms_t.mean(), norms_t.max()])
