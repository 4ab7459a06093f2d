"""Latents and text embeddings: encoded once (memory or disk cache) or per batch.

Latents use the VAE distribution's mean (not a sample), so the cached and the uncached paths train
on the same numbers and a run does not depend on when its latents were encoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from backend.dataset import Batch, ImageItem, load_pixels
from backend.image_pool import ordered_map
from backend.trainer.distributed import split_work
from backend.trainer.models import Components


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

    def __init__(self, vae: Any, items: list[ImageItem], buckets: list[tuple[int, int]], disk_dir: Path | None, model_id: str,
                 threads: int = 1):
        self.vae, self.items, self.buckets = vae, items, buckets
        self.threads = threads  # for reading the images' pixels (image_pool); the latents do not depend on it
        self.disk_dir = disk_dir
        self.model_id = model_id
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.device: torch.device | None = None  # set when pinned: batch() copies to it

    def _key(self, i: int, flip: bool) -> str:
        it = self.items[i]
        st = os.stat(it.path)
        raw = json.dumps([os.path.abspath(it.path), st.st_size, st.st_mtime_ns, self.buckets[i], flip, self.model_id])
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def fill(self, flips: tuple[bool, ...], batch_size: int = 8, rank: int = 0, world: int = 1,
             exchange: Callable[[list[Any]], list[Any]] | None = None) -> tuple[int, int]:
        """Encode every (image, flip) not cached yet, batching images of the same bucket. Under
        several processes each rank encodes its share and `exchange` (gather_object) shares the
        results, so every rank holds every latent. Returns (encoded by this rank, read from disk)."""
        missing = [(i, flip) for i in range(len(self.items)) for flip in flips if not self._from_disk(i, flip)]
        hits = len(self.items) * len(flips) - len(missing)
        if world > 1 and exchange is not None:  # a rank on its own disk may miss what another has
            missing = sorted({key for part in exchange([missing]) for key in part})
        todo = sorted(missing, key=lambda k: (self.buckets[k[0]], k[1], k[0]))
        done, mine = split_work(todo, rank, world, lambda part: self._encode(part, batch_size), exchange)
        for key, latent in done.items():
            self._to_disk(*key, latent)  # every rank: a machine with a disk of its own keeps its cache too
            self.latents[key] = latent
        return mine, hits

    def _encode(self, keys: list[tuple[int, bool]], batch_size: int) -> dict[tuple[int, bool], torch.Tensor]:
        """Encode `keys` in batches of one bucket: each chunk of up to batch_size images is read once
        (its mirror image is the same pixels reversed, bit for bit what Pillow's flip gives) and encoded
        unflipped, then flipped."""
        flips_of: dict[tuple[int, int], dict[int, list[bool]]] = {}
        for i, flip in keys:
            flips_of.setdefault(self.buckets[i], {}).setdefault(i, []).append(flip)
        chunks = [(bucket, idx[k : k + batch_size]) for bucket, per in sorted(flips_of.items())
                  for idx in [sorted(per)] for k in range(0, len(idx), batch_size)]

        def mirror(chw: np.ndarray) -> np.ndarray:  # kept in load_pixels' memory layout (HWC under CHW strides),
            return np.ascontiguousarray(chw.transpose(1, 2, 0)[:, ::-1]).transpose(2, 0, 1)  # which the VAE's kernels see

        def read(job: tuple[int, tuple[int, int]]) -> dict[bool, np.ndarray]:
            i, bucket = job
            flips = flips_of[bucket][i]
            plain = load_pixels(self.items[i], bucket, flips == [True])
            return {f: mirror(plain) if f and flips != [True] else plain for f in flips}

        # the next chunks' pixels are read on other threads while the VAE encodes this one
        pixels_of = ordered_map(read, ((i, bucket) for bucket, part in chunks for i in part),
                                self.threads, ahead=batch_size + self.threads)
        out = {}
        try:
            for _, part in chunks:
                read_part = [(i, next(pixels_of)) for i in part]
                for flip in (False, True):
                    members = [(i, px[flip]) for i, px in read_part if flip in px]
                    if not members:
                        continue
                    lat = encode_pixels(self.vae, torch.from_numpy(np.stack([px for _, px in members]))).cpu()
                    for (i, _), latent in zip(members, lat, strict=True):
                        out[(i, flip)] = latent.clone()
        finally:
            pixels_of.close()  # the reading threads end here, also when an image or the VAE failed
        return out

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
        if path.exists():
            return  # written by another rank sharing this disk (the same numbers)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks sharing a disk never share a temp name
        save_file({"latent": latent}, str(tmp))
        os.replace(tmp, path)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latents.values())

    def place(self, device: torch.device, budget_bytes: int) -> str:
        """Where the cache lives for training: on the device when it fits the budget (no copy per
        step), else in pinned CPU memory (each batch copied without blocking). Returns where."""
        if device.type != "cuda":
            return "cpu"
        if self.nbytes <= budget_bytes:
            self.latents = {k: v.to(device) for k, v in self.latents.items()}
            return "gpu"
        self.latents = {k: v.pin_memory() for k, v in self.latents.items()}
        self.device = device
        return "pinned cpu"

    def batch(self, b: Batch) -> torch.Tensor:
        """The latents of a batch, on the device when the cache is there or pinned (non-blocking copies)."""
        if self.device is not None:
            return torch.stack([self.latents[(s.item, s.flip)].to(self.device, non_blocking=True) for s in b.samples])
        return torch.stack([self.latents[(s.item, s.flip)] for s in b.samples])


class FrozenOutputs:
    """A frozen text encoder that its family calls as `encoder(ids)[0]` (T5-XXL in SD3 and Flux.1),
    with the output for each row of token ids computed once, when a run trains the other encoders.

    Filled in one pass over the run's fixed captions (TextEncoder.memoize_frozen: sorted, in chunks,
    the same on a fresh run and on its resume, so both train on the same numbers); a call whose rows
    are all memoized costs a lookup instead of a forward pass. Any other call (a sample prompt, a
    caption the fill did not see) runs the module as before and memoizes nothing; where the module
    was parked on the CPU after the fill (CUDA runs), that output is brought to `device`, where the
    memoized rows are and a step reads them."""

    def __init__(self, module: Any):
        self.module = module
        self.memo: dict[bytes, torch.Tensor] = {}
        self.device: torch.device | None = None  # where the outputs belong (the module's device at the fill)
        self._recording: dict[bytes, torch.Tensor] | None = None

    def parameters(self) -> Any:
        return self.module.parameters()

    @staticmethod
    def keys(ids: torch.Tensor) -> list[bytes]:
        """The rows' memo keys. In a training step the ids are on the CPU (the family sends them to the
        module's device, and on CUDA a memoized module is parked on the CPU), so no device sync."""
        return [row.tobytes() for row in ids.detach().cpu().numpy()]

    def __call__(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keys = self.keys(ids)
        if self._recording is None and not args and not kwargs and keys and all(k in self.memo for k in keys):
            return (torch.stack([self.memo[k] for k in keys]),)
        out = self.module(ids, *args, **kwargs)
        if self._recording is not None:
            self._recording.update((k, row.detach().cpu().clone()) for k, row in zip(keys, out[0], strict=True))
        if self.device is not None and out[0].device != self.device:
            return (out[0].to(self.device),)
        return out

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[bytes, torch.Tensor]]:
        """Every output row computed inside the block, by its token ids."""
        self._recording = {}
        try:
            yield self._recording
        finally:
            self._recording = None


class TextEncoder:
    """Caption -> (context, pooled). With frozen encoders and fixed captions, each caption is encoded
    once; when the run trains some encoders, the frozen ones its family can memoize (FrozenOutputs)
    are run once per caption and the trained ones every step.

    `encoders` are what a training step calls (the DDP wrappers of trained encoders); `bare()` is the
    same encoder over the plain modules, for evaluation and sampling on one rank."""

    def __init__(self, comps: Components, clip_skip: int, cache: bool, encoders: list[Any] | None = None,
                 max_token_length: int = 75):
        self.comps, self.clip_skip, self.cache, self.max_token_length = comps, clip_skip, cache, max_token_length
        self.encoders = list(encoders) if encoders is not None else list(comps.text_encoders)
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.frozen: dict[int, FrozenOutputs] = {}  # by encoder index

    @classmethod
    def for_training(cls, comps: Components, training: Any, cache: bool, encoders: list[Any] | None = None) -> TextEncoder:
        """The encoder of a run's `training` section (clip_skip, max_token_length): training, evaluation,
        `verify` and samples all encode text through one of these."""
        return cls(comps, training.clip_skip, cache, encoders, training.max_token_length)

    def bare(self) -> TextEncoder:
        out = TextEncoder(self.comps, self.clip_skip, self.cache, max_token_length=self.max_token_length)
        out._memo, out.frozen = self._memo, self.frozen  # a frozen encoder has no DDP wrapper to leave out
        return out

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoders = [self.frozen.get(i, te) for i, te in enumerate(self.encoders)]
        return self.comps.spec.encode_text(self.comps, captions, self.clip_skip, self.max_token_length, encoders)

    def memoize_frozen(self, indices: list[int], captions: set[str], rank: int = 0, world: int = 1,
                       exchange: Callable[[list[Any]], list[Any]] | None = None) -> int:
        """Run the frozen encoders `indices` once over `captions` and keep their outputs (FrozenOutputs);
        under several processes each rank runs its share and `exchange` shares them. Returns how many
        captions this rank encoded."""
        self.frozen = {i: FrozenOutputs(self.comps.text_encoders[i]) for i in indices}
        modules = self.comps.text_encoders
        plain = [self.frozen.get(i, te) for i, te in enumerate(modules)]  # no DDP wrapper: no collective per chunk

        def work(part: list[str]) -> dict[str, dict[int, dict[bytes, torch.Tensor]]]:
            out: dict[str, dict[int, dict[bytes, torch.Tensor]]] = {}
            modes = [m.training for m in modules]
            try:
                for m in modules:
                    m.eval()  # a trained encoder's LoRA dropout stays off (and draws no random numbers)
                for k in range(0, len(part), 32):
                    chunk = part[k : k + 32]
                    with contextlib.ExitStack() as stack, torch.no_grad():
                        rows = {i: stack.enter_context(f.recording()) for i, f in self.frozen.items()}
                        self.comps.spec.encode_text(self.comps, chunk, self.clip_skip, self.max_token_length, plain)
                    out[chunk[0]] = rows  # one entry per chunk: its rows by token ids
            finally:
                for m, mode in zip(modules, modes, strict=True):
                    m.train(mode)
            return out

        done, mine = split_work(sorted(captions), rank, world, work, exchange)
        for f in self.frozen.values():
            f.device = next(f.parameters()).device  # rows kept where a step reads them
        for rows in done.values():
            for i, part in rows.items():
                self.frozen[i].memo.update((k, row.to(self.frozen[i].device)) for k, row in part.items())
        return mine

    def precompute(self, captions: set[str], rank: int = 0, world: int = 1,
                   exchange: Callable[[list[Any]], list[Any]] | None = None) -> int:
        """Encode the captions not memoized yet; under several processes each rank encodes its share
        and `exchange` (gather_object) shares them. Returns how many this rank encoded."""
        todo = sorted(captions - set(self._memo))
        done, mine = split_work(todo, rank, world, self._encode_all, exchange)
        dev = next(self.comps.text_encoders[0].parameters()).device  # kept where a step reads them
        self._memo.update({c: (ctx.to(dev), None if pooled is None else pooled.to(dev)) for c, (ctx, pooled) in done.items()})
        return mine

    def __len__(self) -> int:
        return len(self._memo)

    def _encode_all(self, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        out = {}
        for k in range(0, len(captions), 32):
            part = captions[k : k + 32]
            with torch.no_grad():
                ctx, pooled = self.encode(part)
            for j, cap in enumerate(part):
                out[cap] = (ctx[j].cpu().clone(), None if pooled is None else pooled[j].cpu().clone())
        return out

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache:
            self.precompute(set(captions))
            ctx = torch.stack([self._memo[c][0].to(device) for c in captions])
            if self._memo[captions[0]][1] is None:  # a family without a pooled embedding
                return ctx, None
            return ctx, torch.stack([self._memo[c][1].to(device) for c in captions])
        return self.encode(captions)
