"""The deterministic batch plan: which samples, flips and captions each optimizer step trains on.

The order of global batches in an epoch is a pure function of (seed, epoch, global batch size):
`epoch_plan`. A position in training is therefore just (epoch, global batches done), which is what
exact resume records, whatever the number of processes. Caption shuffling, caption dropout and flips
are drawn from generators seeded by (seed, epoch, batch, slot), so they too replay identically after
a resume and on any layout of the same global batch (`micro_batches_of` splits a global batch over
ranks and micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from backend.dataset import ImageItem, Subset


@dataclass(frozen=True)
class Sample:
    item: int  # index into the item list
    flip: bool
    caption: str
    index: int  # position in the epoch (global batch x global batch size + slot): keys its noise and timestep
    weight: float = 1.0  # loss weight: training.prior_loss_weight for regularization images


@dataclass(frozen=True)
class Batch:
    """A global batch (one optimizer step, all ranks and micro-batches together) or, after
    `micro_batches_of`, one rank's micro-batch of it. `share` weights each sample's loss so that the
    step's gradient is the mean over the whole global batch: world / samples in the global batch
    (0 for a filler: a rank with no sample in a short tail batch still takes part in the all-reduce)."""

    bucket: tuple[int, int]
    samples: tuple[Sample, ...]
    share: float = 1.0


def process_caption(caption: str, rng: np.random.Generator, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout, then shuffle the comma-separated tags after the first `keep_tokens`."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


@dataclass(frozen=True)
class PlanSettings:
    seed: int
    global_batch: int  # train_batch_size x processes x gradient_accumulation_steps
    random_flip: bool
    shuffle_caption: bool
    keep_tokens: int
    caption_dropout_rate: float
    per_subset: tuple[Subset, ...] = ()  # each subset's caption rules (empty: the fields above for every image)
    prior_loss_weight: float = 1.0

    def rules(self, item: ImageItem) -> Subset | PlanSettings:
        """What flips and captions an item: its subset's settings, or the dataset's."""
        return self.per_subset[item.subset] if self.per_subset else self


def epoch_plan(items: list[ImageItem], item_buckets: list[tuple[int, int]], s: PlanSettings, epoch: int) -> list[Batch]:
    """Every global batch of one epoch (0-based), in order: one per optimizer step, each from one
    bucket. A pure function of its arguments; the process count, the per-device batch size and the
    accumulation enter only through their product, so any layout of the same global batch trains
    on the same samples in the same steps, with the same flips and captions."""
    rng = np.random.default_rng([s.seed, epoch])
    g = s.global_batch
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        by_bucket.setdefault(item_buckets[i], []).extend([i] * it.repeats)
    chunks: list[tuple[tuple[int, int], list[int]]] = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        perm = rng.permutation(len(idx))
        shuffled = [idx[j] for j in perm]
        chunks += [(bucket, shuffled[k : k + g]) for k in range(0, len(shuffled), g)]
    order = rng.permutation(len(chunks))
    batches = []
    for b, j in enumerate(order):
        bucket, members = chunks[j]
        samples = []
        for slot, i in enumerate(members):
            srng = np.random.default_rng([s.seed, epoch, b, slot])
            it, r = items[i], s.rules(items[i])
            flip = bool(r.random_flip and srng.random() < 0.5)
            cap = process_caption(it.caption, srng, r.shuffle_caption, r.keep_tokens, r.caption_dropout_rate)
            samples.append(Sample(i, flip, cap, b * g + slot, s.prior_loss_weight if it.is_reg else 1.0))
        batches.append(Batch(bucket, tuple(samples)))
    return batches


def micro_batches_of(step: Batch, rank: int, world: int, accum: int) -> list[Batch]:
    """One rank's micro-batches of a global batch. Micro-batch m of rank r takes the samples at
    positions k, k + world*accum, ... with k = m*world + r: a full global batch gives everyone
    train_batch_size samples, a short tail is spread as evenly as it goes. Empty micro-batches are
    left out; a rank left with none gets one filler (a copy of the first sample, weight 0)."""
    n, slots = len(step.samples), world * accum
    share = world / n
    out = [Batch(step.bucket, step.samples[m * world + rank :: slots], share) for m in range(accum)]
    out = [b for b in out if b.samples]
    return out or [Batch(step.bucket, step.samples[:1], 0.0)]


def steps_per_epoch(items: list[ImageItem], item_buckets: list[tuple[int, int]], s: PlanSettings) -> int:
    """Optimizer steps in one epoch: the global batches of the plan (the same for every epoch)."""
    return len(epoch_plan(items, item_buckets, s, 0))


def plan_steps(items: list[ImageItem], item_buckets: list[tuple[int, int]], global_batch: int) -> int:
    """What steps_per_epoch returns, counted without drawing the plan: each bucket's uses per epoch
    (images x repeats) make ceil(uses / global batch) batches. For summaries of large datasets."""
    uses: dict[tuple[int, int], int] = {}
    for it, b in zip(items, item_buckets, strict=True):
        uses[b] = uses.get(b, 0) + it.repeats
    return sum(-(-n // global_batch) for n in uses.values())


def global_batch(per_device: int, processes: int, accum: int) -> int:
    """Samples per optimizer step: what the data plan, the schedule and elastic resume are counted in."""
    return per_device * processes * accum
