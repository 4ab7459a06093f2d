"""Step events without a host sync per step.

Every optimizer step gets its `step` event, but the losses stay on the device and are read back in
one transfer every `logging.log_every_n_steps` steps (and before anything that needs them: a save
point, the end of an epoch, a stop). On a GPU this keeps the queue full; on a CPU it costs nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from backend.trainer.optim import prodigy_d

if TYPE_CHECKING:
    from backend.trainer.loop import Progress, Setup


class NonFiniteLoss(Exception):
    pass


@dataclass
class _Pending:
    step: int
    epoch: int
    loss: torch.Tensor
    lr: float
    d: float | None
    dt: float
    when: float


class StepLog:
    def __init__(self, s: Setup, prog: Progress, images_per_step: int):
        self.s, self.prog, self.images_per_step = s, prog, images_per_step
        self.every = s.cfg.logging.log_every_n_steps
        self.pending: list[_Pending] = []
        self.rate: float | None = None  # smoothed seconds per step, for the ETA
        self._last = time.perf_counter()

    def record(self, loss: torch.Tensor) -> None:
        """Note the step just taken; flush when a batch of `log_every_n_steps` is complete."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.rate = dt if self.rate is None else 0.8 * self.rate + 0.2 * dt
        p = self.prog
        self.pending.append(_Pending(p.global_step, p.epoch + 1, loss.detach(), self.s.lr_scheduler.get_last_lr()[0],
                                     prodigy_d(self.s.optimizer), dt, time.time()))
        if p.global_step % self.every == 0 or p.global_step >= self.s.total_steps:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([x.loss.float() for x in self.pending]).tolist()  # the one host sync
        io, prog = self.s.io, self.prog
        for x, value in zip(self.pending, values, strict=True):
            if not math.isfinite(value):
                self.pending.clear()
                raise NonFiniteLoss(
                    f"loss became {value} at step {x.step}; lower the learning rate, or use bf16/fp32 instead of fp16")
            prog.epoch_loss_sum += value
            prog.epoch_loss_count += 1
            prog.last_loss = value
            eta = (self.rate or 0.0) * (self.s.total_steps - x.step)
            io.emit("step", when=x.when, step=x.step, epoch=x.epoch, loss=value, lr=x.lr, d=x.d,
                    samples_per_s=round(self.images_per_step / max(x.dt, 1e-9), 3), eta_s=round(eta, 1))
            io.scalars(x.step, {"loss": value, "lr": x.lr, "prodigy_d": x.d})
        self.pending.clear()
