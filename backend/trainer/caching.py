"""Latents and text embeddings: encoded once (memory or disk cache) or per batch.

Latents use the VAE distribution's mean (not a sample), so the cached and the uncached paths train
on the same numbers and a run does not depend on when its latents were encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from backend.trainer.data import Batch, ImageItem, load_pixels
from backend.trainer.models import Components, encode_tokens, tokenize


class PixelBatches(torch.utils.data.Dataset):
    """Loads the pixels of planned batches (in DataLoader workers when num_workers > 0)."""

    def __init__(self, items: list[ImageItem], batches: list[Batch]):
        self.items, self.batches = items, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        b = self.batches[i]
        return torch.from_numpy(np.stack([load_pixels(self.items[s.item], b.bucket, s.flip) for s in b.samples]))


@torch.no_grad()
def encode_pixels(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    latents = dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


class LatentCache:
    """(item index, flipped) -> latent [C, h, w] on the CPU, optionally backed by files on disk."""

    def __init__(self, vae: Any, items: list[ImageItem], buckets: list[tuple[int, int]], disk_dir: Path | None, model_id: str):
        self.vae, self.items, self.buckets = vae, items, buckets
        self.disk_dir = disk_dir
        self.model_id = model_id
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}

    def _key(self, i: int, flip: bool) -> str:
        it = self.items[i]
        st = os.stat(it.path)
        raw = json.dumps([os.path.abspath(it.path), st.st_size, st.st_mtime_ns, self.buckets[i], flip, self.model_id])
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def fill(self, flips: tuple[bool, ...], batch_size: int = 8, progress: Any = None) -> None:
        """Encode every (image, flip) not cached yet, batching images of the same bucket."""
        todo: dict[tuple[tuple[int, int], bool], list[int]] = {}
        for i in range(len(self.items)):
            for flip in flips:
                if not self._from_disk(i, flip):
                    todo.setdefault((self.buckets[i], flip), []).append(i)
        for (bucket, flip), idx in sorted(todo.items()):
            for k in range(0, len(idx), batch_size):
                part = idx[k : k + batch_size]
                pixels = torch.from_numpy(np.stack([load_pixels(self.items[i], bucket, flip) for i in part]))
                lat = encode_pixels(self.vae, pixels).cpu()
                for i, latent in zip(part, lat, strict=True):
                    self.latents[(i, flip)] = latent.clone()
                    self._to_disk(i, flip, self.latents[(i, flip)])
                if progress is not None:
                    progress(len(part))

    def _from_disk(self, i: int, flip: bool) -> bool:
        if self.disk_dir is None:
            return False
        path = self.disk_dir / f"{self._key(i, flip)}.safetensors"
        try:
            self.latents[(i, flip)] = load_file(str(path))["latent"]
            return True
        except (FileNotFoundError, OSError, KeyError, RuntimeError):
            return False
        except Exception:  # a damaged cache file is re-encoded, never trusted
            return False

    def _to_disk(self, i: int, flip: bool, latent: torch.Tensor) -> None:
        if self.disk_dir is None:
            return
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        path = self.disk_dir / f"{self._key(i, flip)}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"latent": latent}, str(tmp))
        os.replace(tmp, path)

    def to(self, device: torch.device) -> None:
        self.latents = {k: v.to(device) for k, v in self.latents.items()}

    def batch(self, b: Batch) -> torch.Tensor:
        return torch.stack([self.latents[(s.item, s.flip)] for s in b.samples])


class TextEncoder:
    """Caption -> (context, pooled). With frozen encoders and fixed captions, each caption is encoded once.

    `encoders` are what a training step calls (the DDP wrappers of trained encoders); `bare()` is the
    same encoder over the plain modules, for evaluation and sampling on one rank."""

    def __init__(self, comps: Components, clip_skip: int, cache: bool, encoders: list[Any] | None = None):
        self.comps, self.clip_skip, self.cache = comps, clip_skip, cache
        self.encoders = list(encoders) if encoders is not None else list(comps.text_encoders)
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def bare(self) -> TextEncoder:
        out = TextEncoder(self.comps, self.clip_skip, self.cache)
        out._memo = self._memo
        return out

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_tokens(self.comps, tokenize(self.comps, captions), self.clip_skip, self.encoders)

    def precompute(self, captions: set[str]) -> None:
        todo = sorted(captions - set(self._memo))
        for k in range(0, len(todo), 32):
            part = todo[k : k + 32]
            with torch.no_grad():
                ctx, pooled = self.encode(part)
            for j, cap in enumerate(part):
                self._memo[cap] = (ctx[j].clone(), None if pooled is None else pooled[j].clone())

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache:
            self.precompute(set(captions))
            ctx = torch.stack([self._memo[c][0].to(device) for c in captions])
            if not self.comps.is_sdxl:
                return ctx, None
            return ctx, torch.stack([self._memo[c][1].to(device) for c in captions])
        return self.encode(captions)
