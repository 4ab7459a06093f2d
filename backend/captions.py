"""Which files of a dataset a client may read and write: `resolve_image` confines a requested image
to the folders the config trains on, and `save_caption` writes the caption file that belongs to one.

A request is a string a browser may have sent, so it is checked as text before it touches the file
system: no NUL or other control characters, no backslashes, no percent-encoding (`%2e%2e`), no `..`
component, an image extension. Then it is resolved (symlinks followed) and accepted only when the
file it names lies directly in one of the dataset's subset folders (train_data_dir's
`<repeats>_<class>` folders, reg_data_dir's, each dataset.subsets image_dir; the folders discovery
reads, which are not recursive) and is an image discovery would list. A symlink in a dataset folder
that points elsewhere is refused.

Torch-free and GUI-free: the GUI server and the CLI import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backend import dataset as D
from backend.checkpoints import fsync_dir
from backend.config import TrainingConfig

BACKUP_DIR = ".lathe-caption-backups"
MAX_REQUEST = 4096  # characters
MAX_CAPTION = 20_000  # characters; a caption is a line of tags, not a document
_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_ID = re.compile(r"^(\d{1,6}):([^/]+)$")  # an entry id: "<subset index>:<file name>"


class PathRefused(ValueError):
    """A requested dataset path was not accepted; the message says why, in plain words."""


@dataclass(frozen=True)
class Located:
    """An accepted image: the subset folder it lies in (resolved), its name as listed there, and the
    subset it belongs to."""

    folder: Path
    name: str
    subset_index: int
    subset: D.Subset

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def entry_id(self) -> str:
        return entry_id(self.subset_index, self.name)


def entry_id(subset_index: int, name: str) -> str:
    """The id the Dataset view gives an image: `<subset index>:<file name>`."""
    return f"{subset_index}:{name}"


def _check_text(requested: object) -> str:
    """The request as text, refused before any file-system access when it could smuggle a path."""
    if not isinstance(requested, str) or not requested.strip():
        raise PathRefused("no image path given")
    s = requested
    shown = repr(s[:80])
    if len(s) > MAX_REQUEST:
        raise PathRefused(f"image path is too long ({len(s)} characters)")
    if "\0" in s or any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise PathRefused(f"image path {shown} contains a NUL or control character")
    if "\\" in s:
        raise PathRefused(f"image path {shown} contains a backslash; use / between folders")
    if _ENCODED.search(s):
        raise PathRefused(f"image path {shown} contains percent-encoded characters; send the plain name")
    if ".." in Path(s).parts:
        raise PathRefused(f"image path {shown} contains '..'")
    if Path(s).suffix.lower() not in D.IMAGE_EXTS:
        raise PathRefused(f"{shown} is not an image file (allowed: {', '.join(sorted(D.IMAGE_EXTS))})")
    return s


Folder = tuple[Path, int, D.Subset]  # (resolved folder, index into the resolved subsets, subset)


def dataset_folders(cfg: TrainingConfig) -> list[Folder]:
    """Every subset folder of the config that exists, resolved, with its subset and its index."""
    try:
        subsets, _ = D.resolve_subsets(cfg.dataset)
    except D.DatasetError as e:
        raise PathRefused(str(e)) from None
    out = []
    for index, sub in enumerate(subsets):
        with contextlib.suppress(OSError, RuntimeError):
            folder = Path(sub.image_dir).resolve(strict=True)
            if folder.is_dir():
                out.append((folder, index, sub))
    return out


def _candidates(s: str, folders: list[Folder], cfg: TrainingConfig) -> list[Path]:
    """The files a request may mean: an entry id, an absolute path, or a path relative to a subset
    folder, to train_data_dir / reg_data_dir, or to the working folder (as config paths are)."""
    m = _ID.match(s)
    if m:
        index = int(m.group(1))
        hits = [folder / m.group(2) for folder, i, _ in folders if i == index]
        if not hits:
            raise PathRefused(f"image id {s!r}: the dataset has no subset {index}")
        return hits
    p = Path(s)
    if p.is_absolute():
        return [p]
    roots = [folder for folder, _, _ in folders]
    roots += [Path(d).expanduser() for d in (cfg.dataset.train_data_dir, cfg.dataset.reg_data_dir) if d]
    return [root / p for root in roots] + [p]


def _accept(candidate: Path, folders: list[Folder]) -> Located | str | None:
    """The image when the candidate lies directly in a dataset folder, also once its links are
    followed; None when no such file exists; else why it is refused."""
    try:
        real = candidate.resolve(strict=True)
        parent = candidate.parent.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    hit = next(((folder, i, sub) for folder, i, sub in folders if folder == parent), None)
    if hit is None:
        return f"{candidate} is not in one of the dataset's image folders"
    folder, index, sub = hit
    if real.parent != folder:
        return f"{candidate} is a link that points outside its dataset folder"
    if candidate.name.startswith(".") or real.name.startswith(".") or real.suffix.lower() not in D.IMAGE_EXTS:
        return f"{candidate} is not a dataset image (hidden, or not an image file)"
    if not real.is_file():
        return f"{candidate} is not a file"
    return Located(folder, candidate.name, index, sub)


def locate(cfg: TrainingConfig, requested: str) -> Located:
    """The dataset image a request names (see the module docstring), or PathRefused."""
    s = _check_text(requested)
    folders = dataset_folders(cfg)
    if not folders:
        raise PathRefused("the dataset has no image folder that exists")
    found: dict[Path, Located] = {}
    refused: list[str] = []
    for cand in _candidates(s, folders, cfg):
        hit = _accept(cand, folders)
        if isinstance(hit, Located):
            found.setdefault(hit.path, hit)
        elif hit:
            refused.append(hit)
    if not found:
        raise PathRefused(refused[0] if refused else f"no dataset image {s!r}")
    if len(found) > 1:
        ids = ", ".join(sorted(loc.entry_id for loc in found.values()))
        raise PathRefused(f"{s!r} names images in more than one dataset folder; use its id ({ids})")
    return next(iter(found.values()))


def resolve_image(cfg: TrainingConfig, requested: str) -> Path:
    """The resolved path of a dataset image (see the module docstring for what is accepted); raises
    PathRefused otherwise."""
    return locate(cfg, requested).path.resolve(strict=True)


# ------------------------------------------------------------------------------------ caption files
def caption_path(loc: Located) -> Path:
    """The caption file training reads for the image: same folder, the subset's caption_extension."""
    ext = loc.subset.caption_extension
    cap = loc.folder / (Path(loc.name).stem + ext)
    if ext.lower() in D.IMAGE_EXTS or ".." in ext or cap.parent != loc.folder or cap.name == loc.name:
        raise PathRefused(f"caption_extension {ext!r} would not name a caption file next to {loc.name}")
    return cap


def _refuse_link(path: Path, what: str) -> None:
    if path.is_symlink():
        raise PathRefused(f"{what} {path} is a symbolic link; not written")
    if path.exists() and not path.is_file():
        raise PathRefused(f"{what} {path} exists and is not a regular file; not written")


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (never an existing file, never through a link) with `data`, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def backup_caption(cap: Path) -> Path:
    """Copy the caption's current content to `<folder>/.lathe-caption-backups/<caption name>.<time>.bak`
    (a new file each time, never one that exists). The .bak suffix keeps backups out of the dataset
    fingerprint, which reads files with the caption extension."""
    folder = cap.parent / BACKUP_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise PathRefused(f"{folder} is not a plain folder; the caption was not changed")
    folder.mkdir(exist_ok=True)
    old = cap.read_bytes()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"
    for n in range(1000):
        target = folder / f"{cap.name}.{stamp}{'' if n == 0 else f'-{n}'}.bak"
        try:
            _write_new(target, old)
        except FileExistsError:
            continue
        fsync_dir(folder)
        return target
    raise PathRefused(f"could not find a free backup name in {folder}")


def save_caption(cfg: TrainingConfig, image: str, text: str) -> Path:
    """Write the caption of one dataset image (an entry id or a path, confined as resolve_image),
    atomically: a temp file in the same folder, fsync, os.replace. An existing caption with other
    content is first copied to a backup (backup_caption). Returns the caption file's path."""
    if not isinstance(text, str):
        raise PathRefused("the caption must be text")
    if "\0" in text or len(text) > MAX_CAPTION:
        raise PathRefused(f"the caption must be text without NUL characters, at most {MAX_CAPTION} characters")
    loc = locate(cfg, image)
    meta = D.read_metadata(loc.folder, [])
    if loc.name in meta:
        raise PathRefused(f"{loc.path} takes its caption from {loc.folder / 'metadata.jsonl'}, which wins over a "
                          "caption file; edit that file instead")
    cap = caption_path(loc)
    _refuse_link(cap, "caption file")
    data = text.encode("utf-8")
    mode = 0o644
    if cap.exists():
        if cap.read_bytes() == data:
            return cap
        mode = stat.S_IMODE(cap.stat().st_mode)
        backup_caption(cap)
    fd, tmp = tempfile.mkstemp(prefix=f".{cap.name}.", suffix=".tmp", dir=cap.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        _refuse_link(cap, "caption file")  # checked again just before the swap
        os.replace(tmp, cap)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(cap.parent)
    return cap
