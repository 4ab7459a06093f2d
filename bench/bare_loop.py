"""The bare reference loop's shared parts (bench/gpu.py for the UNets, bench/gpu_flow.py for the
transformers): peft LoRA injected the way anyone would, and the timed steps with their report."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from typing import Any


def inject_lora(net: Any, targets: list[str], rank: int) -> list[Any]:
    """peft LoRA (alpha = rank) on `targets`, its weights fp32 and trainable, `net` in train mode; the
    LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, bias="none"), net)
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    net.train()
    return params


def time_steps(forward_backward: Callable[[], Any], params: list[Any], opt: Any, max_grad_norm: float,
               steps: int, warmup: int, batch: int, cuda: bool, name: str, peak: float | None) -> dict[str, Any]:
    """FLOPs of one forward+backward, then `warmup` and `steps` timed optimizer steps (clipped): the bare
    contestant's report."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def step() -> Any:
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync()
    step_s = (time.perf_counter() - t0) / steps
    final = float(losses[-1])
    if not all(math.isfinite(float(x)) for x in losses):
        raise RuntimeError(f"non-finite loss in the bare loop (last {final})")
    return {"contestant": "bare", "device": name, "peak_bf16_flops": peak,
            "flops_per_step": counter.get_total_flops(), "step_s": step_s, "images_per_s": batch / step_s,
            "timed_steps": steps, "final_loss": final,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
