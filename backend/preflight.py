"""Checks that need the file system, done before a process is started (validation cannot do them:
a preset is valid on any machine, a launch only where its files are)."""

from __future__ import annotations

import json
from pathlib import Path

from backend.config import TrainingConfig

# What the recipe supports: one process, or plain DDP on GPUs or CPUs. A sharded optimizer (DeepSpeed,
# FSDP) would be saved as rank 0's shard, so those are refused until the recipe handles them.
SUPPORTED_DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU")


def preflight(cfg: TrainingConfig) -> list[str]:
    """`path: message` lines for everything that would make the launch fail at once."""
    out = []
    model = Path(cfg.model.pretrained_model).expanduser()
    if not model.exists():
        out.append(f"model.pretrained_model: {model} does not exist")
    elif model.is_dir() and not (model / "model_index.json").is_file():
        out.append(f"model.pretrained_model: {model} is a folder without model_index.json (not a diffusers model)")
    data = Path(cfg.dataset.train_data_dir).expanduser()
    if not data.is_dir():
        out.append(f"dataset.train_data_dir: folder {data} does not exist")
    if cfg.dataset.validation_data_dir and not Path(cfg.dataset.validation_data_dir).expanduser().is_dir():
        out.append(f"dataset.validation_data_dir: folder {cfg.dataset.validation_data_dir} does not exist")
    if cfg.launch.accelerate_config_file:
        out += accelerate_config_problems(Path(cfg.launch.accelerate_config_file).expanduser())
    weights = cfg.network.network_weights
    if weights and not cfg.resume_from and not Path(weights).expanduser().is_file():
        out.append(f"network.network_weights: file {weights} does not exist")
    if cfg.resume_from and not Path(cfg.resume_from).expanduser().is_dir():
        out.append(f"resume_from: checkpoint folder {cfg.resume_from} does not exist")
    return out


def accelerate_config_problems(path: Path) -> list[str]:
    """The file exists, parses (YAML or JSON), and asks for a distributed type Lathe supports."""
    field = "launch.accelerate_config_file"
    if not path.is_file():
        return [f"{field}: {path} does not exist"]
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - OSError, JSON's ValueError, yaml's YAMLError: all say the same
        return [f"{field}: {path} is not a readable accelerate config ({type(e).__name__}: {str(e)[:120]})"]
    if not isinstance(data, dict):
        return [f"{field}: {path} does not hold an accelerate config (expected a mapping of settings)"]
    raw = data.get("distributed_type", "NO")
    kind = "NO" if raw is False else str(raw).upper()  # YAML 1.1 reads an unquoted NO as false
    if kind not in SUPPORTED_DISTRIBUTED:
        return [f"{field}: distributed_type {kind} is not supported; Lathe trains with one process or plain "
                f"DDP ({', '.join(SUPPORTED_DISTRIBUTED)}). DeepSpeed and FSDP would save a sharded optimizer "
                "as one rank's shard."]
    return []


def latent_cache_bytes(cfg: TrainingConfig) -> tuple[int, int, int] | None:
    """(bytes, images, variants per image) the latent cache will hold, from the image headers (no
    decoding); None when latents are not cached or the folder cannot be read."""
    from backend.trainer import data as D

    ds = cfg.dataset
    if not ds.cache_latents:
        return None
    try:
        items = D.discover(ds.train_data_dir, ds.caption_extension, decode=False).items
    except D.DatasetError:
        return None
    buckets = D.bucket_of_items(items, D.buckets_for(ds), ds.resolution)
    channels = _latent_channels(Path(cfg.model.pretrained_model).expanduser())
    variants = 2 if ds.random_flip else 1
    return sum(channels * (w // 8) * (h // 8) * 4 for w, h in buckets) * variants, len(items), variants


def latent_cache_estimate(cfg: TrainingConfig) -> str | None:
    """The latent cache's size as one line for people, shown before a run starts."""
    found = latent_cache_bytes(cfg)
    if found is None:
        return None
    total, n, variants = found
    size = f"{total / 2**20:.1f} MB" if total >= 2**20 else f"{total / 1024:.0f} KB"
    return (f"latent cache: about {size} for {n} images x {variants} variant(s) (in GPU memory when it fits "
            "dataset.latent_cache_gpu_mb, else in pinned CPU memory)")


def _latent_channels(model: Path) -> int:
    try:
        return int(json.loads((model / "vae" / "config.json").read_text(encoding="utf-8")).get("latent_channels", 4))
    except (OSError, ValueError, TypeError):
        return 4  # every SD 1.x/2.x/XL VAE
