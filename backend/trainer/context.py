"""The two objects the recipe passes around: `Setup` (everything built before the first step) and
`Progress` (where training is). Plain dataclasses built with keyword arguments; this module imports
nothing of the trainer's that imports it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from backend import dataset as D
from backend.config import TrainingConfig
from backend.trainer.caching import LatentCache, TextEncoder
from backend.trainer.models import Components
from backend.trainer.run_io import RunIO
from backend.trainer.trained import Trained


@dataclass(kw_only=True)
class Progress:
    """Where training is: the sampler position is (epoch, batch) and is all exact resume needs."""

    global_step: int = 0
    epoch: int = 0  # completed epochs = 0-based index of the epoch being trained
    batch_in_epoch: int = 0  # batches of this epoch already consumed (this rank's shard)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    best_val_loss: float | None = None
    last_loss: float | None = None
    skipped_steps: int = 0  # optimizer steps the fp16 loss scaler skipped (overflow)


@dataclass(kw_only=True)
class Setup:
    cfg: TrainingConfig
    acc: Any
    io: RunIO
    comps: Components
    items: list[D.ImageItem]
    item_buckets: list[tuple[int, int]]
    plan: D.PlanSettings
    latents: LatentCache | None
    text: TextEncoder
    trained: Trained
    optimizer: Any
    lr_scheduler: Any
    weight_dtype: torch.dtype
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    eval_kind: str = "ref"
    eval_samples: list[Any] = field(default_factory=list)
    dataset_fingerprint: str = ""
    subsets: list[D.Subset] = field(default_factory=list)  # the dataset's resolved subsets (items index them)
    cache_reports: list[dict[str, Any]] = field(default_factory=list)  # what caching did, per kind (cache_filled)

    @property
    def scaler(self) -> Any:
        """The fp16 loss scaler (None unless training in fp16 on a GPU)."""
        return getattr(self.acc, "scaler", None)
