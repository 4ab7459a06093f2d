"""Step events without a host sync per step.

Every optimizer step gets its `step` event, but the losses stay on the device and are read back in
one transfer (averaged over the ranks in one all-reduce) every `logging.log_every_n_steps` steps (and before anything that needs them: a save
point, the end of an epoch, a stop). On a GPU this keeps the queue full; on a CPU it costs nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from backend.trainer.context import Progress, Setup
from backend.trainer.optim import prodigy_d

# Under fp16 an overflow is the loss scaler's business: it skips the step and lowers its scale. Only
# this many overflowing steps in a row (the scale is then 2^-20 of where it was) mean a diverged run.
MAX_SKIPPED_IN_A_ROW = 20


class NonFiniteLoss(Exception):
    pass


class Overflows:
    """Counts the optimizer steps the fp16 scaler skipped, and says when that means the run diverged."""

    def __init__(self, scaler_active: bool):
        self.scaler_active = scaler_active
        self.in_a_row = 0

    def check(self, step: int, loss: float, stepped: bool) -> str | None:
        """None when training goes on; else why it must stop. `stepped` is False for a skipped step."""
        finite = math.isfinite(loss)
        if not self.scaler_active:
            if finite:
                return None
            return f"loss became {loss} at step {step}; lower the learning rate, or use bf16/fp32 instead of fp16"
        self.in_a_row = 0 if stepped and finite else self.in_a_row + 1
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            return (f"fp16 overflow in {self.in_a_row} steps in a row (last at step {step}, loss {loss}); "
                    "lower the learning rate, or use bf16 instead of fp16")
        return None


@dataclass
class _Pending:
    step: int
    epoch: int
    loss: torch.Tensor
    stepped: bool
    lr: float
    d: float | None
    dt: float
    when: float
    norms: torch.Tensor | None = None  # max-norm regularization: [keys scaled, mean norm, max norm]


class StepLog:
    def __init__(self, s: Setup, prog: Progress, images_per_step: int):
        self.s, self.prog, self.images_per_step = s, prog, images_per_step
        self.every = s.cfg.logging.log_every_n_steps
        self.pending: list[_Pending] = []
        self.overflows = Overflows(s.scaler is not None)
        self.rate: float | None = None  # smoothed seconds per step, for the ETA
        self._last = time.perf_counter()

    def record(self, loss: torch.Tensor, stepped: bool = True, norms: torch.Tensor | None = None) -> None:
        """Note the step just taken; flush when a batch of `log_every_n_steps` is complete. `norms`:
        what max-norm regularization did (max_norm.apply_max_norm), the same on every rank."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.rate = dt if self.rate is None else 0.8 * self.rate + 0.2 * dt
        p = self.prog
        self.pending.append(_Pending(p.global_step, p.epoch + 1, loss.detach(), stepped, self.s.lr_scheduler.get_last_lr()[0],
                                     prodigy_d(self.s.optimizer), dt, time.time(), norms))
        if p.global_step % self.every == 0 or p.global_step >= self.s.total_steps:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([x.loss.float() for x in self.pending])
        if self.s.acc.num_processes > 1:
            # A step's loss is over the whole global batch (design contract), and every rank then
            # sees the same values, so a non-finite loss stops all of them at once.
            losses = self.s.acc.reduce(losses, reduction="mean")
        values = losses.tolist()  # the one host sync (and one more for the max-norm figures when on)
        norms = _norm_fields([x.norms for x in self.pending])
        io, prog = self.s.io, self.prog
        for x, value, norm in zip(self.pending, values, norms, strict=True):
            reason = self.overflows.check(x.step, value, x.stepped)
            if reason:
                self.pending.clear()
                raise NonFiniteLoss(reason)
            if not x.stepped:
                prog.skipped_steps += 1
                io.warn(f"step {x.step}: fp16 overflow (loss {value}); the loss scaler skipped this step and lowered its scale")
            finite = math.isfinite(value)  # a non-finite loss here is an fp16 step the scaler skipped
            if finite:
                prog.epoch_loss_sum += value
                prog.epoch_loss_count += 1
                prog.last_loss = value
                io.scalars(x.step, {"loss": value, "lr": x.lr, "prodigy_d": x.d, **norm})
            eta = (self.rate or 0.0) * (self.s.total_steps - x.step)
            io.emit("step", when=x.when, step=x.step, epoch=x.epoch, loss=value if finite else None, lr=x.lr, d=x.d,
                    samples_per_s=round(self.images_per_step / max(x.dt, 1e-9), 3), eta_s=round(eta, 1),
                    **norm, **({} if x.stepped else {"skipped": True}))
        self.pending.clear()


def _norm_fields(pending: list[torch.Tensor | None]) -> list[dict[str, float | int]]:
    """The `step` event fields of max-norm regularization (training.scale_weight_norms), per step:
    keys_scaled (layers scaled down, sd-scripts' "Keys Scaled"), average_key_norm (its "Average key
    norm") and max_key_norm; {} for steps without it."""
    rows = [x for x in pending if x is not None]
    values = iter(torch.stack(rows).tolist() if rows else [])
    out: list[dict[str, float | int]] = []
    for x in pending:
        if x is None:
            out.append({})
        else:
            scaled, mean, top = next(values)
            out.append({"keys_scaled": int(scaled), "average_key_norm": mean, "max_key_norm": top})
    return out
