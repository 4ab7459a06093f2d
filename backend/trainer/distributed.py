"""What several processes share and how work is split between them.

- `share(n, rank, world)`: the indices of n work items that one rank does (strided, so every rank's
  count differs by at most one); `gather_shares` puts the ranks' results back in the original order.
- `global_batch`: samples per optimizer step, the unit of the data plan (any layout of the same
  global batch trains the same steps on the same samples).
- `split_work`: caching work (latents, text embeddings) done 1/N per rank and shared.
- `collective_timeout_s(cfg)`: how long a rank may wait in a collective before the group is declared
  hung, from the longest expected pause (a save point's sampling pass on one rank's share of the
  prompts). Too short kills healthy runs during a long SDXL sampling pass; too long leaves a crashed
  group holding GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from backend.config import TrainingConfig

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

BASE_TIMEOUT_S = 1800  # torch's own default: caching, evaluation and checkpoint writes fit in it
SECONDS_PER_SAMPLE_STEP = 3.0  # a pessimistic denoising step (SDXL 1024 px with CFG on a slow GPU)
MAX_TIMEOUT_S = 6 * 3600


def share(n: int, rank: int, world: int) -> range:
    """The items (by index) rank `rank` of `world` handles."""
    return range(rank, n, world)


def gather_shares(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Undo `share`: parts[r] holds rank r's results in its own order; returns all n in order."""
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        idx = share(n, rank, len(parts))
        if len(part) != len(idx):
            raise ValueError(f"rank {rank} returned {len(part)} results for {len(idx)} items")
        for i, value in zip(idx, part, strict=True):
            out[i] = value
    return out


def collective_timeout_s(cfg: TrainingConfig) -> int:
    """Seconds a collective may wait: the base plus the longest sampling pass of one rank's share."""
    prompts = math.ceil(len(cfg.sampling.prompts) / max(1, cfg.launch.num_processes))
    sampling = prompts * cfg.sampling.steps * SECONDS_PER_SAMPLE_STEP * (2 if cfg.sampling.guidance_scale > 1 else 1)
    return int(min(MAX_TIMEOUT_S, BASE_TIMEOUT_S + sampling))


def every_rank(value: T, exchange: Callable[[list[Any]], list[Any]] | None) -> list[T]:
    """[value of rank 0, value of rank 1, ...] (just [value] on one process)."""
    return exchange([value]) if exchange is not None else [value]


def split_work(todo: Sequence[K], rank: int, world: int, work: Callable[[list[K]], dict[K, V]],
               exchange: Callable[[list[Any]], list[Any]] | None, round_size: int = 256) -> tuple[dict[K, V], int]:
    """Do `todo` (the same list on every rank) split over the ranks: rank r does todo[r::world], in
    rounds of at most `round_size` items, and after each round `exchange` (accelerate's gather_object)
    brings every rank's results to every rank, so memory in flight stays bounded and no rank waits
    long in a collective. Returns (every result, how many items this rank did itself)."""
    mine = [todo[i] for i in share(len(todo), rank, world)]
    if world == 1 or exchange is None:
        return work(mine), len(mine)
    rounds = math.ceil(math.ceil(len(todo) / world) / round_size)  # the same count on every rank
    out: dict[K, V] = {}
    for r in range(rounds):
        done = work(mine[r * round_size : (r + 1) * round_size])
        for part in exchange([done]):
            out.update(part)
    return out, len(mine)
