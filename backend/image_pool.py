"""Images read on several threads at once, results in their order.

Pillow releases the GIL while it decodes and resizes, so threads read a dataset's images in
parallel: the trainer's start-up check (each image decoded once, so that a truncated file fails
before step 1, not mid-epoch) and the pixels of the latent cache, loaded while the VAE encodes the
batch before. The order of results never depends on the threads, so what is built from them
(items, buckets, latents) is the same with one thread or sixteen.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 16  # beyond this the disk, not the decoder, is what limits on the machines we know


def image_threads(local_processes: int = 1) -> int:
    """Threads for reading images: this process's share of the cores it may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores // max(1, local_processes)))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int | None = None) -> Iterator[R]:
    """fn over items on `threads` threads, yielded in the items' order, with at most `ahead` results
    (default 4 per thread) computed or computing beyond the one being consumed (bounded memory).
    An exception in fn is raised here, at its item's turn. One thread: a plain map, no pool."""
    if threads <= 1:
        yield from map(fn, items)
        return
    ahead = max(1, ahead if ahead is not None else 4 * threads)
    source = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="images") as pool:
        pending: deque[Future[R]] = deque(pool.submit(fn, x) for x in islice(source, ahead))
        try:
            while pending:
                head = pending.popleft()
                pending.extend(pool.submit(fn, x) for x in islice(source, 1))  # one in for the one going out
                yield head.result()
        finally:
            for f in pending:  # the consumer stopped early or fn failed: drop what nobody will read
                f.cancel()
