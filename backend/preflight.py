"""Checks that need the file system, done before a process is started (validation cannot do them:
a preset is valid on any machine, a launch only where its files are).

`preflight` is the one function behind the GUI's Validate, its Start and Resume, and the CLI's
`train` and `resume`: what it refuses never starts. Torch-free: the GUI imports it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from backend import launcher, resources
from backend.config import LaunchConfig, ModelConfig, TrainingConfig
from backend.model_family import FAMILY_NAMES, ModelReadError, detect_family
from backend.resume import IMAGE_EXTS, plan_resume

# What the recipe supports: one process, or plain DDP on GPUs or CPUs. A sharded optimizer (DeepSpeed,
# FSDP) would be saved as rank 0's shard, so those are refused until the recipe handles them.
SUPPORTED_DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
REPEATS_RE = re.compile(r"^(\d+)_(.*)$")  # kohya's <repeats>_<class words> folders, as backend/dataset.py reads them
MB = 2**20
DISK_FLOOR_BYTES = 256 * MB  # room for a typical run's LoRA exports, state folders, samples and logs


def preflight(cfg: TrainingConfig) -> list[str]:
    """`path: message` lines for everything that would make the launch fail at once."""
    out = model_problems(cfg.model)
    ds = cfg.dataset
    images = 0
    for field, folder in (("dataset.train_data_dir", ds.train_data_dir), ("dataset.reg_data_dir", ds.reg_data_dir)):
        if folder:
            found = image_count(Path(folder).expanduser())
            out += image_folder_problems(field, Path(folder).expanduser(), found)
            images += found or 0
    for i, sub in enumerate(ds.subsets):
        folder = Path(sub.image_dir).expanduser()
        found = images_in(folder) if folder.is_dir() else None
        out += subset_folder_problems(f"dataset.subsets.{i}.image_dir", folder, found)
        images += found or 0
    if ds.validation_data_dir:
        folder = Path(ds.validation_data_dir).expanduser()
        out += image_folder_problems("dataset.validation_data_dir", folder, image_count(folder))
    writable = output_problems(Path(cfg.output_dir).expanduser())
    out += writable or disk_problems(cfg, images or 0)
    out += gpu_problems(cfg.launch)
    if cfg.launch.accelerate_config_file:
        out += accelerate_config_problems(Path(cfg.launch.accelerate_config_file).expanduser())
    weights = cfg.network.network_weights
    if weights and not cfg.resume_from and not Path(weights).expanduser().is_file():
        out.append(f"network.network_weights: file {weights} does not exist")
    if cfg.resume_from and not Path(cfg.resume_from).expanduser().is_dir():
        out.append(f"resume_from: checkpoint folder {cfg.resume_from} does not exist")
    return out


def start_problems(cfg: TrainingConfig) -> list[str]:
    """Why `cfg` cannot start (`path: message` lines), or []: the preflight and, for a resume, the
    resume plan's refusals. The GUI's Validate shows exactly these, its Start and the run queue
    refuse on exactly these."""
    problems = preflight(cfg)
    if cfg.resume_from and not problems:
        problems = [f"resume_from: {r}" for r in plan_resume(cfg.resume_from, launcher.absolutize(cfg)).refused]
    return problems


def model_problems(model: ModelConfig) -> list[str]:
    """The base model exists, is a diffusers folder or a single checkpoint file, and (when
    `model.family` is not auto) is of that family."""
    field = "model.pretrained_model"
    path = Path(model.pretrained_model).expanduser()
    if not path.exists():
        return [f"{field}: {path} does not exist"]
    if path.is_dir() and not (path / "model_index.json").is_file():
        return [f"{field}: {path} is a folder without model_index.json (not a diffusers model)"]
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return [f"{field}: {path} is neither a diffusers folder nor a .safetensors/.ckpt file"]
    try:
        found = detect_family(path)
    except ModelReadError as e:
        return [f"{field}: {e}"]
    if found is None or model.family in ("auto", found):
        return []
    want = FAMILY_NAMES.get(model.family, model.family)
    return [f"model.family: set to {model.family}, but {path} is an {FAMILY_NAMES[found]} model; "
            f"set the family to auto or choose an {want} model"]


def image_count(folder: Path) -> int | None:
    """How many images the trainer will find in `folder` (None when it is not a folder): those in its
    `<repeats>_<name>/` sub-folders (repeats 0 skipped) when it has such folders, else those in it.
    Counted by file extension: an unreadable image still counts (the trainer skips it with a warning)."""
    if not folder.is_dir():
        return None
    try:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and REPEATS_RE.match(p.name)]
        if subdirs:
            return sum(images_in(d) for d in subdirs if int(REPEATS_RE.match(d.name).group(1)) > 0)
        return images_in(folder)
    except OSError:
        return 0


def images_in(folder: Path) -> int:
    """The images directly in a folder (by extension)."""
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
                   and p.is_file())
    except OSError:
        return 0


def subset_folder_problems(field: str, folder: Path, images: int | None) -> list[str]:
    """A listed subset's folder holds its images itself (it is not expanded into repeats folders)."""
    if images is None:
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        return [f"{field}: folder {folder} {what}"]
    if images == 0:
        looks_kohya = any(p.is_dir() and REPEATS_RE.match(p.name) for p in folder.iterdir())
        hint = (" (its sub-folders look like kohya '<repeats>_<name>' folders: give it as dataset.train_data_dir or "
                "dataset.reg_data_dir instead)" if looks_kohya else "")
        return [f"{field}: no images in {folder}{hint}"]
    return []


def image_folder_problems(field: str, folder: Path, images: int | None) -> list[str]:
    if images is None:
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        return [f"{field}: folder {folder} {what}"]
    if images == 0:
        exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTS))
        return [f"{field}: no images in {folder} (expected <repeats>_<name>/ sub-folders holding {exts} images, "
                "or images in the folder itself)"]
    return []


def output_problems(output_dir: Path) -> list[str]:
    """The output folder is a writable folder, or can be created (its nearest existing parent is one)."""
    field = "output_dir"
    if output_dir.exists():
        if not output_dir.is_dir():
            return [f"{field}: {output_dir} is a file, not a folder"]
        if not os.access(output_dir, os.W_OK | os.X_OK):
            return [f"{field}: folder {output_dir} is not writable"]
        return []
    parent = output_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [f"{field}: {output_dir} cannot be created: {parent} is a file, not a folder"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{field}: {output_dir} cannot be created: folder {parent} is not writable"]
    return []


def planned_disk_bytes(cfg: TrainingConfig, images: int) -> int:
    """A rough lower bound of the disk space a run needs: a fixed floor for its saves (the size of a
    LoRA file and its optimizer state depends on the model's layers, which only the trainer knows),
    plus the latent cache when it is kept on disk (every image at the full training resolution, as
    float32 latents, twice with random flips)."""
    ds = cfg.dataset
    need = DISK_FLOOR_BYTES
    if ds.cache_latents and ds.cache_latents_to_disk:
        channels = _latent_channels(Path(cfg.model.pretrained_model).expanduser())
        variants = 2 if ds.random_flip else 1
        need += images * variants * channels * (ds.resolution // 8) ** 2 * 4
    return need


def disk_problems(cfg: TrainingConfig, images: int) -> list[str]:
    d = resources.disk(Path(cfg.output_dir).expanduser())
    if d is None:
        return []
    need = planned_disk_bytes(cfg, images)
    if d["free_mb"] * MB >= need:
        return []
    return [f"output_dir: only {d['free_mb']:.0f} MB free in {d['path']}; the planned saves need about "
            f"{need / MB:.0f} MB; free some space or choose another output folder"]


def gpu_problems(launch: LaunchConfig) -> list[str]:
    """When `launch.device` is cuda: a GPU is present (NVML or nvidia-smi, as the resource monitor
    reads them), the listed gpu_ids exist, and this machine has a GPU for each of its processes."""
    if launch.device != "cuda":
        return []
    found = resources.gpus()
    if not found:
        return ["launch.device: cuda is chosen but no NVIDIA GPU was found on this machine "
                "(nvidia-smi and NVML see none); choose cpu or auto"]
    have = sorted(g["index"] for g in found)
    ids = [int(i) for i in launch.gpu_ids.split(",")] if launch.gpu_ids and launch.gpu_ids != "all" else have
    missing = [i for i in ids if i not in have]
    if missing:
        return [f"launch.gpu_ids: GPU {', '.join(map(str, missing))} not found; this machine has GPU "
                f"{', '.join(map(str, have))}"]
    per_machine = launch.num_processes // launch.num_machines
    if not launch.accelerate_config_file and per_machine > len(ids):
        return [f"launch.num_processes: {per_machine} process(es) on this machine but only {len(ids)} GPU(s) "
                "to run them on; one process per GPU"]
    return []


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
    from backend import dataset as D

    ds = cfg.dataset
    if not ds.cache_latents:
        return None
    try:
        data = D.load(ds, cfg.training.seed, decode=False)
    except (D.DatasetError, OSError):
        return None
    items = data.items
    buckets = D.bucket_of_items(items, D.buckets_for(ds))
    channels = _latent_channels(Path(cfg.model.pretrained_model).expanduser())
    variants = 2 if any(s.random_flip for s in data.subsets) else 1
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
