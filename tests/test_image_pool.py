"""Images read on several threads (backend/image_pool.py): the dataset's start-up check and the
latent cache's pixels give the same result, in the same order, on one thread or several."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import dataset as D
from backend.image_pool import image_threads, ordered_map


def test_ordered_map_keeps_the_order_bounds_its_window_and_raises_at_the_failing_items_turn():
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.02 if x % 3 else 0.001)  # out of order completion
        if x == 13:
            raise ValueError("item 13 is bad")
        return x * x

    results = ordered_map(slow_square, range(20), threads=3, ahead=5)
    assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
    time.sleep(0.2)  # the threads may run ahead, but only within the window
    assert max(started) <= 3 + 5
    assert [next(results) for _ in range(9)] == [x * x for x in range(4, 13)]
    with pytest.raises(ValueError, match="item 13"):
        next(results)
    assert list(ordered_map(lambda x: -x, range(7), threads=1)) == [-x for x in range(7)]
    assert 1 <= image_threads(2) <= image_threads(1) <= 16


def _photo(path: Path, seed: int, size=(96, 80)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)


def test_discovery_on_several_threads_finds_what_one_thread_finds(tmp_path):
    folder = tmp_path / "3_sks cat"
    folder.mkdir()
    for i in range(40):
        _photo(folder / f"{i:02d}.png", i, size=(64 + i, 96 - i))
        if i % 4 == 0:
            (folder / f"{i:02d}.txt").write_text(f"caption {i}")
    (folder / "17.png").write_bytes((folder / "17.png").read_bytes()[:300])  # truncated: decoding fails
    (folder / "29.png").write_bytes(b"not an image")
    one, many = D.discover(tmp_path, threads=1), D.discover(tmp_path, threads=4)
    assert many.items == one.items and many.warnings == one.warnings
    assert len(one.items) == 38 and len(one.warnings) == 2
    assert "17.png" in one.warnings[0] and "29.png" in one.warnings[1]
    assert one.items[5].size == (69, 91) and one.items[4].caption == "caption 4"


def test_latent_cache_is_bitwise_the_same_on_one_thread_and_several(demo, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from backend.trainer.caching import LatentCache, encode_pixels

    vae = AutoencoderKL.from_pretrained(demo / "model" / "vae").eval()
    for i in range(11):
        _photo(tmp_path / f"{i:02d}.png", 100 + i, size=(64 + 8 * (i % 3), 64))
    items = D.discover(tmp_path, threads=1).items
    buckets = [(64, 64) if i % 2 else (72, 56) for i in range(len(items))]
    caches = []
    for threads in (1, 3):
        cache = LatentCache(vae, items, buckets, None, model_id="demo", threads=threads)
        assert cache.fill((False, True), batch_size=4) == (22, 0)
        caches.append(cache.latents)
    assert caches[0].keys() == caches[1].keys() and len(caches[0]) == 22
    assert all(torch.equal(caches[0][k], caches[1][k]) for k in caches[0])
    assert caches[0][(1, False)].shape[-2:] == (8, 8) and caches[0][(0, True)].shape[-2:] == (7, 9)
    # Each image is read once for both flips: the mirror is the same pixels reversed, what Pillow's flip gives.
    for i in (0, 1):
        mirrored = D.load_pixels(items[i], buckets[i], True)
        assert np.array_equal(mirrored, D.load_pixels(items[i], buckets[i], False)[:, :, ::-1])
        alone = encode_pixels(vae, torch.from_numpy(mirrored[None]))[0]
        torch.testing.assert_close(caches[0][(i, True)], alone, rtol=1e-4, atol=1e-5)  # another batch: last bits only
